"""Why a training run failed or achieved nothing, in words a PETSc user can act on.

Three questions, each answered by solving, never by guessing: which solve failed and what PETSc
said (`failure_cause`), whether training lowered the held-out cost (`check_progress`), and if not,
the likely reason (`likely_causes`: the cost ignores the setting, θ did not move, the loss rose,
unscaled features). Every solve here goes through `BlackBox.evaluate`/`BlackBox.diagnose`, that
is through `metasolve.method.measure.measure`, and is counted: the held-out costs as evaluation,
the probes as diagnosis, so a run's report says what its diagnosis spent.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from metasolve.method.blackbox import BlackBox
from metasolve.method.meta_solver import MetaSolver

log = logging.getLogger("metasolve")


def features_of(tasks: Sequence[Any]) -> torch.Tensor:
    return torch.stack([t.features for t in tasks]).to(torch.float64)


def describe(setting: Mapping[str, Any]) -> str:
    """A setting in one line, vectors by their length."""
    parts = []
    for key, value in setting.items():
        size = np.size(value)
        parts.append(f"{key} = <vector of {size}>" if size > 1 else f"{key} = {value!r}")
    return ", ".join(parts)


def failure_cause(box: BlackBox, tasks: Sequence[Any], theta: torch.Tensor | None) -> str:
    """PETSc's own message for one failed solve of the latest round and the setting that produced
    it; when that round reported none, the batch (`tasks` at `theta`) is solved again to read why."""
    if box.last_failures:
        name, text = box.last_failures[0]
        index = next((i for i, t in enumerate(tasks) if str(t.name) == name), None)
        where = f" under setting {describe(box.space.decode(theta[index]))}" if index is not None and theta is not None else ""
        return f"Task {name!r}{where} with {box.oracle!r}: {text}"
    if theta is not None and len(tasks):
        for task, row, result in zip(tasks, theta, box.diagnose(theta, tasks)):
            if result.failed or result.outcome.failed:
                outcome = result.outcome
                final = outcome.residuals[-1] if outcome.residuals.size else "none"
                why = outcome.error or (f"PETSc converged reason {outcome.reason} after {outcome.iterations} "
                                        f"iterations (final residual {final})")
                return f"Task {task.name!r} under setting {describe(box.space.decode(row))} with {box.oracle!r}: {why}"
    return f"The solves failed with {box.oracle!r}."


def held_out(box: BlackBox, meta_solver: nn.Module, tasks: Sequence[Any]) -> dict[str, Any]:
    """Mean training cost of the predictor on `tasks` (one evaluation solve each), its θ, and how
    many solves failed."""
    with torch.no_grad():
        theta = meta_solver(features_of(tasks)).to(torch.float64)
        values = box.evaluate(theta, tasks)
    return {"cost": float(values.mean()), "theta": theta.clone(), "failed": int((~torch.isfinite(values)).sum())}


def check_progress(box: BlackBox, meta_solver: nn.Module, tasks: Sequence[Any], untrained: Mapping[str, Any],
                   history: Sequence[Mapping[str, Any]], min_improvement: float = 0.01) -> dict[str, Any]:
    """Held-out training cost, untrained vs trained; a warning with likely causes when it improved by
    less than `min_improvement` (relative) — training then achieved nothing. A NaN cost (a failed
    held-out solve) is no improvement: `lr = 1e300` once saturated θ so that every trained solve
    failed, and "untrained 194.833 -> trained nan" passed as if training had worked."""
    now = held_out(box, meta_solver, tasks)
    before, after = untrained["cost"], now["cost"]
    improvement = (before - after) / max(abs(before), 1e-12)
    report: dict[str, Any] = {"untrained_cost": before, "trained_cost": after, "relative_improvement": improvement,
                              "trained_failed": now["failed"]}
    log.info("held-out cost: untrained %.6g -> trained %.6g (%+.1f%%)", before, after, -100 * improvement)
    if not improvement >= min_improvement:  # NaN included
        causes = failed_causes(box, tasks, now) if now["failed"] else \
            likely_causes(box, meta_solver, tasks, now["theta"], untrained["theta"], history)
        report["causes"] = causes
        log.warning("training did not lower the held-out cost (untrained %.6g, trained %.6g). Likely cause: %s",
                    before, after, " ".join(causes))
    return report


def failed_causes(box: BlackBox, tasks: Sequence[Any], trained: Mapping[str, Any]) -> list[str]:
    """Why the trained predictor's held-out cost is not a number: its solves failed, with PETSc's
    message for one of them."""
    return [f"{trained['failed']} of {len(tasks)} held-out solves of the trained predictor failed "
            f"(its setting is not usable there). {failure_cause(box, tasks, trained['theta'])}"]


def likely_causes(box: BlackBox, meta_solver: nn.Module, tasks: Sequence[Any], theta: torch.Tensor,
                  untrained_theta: torch.Tensor, history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reasons a run did not lower the held-out cost, most specific first (two diagnosis solves
    per task: θ and θ moved by one in every raw coordinate)."""
    causes = []
    generator = torch.Generator().manual_seed(0)
    direction = torch.randint(0, 2, theta.shape, generator=generator).to(torch.float64) * 2 - 1
    here = box.evaluate(theta, tasks, purpose="diagnosis")
    there = box.evaluate(theta + direction, tasks, purpose="diagnosis")
    change = float(torch.nanmean((there - here).abs()))
    if not change > 1e-12 * (1 + float(torch.nanmean(here.abs()))):
        causes.append(f"the cost does not change with the setting (a unit step in every raw θ coordinate "
                      f"changed it by {change:.2g}): the option may not act on this solver, or the cost's "
                      f"budget ({box.cost!r}) does not see its effect.")
    moved = float((theta - untrained_theta).pow(2).mean().sqrt())
    losses = np.array([r["loss"] for r in history if math.isfinite(r["loss"])])
    tenth = max(1, len(losses) // 10)
    first, last = losses[:tenth], losses[-tenth:]
    # A rise counts only beyond batch-to-batch noise: two standard errors of a tenth's mean.
    noise = 2 * float(losses.std()) * math.sqrt(2 / tenth) if len(losses) > 1 else math.inf
    if moved < 1e-2:
        causes.append(f"θ barely moved (RMS change {moved:.2g} in raw θ): the learning rate is likely too small, "
                      f"or the space's scale makes useful settings need very large raw θ (θ scaling).")
    elif len(losses) > 1 and last.mean() - first.mean() > noise:
        causes.append(f"the training cost rose ({first.mean():.4g} -> {last.mean():.4g} over the first and last "
                      f"tenth of the steps): the learning rate is likely too large.")
    if isinstance(meta_solver, MetaSolver) and len(tasks) > 1 and bool(torch.all(meta_solver.feature_scale == 1)):
        spread = features_of(tasks).std(0)
        spread = spread[spread > 0]
        if spread.numel() and float(spread.max() / spread.min()) > 1e3:
            causes.append(f"the features are not standardised and their spreads differ by "
                          f"{float(spread.max() / spread.min()):.1g}x (feature scaling: model.normalize = true).")
    if not causes:
        causes.append(f"θ moved (RMS {moved:.2g}) but the cost did not follow: the gradient estimate may be too "
                      f"noisy for this learning rate (more tangents, a control variate, or more steps).")
    return causes


__all__ = ["check_progress", "describe", "failed_causes", "failure_cause", "features_of", "held_out", "likely_causes"]
