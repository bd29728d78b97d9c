"""IsolatedOracle: real crashes (a segfault through ctypes, abort, PETSc's own Chebyshev crash)
and hangs become failed Outcomes naming the signal; everything else is exactly the in-process
oracle: the same Outcomes bit for bit, the same exceptions for mistakes."""
from __future__ import annotations

import copy
import ctypes
import functools
import os
import time

import numpy as np
import pytest
import torch

from metasolve import BlackBox, ForwardGradient, LogResidual, Space, Vector
from metasolve.training.train import Trainer
from solvers import Budget, IsolatedOracle, KSPOracle, LinearSystem, Oracle
from solvers._petsc import PETSc
from tests.systems import poisson_1d, poisson_2d

pytestmark = pytest.mark.slow  # each test starts worker processes (python + torch + PETSc)


class CrashingOracle(Oracle):
    """A real KSPOracle, except that a setting {"crash": how} really crashes the process:
    `segv` reads address 0 through ctypes, `abort` calls abort(3), `hang` never returns."""

    def __init__(self, **ksp: object) -> None:
        self.ksp = KSPOracle(**ksp)

    def budget_options(self, budget: Budget, task: LinearSystem) -> dict:
        return self.ksp.budget_options(budget, task)

    def solve_many(self, task: LinearSystem, settings: list[dict]) -> list:
        for setting in settings:
            how = setting.get("crash")
            if how == "segv":
                ctypes.string_at(0)
            elif how == "abort":
                os.abort()
            elif how == "hang":
                time.sleep(1e9)
        return self.ksp.solve_many(task, [{k: v for k, v in s.items() if k != "crash"} for s in settings])


def same(a, b) -> bool:
    return (a.iterations, a.reason, a.converged) == (b.iterations, b.reason, b.converged) \
        and np.array_equal(a.residuals, b.residuals)


@pytest.fixture
def isolated():
    oracle = IsolatedOracle(functools.partial(CrashingOracle, ksp_type="cg", pc_type="jacobi", rtol=1e-8), timeout=20)
    yield oracle
    oracle.close()


