"""Every oracle keeps the `solvers.oracle.Oracle` contract (real PETSc, a real compiled program,
a real worker process): an unread option is a ValueError naming it, a divergence is a failed
Outcome, the same call gives the same result, `solve_many` is the map of calls, a budget stops
the solve where it says."""
from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metasolve.method.cost import Iterations
from problems.bratu import Bratu, BratuOracle
from solvers import Budget, ExecutableOracle, IsolatedOracle, KSPOracle, Oracle, Outcome, SNESOracle
from solvers.budget import reference_norm
from tests.systems import poisson_2d

LEGACY_DIR = Path(__file__).resolve().parents[1] / "examples" / "legacy_solver"


@dataclass
class ExponentialSystem:
    """F(u) = e^u − c componentwise, root log c; its tolerances refer to ‖F(0)‖ = ‖1 − c‖."""

    c: np.ndarray
    name: str = "exp"

    @property
    def reference_norm(self) -> float:
        return float(np.linalg.norm(1.0 - self.c))


def exponential_residual(task: ExponentialSystem, setting: dict, u: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(u) - task.c


def exponential_jacobian(task: ExponentialSystem, setting: dict, u: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.diag(np.exp(u))


@dataclass
class Case:
    """An oracle with a task, settings it solves, one PETSc never reads, one that diverges."""

    make: Callable[[], Oracle]
    task: Any
    settings: list[dict]
    unread: str
    diverging: dict


def ksp_case() -> Case:
    task = poisson_2d(8)
    return Case(lambda: KSPOracle(ksp_type="cg", pc_type="jacobi"), task,
                [{}, {"x0": np.full(task.size, 0.5)}, {"ksp_type": "gmres", "ksp_pc_side": "right", "ksp_gmres_restart": 7}],
                unread="ksp_gmres_restrat",
                diverging={"ksp_type": "richardson", "pc_type": "none", "ksp_richardson_scale": 3.0})


def snes_case() -> Case:
    task = ExponentialSystem(np.array([2.0, 0.5, 3.0, 1.5]))
    make = functools.partial(SNESOracle, exponential_residual, lambda task, setting: np.zeros(task.c.size),
                             jacobian=exponential_jacobian, rtol=1e-10, warm_start=False)
    return Case(make, task, [{}, {"u0": np.full(4, 0.3)}, {"snes_linesearch_type": "basic"}],
                unread="snes_linesearch_tpye", diverging={"u0": np.full(4, 800.0)})


def bratu_case() -> Case:
    task = Bratu(n=9, lam_range=(5.0, 6.0)).task(0)
    return Case(BratuOracle, task, [{}, {"u0": np.full(task.size, 0.2)}, {"snes_linesearch_type": "basic"}],
                unread="snes_linesearch_tpye", diverging={"u0": np.full(task.size, 800.0)})


def isolated_case() -> Case:
    case = ksp_case()
    case.make = lambda: IsolatedOracle(functools.partial(KSPOracle, ksp_type="cg", pc_type="jacobi"), timeout=60)
    return case


@pytest.fixture(scope="module")
def legacy_solver() -> str:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(LEGACY_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the legacy programs failed:\n{result.stdout}\n{result.stderr}"
    return str(LEGACY_DIR / "legacy_solver")


def executable_case(legacy_solver: str) -> Case:
    case = ksp_case()
    case.make = lambda: ExecutableOracle([legacy_solver], options={"ksp_type": "cg", "pc_type": "jacobi",
                                                                   "ksp_norm_type": "unpreconditioned"})
    return case


@pytest.fixture(params=["ksp", "snes", "bratu", pytest.param("executable", marks=pytest.mark.compiled),
                        pytest.param("isolated", marks=pytest.mark.slow)])
def case(request) -> tuple[Case, Oracle]:
    if request.param == "executable":
        built = executable_case(request.getfixturevalue("legacy_solver"))
    else:
        built = {"ksp": ksp_case, "snes": snes_case, "bratu": bratu_case, "isolated": isolated_case}[request.param]()
    oracle = built.make()
    yield built, oracle
    if isinstance(oracle, IsolatedOracle):
        oracle.close()


def same(a: Outcome, b: Outcome) -> None:
    assert (a.iterations, a.reason, a.converged, a.failed) == (b.iterations, b.reason, b.converged, b.failed)
    np.testing.assert_array_equal(a.residuals, b.residuals)


def test_every_oracle_is_an_oracle(case):
    _, oracle = case
    assert isinstance(oracle, Oracle)


def test_an_option_never_read_is_a_value_error_naming_it(case):
    built, oracle = case
    with pytest.raises(ValueError, match=built.unread):
        oracle(built.task, {built.unread: "7"})


def test_a_divergence_is_a_failed_outcome_not_an_exception(case):
    built, oracle = case
    outcome = oracle(built.task, built.diverging)
    assert outcome.failed and not outcome.converged
    assert outcome.error is not None or outcome.reason < 0


def test_the_same_call_twice_gives_the_same_result(case):
    built, oracle = case
    for setting in built.settings:
        first, second = oracle(built.task, setting), oracle(built.task, setting)
        assert first.converged, first.error
        same(first, second)


def test_solve_many_is_the_map_of_calls(case):
    built, oracle = case
    settings = built.settings + [built.diverging] + built.settings[:1]
    together = oracle.solve_many(built.task, settings)
    assert len(together) == len(settings)
    for outcome, setting in zip(together, settings):
        same(outcome, oracle(built.task, setting))


def _relative_final(outcome: Outcome, task: Any) -> float:
    if outcome.solves:  # a program run: the ratio it printed
        return float(outcome.solves[-1].relative[-1])
    return float(outcome.residuals[-1]) / reference_norm(task)


def test_a_budget_stops_the_solve_where_it_says(case):
    built, oracle = case
    loose, short = Budget(rtol=1e-3, max_it=1000), Budget(rtol=1e-12, max_it=2)
    for setting in built.settings:
        (reached,) = oracle.solve_within(loose, built.task, [setting])
        assert reached.converged and _relative_final(reached, built.task) <= 1e-3
        assert Iterations(1e-3)(reached, built.task) == reached.iterations
        (cut,) = oracle.solve_within(short, built.task, [setting])
        assert cut.iterations <= 2 and len(cut.residuals) <= 3
        assert not cut.converged
    # The budget's own tolerance, not the oracle's: the default tolerance is tighter still.
    (default,) = oracle.solve_many(built.task, built.settings[:1])
    assert default.iterations > oracle.solve_within(loose, built.task, built.settings[:1])[0].iterations
