"""Gradient estimators from forward evaluations only.

Every estimator plans its query points *before* any solve (`queries`), so the centre and all
perturbed solves of a batch go to the executor in one round; then `gradient` turns the values
into ∂L/∂θ. Values are `[B, 1 + Q]`: column 0 is f(θ), the rest f at the query points; NaN
marks a failed solve. A failed query drops its tangent from that sample (the rest are
renormalised); a failed centre gives that sample a zero gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from metasolve.surrogate import Surrogate


class Estimator(Protocol):
    def queries(self, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor: ...


def _combine(tangents: torch.Tensor, derivatives: torch.Tensor, how: str) -> torch.Tensor:
    """Turn K directional derivatives (NaN = missing) along tangents [B, K, d] into gradients [B, d]."""
    valid = torch.isfinite(derivatives)
    known = torch.where(valid, derivatives, torch.zeros_like(derivatives))
    if how == "mean":
        counts = valid.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.einsum("bk,bkd->bd", known / counts, tangents)
    rows = []
    for b in range(tangents.shape[0]):
        basis = tangents[b][valid[b]]
        if basis.shape[0] == 0:
            rows.append(torch.zeros(tangents.shape[2], dtype=tangents.dtype))
            continue
        rows.append(torch.linalg.lstsq(basis, known[b][valid[b]][:, None], driver="gelsd").solution[:, 0])
    return torch.stack(rows)


class ForwardGradient:
    """g = (1/K) Σ_j (∇f·v_j) v_j with random tangents, E[v vᵀ] = I; variance ≈ (d+1)/K ‖∇f‖².

    `combine="projection"` returns the minimum-norm gradient consistent with the K directional
    derivatives, V(VᵀV)⁻¹Vᵀ∇f: exact at K = d, biased towards (K/d)∇f below it.
    """

    def __init__(self, tangents: int = 1, difference: str = "forward", eps: float = 1e-3,
                 distribution: str = "rademacher", combine: str = "mean") -> None:
        if tangents < 1:
            raise ValueError(f"tangents must be >= 1, got {tangents}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be positive and finite, got {eps}")
        if difference not in ("forward", "central"):
            raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        if combine not in ("mean", "projection"):
            raise ValueError(f"combine must be 'mean' or 'projection', got {combine!r}")
        self.tangents, self.difference, self.eps = int(tangents), difference, float(eps)
        self.distribution, self.combine = distribution, combine

    def sample_tangents(self, batch: int, dim: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch, self.tangents, dim)
        if self.distribution == "gaussian":
            return torch.randn(shape, generator=generator, dtype=torch.float64)
        return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1

    def queries(self, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        v = self.sample_tangents(theta.shape[0], theta.shape[1], generator)
        forward = theta[:, None, :] + self.eps * v
        if self.difference == "forward":
            return forward
        return torch.cat([forward, theta[:, None, :] - self.eps * v], dim=1)

    def directional(self, theta: torch.Tensor, points: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tangents [B, K, d], finite-difference directional derivatives [B, K], NaN if failed).

        Tangents are read back from the query points, so the estimate uses the perturbation that
        was actually applied; entries known to be ±1/0 are snapped back exactly.
        """
        k = points.shape[1] if self.difference == "forward" else points.shape[1] // 2
        tangents = (points[:, :k] - theta[:, None, :]) / self.eps
        if self.distribution == "rademacher":
            tangents = torch.sign(tangents)
        if self.difference == "forward":
            derivatives = (values[:, 1:1 + k] - values[:, :1]) / self.eps
        else:
            derivatives = (values[:, 1:1 + k] - values[:, 1 + k:1 + 2 * k]) / (2 * self.eps)
        return tangents, derivatives

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        tangents, derivatives = self.directional(theta, points, values)
        return _combine(tangents, upstream[:, None] * derivatives, self.combine)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tangents={self.tangents}, difference={self.difference!r}, "
                f"eps={self.eps}, distribution={self.distribution!r}, combine={self.combine!r})")


class SPSA(ForwardGradient):
    """Simultaneous-perturbation stochastic approximation: central differences along Rademacher
    tangents. With ±1 perturbations Δ⁻¹ = Δ, so it is the central Rademacher forward gradient;
    kept under its own name as the reference from the stochastic-approximation literature."""

    def __init__(self, tangents: int = 1, eps: float = 1e-3) -> None:
        super().__init__(tangents=tangents, difference="central", eps=eps, distribution="rademacher")


class FiniteDifference(ForwardGradient):
    """Full finite differences along every coordinate: d (forward) or 2d (central) solves per sample.

    The deterministic reference; one coordinate whose solve failed reads as a zero component.
    """

    def __init__(self, difference: str = "forward", eps: float = 1e-3) -> None:
        super().__init__(tangents=1, difference=difference, eps=eps, distribution="rademacher",
                         combine="projection")

    def sample_tangents(self, batch: int, dim: int, generator: torch.Generator) -> torch.Tensor:
        return torch.eye(dim, dtype=torch.float64).expand(batch, dim, dim)

    def __repr__(self) -> str:
        return f"FiniteDifference(difference={self.difference!r}, eps={self.eps})"


class ControlVariate:
    """NI-GBMS: h = ∇f̂ + combine_j[(∂_{v_j} f − ∂_{v_j} f̂) v_j] with a differentiable surrogate f̂.

    Unbiased whatever f̂ is (the correction has the mean of ∇f − ∇f̂); its variance scales with
    ‖∇f − ∇f̂‖², so it falls as the surrogate learns. The surrogate is updated *after* the
    estimate, on the values and directional derivatives the solver already produced.
    """

    def __init__(self, base: ForwardGradient, surrogate: Surrogate) -> None:
        self.base, self.surrogate = base, surrogate

    def queries(self, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.base.queries(theta, generator)

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        tangents, derivatives = self.base.directional(theta, points, values)
        features = self.surrogate.features_of(tasks)
        surrogate_gradient = self.surrogate.gradient(features, theta)
        surrogate_derivatives = torch.einsum("bd,bkd->bk", surrogate_gradient, tangents)
        residual = upstream[:, None] * (derivatives - surrogate_derivatives)
        estimate = upstream[:, None] * surrogate_gradient + _combine(tangents, residual, self.base.combine)
        self.surrogate.update(features, theta, values[:, 0], tangents, derivatives)
        return estimate

    def __repr__(self) -> str:
        return f"ControlVariate({self.base!r}, {self.surrogate!r})"


class Exact:
    """The exact gradient of a torch-differentiable cost `fn(theta_row, task) -> scalar`.

    For the differentiable twins only: the ceiling a non-intrusive estimator is measured against.
    """

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self.fn = fn

    def queries(self, theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return theta.new_zeros((theta.shape[0], 0, theta.shape[1]))

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        rows = []
        for row, task, u in zip(theta, tasks, upstream):
            with torch.enable_grad():
                leaf = row.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.fn(leaf, task), leaf)
            rows.append(u * grad)
        return torch.stack(rows)

    def __repr__(self) -> str:
        return "Exact()"
