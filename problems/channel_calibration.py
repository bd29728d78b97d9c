"""The wall model's calibration, chosen by cross-validation over the DNS cases it is given.

Which data a user has should not decide how well the model generalises (trained on two DNS
cases it did well on unseen ones, trained on three it did worse than the law it corrects:
benchmarks/results/wall_model.md). So the model's capacity (random features, `hidden`) and its
ridge (`ridge`) are chosen by leave-one-DNS-case-out inside the training data: for every
candidate, each training case is held out in turn, the friction law is refitted without it, the
model is fitted to what is left and scored on the held-out case's grids against its DNS Re_τ
(with a single case, each flow rate is held out in turn instead: `folds`).

The fits are closed-form: each task's coarse solve is linearised around Spalding's law
(`Response`, two solves per task, measured once), and the learned model's ln Re_τ,
Spalding's + s·c_θ(x), is linear in θ, so each fit is a weighted ridge regression,

    min_θ (1/N) Σ_i w_i (e₀_i + s_i φ(x_i)·θ)² + λ|θ|²,   e₀ = ln Re_τ,Spalding − ln Re_τ,target,

the training cost of `metasolve.method.calibration.LogError` to first order, plus the ridge.
A friction-law target's weight falls with the law's own variance at that flow rate
(`FrictionLaw.re_tau_sd`, `FIT_FLOOR`): where the law extrapolates, the model trusts it less.
Each prediction carries a band: the spread of the held-out fits, with the law's uncertainty added.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from problems.channel_dns import DNSProfile, FrictionLaw
from problems.channel_task import ChannelTask
from problems.wall_laws import LearnedWallModel

FIT_FLOOR = 5e-3
"""The ln Re_τ error below which a coarse-grid wall model cannot be held on every grid at once
(the leave-one-case-out errors are of this size: `runs.*.cv_scores` in
benchmarks/results/wall_model.json): a friction-law target whose uncertainty is below it counts
nearly as much as DNS, one far above it little. Weight = FIT_FLOOR²/(FIT_FLOOR² + sd_law²)."""
TARGETS = ("dns", "friction_law", "rans")


def training_set(target: str, cases: Sequence[DNSProfile], dns_tasks: dict[int, list[ChannelTask]],
                 synthetic: Sequence[ChannelTask]) -> tuple[list[ChannelTask], FrictionLaw | None]:
    """The training tasks for `target` from these DNS cases: their own tasks ("dns"); those and
    the synthetic conditions with friction-law targets weighted by the law's certainty
    ("friction_law"); or the synthetic conditions against the wall-resolved RANS ("rans")."""
    if target not in TARGETS:
        raise ValueError(f"channel target must be one of {TARGETS}, got {target!r}")
    if target == "rans":
        return [t.retargeted(t.reference.re_tau, "RANS") for t in synthetic], None
    if not cases:
        raise ValueError(f"target {target!r} needs at least one DNS case in train_dns")
    tasks = [t for case in cases for t in dns_tasks[case.nominal]]
    if target == "dns":
        return tasks, None
    law = FrictionLaw.fit(cases)
    for task in synthetic:
        spread = law.re_tau_sd(task.re_b)
        tasks.append(task.retargeted(law.re_tau(task.re_b), "friction law", FIT_FLOOR**2 / (FIT_FLOOR**2 + spread**2)))
    return tasks, law


def _design(model: LearnedWallModel, tasks: Sequence[ChannelTask]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, e₀, w): rows s_i φ(x_i), Spalding's log errors, weights."""
    features = model.features(np.stack([t.inputs for t in tasks]))
    slope = np.array([t.response.slope for t in tasks])
    error = np.array([t.response.log_re_tau - math.log(t.target) for t in tasks])
    return slope[:, None] * features, error, np.array([t.weight for t in tasks])


def ridge_fit(model: LearnedWallModel, tasks: Sequence[ChannelTask], ridge: float) -> np.ndarray:
    """θ minimising (1/N) Σ w_i (e₀_i + A_i·θ)² + ridge·|θ|² (closed form; float64)."""
    design, error, weight = _design(model, tasks)
    n = len(tasks)
    gram = design.T @ (weight[:, None] * design) / n + ridge * np.eye(design.shape[1])
    return -np.linalg.solve(gram, design.T @ (weight * error) / n)


def linearised_log_re_tau(model: LearnedWallModel, theta: np.ndarray, tasks: Sequence[ChannelTask]) -> np.ndarray:
    """ln Re_τ the model at θ predicts on each task, to first order around Spalding."""
    features = model.features(np.stack([t.inputs for t in tasks]))
    return np.array([t.response.log_re_tau + t.response.slope * f for t, f in zip(tasks, features @ theta)])


