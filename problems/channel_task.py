"""The wall-modelled channel task and its solver: one flow rate on one coarse grid, one target Re_τ.

The coarse solve (problems/channel_flow.py's momentum balance) takes its wall flux from a wall
model evaluated at the first cell centre; the oracle is that SNES solve as a black box whose
setting is the learned model's θ. `measure_response` is the task's linearisation around
Spalding (two solves, made explicitly and counted by whoever calls it): what the calibration
(problems/channel_calibration.py) and the control variate's surrogate work from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from problems.channel_flow import TOLERANCES, Driving, Grid, Profile, first_guess, momentum_residual, \
    wall_resolved_reference
from problems.wall_laws import LearnedWallModel, WallModel
from solvers.outcome import Outcome
from solvers.snes import SNESOracle

WALL_MODEL_KEY = "wall_model"
"""The setting entry holding a learned wall model's parameters θ."""
SENSITIVITY_STEP = 1e-4
"""Step in c for ∂ ln u_τ/∂c: c is O(0.01–0.1) in use, and the solve is exact to ~1e-13."""
RESPONSE_SOLVES = 2
"""Solves per `measure_response`: Spalding, and Spalding × e^SENSITIVITY_STEP."""


@dataclass(frozen=True)
class Response:
    """A task's coarse solve linearised around Spalding's law: Re_y at the first cell, Spalding's
    ln Re_τ, and s = ∂ ln Re_τ/∂c for the model Spalding × e^c. Independent of any target, so
    one measurement serves every target the condition is given (the cross-validation's folds)."""

    re_y: float
    log_re_tau: float
    slope: float


