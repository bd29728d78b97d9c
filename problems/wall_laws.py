"""Wall models for a coarse-grid channel solver: first-cell Reynolds number Re_y → y₁⁺.

A wall model sees what a coarse solver knows at its first cell centre, Re_y = U₁y₁/ν (and
y₁/h), and returns y₁⁺ = y₁u_τ/ν, hence the wall shear stress. Re_τ itself is never an input:
it is the unknown. Each classical law is written as u⁺(y⁺) (or y⁺(u⁺)) and inverted through
Re_y = u⁺·y⁺; all maps are vectorised over NumPy arrays in float64.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.special
import torch

Array = np.ndarray | torch.Tensor


def _positive(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be positive and finite")
    return array


class LogLaw:
    """u⁺ = ln(y⁺)/κ + B (κ = 0.41, B = 5.2), valid in the log layer only (y⁺ ≳ 30).

    Inverted in closed form: κu⁺e^{κu⁺} = κ Re_y e^{κB}, so u⁺ = W₀(κ Re_y e^{κB})/κ.
    """

    name = "log law"
    takes_parameters = False

    def __init__(self, kappa: float = 0.41, b: float = 5.2) -> None:
        self.kappa, self.b = float(kappa), float(b)

    def y_plus_of_u_plus(self, u_plus: Any) -> np.ndarray:
        return np.exp(self.kappa * (np.asarray(u_plus, dtype=np.float64) - self.b))

    def u_plus(self, re_y: Any) -> np.ndarray:
        argument = self.kappa * _positive("Re_y", re_y) * math.exp(self.kappa * self.b)
        return np.real(scipy.special.lambertw(argument, 0)) / self.kappa

    def y_plus(self, re_y: Any, y_over_h: Any = None, theta: Any = None) -> np.ndarray:
        return np.asarray(re_y, dtype=np.float64) / self.u_plus(re_y)

    def __repr__(self) -> str:
        return f"LogLaw(kappa={self.kappa}, b={self.b})"


class Spalding:
    """Spalding's law, one formula from the wall to the log layer (κ = 0.4, B = 5.5):

        y⁺ = u⁺ + e^{−κB}[e^{κu⁺} − 1 − κu⁺ − (κu⁺)²/2 − (κu⁺)³/6].

    Inverted by Newton's method on φ(t) = t + ln y⁺(e^t) − ln Re_y, t = ln u⁺. φ is increasing
    and convex (its slope 1 + d ln y⁺/d ln u⁺ grows with u⁺), and the start
    u⁺ = min(√Re_y, 100) lies to the right of the root (y⁺ ≥ u⁺ gives u⁺ ≤ √Re_y, and u⁺ = 100
    already means Re_y > 10¹⁸, beyond any flow): Newton then decreases monotonically onto the
    root, with no overshoot to guard against.
    """

    name = "Spalding"
    takes_parameters = False
    iterations = 100
    largest_u_plus = 100.0

    def __init__(self, kappa: float = 0.4, b: float = 5.5) -> None:
        self.kappa, self.b = float(kappa), float(b)

    def y_plus_of_u_plus(self, u_plus: Any) -> np.ndarray:
        x = self.kappa * np.asarray(u_plus, dtype=np.float64)
        return x / self.kappa + math.exp(-self.kappa * self.b) * (np.expm1(x) - x - x**2 / 2 - x**3 / 6)

    def _slope(self, u_plus: np.ndarray) -> np.ndarray:
        """dy⁺/du⁺."""
        x = self.kappa * u_plus
        return 1.0 + self.kappa * math.exp(-self.kappa * self.b) * (np.expm1(x) - x - x**2 / 2)

    def u_plus(self, re_y: Any) -> np.ndarray:
        log_re_y = np.log(_positive("Re_y", re_y))
        cap = self.largest_u_plus
        if np.any(log_re_y >= math.log(cap * self.y_plus_of_u_plus(cap))):
            raise ValueError(f"Re_y beyond Spalding's range (u⁺ > {cap}): {np.max(np.exp(log_re_y)):.3g}")
        t = np.minimum(0.5 * log_re_y, math.log(cap))
        for _ in range(self.iterations):
            u = np.exp(t)
            y = self.y_plus_of_u_plus(u)
            step = (t + np.log(y) - log_re_y) / (1.0 + u * self._slope(u) / y)
            t = t - step
            if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(t))):
                break
        return np.exp(t)

    def y_plus(self, re_y: Any, y_over_h: Any = None, theta: Any = None) -> np.ndarray:
        return np.asarray(re_y, dtype=np.float64) / self.u_plus(re_y)

    def __repr__(self) -> str:
        return f"Spalding(kappa={self.kappa}, b={self.b})"


class LearnedWallModel:
    """Spalding's law times a learned factor: ln y₁⁺ = ln y₁⁺_Spalding(Re_y) + c_θ(x).

    c_θ is a one-hidden-layer tanh MLP on x = [(ln Re_y − 7)/2, (ln(y₁/h) + 3.3)/0.6] (both
    O(1) over channel flows with Re_τ 180–5200 on 8–24 cells). Its parameters θ are one flat
    float64 vector, laid out [W₁ (hidden×2, row-major), b₁, w₂, b₂]; the output layer starts at
    zero, so θ₀ is exactly Spalding. The same code evaluates c_θ on NumPy arrays (inside the
    solver's residual) and on torch tensors (differentiable, for the surrogate); θ may be one
    vector `[d]` or one per sample `[B, d]` with `x` of shape `[B, 2]`.
    """

    name = "learned"
    takes_parameters = True

    def __init__(self, hidden: int = 8, seed: int = 0, base: Spalding | None = None) -> None:
        if hidden < 1:
            raise ValueError(f"LearnedWallModel needs hidden >= 1, got {hidden}")
        self.hidden, self.seed = int(hidden), int(seed)
        self.base = base if base is not None else Spalding()
        self.n_params = 4 * self.hidden + 1

    def initial_parameters(self) -> np.ndarray:
        """θ₀: torch's default initialisation of the hidden layer (seeded), a zero output layer."""
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(self.seed)
            layer = torch.nn.Linear(2, self.hidden, dtype=torch.float64)
        finally:
            torch.random.set_rng_state(generator_state)
        hidden = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
        return np.concatenate([hidden.numpy(), np.zeros(self.hidden + 1)])

    @staticmethod
    def inputs(re_y: Array, y_over_h: Array) -> Array:
        """The MLP's normalised inputs [..., 2]."""
        lib = torch if isinstance(re_y, torch.Tensor) else np
        return lib.stack([(lib.log(re_y) - 7.0) / 2.0, (lib.log(y_over_h) + 3.3) / 0.6], -1)

    def correction(self, theta: Array, x: Array) -> Array:
        """c_θ(x) = w₂·tanh(W₁x + b₁) + b₂, on NumPy or torch alike."""
        lib = torch if isinstance(theta, torch.Tensor) else np
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"θ has {theta.shape[-1]} entries, this wall model has {self.n_params}")
        h = self.hidden
        batch = theta.shape[:-1]
        weights = theta[..., :2 * h].reshape(*batch, h, 2)
        bias = theta[..., 2 * h:3 * h]
        output_weights, output_bias = theta[..., 3 * h:4 * h], theta[..., 4 * h]
        activations = lib.tanh((weights @ x[..., None])[..., 0] + bias)
        return (activations * output_weights).sum(-1) + output_bias

    def y_plus(self, re_y: Any, y_over_h: Any, theta: Any) -> np.ndarray:
        if theta is None:
            raise ValueError("the learned wall model needs its parameters θ (setting 'wall_model')")
        theta = np.asarray(theta, dtype=np.float64)
        re_y = np.asarray(re_y, dtype=np.float64)
        y_over_h = np.broadcast_to(np.asarray(y_over_h, dtype=np.float64), re_y.shape)
        return self.base.y_plus(re_y) * np.exp(self.correction(theta, self.inputs(re_y, y_over_h)))

    def __repr__(self) -> str:
        return f"LearnedWallModel(hidden={self.hidden}, seed={self.seed}, base={self.base!r})"


WallModel = LogLaw | Spalding | LearnedWallModel

__all__ = ["LearnedWallModel", "LogLaw", "Spalding", "WallModel"]
