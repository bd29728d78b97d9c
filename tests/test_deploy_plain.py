"""Deployment without torch: the plain-array model equals the torch one, options files reproduce
training on the real programs, and nothing a model file or a user passes can inject options."""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metasolve import Choice, Integer, Interval, LogInterval, MetaSolver, Space, Vector
from metasolve.method.plain_model import FORMAT_VERSION, load_plain, plain_path
from metasolve.app.predict import (OPTIONS_FILE, Delivery, delivery_path, needs_monitor, parse_arguments, predict,
                                   predict_table, run_predict, save_for_program, write_petsc_vector)
from solvers import ArgumentFeatures, KSPOracle, LinearSystem, PETSc, ProgramTask
from solvers.executable import ExecutableOracle, child_environment, linear_system_files
from solvers.program_task import YoungOmega
from solvers.program_task import parse_arguments as solvers_parse_arguments
from tests.mpi_run import REPO_ROOT
from tests.systems import poisson_2d

LEGACY_DIR = REPO_ROOT / "examples" / "legacy_solver"
HEAT = {"ksp_type": "richardson", "pc_type": "sor", "pc_sor_forward": None, "ksp_norm_type": "unpreconditioned",
        "ksp_rtol": 1e-6, "ksp_atol": 1e-50, "ksp_divtol": 1e4, "ksp_max_it": 10_000}
HEAT_FEATURES = ArgumentFeatures(("n", "kappa", "dt"), log=("n", "kappa", "dt"))
INJECTION = "sor\n-ksp_view_solution binary:x.bin"


