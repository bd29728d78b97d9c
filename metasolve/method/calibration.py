"""Calibration: one θ shared by every task, fitted so that a black-box solve reproduces data.

A settings predictor maps each task's features to its own θ. A calibration — a closure
constant, a wall model's weights — has one θ for all tasks: the tasks are the conditions under
which the solver's prediction is compared with measurements. `Trainer` trains any module from
features [B, F] to θ [B, d]; `SharedParameters` is that module for a calibration (it ignores the
features and broadcasts its one vector), so training, checkpoints, resume, metrics and MPI are
the same code for both shapes of problem.

The costs compare one predicted scalar with its target; the task says how
(`CalibrationTask.log_error`, ln(predicted/target)), the cost only squares it (training) or
reports |predicted/target − 1| (evaluation). `LinearisedResponse` is the control variate's
surrogate for a model that multiplies a base law by e^{c_θ(x)} at one matching point.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from metasolve.method.params import Space
from solvers.outcome import Outcome


class CalibrationTask(Protocol):
    """A condition with a measured target: the solve's prediction against it."""

    name: str
    features: torch.Tensor
    weight: float
    """How much the training cost trusts the target (1: as measured; less: a model's extrapolation)."""

    def log_error(self, outcome: Outcome) -> float:
        """ln(predicted/target) of a solve (NaN when it failed)."""


class SharedParameters(nn.Module):
    """One θ for every task: `forward(features)` returns it broadcast to the batch, [B, d].

    Starts at `initial` (the model's own neutral parameters, e.g. a wall model that is exactly
    its base law), so training begins from the law a user would otherwise take.
    """

    def __init__(self, space: Space, initial: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        start = torch.zeros(space.dim, dtype=torch.float64) if initial is None else \
            torch.as_tensor(np.asarray(initial, dtype=np.float64)).clone()
        if start.shape != (space.dim,) or not torch.all(torch.isfinite(start)):
            raise ValueError(f"SharedParameters needs {space.dim} finite initial values, got shape {tuple(start.shape)}")
        self.space = space
        self.theta = nn.Parameter(start)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(features.shape[0], -1)

    def predict(self, task: Any = None) -> dict[str, Any]:
        """The calibrated setting (the same for every task)."""
        with torch.no_grad():
            return self.space.decode(self.theta)

    def save(self, path: str | Path) -> None:
        torch.save({"shared_parameters": {"space": self.space, "theta": self.theta.detach().clone()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "SharedParameters":
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "shared_parameters" not in state:
            raise ValueError(f"{path} holds no shared parameters (expected a SharedParameters.save file)")
        saved = state["shared_parameters"]
        return cls(saved["space"], saved["theta"])


class LogError:
    """Training cost: w·(ln predicted − ln target)², the squared relative error to first order,
    weighted by how much the target is trusted (`CalibrationTask.weight`: a target a law
    extrapolates counts less than a measurement, so the fit is weighted least squares).

    Logarithmic, so over- and under-prediction by the same factor cost the same and the cost of
    a task does not grow with the size of its target. A failed solve costs NaN in training (the
    estimator drops it) and `failure_value`, a factor-2 error, in reports.
    """

    overrides: dict[str, Any] = {}
    budget = None  # a `solvers.budget.Budget`; None: the solver's own stopping test

    def __call__(self, outcome: Outcome, task: CalibrationTask) -> float:
        return task.weight * task.log_error(outcome) ** 2

    def failure_value(self, task: CalibrationTask) -> float:
        return math.log(2.0) ** 2

    def __repr__(self) -> str:
        return "LogError()"


class RelativeError:
    """Evaluation cost: |predicted/target − 1| (a failed solve counts as 100%)."""

    overrides: dict[str, Any] = {}
    budget = None  # a `solvers.budget.Budget`; None: the solver's own stopping test

    def __call__(self, outcome: Outcome, task: CalibrationTask) -> float:
        return abs(math.expm1(task.log_error(outcome)))

    def failure_value(self, task: CalibrationTask) -> float:
        return 1.0

    def __repr__(self) -> str:
        return "RelativeError()"


class LinearisedResponse(nn.Module):
    """The control variate's surrogate: the black-box solve linearised in the model's correction.

    The calibrated model is a base law times e^{c_θ(x)}, evaluated at one matching point with
    inputs x. Around the base law (c = 0) the log error responds linearly, e ≈ e₀ + s·c, with e₀
    the base law's own error and s = ∂e/∂c, both measured by two solves per task and carried in
    its features as [x..., e₀, s] (both times √w for a task of weight w, so the square is
    the weighted cost). c_θ(x) is evaluated exactly and differentiably (`correction`),
    so the surrogate (e₀ + a·s·c_θ(x) + b)² has the right gradient at θ₀ by construction; the
    scalars a (= 1) and b (= 0), trained online, absorb what the linearisation misses as c grows.
    """

    def __init__(self, correction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: int) -> None:
        super().__init__()
        if inputs < 1:
            raise ValueError(f"LinearisedResponse needs inputs >= 1, got {inputs}")
        self.correction, self.inputs = correction, int(inputs)
        self.gain = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, features_and_theta: torch.Tensor) -> torch.Tensor:
        k = self.inputs
        x, error, slope = features_and_theta[..., :k], features_and_theta[..., k], features_and_theta[..., k + 1]
        theta = features_and_theta[..., k + 2:]
        return (error + self.gain * slope * self.correction(theta, x) + self.bias) ** 2


__all__ = ["CalibrationTask", "LinearisedResponse", "LogError", "RelativeError", "SharedParameters"]