@dataclass(eq=False)
class ChannelTask:
    """One wall-modelled problem: the flow rate Re_b on a named coarse grid ("u8", "s16"), and
    the Re_τ the solve should reproduce (`target_re_tau`; None means the wall-resolved RANS at
    the same Re_b, computed on first use and cached). `source` says where the target came from;
    `weight` how much the training cost trusts it (1 for DNS, less for an extrapolated friction
    law: `metasolve.method.calibration.LogError`); `response` its measured linearisation.
    """

    re_b: float
    grid_name: str = "u8"
    target_re_tau: float | None = None
    source: str = "RANS"
    name: str = ""
    weight: float = 1.0
    response: Response | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.driving = Driving(re_b=float(self.re_b))
        self.grid = Grid.named(self.grid_name)
        if self.target_re_tau is not None and not (math.isfinite(self.target_re_tau) and self.target_re_tau > 0):
            raise ValueError(f"target Re_tau must be positive and finite, got {self.target_re_tau}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"task weight must be positive and finite, got {self.weight}")
        if not self.name:
            self.name = f"channel-Reb{self.re_b:.0f}-{self.grid_name}-{self.source.replace(' ', '')}"

    def retargeted(self, target_re_tau: float, source: str, weight: float = 1.0) -> "ChannelTask":
        """The same condition (and its measured response) with another target."""
        return dataclasses.replace(self, target_re_tau=float(target_re_tau), source=source, name="", weight=weight)

    @property
    def reference(self) -> Profile:
        """The wall-resolved solution at this Re_b (cached)."""
        return wall_resolved_reference(float(self.re_b))

    @property
    def target(self) -> float:
        return self.target_re_tau if self.target_re_tau is not None else self.reference.re_tau

    @property
    def first_centre(self) -> float:
        return float(self.grid.centres[0])

    @property
    def inputs(self) -> np.ndarray:
        """The learned model's three inputs at Spalding's solution (needs `response`)."""
        response = self._measured()
        return np.asarray(LearnedWallModel.inputs(np.array(response.re_y), np.array(self.first_centre),
                                                  np.array(self.grid.growth)), dtype=np.float64)

    def log_error(self, outcome: Outcome) -> float:
        """ln Re_τ − ln Re_τ,target of a wall-modelled solve (NaN if it failed)."""
        if outcome.failed:
            return math.nan
        g = float(outcome.solution[-1])
        if not g > 0:
            return math.nan
        return math.log(self.driving.scale) + 0.5 * math.log(g) - math.log(self.target)

    @property
    def features(self) -> torch.Tensor:
        """[x (the model's inputs at Spalding's solution), √w·e₀, √w·s] for `LinearisedResponse`:
        Spalding's log error against the target and its sensitivity to a factor e^c on y₁⁺,
        both times √weight so the surrogate's square is the weighted cost `LogError` trains on.
        They describe the task for training only; a deployed wall model sees Re_y, y₁/h and the
        grid's growth at run time, nothing else. No solve happens here: `response` was measured
        (and counted) when the task was built."""
        response = self._measured()
        root = math.sqrt(self.weight)
        error = response.log_re_tau - math.log(self.target)
        return torch.tensor([*self.inputs.tolist(), root * error, root * response.slope], dtype=torch.float64)

    def _measured(self) -> Response:
        if self.response is None:
            raise ValueError(f"task {self.name} has no measured response: call measure_response (two SNES "
                             "solves) first, as ChannelFamily does when it builds its tasks")
        return self.response



def wall_stress(model: WallModel, task: ChannelTask, u_first: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """τ_w/V² from the wall model at the first cell centre: (y₁⁺/(y₁V))², odd in U₁."""
    scale, y_first = task.driving.scale, task.first_centre
    re_y = np.maximum(scale * np.abs(u_first) * y_first, 1e-12)
    y_plus = model.y_plus(re_y, y_first, theta, task.grid.growth)
    return np.sign(u_first) * (y_plus / (y_first * scale)) ** 2


def wall_modelled_residual(model: WallModel, task: ChannelTask, setting: dict, w: np.ndarray) -> np.ndarray:
    theta = setting.get(WALL_MODEL_KEY)
    wall_flux = wall_stress(model, task, w[..., 0], theta)
    balances = momentum_residual(task.grid, w, task.driving.scale, wall_flux)
    return np.concatenate([balances, task.driving.constraint(task.grid, w)[..., None]], axis=-1)


def _checked_first_guess(model: WallModel, task: ChannelTask, setting: dict) -> np.ndarray:
    """The first guess, after checking the setting fits the model (bad input → ValueError).

    A learned model without θ is its base law (θ₀ is exactly that too): the "configured
    defaults" a trained model is compared with.
    """
    theta = setting.get(WALL_MODEL_KEY)
    if model.takes_parameters:
        if theta is not None and np.shape(theta) != (model.n_params,):
            raise ValueError(f"{model!r} needs setting {WALL_MODEL_KEY!r} with {model.n_params} parameters, "
                             f"got shape {np.shape(theta)}")
    elif theta is not None:
        raise ValueError(f"{model!r} has no parameters, but the setting gives {WALL_MODEL_KEY!r}")
    return first_guess(task.grid, task.driving)


def wall_modelled_oracle(model: WallModel, **snes_options: Any) -> SNESOracle:
    """The coarse solve as a black box: setting {"wall_model": θ} for a learned model, {} otherwise.

    Newton with a backtracking line search, the Jacobian by vectorised forward differences, the
    tight TOLERANCES (override through `snes_options`); `solve_many` warm-starts the queries of a
    training step from the first (unperturbed) solution.
    """
    config = {**TOLERANCES, **snes_options}
    return SNESOracle(partial(wall_modelled_residual, model), partial(_checked_first_guess, model),
                      vectorized=True, problem_keys=(WALL_MODEL_KEY,), **config)


def wall_modelled_profile(outcome: Outcome, task: ChannelTask) -> Profile:
    if outcome.failed:
        raise ValueError(f"no profile from a failed solve: {outcome.error}")
    return Profile.from_state(task.grid, task.driving, outcome.solution, outcome)


def measure_response(task: ChannelTask) -> Response:
    """`RESPONSE_SOLVES` coarse solves, Spalding and Spalding × e^c (c = SENSITIVITY_STEP): the
    task's `Response`. The learned model is Spalding × e^{c_θ(x)}, so to first order its
    ln Re_τ is Spalding's + s·c_θ(x). A failed Spalding solve is a broken setup: RuntimeError."""
    factor = LearnedWallModel(hidden=1)
    shifted = np.zeros(factor.n_params)
    shifted[-1] = SENSITIVITY_STEP
    centre, moved = wall_modelled_oracle(factor).solve_many(task, [{}, {WALL_MODEL_KEY: shifted}])
    if centre.failed or moved.failed or not (centre.solution[-1] > 0 and moved.solution[-1] > 0):
        raise RuntimeError(f"Spalding's wall-modelled solve failed for {task.name}: {centre.error or moved.error}")
    log_re_tau = math.log(task.driving.scale) + 0.5 * math.log(float(centre.solution[-1]))
    moved_log = math.log(task.driving.scale) + 0.5 * math.log(float(moved.solution[-1]))
    re_y = task.driving.scale * float(centre.solution[0]) * task.first_centre
    return Response(re_y, log_re_tau, (moved_log - log_re_tau) / SENSITIVITY_STEP)


__all__ = [
    "ChannelTask", "RESPONSE_SOLVES", "Response", "SENSITIVITY_STEP", "WALL_MODEL_KEY", "measure_response",
    "wall_modelled_oracle", "wall_modelled_profile", "wall_modelled_residual", "wall_stress",
]