@pytest.fixture(scope="module")
def programs() -> Path:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(LEGACY_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the legacy programs failed:\n{result.stdout}\n{result.stderr}"
    return LEGACY_DIR


def every_part_space() -> Space:
    return Space({"pc_sor_omega": Interval(1.0, 1.95), "ksp_rtol": LogInterval(1e-8, 1e-2),
                  "x0": Vector((6, 5), basis="sine", modes=3, decay=2.0, scale=0.5),
                  "weights": Vector(7, basis="identity", scale=2.0), "ksp_type": Choice(["cg", "gmres", 3]),
                  "solver": Choice([{"pc_type": "sor", "pc_sor_its": 2}, {"pc_type": "jacobi"}]),
                  "ksp_gmres_restart": Integer(5, 60)})


def random_meta(space: Space, width: int = 4, depth: int = 2, seed: int = 0, **kwargs) -> MetaSolver:
    """A meta-solver with random weights and normaliser: every layer and part matters."""
    torch.manual_seed(seed)
    meta = MetaSolver(width, space, hidden=8, depth=depth, **kwargs)
    with torch.no_grad():
        for parameter in meta.net.parameters():
            parameter.copy_(torch.randn_like(parameter))
        meta.feature_mean.copy_(torch.randn(width, dtype=torch.float64))
        meta.feature_scale.copy_(torch.rand(width, dtype=torch.float64) + 0.5)
    return meta


def assert_same_setting(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for name, value in reference.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(ours[name], value, rtol=1e-12, atol=1e-12)
        elif isinstance(value, float):
            assert ours[name] == pytest.approx(value, rel=1e-12)
        else:
            assert ours[name] == value and type(ours[name]) is type(value)


@pytest.mark.parametrize("depth", [0, 2])
def test_the_plain_model_is_the_torch_model(tmp_path, depth):
    space = every_part_space()
    meta = random_meta(space, depth=depth)
    meta.save(tmp_path / "meta.pt")
    plain = load_plain(plain_path(tmp_path / "meta.pt"))
    features = torch.randn(50, 4, dtype=torch.float64) * 2
    with torch.no_grad():
        theta = meta(features).numpy()
    np.testing.assert_allclose(plain.theta(features.numpy()), theta, rtol=1e-12, atol=1e-12)
    decoded = plain.settings(features.numpy())
    for row, setting in zip(theta, decoded):
        assert_same_setting(setting, space.decode(torch.from_numpy(row)))
    choices = {(s["ksp_type"], s["pc_type"], s["ksp_gmres_restart"]) for s in decoded}
    assert len(choices) > 3  # the random network exercises several choices and integers


def test_an_anchored_part_is_decoded_as_the_torch_model_decodes_it(tmp_path):
    """raw θ_part += encode(feature value): the untrained model deploys the formula in the feature."""
    space = Space({"pc_sor_omega": Interval(1.0, 2.0), "ksp_rtol": LogInterval(1e-8, 1e-2)})
    meta = random_meta(space, width=3, depth=1, anchor={"pc_sor_omega": 1, "ksp_rtol": 2})
    meta.save(tmp_path / "meta.pt")
    plain = load_plain(plain_path(tmp_path / "meta.pt"))
    features = np.column_stack([np.linspace(-1, 1, 9), np.linspace(1.05, 1.95, 9), np.logspace(-7, -3, 9)])
    outside = np.array([[0.0, 2.5, 0.0], [0.0, 0.3, -1.0], [0.0, 2.0, 1.0]])  # clipped into the interval
    for rows in (features, outside):
        with torch.no_grad():
            theta = meta(torch.from_numpy(rows)).numpy()
        np.testing.assert_allclose(plain.theta(rows), theta, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="anchor of 'pc_sor_omega'"):
        plain.theta(np.array([[0.0, np.nan, 1e-5]]))
    zero = MetaSolver(3, space, depth=0, anchor={"pc_sor_omega": 1, "ksp_rtol": 2})
    zero.save(tmp_path / "zero.pt")
    settings = load_plain(plain_path(tmp_path / "zero.pt")).settings(features)
    np.testing.assert_allclose([s["pc_sor_omega"] for s in settings], features[:, 1], rtol=1e-12)
    np.testing.assert_allclose([s["ksp_rtol"] for s in settings], features[:, 2], rtol=1e-12)


def test_unknown_format_versions_are_refused(tmp_path):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), depth=0)
    meta.save(tmp_path / "meta.pt")
    plain = plain_path(tmp_path / "meta.pt")
    with np.load(plain) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays.pop("header")))
    assert header["format_version"] == FORMAT_VERSION
    header["format_version"] = 99
    np.savez(plain, header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_plain(plain)
    exported = meta.export()
    exported["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        MetaSolver.from_export(exported)
    delivery_path(tmp_path / "meta.pt").write_text(json.dumps({"format_version": 2, "prefix": "heat_"}))
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", ["-n", "4"], None, None, None, None) == 2
    assert not (tmp_path / "job").exists()


def test_an_old_delivery_file_still_loads_and_says_what_it_cannot_promise(tmp_path, capsys):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    meta.save(tmp_path / "meta.pt")
    delivery_path(tmp_path / "meta.pt").write_text(json.dumps(
        {"features": {"names": ["n", "kappa", "dt"], "log": ["n"]}, "prefix": "heat_", "guess_flag": "-x0"}))
    options_file, setting = predict(tmp_path / "meta.pt", tmp_path / "job", arguments=["-n", "8", "-kappa", "2",
                                                                                       "-dt", "0.1"])
    options = [line for line in options_file.read_text().splitlines() if not line.startswith("#")]
    assert options == [f"-heat_pc_sor_omega {setting['pc_sor_omega']!r}"]
    assert "records no training solver" in capsys.readouterr().err


# ------------------------------------------------------------------ injection and bad input

def test_a_choice_value_carrying_options_is_refused_everywhere(tmp_path, capsys):
    meta = MetaSolver(1, Space({"pc_type": Choice([INJECTION, "jacobi"])}), depth=0)
    with pytest.raises(ValueError, match="not a plain PETSc value"):
        meta.save(tmp_path / "meta.pt")  # refused when written ...
    assert not (tmp_path / "meta.pt").exists()
    torch.save({"meta_solver": meta.export()}, tmp_path / "crafted.pt")  # ... and when a crafted file is read,
    safe = MetaSolver(1, Space({"pc_type": Choice(["sor", "jacobi"])}), depth=0)
    safe.save(tmp_path / "safe.pt")
    with np.load(plain_path(tmp_path / "safe.pt")) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(str(arrays.pop("header")))
    header["space"]["parts"][0][1]["choices"][0] = INJECTION
    np.savez(tmp_path / "crafted2.plain.npz", header=np.array(json.dumps(header)), **arrays)
    for model in ("crafted.pt", "crafted2.plain.npz"):
        status = run_predict(tmp_path / model, tmp_path / "job", None, None, tmp_path / "A.bin", None, None)
        assert status == 2 and "not a plain PETSc value" in capsys.readouterr().err
        assert not (tmp_path / "job").exists()
    with pytest.raises(ValueError, match="not a plain PETSc value"):
        load_plain(tmp_path / "crafted2.plain.npz")
    with pytest.raises(ValueError, match="not an identifier"):
        MetaSolver(1, Space({"solver": Choice([{"pc_type": "sor", "-options_file": "x"}, {"pc_type": "lu"}])}),
                   depth=0).save(tmp_path / "bad.pt")
    for name, choices in (("options_file", ["a", "b"]), ("solver", [{"ksp_view_solution": "binary"}, {"pc_type": "lu"}])):
        bad = MetaSolver(1, Space({name: Choice(choices)}), depth=0)
        save_for_program(tmp_path / "bad.pt", bad, Delivery(ArgumentFeatures(("n",))))  # a name, not yet an option
        with pytest.raises(ValueError, match="not a solver setting a model may set"):
            predict(tmp_path / "bad.pt", tmp_path / "job", arguments=["-n", "4"])
        assert not (tmp_path / "job").exists()


def test_bad_prefixes_flags_and_base_options_are_refused(tmp_path, capsys):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    save_for_program(tmp_path / "meta.pt", meta, Delivery(HEAT_FEATURES, prefix="heat_"))
    arguments = ["-n", "8", "-kappa", "2", "-dt", "0.1"]
    for prefix in ("bad prefix!", "-heat_", "1heat", "heat_\n-options_file"):
        assert run_predict(tmp_path / "meta.pt", tmp_path / "job", arguments, None, None, None, prefix) == 2
        assert "invalid options prefix" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()
    for flag in ("x0", "-x0 /etc/passwd", "-options_file", "--x0", "-x0\n-pc_type"):
        with pytest.raises(ValueError, match="invalid option flag"):
            Delivery(guess_flag=flag)
    with pytest.raises(ValueError, match="not a plain PETSc value"):
        Delivery(base_options={"pc_type": INJECTION})
    with pytest.raises(ValueError, match="not a solver setting"):
        Delivery(base_options={"options_file": "/etc/passwd"})
    delivery_path(tmp_path / "meta.pt").write_text(json.dumps({"guess_flag": "-x0 -options_file /etc/passwd"}))
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", arguments, None, None, None, None) == 2
    assert "invalid option flag" in capsys.readouterr().err


def test_out_must_be_a_writable_directory(tmp_path, capsys):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    save_for_program(tmp_path / "meta.pt", meta, Delivery(HEAT_FEATURES, prefix="heat_"))
    arguments = ["-n", "8", "-kappa", "2", "-dt", "0.1"]
    (tmp_path / "file").write_text("a user's file\n")
    assert run_predict(tmp_path / "meta.pt", tmp_path / "file", arguments, None, None, None, None) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "a user's file\n"
    assert run_predict(tmp_path / "meta.pt", tmp_path / "file" / "job", arguments, None, None, None, None) == 2
    assert "cannot create the directory" in capsys.readouterr().err
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", arguments, None, None, None, None) == 0


def test_a_run_that_sets_another_solver_is_refused(tmp_path, programs, capsys):
    oracle = ExecutableOracle([str(programs / "heat_stepper")], options=HEAT, prefix="heat_")
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    save_for_program(tmp_path / "meta.pt", meta, Delivery.for_oracle(oracle, HEAT_FEATURES))
    arguments = ["-n", "8", "-kappa", "2", "-dt", "0.1"]
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", [*arguments, "-heat_pc_type", "jacobi"],
                       None, None, None, None) == 2
    assert "-heat_pc_type jacobi" in capsys.readouterr().err and not (tmp_path / "job").exists()
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", [*arguments, "-heat_pc_sor_omega", "1.1"],
                       None, None, None, None) == 2
    assert "learned" in capsys.readouterr().err
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", [*arguments, "-heat_pc_type", "sor"],
                       None, None, None, None) == 0  # the same solver, said again


