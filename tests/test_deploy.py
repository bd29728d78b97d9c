"""Deployment on a user's own KSP: as strict as training, and nothing left behind (real PETSc)."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from metasolve import Interval, MetaSolver, Space, Vector
from solvers import KSPOracle, LinearSystem, PETSc
from solvers.deploy import applied
from solvers.features import operator_features, structural_features
from solvers.options import unused_options
from tests.mpi_run import REPO_ROOT, run_mpi
from tests.systems import poisson_2d

RTOL, MAX_IT = 1e-6, 5000


def users_ksp(task: LinearSystem, prefix: str = "mycode_", ksp_type: str = "richardson", pc_type: str = "sor",
              monitor: bool = False) -> PETSc.KSP:
    """An ordinary petsc4py solve, written without knowing about PETSc's Richardson trap."""
    A, _ = task.petsc(PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOptionsPrefix(prefix)
    ksp.setOperators(A)
    ksp.setType(ksp_type)
    ksp.getPC().setType(pc_type)
    ksp.setTolerances(rtol=RTOL, max_it=MAX_IT)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    if monitor:
        ksp.setMonitor(lambda *_: None)
    ksp.setFromOptions()
    return ksp


def solve(ksp: PETSc.KSP, task: LinearSystem, x: PETSc.Vec | None = None) -> int:
    _, b = task.petsc(PETSc.COMM_SELF)
    ksp.solve(b, x if x is not None else b.duplicate())
    return ksp.getIterationNumber()


def oracle(**options) -> KSPOracle:
    return KSPOracle(ksp_type="richardson", pc_type="sor", rtol=RTOL, max_it=MAX_IT, **options)


def test_a_deployed_option_solves_as_in_training_with_the_convergence_test_kept():
    task = poisson_2d(16, seed=1)
    ksp = users_ksp(task)
    plain = solve(ksp, task)
    assert plain == MAX_IT  # the trap: Richardson + SOR without a monitor never tests convergence
    with applied(ksp, {"pc_sor_omega": 1.7}):
        deployed = solve(ksp, task)
    expected = oracle()(task, {"pc_sor_omega": 1.7})
    assert deployed == expected.iterations < MAX_IT
    assert expected.iterations != oracle()(task).iterations  # ω mattered
    with applied(ksp, {"pc_sor_omega": 1.7}):
        assert solve(ksp, task) == deployed
    assert len(ksp.getMonitor()) == 1  # attached once, however often a setting is applied


def test_the_options_database_is_left_exactly_as_found():
    task = poisson_2d(12, seed=2)
    database = PETSc.Options()
    database.setValue("-mycode_pc_sor_omega", "1.2")  # the user's own value, read by their setFromOptions
    try:
        ksp = users_ksp(task)
        before = database.getAll()
        assert unused_options("", ["mycode_pc_sor_omega"]) == []
        with applied(ksp, {"pc_sor_omega": 1.7, "pc_sor_its": 1}):
            assert database.getString("-mycode_pc_sor_omega") == "1.7"
            solve(ksp, task)
        assert database.getAll() == before
        assert unused_options("", ["mycode_pc_sor_omega"]) == []  # its used-flag restored, too
    finally:
        database.delValue("-mycode_pc_sor_omega")


def test_a_misspelt_learned_option_fails_exactly_as_in_training_and_leaves_nothing():
    task = poisson_2d(8, seed=3)
    with pytest.raises(ValueError) as training:
        oracle()(task, {"pc_sor_omgea": 1.7})
    ksp = users_ksp(task)
    before = PETSc.Options().getAll()
    with pytest.raises(ValueError) as deployment:
        with applied(ksp, {"pc_sor_omgea": 1.7}):
            solve(ksp, task)
    assert str(deployment.value) == str(training.value)
    assert "pc_sor_omgea" in str(deployment.value)
    assert PETSc.Options().getAll() == before


def test_an_initial_guess_is_copied_and_the_nonzero_flag_restored():
    task = poisson_2d(12, seed=4)
    ksp = users_ksp(task, monitor=True)
    x = task.petsc(PETSc.COMM_SELF)[0].createVecRight()
    guess = task.x_ref + 1e-3 * np.random.default_rng(0).standard_normal(task.size)
    with applied(ksp, {"x0": guess}, x):
        assert ksp.getInitialGuessNonzero()
        np.testing.assert_array_equal(x.getArray(), guess)
        deployed = solve(ksp, task, x)
    assert not ksp.getInitialGuessNonzero()
    assert deployed == oracle()(task, {"x0": guess}).iterations < oracle()(task).iterations
    with pytest.raises(ValueError, match="x0"):
        with applied(ksp, {"x0": guess}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with applied(ksp, {"x0": guess[:-1]}, x):
            pass


def test_options_read_at_setup_take_effect_on_a_ksp_that_already_solved():
    task = poisson_2d(16, seed=5)
    ksp = users_ksp(task, ksp_type="cg", pc_type="bjacobi")
    default = solve(ksp, task)  # set up with ILU(0) blocks
    with applied(ksp, {"sub_pc_factor_levels": 2}):
        deployed = solve(ksp, task)
    cg = KSPOracle(ksp_type="cg", pc_type="bjacobi", rtol=RTOL, max_it=MAX_IT)
    assert deployed == cg(task, {"sub_pc_factor_levels": 2}).iterations != default


def test_meta_solver_apply_deploys_a_prediction_on_a_users_ksp(tmp_path):
    task = poisson_2d(8, seed=6)
    task.features = torch.ones(3, dtype=torch.float64)
    space = Space({"x0": Vector((8, 8), basis="sine", modes=2, scale=1.0)})
    meta = MetaSolver(3, space, depth=0)
    bias = torch.tensor([0.3, -0.1, 0.2, 0.05], dtype=torch.float64)
    with torch.no_grad():
        meta.net[-1].bias.copy_(bias)
    meta.save(tmp_path / "meta.pt")
    setting = MetaSolver.load(tmp_path / "meta.pt").predict(task)
    np.testing.assert_array_equal(setting["x0"], space.decode(bias)["x0"])
    ksp = users_ksp(task, monitor=True)
    x = task.petsc(PETSc.COMM_SELF)[0].createVecRight()
    with MetaSolver.apply(setting, ksp, x):
        deployed = solve(ksp, task, x)
    assert deployed == oracle()(task, setting).iterations


def test_an_apply_never_entered_warns_that_nothing_was_applied():
    task = poisson_2d(8, seed=6)
    ksp = users_ksp(task)
    with pytest.warns(RuntimeWarning, match="never applied"):
        MetaSolver.apply({"pc_sor_omega": 1.5}, ksp)
        gc.collect()


def test_features_of_a_users_system_are_the_training_features():
    task = poisson_2d(8, seed=7)
    A, b = task.petsc(PETSc.COMM_SELF)
    space = Space({"pc_sor_omega": Interval(1.0, 1.99)})
    meta = MetaSolver(len(operator_features(A, b)), space, depth=0, features="operator")
    np.testing.assert_array_equal(meta.features_of(A, b).numpy(), operator_features(A, b))
    users_system = LinearSystem(task.A, task.b)  # no features: a user's own (A, b)
    theta = meta(torch.from_numpy(operator_features(A, b))[None, :])[0]
    assert meta.predict(users_system) == space.decode(theta)
    structural = MetaSolver(len(structural_features(A, b)), space, depth=0, features="structural")
    np.testing.assert_array_equal(structural.features_of(A, b).numpy(), structural_features(A, b))
    family_trained = MetaSolver(3, space, depth=0, features="poisson2d")
    with pytest.raises(ValueError, match="poisson2d"):
        family_trained.predict(LinearSystem(task.A, task.b))


@pytest.mark.mpi
def test_distributed_wrap_and_deploy_on_two_ranks():
    result = run_mpi(REPO_ROOT / "tests" / "mpi_scripts" / "deploy_distributed.py", n=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK distributed wrap and deploy", result.stdout + result.stderr


def test_a_predicted_options_file_makes_a_users_unmonitored_ksp_solve_as_in_training(tmp_path):
    """`metasolve predict --matrix` for a model trained through a KSPOracle: the options file alone
    (the training solver and tolerances, the learned ω, the monitor Richardson + SOR needs) turns
    a user's bare KSP, with no monitor of its own, into exactly the training solve."""
    from metasolve.app.predict import Delivery, predict, save_for_program
    from solvers.executable import linear_system_files

    task = poisson_2d(16, seed=8)
    A, b = task.petsc(PETSc.COMM_SELF)
    features = operator_features(A, b)
    meta = MetaSolver(len(features), Space({"pc_sor_omega": Interval(1.0, 1.95)}), depth=0, features="operator")
    with torch.no_grad():
        meta.net[-1].bias.fill_(1.2)
    save_for_program(tmp_path / "meta.pt", meta, Delivery.for_oracle(oracle()))
    files = linear_system_files(task, str(tmp_path))
    options_file, setting = predict(tmp_path / "meta.pt", tmp_path / "job", matrix=files[1], rhs=files[3],
                                    prefix="mycode_")
    database = PETSc.Options()
    before = database.getAll()
    database.insertString(f"-options_file {options_file}")
    try:
        ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
        ksp.setOptionsPrefix("mycode_")
        ksp.setOperators(A)
        ksp.setFromOptions()
        assert ksp.getType() == "richardson" and ksp.getPC().getType() == "sor"
        deployed = solve(ksp, task)
    finally:
        for name in set(database.getAll()) - set(before):
            database.delValue(f"-{name}")
    assert database.getAll() == before
    assert deployed == oracle()(task, setting).iterations < MAX_IT
