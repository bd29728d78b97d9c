"""The black-box solver as a torch operation: real solves forward, estimated gradient backward."""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from metasolve.method.estimator import Deferred, Estimator
from metasolve.method.measure import PURPOSES, Measurement, SolveStats, measure
from metasolve.method.params import Space
from metasolve.method.protocols import Cost, Executor, Oracle
from metasolve.method.protocols import SerialExecutor

logger = logging.getLogger("metasolve")

DEFERRED_KEY = ("estimator: deferred work", 0)
"""The balanced schedule's key for the estimator's work item: its cost is learned like a solve's."""


class BlackBox:
    """`y = bb(theta, tasks)`: θ [B, d] → cost of solving task b under setting decode(θ_b), [B].

    Forward runs one executor round holding the centre and every query point of every task
    (queries of one task go together, so `solve_many` sets up the preconditioner once); a query
    point that is NaN was not asked for and is not solved. The estimator's deferred work from
    the last estimate (`metasolve.method.estimator`: a surrogate update, a cost-model fit) runs
    as one more item of a training round, on whichever rank the schedule picks, and every rank
    adopts its result; work the next queries need runs on every rank before them. Backward
    returns the estimator's gradient times the upstream gradient, then lets the estimator keep
    the step's data (`observe`). Every solve goes through `metasolve.method.measure.measure`
    and is counted by purpose in `stats` after its round.

    Failures: `failures="drop"` (default) hands a failed query to the estimator as NaN, which drops
    its tangent: a divergence cliff then looks like missing data. `failures="penalize"` charges it
    `cost.failure_value(task)` instead, so the estimate sees the cliff (a large finite difference
    pointing away from it). A failed centre always costs `failure_value` and gets a zero gradient
    (when the estimator `uses_centre`). Every failure is counted (`stats`), listed in
    `last_failures` as (task name, the solver's error text) for the latest round, and reported
    through the `metasolve` logger: one record per round, identical messages grouped with their
    count; a round whose error texts were all reported before (for any task) goes to DEBUG, so a
    recurring divergence warns once, not every step.
    """

    FAILURES = ("drop", "penalize")

    def __init__(self, oracle: Oracle, space: Space, cost: Cost, estimator: Estimator,
                 executor: Executor | None = None, seed: int = 0, failures: str = "drop") -> None:
        if failures not in self.FAILURES:
            raise ValueError(f"failures must be one of {self.FAILURES}, got {failures!r}")
        if not isinstance(estimator, Estimator):
            raise TypeError(f"the estimator must subclass metasolve.method.estimator.Estimator, "
                            f"got {type(estimator).__name__}")
        self.oracle, self.space, self.cost, self.estimator = oracle, space, cost, estimator
        self.executor: Executor = executor if executor is not None else SerialExecutor()
        self.generator = torch.Generator().manual_seed(seed)
        self.failures = failures
        self.stats = SolveStats()
        self.last_failures: list[tuple[str, str]] = []
        self.failure_counts: Counter[tuple[str, str]] = Counter()
        self._pending_work: Deferred | None = None  # the estimator's work for this round (`_prepare`)

    def __call__(self, theta: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        if theta.ndim != 2:
            raise ValueError(f"θ must be [batch, dim], got shape {tuple(theta.shape)}")
        if theta.shape[0] != len(tasks):
            raise ValueError(f"θ has {theta.shape[0]} rows but {len(tasks)} tasks were given")
        self.space.check(theta)
        return _BlackBoxFunction.apply(theta.to(torch.float64), self, list(tasks))

    def evaluate(self, theta: torch.Tensor, tasks: Sequence[Any], purpose: str = "evaluation") -> torch.Tensor:
        """Costs at θ alone (no queries, no gradient, NaN where a solve failed), counted under
        `purpose` ("evaluation" or "diagnosis"), apart from the training solves, so learning curves
        against solver calls show what training spent."""
        with torch.no_grad():
            self.space.check(theta)
            points = theta.new_zeros((theta.shape[0], 0, theta.shape[1]), dtype=torch.float64)
            values = self._solve(theta.to(torch.float64), points, list(tasks), purpose=purpose)
        return values[:, 0]

    def diagnose(self, theta: torch.Tensor, tasks: Sequence[Any]) -> list[Measurement]:
        """One solve per task at θ with the whole Outcome kept (why it failed, in the solver's
        words), counted as diagnosis; for explaining a failed run, not for training."""
        settings = [self.space.decode(row) for row in theta.detach().to(torch.float64)]
        results = self.executor.map(lambda i: measure(self.oracle, self.cost, tasks[i], [settings[i]])[0],
                                    range(len(tasks)))
        self.stats.count("diagnosis", len(tasks))
        return results

    @staticmethod
    def _key(task: Any, index: int) -> Hashable:
        """A task's name identifies it to the balanced schedule and in failure reports."""
        return str(task.name) or f"task {index}"

    def _solve(self, theta: torch.Tensor, points: torch.Tensor, tasks: list, purpose: str = "training") -> torch.Tensor:
        """Values [B, 1 + Q] of the centre and every query point; NaN where a solve failed or a
        point was not asked for (NaN point). A training round also runs the estimator's deferred work."""
        if purpose not in PURPOSES:
            raise ValueError(f"a solve's purpose must be one of {PURPOSES}, got {purpose!r}")
        everything = torch.cat([theta[:, None, :], points], dim=1)
        asked = torch.isfinite(everything).all(dim=2)

        def solve_task(index: int) -> list[tuple[float, str | None]]:
            settings = [self.space.decode(row) for row in everything[index][asked[index]]]
            return [(m.value, m.failure) for m in measure(self.oracle, self.cost, tasks[index], settings)]

        # A task with this many points costs what it cost last time: the key the balanced MPI schedule learns by.
        keys: list[Hashable] = [(self._key(task, i), n) for i, (task, n) in enumerate(zip(tasks, asked.sum(1).tolist()))]
        work = None
        if purpose == "training":
            work, self._pending_work = self._pending_work, None
        if work is not None:
            keys.append(DEFERRED_KEY)
        solved = self.executor.map(lambda index: work.run() if index == len(tasks) else solve_task(index),
                                   range(len(keys)), keys=keys)
        if work is not None:
            self.estimator.adopt(solved.pop())
        values = torch.full(asked.shape, math.nan, dtype=torch.float64)
        values[asked] = torch.tensor([v for results in solved for v, _ in results], dtype=torch.float64)  # row-major
        errors = [(self._key(tasks[b], b), text, j == 0)
                  for b, results in enumerate(solved) for j, (_, text) in enumerate(results) if text is not None]
        self._count(values, asked, errors, purpose)
        return values

    def _prepare(self) -> None:
        """Start a training round: the estimator's deferred work runs here, on every rank, when the
        queries need it; otherwise it waits for the round (`_solve`)."""
        work = self.estimator.deferred()
        if work is not None and work.before_queries:
            self.estimator.adopt(work.run())
            work = None
        self._pending_work = work

    def _count(self, values: torch.Tensor, asked: torch.Tensor, errors: list[tuple[str, str, bool]],
               purpose: str) -> None:
        self.stats.count(purpose, int(asked.sum()))
        failed = ~torch.isfinite(values) & asked
        if purpose == "training":
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
        box._prepare()
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
        estimator, upstream = ctx.box.estimator, upstream.to(torch.float64)
        gradient = estimator.gradient(theta, points, values, upstream, ctx.tasks)
        estimator.observe(theta, points, values, upstream, ctx.tasks)
        if estimator.uses_centre:  # differences against a failed centre are meaningless
            gradient = gradient.masked_fill(~torch.isfinite(values[:, 0])[:, None], 0.0)
        return torch.nan_to_num(gradient, nan=0.0, posinf=0.0, neginf=0.0), None, None


__all__ = ["BlackBox", "SolveStats"]
