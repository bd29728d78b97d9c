"""KSPOracle against hand-written petsc4py solves (real PETSc)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from solvers import KSPOracle, LinearSystem, PETSc
from tests.systems import laplacian_1d, poisson_2d


def hand_written_solve(task: LinearSystem, ksp_type: str, pc_type: str, rtol: float, options=None, x0=None):
    """The plain petsc4py idiom a user would write, recording the unpreconditioned residuals."""
    A, b = task.petsc(PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setType(ksp_type)
    ksp.getPC().setType(pc_type)
    ksp.setTolerances(rtol=rtol, atol=1e-50, max_it=10_000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    prefix = "hand_"
    ksp.setOptionsPrefix(prefix)
    for name, value in (options or {}).items():
        PETSc.Options().setValue(f"-{prefix}{name}", value)
    ksp.setFromOptions()
    for name in options or {}:
        PETSc.Options().delValue(f"-{prefix}{name}")
    history = []
    ksp.setMonitor(lambda _k, _i, r: history.append(r))
    x = A.createVecRight()
    if x0 is not None:
        x.setArray(x0)
        ksp.setInitialGuessNonzero(True)
    ksp.solve(b, x)
    result = ksp.getIterationNumber(), np.array(history), ksp.getConvergedReason()
    ksp.destroy()
    return result


@pytest.mark.parametrize("ksp_type, pc_type, options", [
    ("cg", "jacobi", {}), ("cg", "none", {}), ("richardson", "sor", {"pc_sor_omega": 1.5}),
    ("gmres", "ilu", {}),
])
def test_matches_hand_written_petsc4py(ksp_type, pc_type, options):
    task = poisson_2d(16, seed=1)
    expected_its, expected_history, expected_reason = hand_written_solve(task, ksp_type, pc_type, 1e-6, options)
    outcome = KSPOracle(ksp_type=ksp_type, pc_type=pc_type, rtol=1e-6)(task, options)
    assert outcome.iterations == expected_its
    assert outcome.reason == expected_reason and outcome.converged
    np.testing.assert_allclose(outcome.residuals, expected_history, rtol=1e-12)
    assert len(outcome.residuals) == outcome.iterations + 1
    assert outcome.residuals[0] == pytest.approx(np.linalg.norm(task.b), rel=1e-12)


def test_cg_jacobi_on_poisson2d_32_takes_the_expected_iterations():
    """DESIGN.md measured 86 iterations for CG + Jacobi on Poisson2D(32), random rhs, rtol 1e-6."""
    outcome = KSPOracle()(poisson_2d(32, seed=0))
    assert outcome.converged and 70 <= outcome.iterations <= 100


def test_exact_initial_guess_converges_in_zero_iterations():
    task = poisson_2d(12, seed=2)
    outcome = KSPOracle(return_solution=True)(task, {"x0": task.x_ref})
    assert outcome.iterations == 0 and outcome.converged
    np.testing.assert_allclose(outcome.solution, task.x_ref, rtol=1e-12)


def test_initial_guess_is_honoured():
    task = poisson_2d(12, seed=3)
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi", rtol=1e-6)
    x0 = task.x_ref + 1e-3 * np.random.default_rng(0).standard_normal(task.size)
    outcome = oracle(task, {"x0": x0})
    expected_r0 = np.linalg.norm(task.b - task.A @ x0)
    assert outcome.residuals[0] == pytest.approx(expected_r0, rel=1e-10)
    assert outcome.iterations < oracle(task).iterations


def test_options_never_leak_into_the_next_solve():
    task = poisson_2d(16, seed=4)
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", rtol=1e-6)
    fresh = KSPOracle(ksp_type="richardson", pc_type="sor", rtol=1e-6)(task)
    tuned = oracle(task, {"pc_sor_omega": 1.8})
    after = oracle(task)
    assert tuned.iterations != fresh.iterations
    assert after.iterations == fresh.iterations
    np.testing.assert_array_equal(after.residuals, fresh.residuals)
    assert not any(k.startswith(oracle.prefix) for k in PETSc.Options().getAll())


def test_solve_many_equals_one_by_one():
    task = poisson_2d(12, seed=5)
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor")
    rng = np.random.default_rng(1)
    settings = [{"x0": rng.standard_normal(task.size)}, {"pc_sor_omega": 1.3}, {"x0": rng.standard_normal(task.size)}]
    together = oracle.solve_many(task, settings)
    for setting, outcome in zip(settings, together):
        alone = oracle(task, setting)
        assert alone.iterations == outcome.iterations
        np.testing.assert_array_equal(alone.residuals, outcome.residuals)


def test_diverging_setting_is_a_failed_outcome_not_an_exception():
    task = LinearSystem(laplacian_1d(31), np.ones(31))
    outcome = KSPOracle(ksp_type="richardson", pc_type="jacobi")(task, {"ksp_richardson_scale": 1.8})
    assert not outcome.converged and outcome.failed
    assert outcome.reason == PETSc.KSP.ConvergedReason.DIVERGED_DTOL


def test_zero_pivot_is_a_failed_outcome():
    A = sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))
    outcome = KSPOracle(ksp_type="preonly", pc_type="lu", options={"pc_factor_mat_ordering_type": "natural"})(
        LinearSystem(A, np.ones(2)))
    assert outcome.failed and not outcome.converged
    assert outcome.reason < 0 or outcome.error


def test_unknown_option_raises_naming_it():
    task = poisson_2d(8)
    with pytest.raises(ValueError, match="pc_sor_omgea"):
        KSPOracle(pc_type="sor")(task, {"pc_sor_omgea": 1.2})
    with pytest.raises(ValueError, match="pc_sor_omega"):
        KSPOracle(pc_type="jacobi")(task, {"pc_sor_omega": 1.2})


@pytest.mark.parametrize("x0, message", [(np.full(64, np.nan), "non-finite"), (np.zeros(7), "shape")])
def test_bad_initial_guess_raises(x0, message):
    with pytest.raises(ValueError, match=message):
        KSPOracle()(poisson_2d(8), {"x0": x0})


def test_mismatched_or_non_square_systems_raise():
    with pytest.raises(ValueError, match="square"):
        LinearSystem(sp.csr_matrix(np.ones((3, 4))), np.ones(3))
    with pytest.raises(ValueError, match="entries"):
        LinearSystem(laplacian_1d(5), np.ones(4))


def test_from_ksp_reproduces_the_users_configuration():
    task = poisson_2d(16, seed=6)
    A, b = task.petsc(PETSc.COMM_SELF)
    user = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    user.setOptionsPrefix("user_")
    PETSc.Options().setValue("-user_pc_sor_omega", "1.6")
    user.setOperators(A)
    user.setType("richardson")
    user.getPC().setType("sor")
    user.setTolerances(rtol=1e-5, max_it=500)
    user.setFromOptions()
    user.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    user.setMonitor(lambda *_: None)  # without a monitor Richardson+SOR skips its convergence test (rich.c)
    x = A.createVecRight()
    user.solve(b, x)
    oracle = KSPOracle.from_ksp(user)
    PETSc.Options().delValue("-user_pc_sor_omega")
    assert (oracle.ksp_type, oracle.pc_type, oracle.rtol, oracle.max_it) == ("richardson", "sor", 1e-5, 500)
    assert oracle(task).iterations == user.getIterationNumber()