def test_the_delivery_records_the_training_solver_and_the_evaluation_budget(programs):
    from solvers import IsolatedOracle
    from solvers.budget import Budget

    program = ExecutableOracle([str(programs / "heat_stepper")], options={**HEAT, "ksp_monitor": None},
                               prefix="heat_", guess_flag="-u0")
    delivery = Delivery.for_oracle(program, HEAT_FEATURES, budget=Budget(1e-8, max_it=500))
    assert (delivery.prefix, delivery.guess_flag) == ("heat_", "-u0")
    assert delivery.base_options == {"ksp_type": "richardson", "pc_type": "sor", "pc_sor_forward": "",
                                     "ksp_norm_type": "unpreconditioned", "ksp_rtol": "1e-08", "ksp_atol": "0.0",
                                     "ksp_divtol": "10000.0", "ksp_max_it": "500"}  # no monitor: it prints
    isolated = IsolatedOracle(functools.partial(KSPOracle, ksp_type="cg", pc_type="jacobi", rtol=1e-7))
    recorded = Delivery.for_oracle(isolated).base_options
    assert recorded["ksp_type"] == "cg" and recorded["pc_type"] == "jacobi" and recorded["ksp_rtol"] == "1e-07"
    assert Delivery.from_dict(delivery.to_dict()) == delivery


