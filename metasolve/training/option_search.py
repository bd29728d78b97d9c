"""Each task's best continuous options by a cheap, counted search: the targets of the options'
supervised start (`metasolve.training.pretrain.supervised_start`).

An initial guess has a free supervised target, the solver's own solution. An option has none:
its best value for a task must be searched for, with solves. Golden-section search is the
optimal bracketing method for a unimodal function of one variable with a fixed number of
evaluations (Kiefer 1953): n evaluations leave a bracket of (√5 − 1)/2 ≈ 0.618 to the power n − 1
of the initial one, so 10 solves pin an option to ~1% of its bracket. It searches in raw θ, the
coordinate the network predicts and training steps in, over `centre ± half_width` around the
model's current prediction for the task (θ = 0, mid-interval, for an untrained model; the
formula's value for an anchored one). Several scalar parts are searched one after another
(coordinate search), each with its share of the budget, the others held at the best values
found so far; parts that are not searched (an initial guess, a discrete choice) keep the
model's current prediction.

Every solve goes through `metasolve.method.measure.measure` with the cost the run trains on, so
the search ranks settings exactly as training will; a failed solve is charged the cost's
`failure_value`. Tasks are spread over the ranks by the black box's executor, whose `map`
returns every task's result on every rank, so the regression that follows is identical on all.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metasolve.method.measure import measure
from metasolve.method.params import Interval, Space

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
"""The golden-section ratio: each evaluation after the first two shrinks the bracket by it."""

HALF_WIDTH = 4.0
"""Default half-width of the raw-θ bracket: from θ = 0 it spans sigmoid(±4), 1.8%–98.2% of an
Interval, and around a formula's value it allows any plausible correction."""


def option_parts(space: Space) -> list[str]:
    """Names of the space's continuous scalar parts (`Interval`, `LogInterval`), in space order."""
    return [name for name, part in space.parts.items() if isinstance(part, Interval)]


def golden_section(objective: Callable[[float], float], lo: float, hi: float,
                   evaluations: int) -> tuple[float, float, list[tuple[float, float]]]:
    """Minimise `objective` on [lo, hi] with exactly `evaluations` (>= 2) calls.

    Returns (best point seen, its value, every (point, value) in call order). For a unimodal
    objective the minimiser lies in the final bracket, of length (hi − lo)·GOLDEN^(evaluations − 1),
    which also holds the best point seen. Ties go to the lower bracket, as in the textbook rule.
    """
    if evaluations < 2:
        raise ValueError(f"golden-section search needs at least 2 evaluations, got {evaluations}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"golden-section search needs a finite bracket lo < hi, got [{lo}, {hi}]")
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = objective(c), objective(d)
    seen = [(c, fc), (d, fd)]
    for _ in range(evaluations - 2):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = objective(c)
            seen.append((c, fc))
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = objective(d)
            seen.append((d, fd))
    best = min(seen, key=lambda point: point[1])
    return best[0], best[1], seen


@dataclass(frozen=True)
class TaskSearch:
    """One task's search: the best raw θ found (the whole row) and its cost, solves spent, failed."""

    theta: list[float]
    cost: float
    solves: int
    failed: int


def budget_split(solves: int, parts: int) -> list[int]:
    """Evaluations per part: `solves` shared as evenly as possible, earlier parts taking the rest."""
    if parts < 1:
        raise ValueError("an option search needs at least one part to search")
    if solves < 2 * parts:
        raise ValueError(f"an option search needs at least 2 solves per searched part: got {solves} solves "
                         f"for {parts} part(s)")
    return [solves // parts + (1 if i < solves % parts else 0) for i in range(parts)]


def search_task(oracle: Any, cost: Any, space: Space, task: Any, centre: torch.Tensor, parts: Sequence[str],
                solves: int, half_width: float = HALF_WIDTH) -> TaskSearch:
    """Golden-section search of each part in `parts` in turn around `centre` (a raw θ row)."""
    theta = centre.detach().to(torch.float64).clone()
    failed = 0

    def charge(row: torch.Tensor) -> float:
        nonlocal failed
        result = measure(oracle, cost, task, [space.decode(row)])[0]
        if result.failed:
            failed += 1
            return float(cost.failure_value(task))
        return result.value

    best_cost = math.nan
    for name, evaluations in zip(parts, budget_split(solves, len(parts))):
        column = space.slices[name].start
        start = float(theta[column])

        def objective(x: float) -> float:
            row = theta.clone()
            row[column] = x
            return charge(row)

        theta[column], best_cost, _ = golden_section(objective, start - half_width, start + half_width, evaluations)
    return TaskSearch(theta=theta.tolist(), cost=float(best_cost), solves=solves, failed=failed)


def search_tasks(blackbox: Any, tasks: Sequence[Any], centres: torch.Tensor, parts: Sequence[str], solves: int,
                 half_width: float = HALF_WIDTH) -> list[TaskSearch]:
    """`search_task` for every task, spread over `blackbox.executor` (every rank gets every result)."""
    space = blackbox.space

    def one(index: int) -> TaskSearch:
        return search_task(blackbox.oracle, blackbox.cost, space, tasks[index], centres[index], parts, solves,
                           half_width)

    keys = [(getattr(task, "name", "") or f"task {i}", "option search", solves) for i, task in enumerate(tasks)]
    return blackbox.executor.map(one, range(len(tasks)), keys=keys)


__all__ = ["GOLDEN", "HALF_WIDTH", "TaskSearch", "budget_split", "golden_section", "option_parts", "search_task",
           "search_tasks"]
