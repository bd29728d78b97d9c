"""ExecutableOracle against KSPOracle, on the compiled legacy programs and on canned output (real PETSc, real MPI,
real subprocesses and signals)."""
from __future__ import annotations

import json
import math
import os
import signal
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
from solvers.monitor_parser import LinearSolve, NonlinearSolve, UnreadableOutput, parse_run_output, unused_command_line_options
from solvers.program_task import ArgumentFeatures, ProgramTask
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
def programs() -> Path:
    """Build the programs with the top-level make's command (quick when up to date)."""
    result = subprocess.run(["make", "--no-print-directory", "-C", str(LEGACY_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the legacy programs failed:\n{result.stdout}\n{result.stderr}"
    return LEGACY_DIR


@pytest.fixture(scope="session")
def legacy_solver(programs) -> str:
    return str(programs / "legacy_solver")


@pytest.fixture(scope="session")
def heat_stepper(programs) -> str:
    return str(programs / "heat_stepper")


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
    (dict(command=["sh"], timeout=float("nan")), "timeout"),
    (dict(command=["sh"], count="newton"), "count"),
    (dict(command=["sh"], count="nonlinear"), "nonlinear=True"),
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
    report = parse_run_output(MONITOR_OUTPUT)
    [solve] = report.solves
    assert solve.prefix == "sys_" and solve.iterations == 2
    assert solve.reason == PETSc.KSP.ConvergedReason.CONVERGED_RTOL
    np.testing.assert_array_equal(solve.residuals, [1.0, 1.000000000001e-01, 1.000000000002e-02])
    assert report.unused_options == []


def test_parser_reads_every_solve_and_maps_petscs_c_names():
    second = MONITOR_OUTPUT.replace("converged due to CONVERGED_RTOL iterations 2",
                                    "did not converge due to DIVERGED_ITS iterations 1")
    report = parse_run_output(MONITOR_OUTPUT + second.replace("  2 KSP", "garbage  2 KSP"))
    first, last = report.solves
    assert first.iterations == 2 and len(first.residuals) == 3
    assert last.reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT and last.iterations == 1
    assert len(last.residuals) == 2 and not last.converged and last.usable
    assert parse_run_output(MONITOR_OUTPUT.replace("CONVERGED_RTOL", "DIVERGED_PC_FAILED")).solves[0].reason == \
        PETSc.KSP.ConvergedReason.DIVERGED_PCSETUP_FAILED


def test_parser_keeps_non_finite_norms_for_the_outcome_to_reject():
    report = parse_run_output(MONITOR_OUTPUT.replace("true resid norm 1.000000000002e-02", "true resid norm -nan"))
    assert np.isnan(report.solves[0].residuals[-1])


@pytest.mark.parametrize("text, message", [
    ("", "never finished"),
    ("\x00\xff Segmentation fault (core dumped)\n", "never finished"),
    (MONITOR_OUTPUT.rsplit("  Linear", 1)[0], "stops inside a solve"),
    (MONITOR_OUTPUT.replace("  1 KSP", "  3 KSP"), "monitor iteration 3"),
    (MONITOR_OUTPUT.replace("CONVERGED_RTOL", "CONVERGED_BANANA"), "unknown linear converged reason"),
    (MONITOR_OUTPUT.replace("true resid norm 1.000000000001e-01", "true resid norm 1.0x"), "not a number"),
    ("  Linear solve converged due to CONVERGED_RTOL iterations 0\n", "without residual monitor lines"),
])
def test_parser_rejects_broken_output(text, message):
    with pytest.raises(UnreadableOutput, match=message):
        parse_run_output(text)


def test_unused_options_from_the_command_line_only():
    text = ("WARNING! There are options you set that were not used!\n"
            "Option left: name:-pc_sor_omgea value: 1.2 source: command line\n"
            "Option left: name:-ksp_monitor_true_residual (no value) source: command line\n"
            "Option left: name:-matload_block_size value: 1 source: file\n"
            "Option left: name:-old_style value: 3\n")
    assert unused_command_line_options(text) == ["pc_sor_omgea", "ksp_monitor_true_residual", "old_style"]


# ---------------------------------------------------------------- whole runs: the time-stepping program

HEAT = {"ksp_type": "richardson", "pc_type": "sor", "pc_sor_forward": None, "ksp_norm_type": "unpreconditioned",
        "ksp_rtol": 1e-6, "ksp_atol": 1e-50, "ksp_divtol": 1e4, "ksp_max_it": 10_000}
HEAT_FEATURES = ArgumentFeatures(("n", "kappa", "dt"), log=("n", "kappa", "dt"))


def heat_task(**arguments) -> ProgramTask:
    return ProgramTask.create({"n": 12, "kappa": 1.0, "dt": 0.01, "steps": 3, **arguments}, HEAT_FEATURES)


def heat_oracle(path: str, **kwargs) -> ExecutableOracle:
    return ExecutableOracle([path], options=HEAT, prefix="heat_", **kwargs)


def test_a_run_holds_every_solve_and_its_cost_is_the_total(heat_stepper):
    """Three time steps, three KSP solves under the program's prefix, its own chatter in between."""
    run = heat_oracle(heat_stepper)(heat_task(), {"pc_sor_omega": 1.5})
    assert not run.failed and run.converged
    assert len(run.solves) == 3 and all(isinstance(s, LinearSolve) and s.prefix == "heat_" for s in run.solves)
    assert run.iterations == sum(s.iterations for s in run.solves) > run.solves[-1].iterations
    assert len(run.residuals) == sum(s.iterations + 1 for s in run.solves)
    for solve in run.solves:
        assert solve.converged and len(solve.residuals) == len(solve.relative) == solve.iterations + 1
        assert solve.relative[-1] <= 1e-6 < solve.relative[-2]  # PETSc's test: ||r|| <= rtol ||b||
    last = heat_oracle(heat_stepper, select=-1)(heat_task(), {"pc_sor_omega": 1.5})
    assert last.iterations == run.solves[-1].iterations and len(last.solves) == 3
    assert heat_oracle(heat_stepper, select="heat_")(heat_task(), {"pc_sor_omega": 1.5}).iterations == run.iterations
    other = heat_oracle(heat_stepper, select="other_")(heat_task(), {"pc_sor_omega": 1.5})
    assert other.failed and "prefixes seen: ['heat_']" in other.error


def test_first_step_agrees_with_ksp_oracle(heat_stepper, tmp_path):
    """The program's step matrix, exported by PETSc's -ksp_view_mat, solved in-process from the same
    guess u0 with b = u0 + dt: identical iteration count and residual history."""
    matrix = tmp_path / "A.bin"
    run = heat_oracle(heat_stepper)(heat_task(steps=1, contrast=1.0, seed=2),
                                    {"pc_sor_omega": 1.3, "ksp_view_mat": f"binary:{matrix}"})
    A = PETSc.Mat().load(PETSc.Viewer().createBinary(str(matrix), "r", comm=PETSc.COMM_SELF))
    n, h = 12, 1 / 13
    x, y = np.meshgrid(np.arange(1, n + 1) * h, np.arange(1, n + 1) * h)  # row-major, x fastest
    u0 = (16 * x * (1 - x) * y * (1 - y)).ravel()
    reference = KSPOracle("richardson", "sor", rtol=1e-6)(LinearSystem(A, u0 + 0.01),
                                                          {"x0": u0, "pc_sor_omega": 1.3, "pc_sor_forward": None})
    [solve] = run.solves
    assert solve.iterations == reference.iterations == run.iterations
    np.testing.assert_allclose(solve.residuals, reference.residuals, rtol=HISTORY_RTOL)


def test_a_run_with_one_failed_solve_is_failed_unless_tolerated(tmp_path):
    first = MONITOR_OUTPUT
    diverged = MONITOR_OUTPUT.replace("converged due to CONVERGED_RTOL", "did not converge due to DIVERGED_DTOL")
    text = first + diverged + first
    strict = ExecutableOracle(canned(tmp_path, text), task_args=no_arguments)({})
    assert strict.failed and strict.reason == PETSc.KSP.ConvergedReason.DIVERGED_DTOL and strict.iterations == 6
    tolerant = ExecutableOracle(canned(tmp_path, text), task_args=no_arguments, tolerate_failures=True)({})
    assert not tolerant.failed and tolerant.converged and tolerant.iterations == 6
    budget = first + MONITOR_OUTPUT.replace("converged due to CONVERGED_RTOL", "did not converge due to DIVERGED_ITS")
    capped = ExecutableOracle(canned(tmp_path, budget), task_args=no_arguments)({})
    assert capped.hit_max_it and not capped.failed and not capped.converged


def test_nonlinear_program_newton_and_linear_work(heat_stepper):
    """beta > 0: one SNES solve per step, each Newton step one linear solve (prefix heat_)."""
    task = heat_task(beta=200.0, steps=2)
    setting = {"pc_sor_omega": 1.4, "snes_rtol": 1e-8}
    linear = heat_oracle(heat_stepper, nonlinear=True)(task, setting)
    newton = heat_oracle(heat_stepper, nonlinear=True, count="nonlinear")(task, setting)
    assert not linear.failed and not newton.failed
    assert len(linear.solves) == 2 and all(isinstance(s, NonlinearSolve) for s in linear.solves)
    for solve in linear.solves:
        assert solve.prefix == "heat_" and solve.converged and solve.iterations >= 2
        assert len(solve.linear) == solve.iterations and len(solve.residuals) == solve.iterations + 1
        assert all(inner.prefix == "heat_" and inner.iterations > 0 for inner in solve.linear)
        assert solve.residuals[-1] <= 1e-8 * solve.residuals[0]
    assert newton.iterations == sum(s.iterations for s in linear.solves)
    assert linear.iterations == sum(inner.iterations for s in linear.solves for inner in s.linear) > newton.iterations
    assert newton.norm_type == "function" and len(newton.residuals) == newton.iterations + 2


SNES_OUTPUT = """\
step chatter 0 SNES Function norm is not a monitor line
  0 SNES Function norm 1.000000000000e+00
    Linear heat_ solve converged due to CONVERGED_RTOL iterations 7
  1 SNES Function norm 1.000000000000e-03
    Linear heat_ solve did not converge due to DIVERGED_ITS iterations 50
  2 SNES Function norm 1.000000000000e-09
Nonlinear heat_ solve converged due to CONVERGED_FNORM_RELATIVE iterations 2
"""


def test_parser_nests_linear_solves_in_their_newton_solve():
    [solve] = parse_run_output(SNES_OUTPUT).solves
    assert isinstance(solve, NonlinearSolve) and solve.iterations == 2 and solve.converged
    assert solve.reason == PETSc.SNES.ConvergedReason.CONVERGED_FNORM_RELATIVE
    assert [s.iterations for s in solve.linear] == [7, 50] and solve.linear_iterations == 57
    assert not solve.linear[1].converged  # an inexact Newton step: the SNES converged all the same
    np.testing.assert_array_equal(solve.residuals, [1.0, 1e-3, 1e-9])
    with pytest.raises(UnreadableOutput, match="inside a nonlinear solve"):
        parse_run_output(SNES_OUTPUT.rsplit("Nonlinear", 1)[0])
    with pytest.raises(UnreadableOutput, match="unknown nonlinear converged reason"):
        parse_run_output(SNES_OUTPUT.replace("FNORM_RELATIVE", "BANANA"))


def test_run_iteration_proxy_tracks_the_total(heat_stepper):
    """The smoothed count over a run's solves (each against its own ||b||, read from the monitor)
    is within one iteration per solve of the true total, and so is its ordering across omega."""
    from metasolve.method.run_cost import RunIterationProxy

    cost = RunIterationProxy(1e-6)
    oracle = heat_oracle(heat_stepper)
    for omega in (1.1, 1.6):
        proxy_run = oracle(heat_task(dt=0.05), {"pc_sor_omega": omega, **cost.overrides})
        exact_run = oracle(heat_task(dt=0.05), {"pc_sor_omega": omega})
        assert abs(cost(proxy_run, None) - exact_run.iterations) <= len(exact_run.solves)


def test_a_run_at_the_programs_own_looser_tolerance_is_charged_a_failure(heat_stepper):
    """Every solve stopped at ‖r‖/‖b‖ ≤ 1e-5 (the program's rtol), above the costs' 1e-6 with
    budget left: not counted as iterations to 1e-6. The budget on the program's prefix fixes it."""
    from metasolve.method.cost import Iterations
    from metasolve.method.run_cost import RunIterationProxy

    oracle, task = heat_oracle(heat_stepper), heat_task(dt=0.05)
    proxy, count = RunIterationProxy(1e-6), Iterations(1e-6)
    assert oracle.budget_options(proxy.budget, task) == {"ksp_rtol": proxy.budget.rtol, "ksp_atol": 0.0,
                                                         "ksp_max_it": 1000}
    own = oracle(task, {"ksp_rtol": 1e-5})
    assert own.converged and max(s.relative[-1] for s in own.solves) > 1e-6
    assert math.isnan(proxy(own, task)) and math.isnan(count(own, task))
    (budgeted,) = oracle.solve_within(proxy.budget, task, [{"ksp_rtol": 1e-5}])
    assert all(s.relative[-1] <= proxy.budget.rtol for s in budgeted.solves) and math.isfinite(proxy(budgeted, task))
    (counted,) = oracle.solve_within(count.budget, task, [{}])
    assert count(counted, task) == counted.iterations


# ---------------------------------------------------------------- nothing left behind

def _wait_for(path: Path, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


STUBBORN_PROGRAM = (
    # a descendant that leaves the process group, one orphaned by a subshell that exits at once,
    # and the program itself busy in a solve-like sleep
    'setsid sleep 60 & echo $! > "$0.setsid"; (setsid sleep 60 & echo $! > "$0.orphan"); '
    'echo ready > "$0.ready"; sleep 60')


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_run_leaves_no_process_and_no_files(tmp_path, signum):
    """A forked copy of this test process (no second interpreter start-up) runs the oracle and is
    signalled mid-run: SIGTERM ends it by SIGTERM (the default action, after cleanup), SIGINT as
    KeyboardInterrupt; either way the program's whole tree is gone and so is its directory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    stem = tmp_path / "pids"
    oracle = ExecutableOracle(["sh", "-c", STUBBORN_PROGRAM, str(stem)], timeout=None,
                              task_args=lambda task, directory: open(f"{directory}/A.bin", "w").close() or [])
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the forked process)
        status = 3
        try:
            tempfile.tempdir = str(scratch)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            oracle({})
        except KeyboardInterrupt:
            status = 130
        finally:
            os._exit(status)
    _wait_for(Path(f"{stem}.ready"))
    leftovers = [int(Path(f"{stem}.{kind}").read_text()) for kind in ("setsid", "orphan")]
    assert all(alive(pid) for pid in leftovers)
    os.kill(child, signum)
    _, status = os.waitpid(child, 0)
    if signum == signal.SIGTERM:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM  # what a scheduler expects
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130
    assert not any(alive(pid) for pid in leftovers)
    assert list(scratch.iterdir()) == []


def test_timeout_kills_descendants_that_left_the_group(tmp_path):
    stem = tmp_path / "pids"
    command = ["sh", "-c", STUBBORN_PROGRAM, str(stem)]
    start = time.perf_counter()
    outcome = ExecutableOracle(command, task_args=no_arguments, timeout=0.5)({})
    elapsed = time.perf_counter() - start
    assert outcome.failed and "timed out after 0.5 s" in outcome.error
    assert elapsed < 5.0  # 0.5 s budget + kill; waiting on a survivor would take 60 s
    assert not any(alive(int(Path(f"{stem}.{kind}").read_text())) for kind in ("setsid", "orphan"))


def test_a_finished_program_leaves_nothing_running(tmp_path):
    pid_file = tmp_path / "daemon.pid"
    command = ["sh", "-c", 'setsid sleep 60 & echo $! > "$0"; cat "$1"', str(pid_file), str(tmp_path / "out.txt")]
    (tmp_path / "out.txt").write_text(MONITOR_OUTPUT)
    outcome = ExecutableOracle(command, task_args=no_arguments, prefix="sys_")({})
    assert not outcome.failed and not alive(int(pid_file.read_text()))


@pytest.mark.parametrize("stream, status, message", [(">&2", 3, "exited with status 3"),
                                                     ("", 0, "never finished a solve")])
def test_error_text_is_capped(stream, status, message):
    """A 20 MB single-line output (the cap does not depend on the size) yields a short error."""
    command = ["sh", "-c", f"head -c 20000000 /dev/zero | tr '\\0' x {stream}; exit {status}", "sh"]
    outcome = ExecutableOracle(command, task_args=no_arguments)({})
    assert outcome.failed and message in outcome.error
    assert len(outcome.error) < 5_000 and "characters]" in outcome.error


def test_no_timeout():
    for timeout in (math.inf, None):
        outcome = ExecutableOracle(["sh", "-c", "sleep 0.1; exit 4", "sh"], task_args=no_arguments, timeout=timeout)({})
        assert outcome.failed and "exited with status 4" in outcome.error


# ---------------------------------------------------------------- delivering learned settings

def test_predict_writes_an_options_file_the_unmodified_program_reads(heat_stepper, tmp_path, monkeypatch):
    """train (here: a fixed network) -> `metasolve predict` -> the program run with -options_file:
    PETSc reads every line, and the run is exactly the oracle's run with the predicted omega."""
    import torch

    from metasolve import Interval, MetaSolver, Space
    from metasolve.app.cli import main
    from metasolve.app.predict import Delivery, save_for_program

    meta = MetaSolver(3, Space({"pc_sor_omega": Interval(1.0, 1.95)}), depth=0)
    with torch.no_grad():
        meta.net[-1].weight[0, 1] = 0.4  # omega grows with kappa
    model = tmp_path / "model.pt"
    save_for_program(model, meta, Delivery(HEAT_FEATURES, prefix="heat_"))
    task = heat_task(kappa=3.0)
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs its MPI-abort hook
    try:
        assert main(["predict", str(model), "--out", str(tmp_path / "job"), "--", *task.argv()]) == 0
    finally:
        torch.set_num_threads(threads)
    options_file = tmp_path / "job" / "metasolve.opts"
    omega = meta.predict(task)["pc_sor_omega"]
    assert 1.5 < omega < 1.95 and f"-heat_pc_sor_omega {omega!r}" in options_file.read_text()
    fixed = [a for name, value in HEAT.items() for a in (f"-heat_{name}", *([] if value is None else [str(value)]))]
    program = subprocess.run([heat_stepper, *task.argv(), *fixed, "-options_file", str(options_file),
                              "-heat_ksp_monitor_true_residual", "-heat_ksp_converged_reason", "-options_left"],
                             capture_output=True, text=True, env=child_environment(), timeout=60)
    assert program.returncode == 0 and "Option left" not in program.stdout, program.stdout[-2000:]
    delivered = parse_run_output(program.stdout)
    expected = heat_oracle(heat_stepper)(task, {"pc_sor_omega": omega})
    default = heat_oracle(heat_stepper)(task)
    assert [s.iterations for s in delivered.solves] == [s.iterations for s in expected.solves]
    assert sum(s.iterations for s in delivered.solves) != default.iterations


def test_predict_writes_a_guess_vector_the_program_loads(legacy_solver, tmp_path):
    import torch

    from metasolve import MetaSolver, Space, Vector
    from metasolve.app.predict import Delivery, predict, save_for_program

    meta = MetaSolver(1, Space({"x0": Vector(16, basis="identity", scale=0.01)}), depth=0)
    with torch.no_grad():
        meta.net[-1].bias.copy_(torch.linspace(-1, 1, 16, dtype=torch.float64))
    model = tmp_path / "model.pt"
    save_for_program(model, meta, Delivery(ArgumentFeatures(("contrast",)), guess_flag="-x0"))
    options_file, setting = predict(model, tmp_path / "job", arguments=["-n", "4", "-contrast", "1.5"])
    assert (tmp_path / "job" / "x0.bin").is_file() and "-x0 " in options_file.read_text()
    program = subprocess.run([legacy_solver, "-n", "4", "-contrast", "1.5", "-options_file", str(options_file),
                              "-ksp_type", "cg", "-ksp_monitor_true_residual", "-ksp_converged_reason", "-options_left"],
                             capture_output=True, text=True, env=child_environment(), timeout=60)
    assert program.returncode == 0 and "Option left" not in program.stdout, program.stdout[-2000:]
    oracle = ExecutableOracle([legacy_solver], options={"ksp_type": "cg"},
                              task_args=lambda task, directory: ["-n", "4", "-contrast", "1.5"])
    expected = oracle({"n": 4}, {"x0": setting["x0"]})
    np.testing.assert_allclose(parse_run_output(program.stdout).solves[0].residuals, expected.residuals, rtol=1e-12)
    assert expected.residuals[0] != oracle({"n": 4}).residuals[0]  # the guess reached the program


def test_predict_refuses_a_task_it_cannot_compute_features_for(tmp_path):
    from metasolve import Interval, MetaSolver, Space
    from metasolve.app.predict import Delivery, predict, save_for_program

    meta = MetaSolver(3, Space({"pc_sor_omega": Interval(1.0, 1.95)}), depth=0)
    model = tmp_path / "model.pt"
    meta.save(model)
    with pytest.raises(ValueError, match="no argument features stored"):
        predict(model, tmp_path, arguments=["-n", "4"])
    save_for_program(model, meta, Delivery(HEAT_FEATURES, prefix="heat_"))
    with pytest.raises(ValueError, match=r"lack \['kappa', 'dt'\]"):
        predict(model, tmp_path, arguments=["-n", "4"])
    with pytest.raises(ValueError, match="must be positive"):
        predict(model, tmp_path, arguments=["-n", "4", "-kappa", "0", "-dt", "1"])


def test_predict_from_the_matrix_files_the_oracle_wrote(legacy_solver, tmp_path):
    """A model on operator features: `predict --matrix A.bin --rhs b.bin` computes them from the same
    files the program reads, and the legacy program accepts the options file. A model that
    recorded other features is refused: the files cannot give them."""
    import torch

    from metasolve import Interval, MetaSolver, Space
    from metasolve.app.predict import predict
    from solvers.executable import linear_system_files
    from solvers.features import operator_features

    task = poisson_2d(8, seed=7)
    arguments = linear_system_files(task, str(tmp_path))  # ["-f", A.bin, "-rhs", b.bin]
    features = operator_features(*task.petsc(PETSc.COMM_SELF))
    space = Space({"pc_sor_omega": Interval(1.0, 1.95)})
    MetaSolver(len(features), space, depth=0, features="poisson2d").save(tmp_path / "family.pt")
    with pytest.raises(ValueError, match="trained on 'poisson2d' features"):
        predict(tmp_path / "family.pt", tmp_path / "job", matrix=arguments[1], rhs=arguments[3])
    meta = MetaSolver(len(features), space, depth=0, features="operator")
    with torch.no_grad():
        meta.net[-1].bias.fill_(1.0)
    meta.save(tmp_path / "model.pt")
    options_file, setting = predict(tmp_path / "model.pt", tmp_path / "job", matrix=arguments[1], rhs=arguments[3])
    expected = meta.predict(LinearSystem(task.A, task.b, features=features))["pc_sor_omega"]
    assert setting["pc_sor_omega"] == expected and f"-pc_sor_omega {expected!r}" in options_file.read_text()
    program = subprocess.run([legacy_solver, *arguments, "-ksp_type", "richardson", "-pc_type", "sor",
                              "-options_file", str(options_file), "-ksp_converged_reason", "-options_left"],
                             capture_output=True, text=True, env=child_environment(), timeout=60)
    assert program.returncode == 0 and "Option left" not in program.stdout, program.stdout[-2000:]
