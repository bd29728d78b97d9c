"""The black-box solver as a torch operation: real solves forward, estimated gradient backward."""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metasolve.estimators import Estimator
from metasolve.params import Space
from metasolve.parallel import SerialExecutor

logger = logging.getLogger("metasolve")


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


def failure_text(outcome: Any) -> str:
    """Why a solve gave no usable cost, in the solver's own words where it has them."""
    error = getattr(outcome, "error", None)
    if error:
        return str(error).strip()
    residuals = getattr(outcome, "residuals", None)
    if residuals is not None and len(residuals) and not all(math.isfinite(float(r)) for r in residuals):
        return f"non-finite residual norm (reason {getattr(outcome, 'reason', '?')})"
    if getattr(outcome, "failed", False):
        return f"diverged (reason {getattr(outcome, 'reason', '?')})"
    return f"the cost is undefined for this outcome (reason {getattr(outcome, 'reason', '?')}, not converged)"


class BlackBox:
    """`y = bb(theta, tasks)`: θ [B, d] → cost of solving task b under setting decode(θ_b), [B].

    Forward runs one executor round holding the centre and every query point of every task
    (queries of one task go together, so an oracle with `solve_many` sets up its preconditioner
    once); a query point that is NaN was not asked for and is not solved. An estimator with work
    left from its last estimate (`deferred()` → a callable, `adopt(result)`: the control variate's
    surrogate update) gets it run as one more item of a training round, on whichever rank the
    schedule picks. Backward returns the estimator's gradient times the upstream gradient.

    Failures: `failures="drop"` (default) hands a failed query to the estimator as NaN, which drops
    its tangent: a divergence cliff then looks like missing data. `failures="penalize"` charges it
    `cost.failure_value(task)` instead, so the estimate sees the cliff (a large finite difference
    pointing away from it). A failed centre always costs `failure_value` and gets a zero gradient.
    Every failure is counted (`stats`), listed in `last_failures` as (task name, the solver's error
    text) for the latest forward, and reported through the `metasolve` logger: one record per
    round, identical messages grouped with their count; a round whose error texts were all reported
    before (for any task) goes to DEBUG, so a recurring divergence warns once, not every step.
    """

    FAILURES = ("drop", "penalize")

    def __init__(self, oracle: Any, space: Space, cost: Any, estimator: Estimator, executor: Any = None,
                 seed: int = 0, failures: str = "drop") -> None:
        if failures not in self.FAILURES:
            raise ValueError(f"failures must be one of {self.FAILURES}, got {failures!r}")
        self.oracle, self.space, self.cost, self.estimator = oracle, space, cost, estimator
        self.executor = executor if executor is not None else SerialExecutor()
        self.generator = torch.Generator().manual_seed(seed)
        self.failures = failures
        self.stats = SolveStats()
        self.last_failures: list[tuple[str, str]] = []
        self.failure_counts: Counter[tuple[str, str]] = Counter()

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
        """Values [B, 1 + Q] of the centre and every query point; NaN where a solve failed or a
        point was not asked for (NaN point)."""
        everything = torch.cat([theta[:, None, :], points], dim=1)
        asked = torch.isfinite(everything).all(dim=2)

        def solve_task(index: int) -> list[tuple[float, str | None]]:
            task, rows = tasks[index], everything[index][asked[index]]
            settings = self._settings(rows)
            if hasattr(self.oracle, "solve_many"):
                outcomes = self.oracle.solve_many(task, settings)
            else:
                outcomes = [self.oracle(task, s) for s in settings]
            results = []
            for outcome in outcomes:
                value = self.cost(outcome, task)
                results.append((value, failure_text(outcome) if math.isnan(value) else None))
            return results

        # A task with this many points costs what it cost last time: the key the balanced MPI schedule learns by.
        keys = [(getattr(task, "name", "") or id(task), n) for task, n in zip(tasks, asked.sum(dim=1).tolist())]
        # Work the estimator left for this round (its surrogate's update) runs as one more item,
        # on whichever rank the schedule gives it, while the others solve.
        deferred = getattr(self.estimator, "deferred", lambda: None)() if training else None
        if deferred is not None:
            keys.append(("estimator: deferred work", 0))
        solved = self.executor.map(lambda index: deferred() if index == len(tasks) else solve_task(index),
                                   range(len(keys)), keys=keys)
        if deferred is not None:
            self.estimator.adopt(solved.pop())
        values = torch.full(asked.shape, math.nan, dtype=torch.float64)
        values[asked] = torch.tensor([v for results in solved for v, _ in results], dtype=torch.float64)  # row-major
        errors: list[tuple[str, str, bool]] = []
        for b, results in enumerate(solved):
            if any(text is not None for _, text in results):
                name = getattr(tasks[b], "name", "") or f"task {b}"
                errors += [(name, text, j == 0) for j, (_, text) in enumerate(results) if text is not None]
        self._count(values, asked, errors, training)
        return values

    def _count(self, values: torch.Tensor, asked: torch.Tensor, errors: list[tuple[str, str, bool]],
               training: bool) -> None:
        failed = ~torch.isfinite(values) & asked
        if training:
            self.stats.solves += int(asked.sum())
        else:
            self.stats.evaluation_solves += int(asked.sum())
        self.stats.failed_centres += int(failed[:, 0].sum())
        self.stats.failed_queries += int(failed[:, 1:].sum())
        self.last_failures = [(name, text) for name, text, _ in errors]
        if not errors:
            return
        grouped = Counter((name, text) for name, text, _ in errors)
        seen = {text for _, text in self.failure_counts}
        fresh = [text for _, text in grouped if text not in seen]
        self.failure_counts.update(grouped)
        lines = "; ".join(f"{name}: {text}" + (f" (x{count})" if count > 1 else "")
                          for (name, text), count in grouped.items())
        centres = sum(1 for *_, centre in errors if centre)
        action = "charged the failure cost" if self.failures == "penalize" else "dropped from the gradient estimate"
        logger.log(logging.WARNING if fresh else logging.DEBUG,
                   "%d of %d solve(s) failed (%d centre(s): zero gradient; queries %s): %s",
                   len(errors), int(asked.sum()), centres, action, lines)


class _BlackBoxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, box: BlackBox, tasks: list) -> torch.Tensor:
        points = box.estimator.queries(theta.detach(), box.generator, tasks)
        values = box._solve(theta.detach(), points, tasks)
        centre = values[:, 0].clone()
        failed = ~torch.isfinite(centre)
        for b in torch.nonzero(failed).flatten().tolist():
            centre[b] = box.cost.failure_value(tasks[b])
        if box.failures == "penalize":
            asked = torch.isfinite(points).all(dim=2)
            failed_queries = torch.isnan(values[:, 1:]) & asked
            for b, j in torch.nonzero(failed_queries).tolist():
                values[b, 1 + j] = box.cost.failure_value(tasks[b])
        ctx.box, ctx.tasks = box, tasks
        ctx.save_for_backward(theta.detach(), points, values)
        return centre

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        theta, points, values = ctx.saved_tensors
        gradient = ctx.box.estimator.gradient(theta, points, values, upstream.to(torch.float64), ctx.tasks)
        if getattr(ctx.box.estimator, "uses_centre", True):  # differences against a failed centre are meaningless
            failed_centre = ~torch.isfinite(values[:, 0])
            gradient[failed_centre] = 0.0
        return torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0), None, None


__all__ = ["BlackBox", "SolveStats"]
