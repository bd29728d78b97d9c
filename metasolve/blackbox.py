"""The black-box solver as a torch operation: real solves forward, estimated gradient backward."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metasolve.estimators import Estimator
from metasolve.params import Space
from metasolve.parallel import SerialExecutor


@dataclass
class SolveStats:
    """Running counts a training run reports: solves spent, and failures survived."""

    solves: int = 0
    evaluation_solves: int = 0
    failed_queries: int = 0
    failed_centres: int = 0

    def state_dict(self) -> dict:
        return {"solves": self.solves, "evaluation_solves": self.evaluation_solves,
                "failed_queries": self.failed_queries, "failed_centres": self.failed_centres}

    def load_state_dict(self, state: dict) -> None:
        self.solves, self.evaluation_solves = state["solves"], state["evaluation_solves"]
        self.failed_queries, self.failed_centres = state["failed_queries"], state["failed_centres"]


class BlackBox:
    """`y = bb(theta, tasks)`: θ [B, d] → cost of solving task b under setting decode(θ_b), [B].

    Forward runs one executor round holding the centre and every query point of every task
    (queries of one task go together, so an oracle with `solve_many` sets up its preconditioner
    once). Backward returns the estimator's gradient times the upstream gradient.
    """

    def __init__(self, oracle: Any, space: Space, cost: Any, estimator: Estimator, executor: Any = None,
                 seed: int = 0) -> None:
        self.oracle, self.space, self.cost, self.estimator = oracle, space, cost, estimator
        self.executor = executor if executor is not None else SerialExecutor()
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = SolveStats()

    def __call__(self, theta: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        if theta.ndim != 2:
            raise ValueError(f"θ must be [batch, dim], got shape {tuple(theta.shape)}")
        if theta.shape[0] != len(tasks):
            raise ValueError(f"θ has {theta.shape[0]} rows but {len(tasks)} tasks were given")
        self.space.check(theta)
        return _BlackBoxFunction.apply(theta.to(torch.float64), self, list(tasks))

    def evaluate(self, theta: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        """Costs at θ alone (no queries, no gradient); counted apart from the training solves,
        so learning curves against solver calls show what training spent."""
        with torch.no_grad():
            self.space.check(theta)
            points = theta.new_zeros((theta.shape[0], 0, theta.shape[1]))
            values = self._solve(theta.to(torch.float64), points, list(tasks), training=False)
        return values[:, 0]

    def _settings(self, points: torch.Tensor) -> list[dict]:
        return [{**self.space.decode(p), **self.cost.overrides} for p in points]

    def _solve(self, theta: torch.Tensor, points: torch.Tensor, tasks: list, training: bool = True) -> torch.Tensor:
        """Values [B, 1 + Q] of the centre and every query point; NaN where a solve failed."""
        everything = torch.cat([theta[:, None, :], points], dim=1)

        def solve_task(index: int) -> list[float]:
            task, settings = tasks[index], self._settings(everything[index])
            if hasattr(self.oracle, "solve_many"):
                outcomes = self.oracle.solve_many(task, settings)
            else:
                outcomes = [self.oracle(task, s) for s in settings]
            return [self.cost(outcome, task) for outcome in outcomes]

        values = torch.tensor(self.executor.map(solve_task, range(len(tasks))), dtype=torch.float64)
        values = values.reshape(len(tasks), everything.shape[1])
        self._count(values, tasks, training)
        return values

    def _count(self, values: torch.Tensor, tasks: list, training: bool) -> None:
        failed = ~torch.isfinite(values)
        if training:
            self.stats.solves += values.numel()
        else:
            self.stats.evaluation_solves += values.numel()
        self.stats.failed_centres += int(failed[:, 0].sum())
        self.stats.failed_queries += int(failed[:, 1:].sum())
        bad = [getattr(tasks[b], "name", "") or str(b) for b in range(len(tasks)) if failed[b].any()]
        if bad:
            warnings.warn(f"{int(failed.sum())} solve(s) failed in tasks {bad}: dropped from the gradient estimate",
                          RuntimeWarning, stacklevel=4)


class _BlackBoxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, box: BlackBox, tasks: list) -> torch.Tensor:
        points = box.estimator.queries(theta.detach(), box.generator)
        values = box._solve(theta.detach(), points, tasks)
        centre = values[:, 0].clone()
        failed = ~torch.isfinite(centre)
        for b in torch.nonzero(failed).flatten().tolist():
            centre[b] = box.cost.failure_value(tasks[b])
        ctx.box, ctx.tasks = box, tasks
        ctx.save_for_backward(theta.detach(), points, values)
        return centre

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        theta, points, values = ctx.saved_tensors
        gradient = ctx.box.estimator.gradient(theta, points, values, upstream.to(torch.float64), ctx.tasks)
        failed_centre = ~torch.isfinite(values[:, 0])
        gradient[failed_centre] = 0.0
        return torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0), None, None


__all__ = ["BlackBox", "SolveStats"]
