"""The evaluation table of a run: the learned setting against the baselines a user would try.

Every method is solved on the same unseen tasks through the one solve path
(`metasolve.method.measure.measure`) with the evaluation cost (iterations to the `[evaluate]`
tolerance), and every solve is counted as an evaluation solve. A failed solve is charged the
cost's `failure_value` *and* counted in a `failed` column, so a method that fails cannot hide
behind a cheap-looking number. The learned method's time includes its prediction; the table
also keeps the setting each method used on each task, which is what a PETSc user asks first.

Baselines (`baselines(experiment)`): the solver as configured (no option changed, zero guess);
for a space with one continuous option, the best constant found by golden-section search on
training tasks (its solves are counted apart, in `constant_solves`); and the textbook formula
when the config names one (`[model] anchor`), which is exactly the untrained anchored model.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from metasolve.method.measure import measure
from metasolve.method.params import Interval, LogInterval, Vector
from metasolve.training.option_search import golden_section
from problems.family import Task

Baseline = Callable[[Any], dict]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return f"<vector of {value.size}>"
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def _grid(space: Any) -> tuple[int, ...] | None:
    """The grid of the space's sine-basis vectors (the only parts that mean the same on another grid)."""
    shapes = {part.shape for part in space.parts.values() if isinstance(part, Vector) and part.basis_name == "sine"}
    return shapes.pop() if len(shapes) == 1 else None


def on_task_grid(meta_solver: Any, space: Any, cache: dict) -> Callable[[Any], tuple[Any, Any]]:
    """(model, space) for a task: a task on another grid than the one trained on (`[evaluate]
    params`) gets the same sine series on its own grid (`MetaSolver.on_grid`), built once per
    grid, as a deployment would."""
    grid = _grid(space)

    def choose(task: Any) -> tuple[Any, Any]:
        shape = tuple(task.grid_shape) if isinstance(task, Task) else ()  # a program run or a channel case has none
        if grid is None or not shape or shape == grid:
            return meta_solver, space
        if shape not in cache:
            cache[shape] = meta_solver.on_grid(shape)
        return cache[shape], cache[shape].space
    return choose


def predicted_setting(meta_solver: Any, space: Any, task: Any) -> tuple[dict, float]:
    """The learned setting of one task and the seconds its prediction took (features excluded:
    they are the task's, and reported apart)."""
    begin = time.perf_counter()
    with torch.no_grad():
        setting = space.decode(meta_solver(task.features[None, :].to(torch.float64))[0])
    return setting, time.perf_counter() - begin


def evaluate(experiment: Any, tasks: Sequence[Any], baselines: Mapping[str, Baseline | dict]) -> dict[str, dict]:
    """Per method: cost (iterations), seconds (solve + setup + prediction), failed, setting — per task."""
    box = experiment.blackbox
    cost = experiment.evaluation_cost
    deployed = on_task_grid(experiment.meta_solver, box.space, {})
    methods: dict[str, Callable[[Any], tuple[dict, float]]] = {
        "learned": lambda task: predicted_setting(*deployed(task), task)}
    for name, baseline in baselines.items():
        methods[name] = (lambda task, b=baseline: (b(task) if callable(b) else dict(b), 0.0))
    names = list(methods)

    def run(index: int) -> dict[str, tuple[float, float, bool, dict]]:
        # The first solve of a task also builds its PETSc objects: rotate which method pays that.
        shift = index % len(names)
        results = {}
        for name in names[shift:] + names[:shift]:
            setting, inference = methods[name](tasks[index])
            (result,) = measure(box.oracle, cost, tasks[index], [setting])
            value = cost.failure_value(tasks[index]) if result.failed else result.value
            seconds = inference + result.outcome.setup_seconds + result.outcome.seconds
            results[name] = (value, seconds, result.failed, {k: _plain(v) for k, v in setting.items()})
        return results

    per_task = experiment.trainer.executor.map(run, range(len(tasks)))
    box.stats.evaluation_solves += len(tasks) * len(names)
    return {name: {"iterations": [r[name][0] for r in per_task], "seconds": [r[name][1] for r in per_task],
                   "failed": [r[name][2] for r in per_task], "settings": [r[name][3] for r in per_task],
                   "tasks": [str(task.name) for task in tasks]}
            for name in names}


def summarize(evaluation: Mapping[str, Mapping[str, list]]) -> list[dict[str, Any]]:
    """Median and spread of iterations and seconds per method, and how many solves failed."""
    rows = []
    for name, result in evaluation.items():
        its, secs = np.asarray(result["iterations"], dtype=float), np.asarray(result["seconds"], dtype=float)
        rows.append({"method": name, "median_iterations": float(np.median(its)), "mean_iterations": float(its.mean()),
                     "iqr_iterations": float(np.subtract(*np.percentile(its, [75, 25]))),
                     "median_seconds": float(np.median(secs)), "total_seconds": float(secs.sum()),
                     "failed": int(sum(bool(f) for f in result.get("failed", [])))})
    return rows


def _scalar_part(space: Any) -> tuple[str, Any] | None:
    parts = list(space.parts.items())
    if len(parts) == 1 and isinstance(parts[0][1], (Interval, LogInterval)):
        return parts[0]
    return None


def best_constant(experiment: Any, tasks: Sequence[Any], evaluations: int) -> tuple[dict, int]:
    """The constant setting of a one-option space with the lowest mean training cost on `tasks`,
    by golden-section search in raw θ over [-6, 6] (where the sigmoid covers all but 0.25% of the
    interval); returns the setting and the solves it took."""
    box = experiment.blackbox

    def mean_cost(raw: float) -> float:
        setting = box.space.decode(torch.tensor([raw], dtype=torch.float64))
        values = experiment.trainer.executor.map(
            lambda i: measure(box.oracle, box.cost, tasks[i], [setting])[0], range(len(tasks)))
        finite = [v.value if not v.failed else box.cost.failure_value(tasks[i]) for i, v in enumerate(values)]
        return float(np.mean(finite))

    raw, _, _ = golden_section(mean_cost, -6.0, 6.0, max(2, evaluations))
    box.stats.evaluation_solves += max(2, evaluations) * len(tasks)
    return box.space.decode(torch.tensor([raw], dtype=torch.float64)), max(2, evaluations) * len(tasks)


def baselines(experiment: Any) -> tuple[dict[str, Baseline | dict], dict[str, Any]]:
    """The methods the learned setting is compared with, and what finding them cost."""
    config = experiment.config
    learned = config["space"]
    default = "zero guess" if all(part["kind"] == "vector" for part in learned.values()) else "configured defaults"
    chosen: dict[str, Baseline | dict] = {default: {}}
    spent: dict[str, Any] = {}
    budget = config["evaluate"]["constant_evaluations"]
    if budget and _scalar_part(experiment.blackbox.space) is not None:
        tasks = experiment.train_tasks[:config["evaluate"]["constant_tasks"]]
        setting, solves = best_constant(experiment, tasks, budget)
        chosen["best constant"] = setting
        spent["best constant"] = {"setting": {k: _plain(v) for k, v in setting.items()}, "solves": solves}
    if config["model"]["anchor"]:
        anchored = on_task_grid(experiment.untrained_meta_solver, experiment.blackbox.space, {})
        chosen["textbook formula"] = lambda task: predicted_setting(*anchored(task), task)[0]
    return chosen, spent


__all__ = ["baselines", "best_constant", "evaluate", "predicted_setting", "summarize"]