@pytest.mark.parametrize("how, signal_name", [("segv", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_crash_is_a_failed_outcome_naming_the_signal_and_the_next_solve_works(isolated, how, signal_name):
    task = poisson_1d(24, seed=1)
    direct = KSPOracle("cg", "jacobi", rtol=1e-8)
    guess = {"x0": np.linspace(0.0, 1.0, 24)}
    crashed = isolated(task, {"crash": how})
    assert crashed.failed and signal_name in crashed.error, crashed.error
    assert isolated.crashes == 1
    after = isolated(task, guess)  # a fresh worker, which must be sent the task again
    assert not after.failed and same(after, direct(task, guess))


def test_only_the_crashing_settings_of_a_task_are_lost(isolated):
    task = poisson_2d(12, seed=2)
    settings = [{}, {"crash": "segv"}, {"x0": np.full(144, 0.5)}, {"crash": "abort"}, {"ksp_max_it": 5}]
    outcomes = isolated.solve_many(task, settings)
    direct = KSPOracle("cg", "jacobi", rtol=1e-8)
    assert [o.failed for o in outcomes] == [False, True, False, True, False]
    assert "SIGSEGV" in outcomes[1].error and "SIGABRT" in outcomes[3].error
    for i in (0, 2, 4):
        assert same(outcomes[i], direct(task, settings[i])), i
    assert outcomes[4].hit_max_it and outcomes[4].iterations == 5
    assert isolated.crashes == 3  # the whole request, then each crashing setting alone


def test_a_hang_is_killed_after_the_timeout_and_counted():
    oracle = IsolatedOracle(functools.partial(CrashingOracle, ksp_type="cg", pc_type="jacobi"), timeout=3)
    try:
        task = poisson_1d(16, seed=0)
        hung = oracle(task, {"crash": "hang"})
        assert hung.failed and "hung" in hung.error and "SIGKILL" in hung.error, hung.error
        assert not oracle(task).failed and oracle.crashes == 1
    finally:
        oracle.close()


def test_petsc_chebyshev_jacobi_segfault_is_survived():
    """PETSc 3.26.1's own crash (no deliberate fault): Chebyshev + Jacobi run far past ~2000
    iterations segfaults in-process; isolated, it is a failed Outcome, and the same oracle then
    solves a short Chebyshev problem."""
    recipe = functools.partial(KSPOracle, ksp_type="chebyshev", pc_type="jacobi", rtol=1e-30, atol=0.0)
    oracle = IsolatedOracle(recipe, timeout=60)
    try:
        task = poisson_2d(16, seed=0)
        crashed = oracle(task, {"ksp_max_it": 20000})
        assert crashed.failed and "SIGSEGV" in crashed.error, crashed.error
        short = oracle(task, {"ksp_max_it": 50})
        assert same(short, recipe()(task, {"ksp_max_it": 50})) and short.iterations == 50
        assert oracle.crashes == 1
    finally:
        oracle.close()


def test_a_crash_names_the_candidate_setting_that_crashed_not_only_the_base_recipe(caplog):
    """A Choice over solvers runs its candidates as settings on one base recipe (here GMRES + ILU):
    the message must say that Chebyshev + Jacobi crashed, and on which task."""
    recipe = functools.partial(KSPOracle, ksp_type="gmres", pc_type="ilu", rtol=1e-30, atol=0.0)
    oracle = IsolatedOracle(recipe, timeout=60)
    try:
        task = poisson_2d(16, seed=0)
        candidate = {"ksp_type": "chebyshev", "pc_type": "jacobi", "ksp_max_it": 20000}
        with caplog.at_level("WARNING", logger="solvers.isolated"):
            crashed, fine = oracle.solve_many(task, [candidate, {"x0": np.zeros(256), "ksp_max_it": 5}])
        assert crashed.failed and "SIGSEGV" in crashed.error and not fine.failed
        named = "under setting ksp_type = 'chebyshev', pc_type = 'jacobi', ksp_max_it = 20000"
        assert named in crashed.error and repr(task.name) in crashed.error, crashed.error
        assert named in caplog.text and "base recipe" in caplog.text
        assert "under one of 2 settings" in caplog.text  # the request of both, before each was retried alone
        hung = IsolatedOracle(functools.partial(CrashingOracle, ksp_type="cg", pc_type="jacobi"), timeout=3)
        try:
            outcome = hung(task, {"crash": "hang", "x0": np.ones(256)})
        finally:
            hung.close()
        assert "under setting crash = 'hang', x0 = <vector of 256>" in outcome.error, outcome.error
    finally:
        oracle.close()


def test_a_mistake_in_the_worker_is_raised_in_the_caller_not_survived(isolated):
    with pytest.raises(ValueError, match="pc_sor_omega"):
        isolated(poisson_1d(16, seed=0), {"pc_sor_omega": 1.5})  # not an option of Jacobi
    assert isolated.crashes == 0
    assert not isolated(poisson_1d(16, seed=0)).failed  # the worker lived on


def test_solutions_on_request_and_a_copy_has_a_worker_of_its_own():
    """Pretraining copies the oracle and asks the copy for solutions; deleting the copy must
    leave the original's worker alone."""
    isolated = IsolatedOracle(functools.partial(KSPOracle, "cg", "jacobi", rtol=1e-8))
    try:
        task = poisson_1d(20, seed=3)
        assert isolated(task).solution is None
        twin = copy.copy(isolated)
        twin.return_solution = True
        direct = KSPOracle("cg", "jacobi", rtol=1e-8, return_solution=True)(task)
        assert np.array_equal(twin(task).solution, direct.solution)
        del twin
        again = isolated(task)
        assert not again.failed and again.solution is None and isolated.crashes == 0
    finally:
        isolated.close()


def test_what_cannot_cross_the_pipe_is_named():
    with pytest.raises(TypeError, match="picklable"):
        IsolatedOracle(lambda: KSPOracle())
    oracle = IsolatedOracle(functools.partial(KSPOracle, "cg", "jacobi"))
    try:
        task = poisson_1d(8, seed=0)
        A, b = task.petsc(PETSc.COMM_SELF)
        with pytest.raises(TypeError, match="SciPy/NumPy"):
            oracle(LinearSystem(A, b), {})
    finally:
        oracle.close()


class SegfaultOnTask(CrashingOracle):
    """Segfaults (for real) whenever it solves the task whose right-hand side starts with `marker`."""

    def __init__(self, marker: float, **ksp: object) -> None:
        super().__init__(**ksp)
        self.marker = marker

    def solve_many(self, task: LinearSystem, settings: list[dict]) -> list:
        if task.b[0] == self.marker:
            ctypes.string_at(0)
        return super().solve_many(task, settings)


def test_training_through_a_solver_that_segfaults_on_some_tasks_completes_and_counts_them():
    tasks = [poisson_1d(15, seed=s) for s in range(2)]
    for task in tasks:
        task.features = torch.as_tensor(task.b[:4])
    recipe = functools.partial(SegfaultOnTask, float(tasks[1].b[0]), ksp_type="richardson", pc_type="jacobi")
    oracle = IsolatedOracle(recipe, timeout=20)
    try:
        space = Space({"x0": Vector(15, basis="sine", modes=3, scale=0.1)})
        box = BlackBox(oracle, space, LogResidual(10), ForwardGradient(tangents=1, eps=1e-4))
        model = _Constant(space.dim)
        trainer = Trainer(model, box, torch.optim.Adam(model.parameters(), lr=1e-2), progress=False)
        history = trainer.fit(tasks, steps=2, batch_size=2)
        assert len(history) == 2
        # Task 1 fails whole in every step: its centre, and its query solved again alone.
        assert box.stats.failed_centres == 2 and box.stats.failed_queries == 2
        assert oracle.crashes == 2 * 3  # per step: the task's request, then each of its 2 settings alone
        assert box.stats.solves == 2 * 2 * 2
        assert all(np.isfinite(row["loss"]) for row in history)
        assert model.theta.detach().abs().sum() > 0  # task 0's gradient still trained θ
    finally:
        oracle.close()


class _Constant(torch.nn.Module):
    """θ shared by every task (a calibration): the network ignores the features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(1, dim, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(features.shape[0], -1)