def test_argument_features_with_a_textbook_feature_are_computed_as_in_training():
    features = ArgumentFeatures(("n", "kappa"), ("kappa",), (YoungOmega(("da_grid_x", "da_grid_y"), -1),
                                                             YoungOmega(("n",), 1, "omega_n")))
    runs = [{"n": "12", "kappa": "0.5", "da_grid_x": "33", "da_grid_y": "17"},
            {"n": "40", "kappa": "3", "da_grid_x": "9", "da_grid_y": "65"}]
    plain = Delivery.from_dict(Delivery(features).to_dict()).features
    np.testing.assert_allclose(plain.table(runs), np.stack([features(r).numpy() for r in runs]), rtol=1e-15)
    with pytest.raises(ValueError, match="gives no grid spacing"):
        plain.table([{**runs[0], "da_grid_x": "1"}])
    with pytest.raises(ValueError, match="derived feature"):
        Delivery({"names": ["n"], "derived": [{"kind": "python", "grid": ["n"]}]})


def test_a_model_whose_training_an_options_file_cannot_carry_is_refused(tmp_path, capsys):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", ksp_factory=lambda A: PETSc.KSP().create())
    save_for_program(tmp_path / "meta.pt", meta, Delivery.for_oracle(oracle, HEAT_FEATURES))
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", ["-n", "8", "-kappa", "2", "-dt", "0.1"],
                       None, None, None, None) == 2
    assert "ksp_factory" in capsys.readouterr().err


# ------------------------------------------------------------------ files PETSc reads

@pytest.mark.parametrize("values", [np.array([1.5]), np.linspace(-3, 7, 257), np.array([1e-300, -2.5e300, 0.0])])
def test_the_guess_file_round_trips_through_petscs_vecload(tmp_path, values):
    path = tmp_path / "x0.bin"
    write_petsc_vector(path, values, int64=np.dtype(PETSc.IntType).itemsize == 8)
    viewer = PETSc.Viewer().createBinary(str(path), mode="r", comm=PETSc.COMM_SELF)
    vector = PETSc.Vec().load(viewer)
    viewer.destroy()
    np.testing.assert_array_equal(vector.getArray(), values)


def test_the_options_file_alone_reproduces_the_training_runs(tmp_path, programs):
    """The program gets its arguments and `-options_file` only (plus a reason line to read counts):
    base options, prefix and the monitor come from the file, and every step's iteration count is
    the training oracle's. Without the monitor line, Richardson + SOR runs to max_it."""
    heat_stepper = str(programs / "heat_stepper")
    oracle = ExecutableOracle([heat_stepper], options=HEAT, prefix="heat_")
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=3, depth=0)
    with torch.no_grad():
        meta.net[-1].weight.copy_(torch.tensor([[0.0, 0.6, 0.0]], dtype=torch.float64))
        meta.net[-1].bias.fill_(1.0)
    save_for_program(tmp_path / "heat.pt", meta, Delivery.for_oracle(oracle, HEAT_FEATURES))
    task = ProgramTask.create({"n": 12, "kappa": 3.0, "dt": 0.01, "steps": 3}, HEAT_FEATURES)
    options_file, setting = predict(tmp_path / "heat.pt", tmp_path / "job", arguments=task.argv())
    text = options_file.read_text()
    assert "-heat_ksp_type richardson" in text and "-heat_pc_sor_forward\n" in text
    assert "-heat_ksp_monitor ascii:/dev/null" in text

    def delivered(options: Path) -> list[int]:
        program = subprocess.run([heat_stepper, *task.argv(), "-options_file", str(options),
                                  "-heat_ksp_converged_reason", "-options_left"],
                                 capture_output=True, text=True, env=child_environment(), timeout=120)
        assert program.returncode == 0 and "Option left" not in program.stdout, program.stdout[-2000:]
        return [int(n) for n in re.findall(r"solve converged due to \w+ iterations (\d+)", program.stdout)]

    expected = oracle(task, setting)
    assert delivered(options_file) == [s.iterations for s in expected.solves]
    assert expected.iterations != oracle(task).iterations  # the learned ω mattered
    unmonitored = tmp_path / "unmonitored.opts"
    unmonitored.write_text("".join(line for line in text.splitlines(keepends=True) if "monitor" not in line))
    assert delivered(unmonitored) == [HEAT["ksp_max_it"]] * 3  # PETSc's trap the monitor line avoids


