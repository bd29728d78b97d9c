"""ExecutableOracle against KSPOracle, on the compiled legacy program and on canned output (real PETSc, real MPI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from solvers import KSPOracle, LinearSystem, PETSc
from solvers.executable import ExecutableOracle, child_environment
from solvers.monitor_parser import UnreadableOutput, parse_solve_output, unused_command_line_options
from tests.systems import laplacian_1d, poisson_2d

REPO = Path(__file__).resolve().parents[1]
LEGACY_DIR = REPO / "examples" / "legacy_solver"
# The oracles' common configuration. KSPOracle measures the unpreconditioned norm, so the program
# must test convergence on it too for the iteration counts to be comparable.
BASE = {"ksp_rtol": 1e-6, "ksp_atol": 1e-50, "ksp_divtol": 1e4, "ksp_max_it": 10_000,
        "ksp_norm_type": "unpreconditioned"}
# The program prints norms with 13 significant digits (%14.12e) and its CG history is the true
# residual where KSPOracle's is CG's recursive one; measured gap 4e-13, so 1e-9 leaves room for
# other BLAS builds while still catching any wrong iterate.
HISTORY_RTOL = 1e-9


@pytest.fixture(scope="session")
def legacy_solver() -> str:
    """Build the program with the top-level make's command (quick when up to date)."""
    result = subprocess.run(["make", "--no-print-directory", "-C", str(LEGACY_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building legacy_solver failed:\n{result.stdout}\n{result.stderr}"
    return str(LEGACY_DIR / "legacy_solver")


def legacy_oracle(path: str, ksp_type: str, pc_type: str, **kwargs) -> ExecutableOracle:
    return ExecutableOracle([path], options={**BASE, "ksp_type": ksp_type, "pc_type": pc_type}, **kwargs)


def assert_same_solve(ours, reference) -> None:
    assert ours.error is None, ours.error
    assert ours.iterations == reference.iterations
    assert ours.reason == reference.reason
    assert ours.converged == reference.converged and ours.hit_max_it == reference.hit_max_it
    np.testing.assert_allclose(ours.residuals, reference.residuals, rtol=HISTORY_RTOL)


def canned(tmp_path: Path, text: str) -> list[str]:
    """A command printing `text`; the oracle's appended arguments become ignored positional parameters."""
    path = tmp_path / "output.txt"
    path.write_text(text)
    return ["sh", "-c", 'cat "$0"', str(path)]


def no_arguments(task, directory):
    return []


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, waiting for its new parent to reap it) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


MONITOR_OUTPUT = """\
  Residual norms for sys_ solve.
  0 KSP unpreconditioned resid norm 1.000000000000e+00 true resid norm 1.000000000000e+00 ||r(i)||/||b|| 1.000000000000e+00
  1 KSP unpreconditioned resid norm 1.000000000000e-01 true resid norm 1.000000000001e-01 ||r(i)||/||b|| 1.000000000001e-01
  2 KSP unpreconditioned resid norm 1.000000000000e-02 true resid norm 1.000000000002e-02 ||r(i)||/||b|| 1.000000000002e-02
  Linear sys_ solve converged due to CONVERGED_RTOL iterations 2
"""


# ---------------------------------------------------------------- agreement with KSPOracle

@pytest.mark.parametrize("ksp_type, pc_type, setting", [
    ("cg", "jacobi", {}),
    ("richardson", "sor", {"pc_sor_omega": 1.5}),
    ("richardson", "sor", {"pc_sor_omega": np.float64(1.7), "pc_sor_forward": None}),
    ("gmres", "ilu", {}),
])
def test_agrees_with_ksp_oracle(legacy_solver, ksp_type, pc_type, setting):
    task = poisson_2d(16, seed=1)
    ours = legacy_oracle(legacy_solver, ksp_type, pc_type)(task, setting)
    reference = KSPOracle(ksp_type, pc_type, rtol=1e-6)(task, setting)
    assert reference.converged
    assert_same_solve(ours, reference)
    assert ours.seconds > 0


def test_agrees_on_a_variable_coefficient_diffusion_task(legacy_solver):
    from problems.diffusion import Diffusion

    task = Diffusion(n_range=14, contrast_range=2.0, seed=3).task(0)
    setting = {"pc_sor_omega": 1.85, "pc_sor_forward": None}
    ours = legacy_oracle(legacy_solver, "richardson", "sor")(task, setting)
    assert_same_solve(ours, KSPOracle("richardson", "sor", rtol=1e-6)(task, setting))


def test_fixed_iteration_budget_is_usable_data(legacy_solver):
    """The training costs' overrides: exactly k iterations, DIVERGED_ITS, not a failure."""
    task = poisson_2d(16, seed=2)
    budget = {"ksp_max_it": 15, "ksp_rtol": 0.0, "ksp_atol": 0.0}
    ours = legacy_oracle(legacy_solver, "cg", "jacobi")(task, budget)
    reference = KSPOracle("cg", "jacobi")(task, budget)
    assert_same_solve(ours, reference)
    assert ours.hit_max_it and not ours.failed
    assert ours.reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT and len(ours.residuals) == 16


def test_initial_guesses_and_solve_many(legacy_solver):
    task = poisson_2d(12, seed=3)
    rng = np.random.default_rng(0)
    close = task.x_ref + 1e-4 * rng.standard_normal(task.size)
    settings = [{"x0": close}, {"pc_sor_omega": 1.3}, {"x0": rng.standard_normal(task.size), "pc_sor_omega": 1.6}]
    ours = legacy_oracle(legacy_solver, "richardson", "sor").solve_many(task, settings)
    reference = KSPOracle("richardson", "sor", rtol=1e-6).solve_many(task, settings)
    for outcome, expected in zip(ours, reference):
        assert_same_solve(outcome, expected)
    assert ours[0].residuals[0] == pytest.approx(np.linalg.norm(task.b - task.A @ close), rel=1e-11)
    assert ours[0].iterations < ours[1].iterations


def test_divergence_is_a_failed_outcome_with_petscs_reason(legacy_solver):
    task = LinearSystem(laplacian_1d(31), np.ones(31))
    setting = {"ksp_richardson_scale": 1.8}
    ours = legacy_oracle(legacy_solver, "richardson", "jacobi")(task, setting)
    assert ours.failed and ours.reason == PETSc.KSP.ConvergedReason.DIVERGED_DTOL
    assert_same_solve(ours, KSPOracle("richardson", "jacobi")(task, setting))


def test_program_assembling_its_own_problem_from_parameters(legacy_solver, tmp_path):
    """task_args maps a task to the program's own command line; PETSc's -ksp_view_mat/-ksp_view_rhs
    (options, not code changes) export what it assembled, and KSPOracle on that agrees."""
    matrix, rhs = tmp_path / "A.bin", tmp_path / "b.bin"
    oracle = legacy_oracle(legacy_solver, "cg", "jacobi",
                           task_args=lambda task, directory: [f"-{k}" if i == 0 else str(v)
                                                              for k, v in task.items() for i in (0, 1)])
    ours = oracle({"n": 12, "contrast": 1.5, "seed": 3},
                  {"ksp_view_mat": f"binary:{matrix}", "ksp_view_rhs": f"binary:{rhs}"})
    A = PETSc.Mat().load(PETSc.Viewer().createBinary(str(matrix), "r", comm=PETSc.COMM_SELF))
    b = PETSc.Vec().load(PETSc.Viewer().createBinary(str(rhs), "r", comm=PETSc.COMM_SELF))
    assert A.getSize() == (144, 144) and A.isSymmetric(tol=1e-14)
    np.testing.assert_allclose(b.getArray(), 1 / 13 ** 2)
    assert_same_solve(ours, KSPOracle("cg", "jacobi", rtol=1e-6)(LinearSystem(A, b)))


def test_parallel_program_with_mpiexec(legacy_solver):
    """processes=2: the program runs on two ranks; CG + Jacobi does not depend on the layout."""
    task = poisson_2d(12, seed=4)
    ours = legacy_oracle(legacy_solver, "cg", "jacobi", processes=2)(task)
    assert_same_solve(ours, KSPOracle("cg", "jacobi", rtol=1e-6)(task))


def test_oracle_inside_an_mpi_job(legacy_solver, tmp_path):
    """Each rank of an mpiexec-launched Python runs its own program side by side; without the
    PMI_* variables stripped the child's MPI_Init would try to join the parent's job and abort."""
    script = tmp_path / "per_rank.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from solvers import KSPOracle
        from solvers._petsc import MPI
        from solvers.executable import ExecutableOracle
        from tests.systems import poisson_2d
        rank = MPI.COMM_WORLD.Get_rank()
        task = poisson_2d(10, seed=rank)
        options = {{**{BASE!r}, "ksp_type": "cg", "pc_type": "jacobi"}}
        ours = ExecutableOracle([{legacy_solver!r}], options=options)(task)
        reference = KSPOracle("cg", "jacobi", rtol=1e-6)(task)
        print(json.dumps([rank, ours.error, ours.iterations, reference.iterations]), flush=True)
    """))
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = {**child_environment(), "PYTHONPATH": str(REPO)}
    result = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    rows = sorted(json.loads(line) for line in result.stdout.splitlines() if line.startswith("["))
    assert [r[0] for r in rows] == [0, 1]
    for _, error, ours, reference in rows:
        assert error is None and ours == reference


def test_environment_options_do_not_leak_into_the_program(legacy_solver, monkeypatch):
    monkeypatch.setenv("PETSC_OPTIONS", "-ksp_type gmres -not_an_option 1")
    task = poisson_2d(10, seed=5)
    assert_same_solve(legacy_oracle(legacy_solver, "cg", "jacobi")(task), KSPOracle("cg", "jacobi", rtol=1e-6)(task))


# ---------------------------------------------------------------- misuse raises, failures are data

@pytest.mark.parametrize("pc_type, setting, name", [
    ("sor", {"pc_sor_omgea": 1.2}, "pc_sor_omgea"),
    ("jacobi", {"pc_sor_omega": 1.2}, "pc_sor_omega"),
])
def test_option_the_program_never_read_raises_naming_it(legacy_solver, pc_type, setting, name):
    with pytest.raises(ValueError, match=name):
        legacy_oracle(legacy_solver, "richardson", pc_type)(poisson_2d(8), setting)


def test_petsc_error_in_the_program_is_a_failed_outcome(legacy_solver):
    outcome = legacy_oracle(legacy_solver, "cg", "jacobi")(poisson_2d(8), {"ksp_type": "no_such_krylov"})
    assert outcome.failed and not outcome.converged
    assert "status" in outcome.error and "Unable to find requested KSP type no_such_krylov" in outcome.error


@pytest.mark.parametrize("command, message", [
    (["sh", "-c", "echo boom >&2; exit 3", "sh"], "exited with status 3"),
    (["sh", "-c", "kill -SEGV $$", "sh"], "killed by signal SIGSEGV"),
    (["sh", "-c", "echo hello; echo 'Linear solve converged'", "sh"], "never finished a solve"),
])
def test_crash_and_garbage_are_failed_outcomes(command, message):
    outcome = ExecutableOracle(command, task_args=no_arguments)({})
    assert outcome.failed and message in outcome.error


def test_truncated_output_is_a_failed_outcome(tmp_path):
    truncated = MONITOR_OUTPUT.splitlines(keepends=True)[:3] + ["  2 KSP unprecond"]
    outcome = ExecutableOracle(canned(tmp_path, "".join(truncated)), task_args=no_arguments)({})
    assert outcome.failed and "stops inside a solve" in outcome.error


def test_canned_output_becomes_an_outcome(tmp_path):
    outcome = ExecutableOracle(canned(tmp_path, MONITOR_OUTPUT), task_args=no_arguments, prefix="sys_")({})
    assert not outcome.failed and outcome.iterations == 2 and outcome.reason == PETSc.KSP.ConvergedReason.CONVERGED_RTOL
    np.testing.assert_array_equal(outcome.residuals, [1.0, 1.000000000001e-01, 1.000000000002e-02])


def test_timeout_kills_the_process_group_and_returns(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    command = ["sh", "-c", 'sleep 60 & echo $! > "$0"; wait', str(pid_file)]
    start = time.perf_counter()
    outcome = ExecutableOracle(command, task_args=no_arguments, timeout=0.5)({})
    elapsed = time.perf_counter() - start
    assert outcome.failed and "timed out after 0.5 s" in outcome.error
    assert elapsed < 5.0  # 0.5 s budget + kill + reap; a hang would take the full 60 s
    assert not alive(int(pid_file.read_text()))


def test_temporary_files_are_removed_whatever_happens(legacy_solver, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen = []

    def record_directory(task, directory):
        seen.append(directory)
        return []

    task = poisson_2d(8)
    oracle = legacy_oracle(legacy_solver, "cg", "jacobi")
    assert not oracle(task, {"x0": np.ones(task.size)}).failed
    with pytest.raises(ValueError):
        oracle(task, {"pc_sor_omega": 1.0})
    assert oracle(task, {"ksp_type": "no_such_krylov"}).failed
    assert ExecutableOracle(["sleep", "60"], task_args=record_directory, timeout=0.3)({}).failed
    assert seen and not os.path.exists(seen[0])
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(command=[]), "non-empty"),
    (dict(command="legacy_solver -n 4"), "non-empty"),
    (dict(command=["/no/such/program"]), "not found"),
    (dict(command=["sh"], timeout=0), "timeout"),
    (dict(command=["sh"], processes=0), "processes"),
    (dict(command=["sh"], options={"Pc-Sor": 1}), "invalid PETSc option name"),
])
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExecutableOracle(**kwargs)


@pytest.mark.parametrize("setting, message", [
    ({"x0": np.zeros(7)}, "shape"), ({"x0": np.full(64, np.inf)}, "non-finite"),
    ({"pc_sor_omega": float("nan")}, "non-finite"),
])
def test_bad_setting_raises_before_running(setting, message):
    oracle = ExecutableOracle(["sh", "-c", "exit 9", "sh"])
    with pytest.raises(ValueError, match=message):
        oracle(poisson_2d(8), setting)


def test_task_without_files_needs_task_args():
    with pytest.raises(ValueError, match="task_args"):
        ExecutableOracle(["sh", "-c", "exit 0", "sh"])({"n": 4})


# ---------------------------------------------------------------- the parser on canned text

def test_parser_reads_history_reason_and_prefix():
    report = parse_solve_output(MONITOR_OUTPUT)
    assert report.iterations == 2 and report.reason == PETSc.KSP.ConvergedReason.CONVERGED_RTOL
    np.testing.assert_array_equal(report.residuals, [1.0, 1.000000000001e-01, 1.000000000002e-02])
    assert report.unused_options == []


def test_parser_maps_petscs_c_names_and_keeps_the_last_solve():
    first = MONITOR_OUTPUT
    second = MONITOR_OUTPUT.replace("converged due to CONVERGED_RTOL iterations 2",
                                    "did not converge due to DIVERGED_ITS iterations 1")
    report = parse_solve_output(first + second.replace("  2 KSP", "garbage  2 KSP"))
    assert report.reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT and report.iterations == 1
    assert len(report.residuals) == 2
    assert parse_solve_output(MONITOR_OUTPUT.replace("CONVERGED_RTOL", "DIVERGED_PC_FAILED")).reason == \
        PETSc.KSP.ConvergedReason.DIVERGED_PCSETUP_FAILED


def test_parser_keeps_non_finite_norms_for_the_outcome_to_reject():
    report = parse_solve_output(MONITOR_OUTPUT.replace("true resid norm 1.000000000002e-02", "true resid norm -nan"))
    assert np.isnan(report.residuals[-1])


@pytest.mark.parametrize("text, message", [
    ("", "never finished"),
    ("\x00\xff Segmentation fault (core dumped)\n", "never finished"),
    (MONITOR_OUTPUT.rsplit("  Linear", 1)[0], "stops inside a solve"),
    (MONITOR_OUTPUT.replace("  1 KSP", "  3 KSP"), "monitor iteration 3"),
    (MONITOR_OUTPUT.replace("CONVERGED_RTOL", "CONVERGED_BANANA"), "unknown converged reason"),
    (MONITOR_OUTPUT.replace("true resid norm 1.000000000001e-01", "true resid norm 1.0x"), "not a number"),
    ("  Linear solve converged due to CONVERGED_RTOL iterations 0\n", "without residual monitor lines"),
])
def test_parser_rejects_broken_output(text, message):
    with pytest.raises(UnreadableOutput, match=message):
        parse_solve_output(text)


def test_unused_options_from_the_command_line_only():
    text = ("WARNING! There are options you set that were not used!\n"
            "Option left: name:-pc_sor_omgea value: 1.2 source: command line\n"
            "Option left: name:-ksp_monitor_true_residual (no value) source: command line\n"
            "Option left: name:-matload_block_size value: 1 source: file\n"
            "Option left: name:-old_style value: 3\n")
    assert unused_command_line_options(text) == ["pc_sor_omgea", "ksp_monitor_true_residual", "old_style"]
