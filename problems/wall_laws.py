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

    def y_plus(self, re_y: Any, y_over_h: Any = None, theta: Any = None, growth: Any = 1.0) -> np.ndarray:
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

    def y_plus(self, re_y: Any, y_over_h: Any = None, theta: Any = None, growth: Any = 1.0) -> np.ndarray:
        return np.asarray(re_y, dtype=np.float64) / self.u_plus(re_y)

    def __repr__(self) -> str:
        return f"Spalding(kappa={self.kappa}, b={self.b})"


class Reichardt:
    """Reichardt's law, smooth from the wall through the buffer layer to the log layer (κ = 0.41):

        u⁺ = ln(1 + κy⁺)/κ + 7.8[1 − e^{−y⁺/11} − (y⁺/11)e^{−y⁺/3}].

    Given as u⁺(y⁺), so inverted for y⁺: Re_y = u⁺(y⁺)·y⁺ increases with y⁺, and safeguarded
    Newton on φ(t) = ln u⁺(e^t) + t − ln Re_y (t = ln y⁺) keeps a bracket [lo, hi] with
    φ(lo) < 0 < φ(hi) and bisects whenever a Newton step would leave it.
    """

    name = "Reichardt"
    takes_parameters = False
    iterations = 200

    def __init__(self, kappa: float = 0.41) -> None:
        self.kappa = float(kappa)

    def u_plus_of_y_plus(self, y_plus: Any) -> np.ndarray:
        y = np.asarray(y_plus, dtype=np.float64)
        return np.log1p(self.kappa * y) / self.kappa + 7.8 * (-np.expm1(-y / 11.0) - y / 11.0 * np.exp(-y / 3.0))

    def _slope(self, y: np.ndarray) -> np.ndarray:
        """du⁺/dy⁺."""
        return (1.0 / (1.0 + self.kappa * y)
                + 7.8 * (np.exp(-y / 11.0) / 11.0 - np.exp(-y / 3.0) / 11.0 + y / 33.0 * np.exp(-y / 3.0)))

    def y_plus(self, re_y: Any, y_over_h: Any = None, theta: Any = None, growth: Any = 1.0) -> np.ndarray:
        log_re_y = np.log(_positive("Re_y", re_y))
        lo, hi = np.full_like(log_re_y, -40.0), np.full_like(log_re_y, 40.0)
        t = 0.5 * log_re_y  # the viscous sublayer's y⁺ = √Re_y
        for _ in range(self.iterations):
            y = np.exp(t)
            u = self.u_plus_of_y_plus(y)
            phi = np.log(u) + t - log_re_y
            lo, hi = np.where(phi < 0, t, lo), np.where(phi >= 0, t, hi)
            newton = t - phi / (1.0 + y * self._slope(y) / u)
            inside = (newton > lo) & (newton < hi)
            step = np.where(inside, newton, 0.5 * (lo + hi)) - t
            t = t + step
            if np.all(np.abs(step) <= 1e-14 * np.maximum(1.0, np.abs(t))):
                break
        return np.exp(t)

    def u_plus(self, re_y: Any) -> np.ndarray:
        return np.asarray(re_y, dtype=np.float64) / self.y_plus(re_y)

    def __repr__(self) -> str:
        return f"Reichardt(kappa={self.kappa})"


