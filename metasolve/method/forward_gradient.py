"""Forward-gradient estimators: directional derivatives along random (or coordinate) tangents.

Every estimator here plans its query points before any solve (`queries`), so the centre and all
perturbed solves of a batch go to the executor in one round; then `gradient` turns the values
into ∂L/∂θ. Values are `[B, 1 + Q]`: column 0 is f(θ), the rest f at the query points; NaN
marks a failed solve. A failed query drops its tangent from that sample (the rest are
renormalised); a failed centre gives that sample a zero gradient. A query point that is NaN
was never asked for (query allocation gives tasks different numbers of tangents): `BlackBox`
does not solve it and the estimator treats it like a dropped tangent.

All estimators here estimate ∇f from pairs (v, w) of a tangent v (the direction solved along)
and its *dual* w with E[w vᵀ] = I: E[w (v·∇f)] = ∇f. For Rademacher, Gaussian and orthogonal
tangents w = v; guided tangents v ~ N(0, Σ) have w = Σ⁻¹v (the covariance correction).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metasolve.method.estimator import Deferred, Estimator


def combine_derivatives(duals: torch.Tensor, derivatives: torch.Tensor, how: str) -> torch.Tensor:
    """Turn K directional derivatives (NaN = missing) with duals [B, K, d] into gradients [B, d]."""
    valid = torch.isfinite(derivatives)
    known = torch.where(valid, derivatives, torch.zeros_like(derivatives))
    if how == "mean":
        counts = valid.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.einsum("bk,bkd->bd", known / counts, torch.nan_to_num(duals))
    rows = []
    for b in range(duals.shape[0]):
        basis = duals[b][valid[b]]
        if basis.shape[0] == 0:
            rows.append(torch.zeros(duals.shape[2], dtype=duals.dtype))
            continue
        rows.append(torch.linalg.lstsq(basis, known[b][valid[b]][:, None], driver="gelsd").solution[:, 0])
    return torch.stack(rows)


def _orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal bases [B, d, k] of the spans of the columns of `vectors` [B, d, k]; a zero or
    (numerically) dependent column becomes a zero column, so ranks may differ between samples."""
    if vectors.shape[2] == 0:
        return vectors
    q, r = torch.linalg.qr(vectors)
    diagonal = r.diagonal(dim1=1, dim2=2).abs()
    largest = diagonal.max(dim=1, keepdim=True).values.clamp(min=1e-300)
    return q * (diagonal > 1e-10 * largest)[:, None, :]