def test_the_matrix_route_needs_an_explicit_right_hand_side(tmp_path, programs, capsys):
    task = poisson_2d(8, seed=7)
    files = linear_system_files(task, str(tmp_path))
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", rtol=1e-6)
    from solvers.features import operator_features

    features = operator_features(*task.petsc(PETSc.COMM_SELF))
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95)}), width=len(features), depth=0,
                       features="operator")
    save_for_program(tmp_path / "meta.pt", meta, Delivery.for_oracle(oracle))
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", None, None, Path(files[1]), None, None) == 2
    assert "--matrix needs --rhs" in capsys.readouterr().err
    assert run_predict(tmp_path / "meta.pt", tmp_path / "job", None, None, Path(files[1]), Path(files[3]), None) == 0
    with_b = (tmp_path / "job" / OPTIONS_FILE).read_text()
    expected = meta.predict(LinearSystem(task.A, task.b, features=torch.from_numpy(features)))["pc_sor_omega"]
    omega = float(re.search(r"-pc_sor_omega (\S+)", with_b).group(1))
    assert omega == pytest.approx(expected, rel=1e-12)
    assert run_predict(tmp_path / "meta.pt", tmp_path / "ones", None, None, Path(files[1]), Path("ones"), None) == 0
    program = subprocess.run([str(programs / "legacy_solver"), *files, "-options_file",
                              str(tmp_path / "job" / OPTIONS_FILE), "-ksp_converged_reason", "-options_left"],
                             capture_output=True, text=True, env=child_environment(), timeout=60)
    assert program.returncode == 0 and "Option left" not in program.stdout, program.stdout[-2000:]
    iterations = int(re.search(r"iterations (\d+)", program.stdout).group(1))
    assert iterations == oracle(task, {"pc_sor_omega": omega}).iterations


# ------------------------------------------------------------------ many runs, cold start