@dataclass
class Calibration:
    """The chosen model and its fits: `theta` on every training task, `held_out_thetas` with each
    fold left out in turn (`folds`), `scores` the cross-validation table, and the friction law of
    the full fit (None for the "dns" and "rans" targets)."""

    model: LearnedWallModel
    ridge: float
    theta: np.ndarray
    held_out_thetas: dict[str, np.ndarray] = field(default_factory=dict)
    scores: list[dict] = field(default_factory=list)
    law: FrictionLaw | None = None

    def predict(self, tasks: Sequence[ChannelTask]) -> list[dict[str, float]]:
        """Per task: the predicted Re_τ (to first order around Spalding) and its band [lo, hi],
        the largest departure of a leave-one-case-out fit combined in quadrature with the
        friction law's own uncertainty at that flow rate."""
        centre = linearised_log_re_tau(self.model, self.theta, tasks)
        spread = np.zeros_like(centre)
        for theta in self.held_out_thetas.values():
            spread = np.maximum(spread, np.abs(linearised_log_re_tau(self.model, theta, tasks) - centre))
        law = np.array([self.law.re_tau_sd(t.re_b) if self.law is not None else 0.0 for t in tasks])
        half = np.sqrt(spread**2 + law**2)
        return [{"re_tau": math.exp(c), "lo": math.exp(c - h), "hi": math.exp(c + h)} for c, h in zip(centre, half)]


def folds(target: str, cases: Sequence[DNSProfile], dns_tasks: dict[int, list[ChannelTask]],
          synthetic: Sequence[ChannelTask]) -> dict[str, tuple[list[ChannelTask], list[ChannelTask]]]:
    """Held-out name → (training tasks, held-out tasks with their true targets).

    With two or more DNS cases, each case in turn: trained on the others (the friction law
    refitted without it), scored against its DNS Re_τ. With one case nothing of the data can be
    held out, so each flow rate in turn: trained on the rest, scored against the targets at that
    flow rate (the law between and beyond the case: how smoothly the model interpolates them).
    With one flow rate, none."""
    if len(cases) >= 2:
        return {f"Re{case.nominal}": (training_set(target, [c for c in cases if c is not case], dns_tasks, synthetic)[0],
                                      dns_tasks[case.nominal]) for case in cases}
    tasks, _ = training_set(target, cases, dns_tasks, synthetic)
    flow_rates = sorted({t.re_b for t in tasks})
    if len(flow_rates) < 2:
        return {}
    return {f"Re_b {re_b:.0f}": ([t for t in tasks if t.re_b != re_b], [t for t in tasks if t.re_b == re_b])
            for re_b in flow_rates}


def cross_validate(target: str, cases: Sequence[DNSProfile], dns_tasks: dict[int, list[ChannelTask]],
                   synthetic: Sequence[ChannelTask], hidden: Sequence[int], ridge: Sequence[float],
                   seed: int) -> Calibration:
    """Choose (hidden, ridge) over the `folds`, then fit on every task.

    The score of a candidate is the RMS ln Re_τ error over every fold's held-out tasks; the
    lowest wins (ties: the first, i.e. fewer features and the larger ridge). Without folds the
    most regularised candidate is taken: the one that departs least from Spalding's law."""
    candidates = list(itertools.product(sorted(set(hidden)), sorted(set(ridge), reverse=True)))
    if not candidates:
        raise ValueError("the channel calibration needs at least one hidden size and one ridge value")
    split = folds(target, cases, dns_tasks, synthetic)
    scores = []
    for h, lam in candidates:
        model = LearnedWallModel(hidden=h, seed=seed)
        errors = []
        for training, held_out in split.values():
            predicted = linearised_log_re_tau(model, ridge_fit(model, training, lam), held_out)
            errors += list(predicted - np.log([t.target for t in held_out]))
        rms = float(np.sqrt(np.mean(np.square(errors)))) if errors else math.nan
        scores.append({"hidden": h, "ridge": lam, "held_out_rms": rms,
                       "held_out_max": float(np.max(np.abs(errors))) if errors else math.nan})
    best = min(scores, key=lambda s: s["held_out_rms"]) if split else scores[0]
    model = LearnedWallModel(hidden=best["hidden"], seed=seed)
    tasks, law = training_set(target, cases, dns_tasks, synthetic)
    held_out_thetas = {name: ridge_fit(model, training, best["ridge"]) for name, (training, _) in split.items()}
    return Calibration(model, best["ridge"], ridge_fit(model, tasks, best["ridge"]), held_out_thetas, scores, law)


__all__ = ["Calibration", "TARGETS", "FIT_FLOOR", "cross_validate", "folds", "linearised_log_re_tau", "ridge_fit",
           "training_set"]