class ForwardGradient(Estimator):
    """g = (1/K) Σ_j (∇f·v_j) w_j with random tangents v_j and duals w_j, E[w vᵀ] = I: unbiased.

    Variance, K = 1, tangent error e = ∇f (or the control variate's residual): E‖w(v·e) − e‖² =
    eᵀE[w vᵀv wᵀ]e − ‖e‖². Rademacher: vᵀv = d exactly, so it is (d − 1)‖e‖²; Gaussian:
    E[v vᵀ v vᵀ] = (d + 2)I, so (d + 1)‖e‖²; K independent tangents divide by K. Orthogonal
    tangents (K ≤ d columns of a random orthogonal matrix, scaled by √d) give (d/K − 1)‖e‖²:
    the same at K = 1, exact at K = d. Antithetic pairs (v, −v) are `difference="central"`.

    `distribution="guided"` (Guided ES, Maheswaranathan et al. 2019) samples v ~ N(0, Σ),
    Σ = α I + (1 − α)(d/k) U Uᵀ, with U an orthonormal basis of the guides (the surrogate's ∇f̂
    when a control variate passes it, and the mean of the last `memory` estimates), and uses the
    dual w = Σ⁻¹v = v/α on U's complement and v/(α + (1 − α)d/k) on U, so E[w vᵀ] = I and the
    estimate stays unbiased whatever the guides are (they are fixed before the tangents are drawn).
    Its variance is (eᵀΣe)·tr Σ⁻¹ + ‖e‖²: lower than isotropic only when e lies mostly *off* U
    (about (d − k + 1)‖e‖² for e ⊥ U), higher when e lies in U; measured in benchmarks/estimators.

    `combine="projection"` returns the minimum-norm gradient consistent with the K directional
    derivatives, V(VᵀV)⁻¹Vᵀ∇f: exact at K = d, biased towards (K/d)∇f below it.
    """

    DISTRIBUTIONS = ("rademacher", "gaussian", "orthogonal", "guided")

    def __init__(self, tangents: int = 1, difference: str = "forward", eps: float = 1e-3,
                 distribution: str = "rademacher", combine: str = "mean", alpha: float = 0.5,
                 memory: int = 1) -> None:
        if tangents < 1:
            raise ValueError(f"tangents must be >= 1, got {tangents}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be positive and finite, got {eps}")
        if difference not in ("forward", "central"):
            raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {self.DISTRIBUTIONS}, got {distribution!r}")
        if combine not in ("mean", "projection"):
            raise ValueError(f"combine must be 'mean' or 'projection', got {combine!r}")
        if distribution == "guided" and combine != "mean":
            raise ValueError("distribution='guided' needs combine='mean' (the dual is not the tangent)")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (the isotropic share of a guided covariance) must be in (0, 1], got {alpha}")
        if memory < 0:
            raise ValueError(f"memory must be >= 0, got {memory}")
        self.tangents, self.difference, self.eps = int(tangents), difference, float(eps)
        self.distribution, self.combine = distribution, combine
        self.alpha, self.memory = float(alpha), int(memory)
        self.recent: list[torch.Tensor] = []
        """The last `memory` batch-mean estimates (guided tangents only)."""
        self.pending: dict[str, torch.Tensor] | None = None
        """The last estimate's data, not yet remembered (guided tangents only)."""

    def _subspaces(self, batch: int, dim: int, guides: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, an orthonormal basis U [B, d, k] of the guides (zero columns where they are
        dependent) and its rank [B]."""
        columns = [guides.to(torch.float64)] if guides is not None else []
        columns += [r.expand(batch, dim) for r in self.recent if torch.isfinite(r).all()]
        if not columns:
            return torch.zeros(batch, dim, 0, dtype=torch.float64), torch.zeros(batch, dtype=torch.float64)
        basis = _orthonormal(torch.stack(columns, dim=2))
        return basis, (basis.abs().sum(1) > 0).sum(1).to(torch.float64)

    def _inner_scale(self, dim: int, rank: torch.Tensor) -> torch.Tensor:
        """Variance of a guided tangent along its subspace: α + (1 − α) d/k (1 where k = 0)."""
        return torch.where(rank > 0, self.alpha + (1.0 - self.alpha) * dim / rank.clamp(min=1), 1.0)

    def sample_tangents(self, batch: int, dim: int, generator: torch.Generator,
                        guides: torch.Tensor | None = None, tangents: int | None = None) -> torch.Tensor:
        """[B, K, d] tangents; K = `tangents` (default `self.tangents`: query allocation asks for more)."""
        count = self.tangents if tangents is None else int(tangents)
        shape = (batch, count, dim)
        if self.distribution == "rademacher":
            return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        if self.distribution == "gaussian":
            return z
        if self.distribution == "orthogonal":
            if count > dim:
                raise ValueError(f"orthogonal tangents need tangents <= dim = {dim}, got {count}")
            q = torch.linalg.qr(z.transpose(1, 2)).Q  # [B, d, K], Haar-distributed columns
            return math.sqrt(dim) * q.transpose(1, 2)
        basis, rank = self._subspaces(batch, dim, guides)
        inner = torch.randn(batch, count, basis.shape[2], generator=generator, dtype=torch.float64)
        spread = torch.sqrt((1.0 - self.alpha) * dim / rank.clamp(min=1))[:, None, None]
        return math.sqrt(self.alpha) * z + spread * torch.einsum("bkj,bdj->bkd", inner, basis)

    def duals(self, tangents: torch.Tensor, guides: torch.Tensor | None = None) -> torch.Tensor:
        """w with E[w vᵀ] = I: v itself, or Σ⁻¹v for guided tangents (same subspaces as sampled)."""
        if self.distribution != "guided":
            return tangents
        batch, _, dim = tangents.shape
        basis, rank = self._subspaces(batch, dim, guides)
        inside = torch.einsum("bkd,bdj,bej->bke", tangents, basis, basis)
        return (tangents - inside) / self.alpha + inside / self._inner_scale(dim, rank)[:, None, None]

    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any] | None = None,
                guides: torch.Tensor | None = None, tangents: int | None = None) -> torch.Tensor:
        """θ + εv for each tangent (then θ − εv for central differences), [B, K or 2K, d].
        `guides` [B, d] (a control variate's ∇f̂) shape guided tangents; `tangents` overrides K."""
        v = self.sample_tangents(theta.shape[0], theta.shape[1], generator, guides, tangents)
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

    @property
    def remembers(self) -> bool:
        """Whether estimates are kept as guides for later tangents (guided, `memory` > 0)."""
        return self.distribution == "guided" and self.memory > 0

    def remembered(self, estimate: torch.Tensor) -> list[torch.Tensor]:
        """The guides after `estimate` [B, d]: its batch mean joins the last `memory` (a pure function;
        applied after the estimate, so the tangents an estimate used never depended on it)."""
        if not self.remembers:
            return list(self.recent)
        mean = estimate.mean(0).detach().clone()
        if torch.isfinite(mean).all() and mean.norm() > 0:
            return (self.recent + [mean])[-self.memory:]
        return list(self.recent)

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        tangents, derivatives = self.directional(theta, points, values)
        return combine_derivatives(self.duals(tangents), upstream[:, None] * derivatives, self.combine)

    def observe(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                upstream: torch.Tensor, tasks: Sequence[Any]) -> None:
        """Guided tangents keep the step's data: its estimate becomes a guide (`deferred`)."""
        if self.remembers:
            self.pending = {"theta": theta.detach().clone(), "points": points.detach().clone(),
                            "values": values.detach().clone(), "upstream": upstream.detach().clone()}

    def deferred(self) -> Deferred | None:
        """Remember the last estimate as a guide; the next tangents depend on it, so before them."""
        if self.pending is None:
            return None
        pending = self.pending
        return Deferred(lambda: self.remembered(self.gradient(pending["theta"], pending["points"], pending["values"],
                                                              pending["upstream"], [])), before_queries=True)

    def adopt(self, result: list[torch.Tensor]) -> None:
        if self.pending is None:
            raise RuntimeError(f"{type(self).__name__}.adopt without an observed estimate to remember")
        self.recent = [r.clone() for r in result]
        self.pending = None

    def state_dict(self) -> dict:
        return {"recent": [r.clone() for r in self.recent],
                "pending": None if self.pending is None else {k: v.clone() for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [r.clone() for r in state["recent"]]
        self.pending = None if state["pending"] is None else {k: v.clone() for k, v in state["pending"].items()}

    def __repr__(self) -> str:
        guided = f", alpha={self.alpha}, memory={self.memory}" if self.distribution == "guided" else ""
        return (f"{type(self).__name__}(tangents={self.tangents}, difference={self.difference!r}, "
                f"eps={self.eps}, distribution={self.distribution!r}, combine={self.combine!r}{guided})")


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

    def sample_tangents(self, batch: int, dim: int, generator: torch.Generator,
                        guides: torch.Tensor | None = None, tangents: int | None = None) -> torch.Tensor:
        return torch.eye(dim, dtype=torch.float64).expand(batch, dim, dim)

    def __repr__(self) -> str:
        return f"FiniteDifference(difference={self.difference!r}, eps={self.eps})"


__all__ = ["FiniteDifference", "ForwardGradient", "SPSA", "combine_derivatives"]