def test_a_table_of_runs_gives_each_run_its_own_file(tmp_path):
    oracle_free = Delivery(HEAT_FEATURES, prefix="heat_", base_options={"ksp_type": "richardson", "pc_type": "sor"})
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95), "x0": Vector(5, basis="identity")}), width=3,
                       depth=1)
    save_for_program(tmp_path / "meta.pt", meta, oracle_free)
    table = tmp_path / "runs.csv"
    table.write_text("id,n,kappa,dt,steps\nrun-1,8,0.5,0.01,3\nrun_2,16,2,0.1,\n3,32,10,0.001,2\n")
    index, settings = predict_table(tmp_path / "meta.pt", table, tmp_path / "jobs")
    rows = index.read_text().splitlines()
    assert rows[0] == "id,options_file,pc_sor_omega" and len(rows) == 4
    for run_id, arguments in (("run-1", ["-n", "8", "-kappa", "0.5", "-dt", "0.01", "-steps", "3"]),
                              ("run_2", ["-n", "16", "-kappa", "2", "-dt", "0.1"]),
                              ("3", ["-n", "32", "-kappa", "10", "-dt", "0.001", "-steps", "2"])):
        single, setting = predict(tmp_path / "meta.pt", tmp_path / "single" / run_id, arguments=arguments)
        batch = (tmp_path / "jobs" / run_id / OPTIONS_FILE).read_text().splitlines()
        assert f"-x0 {(tmp_path / 'jobs' / run_id / 'x0.bin').resolve()}" in batch

        def options(lines: list[str]) -> list[str]:
            return [line for line in lines if not line.startswith(("#", "-x0 "))]

        assert options(batch) == options(single.read_text().splitlines())
        assert "-heat_ksp_monitor ascii:/dev/null" in batch
        np.testing.assert_allclose(load_vector(tmp_path / "jobs" / run_id / "x0.bin"), setting["x0"], rtol=1e-12)
    for bad, message in (("n,kappa,dt\n8,1,1\n", "'id'"), ("id,n,kappa,dt\n../x,8,1,1\n", "plain directory name"),
                         ("id,n,kappa,dt\na,8,1,1\na,8,1,1\n", "repeated"), ("id,n,kappa\na,8,1\n", "lack")):
        table.write_text(bad)
        with pytest.raises(ValueError, match=message):
            predict_table(tmp_path / "meta.pt", table, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def load_vector(path: Path) -> np.ndarray:
    viewer = PETSc.Viewer().createBinary(str(path), mode="r", comm=PETSc.COMM_SELF)
    try:
        return PETSc.Vec().load(viewer).getArray().copy()
    finally:
        viewer.destroy()


def test_the_arguments_route_imports_neither_torch_nor_petsc(tmp_path):
    meta = random_meta(Space({"pc_sor_omega": Interval(1.0, 1.95), "x0": Vector(5, basis="identity")}), width=3)
    save_for_program(tmp_path / "meta.pt", meta, Delivery(HEAT_FEATURES, prefix="heat_", base_options={}))
    (tmp_path / "runs.csv").write_text("id,n,kappa,dt\na,8,0.5,0.01\n")
    script = (f"import sys\nfrom pathlib import Path\nfrom metasolve.app.predict import run_predict\n"
              f"m = Path({str(tmp_path / 'meta.pt')!r})\n"
              f"assert run_predict(m, Path({str(tmp_path / 'one')!r}), ['-n', '8', '-kappa', '1', '-dt', '0.1'], "
              f"None, None, None, None) == 0\n"
              f"assert run_predict(m, Path({str(tmp_path / 'many')!r}), None, Path({str(tmp_path / 'runs.csv')!r}), "
              f"None, None, None) == 0\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'petsc4py', 'mpi4py', 'solvers')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    # solvers.text and solvers.arguments are shared with training; nothing that loads PETSc or torch
    assert result.stdout.strip().splitlines()[-1] == "['solvers', 'solvers.arguments', 'solvers.text']"
    assert (tmp_path / "one" / "x0.bin").is_file() and (tmp_path / "many" / "a" / OPTIONS_FILE).is_file()
    command = subprocess.run([sys.executable, "-X", "importtime", "-m", "metasolve", "predict", str(tmp_path / "meta.pt"),
                              "--out", str(tmp_path / "cli"), "--table", str(tmp_path / "runs.csv")],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert command.returncode == 0, command.stderr
    imported = [line.split("|")[-1].strip() for line in command.stderr.splitlines() if line.startswith("import time:")]
    assert "metasolve.app.predict" in imported  # the command's own imports, as a job script runs it
    assert not [m for m in imported if m.split(".")[0] in ("torch", "petsc4py", "mpi4py")]


def test_plain_helpers_agree_with_the_solvers_they_stand_in_for():
    tokens = ["-n", "48", "-kappa", "-0.3", "-flag", "-dt", "1e-3"]
    assert parse_arguments(tokens) == solvers_parse_arguments(tokens)
    assert needs_monitor({"ksp_type": "richardson", "pc_type": "sor"})
    assert needs_monitor({"pc_type": "sor"}) and needs_monitor({"ksp_type": "richardson"})
    assert not needs_monitor({"ksp_type": "cg", "pc_type": "sor"})
    assert not needs_monitor({"ksp_type": "richardson", "pc_type": "jacobi"})
    assert not needs_monitor({"ksp_type": "richardson", "pc_type": "sor", "ksp_richardson_scale": "0.9"})
    assert not needs_monitor({"ksp_type": "richardson", "pc_type": "sor", "ksp_monitor_true_residual": ""})
    from solvers.options import needs_monitor as solvers_needs_monitor

    for ksp in ("richardson", "cg", "gmres"):
        for pc in ("sor", "jacobi", "hypre", "ilu", "none"):
            for extra in ({}, {"ksp_richardson_scale": "0.5"}, {"ksp_monitor": ""}):
                options = {"ksp_type": ksp, "pc_type": pc, **extra}
                assert needs_monitor(options) >= solvers_needs_monitor(options)  # never misses the SOR trap