class LearnedWallModel:
    """Spalding's law times a learned factor: ln y₁⁺ = ln y₁⁺_Spalding(Re_y) + c_θ(x).

    c_θ(x) = θ·[tanh(Wx + b), 1] on what a coarse solver knows at its matching point,
    x = [(ln Re_y − 7)/2, (ln(y₁/h) + 3.3)/0.6, ln(Δ₂/Δ₁)/0.3]: the first cell's Reynolds number,
    its height, and how the grid grows away from the wall (Δ₁, Δ₂ the first two cell widths;
    0 on a uniform grid). All three are O(1) over channel flows with Re_τ 150–2500 on 8–24
    cells. Never Re_τ: it is the unknown. Why the growth ratio: at equal Re_y and y₁/h a
    stretched grid resolves the buffer layer differently, and the friction error the model must
    cancel differs by ~0.8% (measured at Re_τ 550, first cell centre at y/h = 1/64).

    The hidden layer (W, b) is fixed, drawn from `seed` uniformly in ±scale/√3 (random tanh
    features); θ is the output layer [w (hidden), bias]. Why not train W too: c is then linear
    in θ, so the solve's response to θ is as linear as its response to c (`LinearisedResponse`
    is exact to first order everywhere, not only at θ₀), the cost is convex to that order, and a
    forward gradient's variance grows with dim θ (hidden + 1) instead of with every weight.
    Measured on the leave-one-DNS-case-out fits: 16 fixed features fit the targets to 0.12–0.2%
    RMS like a trained 8-unit MLP, and Adam reaches that fit in a few hundred noisy steps where
    the MLP stalled at 0.4–0.6%; following the friction law at the low end of the Re range on
    every grid takes up to 64 (`problems.channel.HIDDEN`: cross-validation chooses).

    θ₀ = 0 is exactly Spalding, and so is a missing θ (`None`). The same code evaluates c_θ on
    NumPy arrays (inside the solver's residual) and on torch tensors (differentiable, for a
    surrogate); θ may be one vector `[d]` or one per sample `[B, d]` with `x` of shape `[B, 3]`.
    """

    name = "learned"
    takes_parameters = True
    n_inputs = 3

    def __init__(self, hidden: int = 16, seed: int = 0, scale: float = 2.0, base: Spalding | None = None) -> None:
        if hidden < 1 or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"LearnedWallModel needs hidden >= 1 and scale > 0, got {hidden}, {scale}")
        self.hidden, self.seed, self.scale = int(hidden), int(seed), float(scale)
        self.base = base if base is not None else Spalding()
        self.n_params = self.hidden + 1
        rng = np.random.default_rng(self.seed)
        bound = self.scale / math.sqrt(self.n_inputs)
        self.weights = rng.uniform(-bound, bound, size=(self.hidden, self.n_inputs))
        self.bias = rng.uniform(-bound, bound, size=self.hidden)

    def initial_parameters(self) -> np.ndarray:
        """θ₀ = 0: exactly the base law."""
        return np.zeros(self.n_params)

    @staticmethod
    def inputs(re_y: Array, y_over_h: Array, growth: Array) -> Array:
        """The normalised inputs [..., 3] (`growth` = Δ₂/Δ₁, 1 on a uniform grid)."""
        lib = torch if isinstance(re_y, torch.Tensor) else np
        return lib.stack([(lib.log(re_y) - 7.0) / 2.0, (lib.log(y_over_h) + 3.3) / 0.6, lib.log(growth) / 0.3], -1)

    def features(self, x: np.ndarray) -> np.ndarray:
        """[tanh(Wx + b), 1], [..., n_params]: c_θ(x) = features(x)·θ, linear in θ."""
        hidden = np.tanh(np.asarray(x, dtype=np.float64) @ self.weights.T + self.bias)
        return np.concatenate([hidden, np.ones_like(hidden[..., :1])], axis=-1)

    def correction(self, theta: Array, x: Array) -> Array:
        """c_θ(x) = w·tanh(Wx + b) + bias, on NumPy or torch alike."""
        if theta.shape[-1] != self.n_params:
            raise ValueError(f"θ has {theta.shape[-1]} entries, this wall model has {self.n_params}")
        if isinstance(theta, torch.Tensor):
            weights, bias = torch.as_tensor(self.weights, dtype=x.dtype), torch.as_tensor(self.bias, dtype=x.dtype)
            features = torch.tanh(x @ weights.T + bias)
        else:
            features = np.tanh(x @ self.weights.T + self.bias)
        return (features * theta[..., :-1]).sum(-1) + theta[..., -1]

    def y_plus(self, re_y: Any, y_over_h: Any, theta: Any, growth: Any = 1.0) -> np.ndarray:
        base = self.base.y_plus(re_y)
        if theta is None:
            return base
        theta = np.asarray(theta, dtype=np.float64)
        re_y = np.asarray(re_y, dtype=np.float64)
        y_over_h = np.broadcast_to(np.asarray(y_over_h, dtype=np.float64), re_y.shape)
        growth = np.broadcast_to(np.asarray(growth, dtype=np.float64), re_y.shape)
        return base * np.exp(self.correction(theta, self.inputs(re_y, y_over_h, growth)))

    def __repr__(self) -> str:
        return f"LearnedWallModel(hidden={self.hidden}, seed={self.seed}, scale={self.scale}, base={self.base!r})"


WallModel = LogLaw | Spalding | Reichardt | LearnedWallModel

__all__ = ["LearnedWallModel", "LogLaw", "Reichardt", "Spalding", "WallModel"]
