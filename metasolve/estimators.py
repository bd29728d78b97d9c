"""Gradient estimators from forward evaluations only.

Every estimator plans its query points *before* any solve (`queries`), so the centre and all
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
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from metasolve.surrogate import Surrogate


class Estimator(Protocol):
    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any]) -> torch.Tensor: ...

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _combine(duals: torch.Tensor, derivatives: torch.Tensor, how: str) -> torch.Tensor:
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


class ForwardGradient:
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
                        guides: torch.Tensor | None = None) -> torch.Tensor:
        shape = (batch, self.tangents, dim)
        if self.distribution == "rademacher":
            return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        if self.distribution == "gaussian":
            return z
        if self.distribution == "orthogonal":
            if self.tangents > dim:
                raise ValueError(f"orthogonal tangents need tangents <= dim = {dim}, got {self.tangents}")
            q = torch.linalg.qr(z.transpose(1, 2)).Q  # [B, d, K], Haar-distributed columns
            return math.sqrt(dim) * q.transpose(1, 2)
        basis, rank = self._subspaces(batch, dim, guides)
        inner = torch.randn(batch, self.tangents, basis.shape[2], generator=generator, dtype=torch.float64)
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
                guides: torch.Tensor | None = None) -> torch.Tensor:
        v = self.sample_tangents(theta.shape[0], theta.shape[1], generator, guides)
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

    def remember(self, estimate: torch.Tensor) -> None:
        """Keep the batch-mean estimate as a guide for the next guided draws (after the estimate,
        so the tangents an estimate used never depended on it)."""
        if self.distribution != "guided" or self.memory == 0:
            return
        mean = estimate.mean(0).detach().clone()
        if torch.isfinite(mean).all() and mean.norm() > 0:
            self.recent = (self.recent + [mean])[-self.memory:]

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        tangents, derivatives = self.directional(theta, points, values)
        estimate = _combine(self.duals(tangents), upstream[:, None] * derivatives, self.combine)
        self.remember(estimate)
        return estimate

    def state_dict(self) -> dict:
        return {"recent": [r.clone() for r in self.recent]}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [r.clone() for r in state["recent"]]

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
                        guides: torch.Tensor | None = None) -> torch.Tensor:
        return torch.eye(dim, dtype=torch.float64).expand(batch, dim, dim)

    def __repr__(self) -> str:
        return f"FiniteDifference(difference={self.difference!r}, eps={self.eps})"


class _Moments:
    """Exponentially weighted sums over past samples of c, s, c², c·s, s² (per coordinate, or
    summed over coordinates for the scalar coefficient): see `ControlVariate`."""

    KEYS = ("c", "s", "cc", "cs", "ss")

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] | None = None

    @staticmethod
    def of(c: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample contributions [B, width]."""
        return {"c": c, "s": s, "cc": c * c, "cs": c * s, "ss": s * s}

    def add(self, contributions: dict[str, torch.Tensor], decay: float) -> None:
        batch_sums = {k: v.sum(0) for k, v in contributions.items()}
        if self.sums is None or self.sums["c"].shape != batch_sums["c"].shape:
            self.sums = batch_sums
        else:
            self.sums = {k: decay * self.sums[k] + batch_sums[k] for k in self.KEYS}


class ControlVariate:
    """h = B∇f̂ + mean_j[(∂_{v_j} f − ∂_{v_j}(B f̂)) w_j] with a differentiable surrogate f̂.

    B is the coefficient: `coefficient=1.0` is NI-GBMS (B = 1), `0.0` the plain forward gradient,
    `"scalar"` (default) and `"diagonal"` estimate the optimal β (one per θ coordinate for
    "diagonal") online.

    Why it is never worse than the forward gradient. Write e = ∇f − B∇f̂. For any B fixed before
    the sample's tangents are drawn, E[h] = B∇f̂ + E[w vᵀ]e = ∇f: unbiased, and its error is the
    forward gradient's applied to e, E‖h − ∇f‖² = κ/K · ‖e‖² (κ = d − 1 Rademacher, d + 1
    Gaussian; see ForwardGradient). Averaged over tasks and θ, for a diagonal B,
        E‖e‖² = Σ_i E[∂_i f²] − 2β_i E[∂_i f ∂_i f̂] + β_i² E[∂_i f̂²],
    a parabola in each β_i, minimal at β_i* = E[∂_i f ∂_i f̂]/E[∂_i f̂²] (the classical optimal
    control-variate coefficient) where it equals Σ_i E[∂_i f²](1 − r_i²), r_i the correlation:
    ≤ E‖∇f‖², the forward gradient's (β = 0) value, with equality only for a useless surrogate.
    The scalar β* is the same with the sums over i taken first. β = 1 is better than β = 0 only
    if β* > 1/2: a wrong surrogate makes NI-GBMS worse than no surrogate, the optimal β never.

    Estimating β*. For any tangent law with E[w vᵀ] = I, c = (∂_v f)w_i∂_i f̂ has mean ∂_i f ∂_i f̂
    and s = (∂_v f̂)w_i∂_i f̂ has mean ∂_i f̂², so β̂ = Σc/Σs over exponentially weighted past samples
    (`decay` per step) *and the other samples of the current batch* (leave-one-out) estimates β*.
    For the scalar β it is the classical regression of ∂_v f on ∂_v f̂, whose error is driven by
    the residual alone (c − β*s = (v·e)(w·∇f̂)): relative variance ≈ ρ²/n, so a good surrogate's
    β is known precisely after few samples (with s = ‖∇f̂‖² it would be ≈ 2/n instead). β̂ for
    sample b never saw b's tangents, which keeps h unbiased. With β̂ unbiased and of standard
    error σ, E[excess over the forward gradient] ∝ E[β̂²] − 2β*E[β̂] = σ² − β*²: never worse as
    long as σ < |β*|. The shrinkage β = β̂·max(0, 1 − σ̂²/β̂²) (σ̂ from the same sums, delta
    method) sets β to 0 wherever the data cannot tell it from 0, so with no data, or a useless
    surrogate, h *is* the forward gradient. Assumptions: the joint law of (∇f, ∇f̂) drifts slowly
    against the averaging window (the surrogate learns, θ moves), and failed queries are missing
    at random.

    Query allocation (`allocation="variance"`): with Q = B·K tangents per batch, Σ_b κ‖e_b‖²/K_b
    is smallest for K_b ∝ ‖e_b‖. ‖e_b‖ is predicted from the task's earlier residuals (an
    exponential average of (∂_v f − ∂_v(B f̂))² per task name; the mean over known tasks for a new
    one), fixed before the tangents are drawn, so the estimate stays unbiased. Each task gets at
    least one and at most `4K` tangents; unused slots are NaN points that `BlackBox` never solves.

    The surrogate is updated *after* the estimate (its replay buffer gets this batch), so the
    surrogate an estimate uses never saw its tangents either. The update is only needed by the
    next estimate, so it is left `pending` and offered to the next executor round as one more work
    item (`deferred`, `adopt`): under MPI one rank trains the surrogate while the others solve, the
    balanced schedule counting its measured cost like a solve's, and every rank adopts the result —
    the same surrogate, bit for bit, as updating right away. A round that does not run it (or a
    split update, `chunk_rows > 0`, which is collective) leaves it to the next estimate's start.

    `last_metrics` reports, on this batch's tangents (held out from the surrogate): the
    surrogate's gradient cosine and
    ρ² = Σ(∂_v f − ∂_v f̂)²/Σ(∂_v f)² (= ‖∇f − ∇f̂‖²/‖∇f‖² in expectation for isotropic tangents),
    the variance ratio Σ(∂_v f − ∂_v(B f̂))²/Σ(∂_v f)² of this estimate against the forward
    gradient's, and the mean coefficient.
    """

    def __init__(self, base: ForwardGradient, surrogate: Surrogate, coefficient: float | str = "scalar",
                 decay: float = 0.95, allocation: str = "equal") -> None:
        if isinstance(coefficient, str):
            if coefficient not in ("scalar", "diagonal"):
                raise ValueError(f"coefficient must be a number, 'scalar' or 'diagonal', got {coefficient!r}")
        elif not math.isfinite(float(coefficient)):
            raise ValueError(f"coefficient must be finite, got {coefficient}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if allocation not in ("equal", "variance"):
            raise ValueError(f"allocation must be 'equal' or 'variance', got {allocation!r}")
        if allocation == "variance" and base.combine != "mean":
            raise ValueError("allocation='variance' needs combine='mean'")
        self.base, self.surrogate = base, surrogate
        self.coefficient = coefficient if isinstance(coefficient, str) else float(coefficient)
        self.decay, self.allocation = float(decay), allocation
        self.moments = {"scalar": _Moments(), "diagonal": _Moments()}
        self.task_residuals: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.pending: dict[str, torch.Tensor] | None = None  # the last estimate's data, not yet trained on

    # ---- queries -------------------------------------------------------------------------
    def _guides(self, features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor | None:
        if self.base.distribution != "guided":
            return None
        self.flush()  # guides come from the up-to-date surrogate
        return self.surrogate.gradient(features, theta)

    # ---- the surrogate update, deferred to the next executor round ---------------------------
    def deferred(self) -> Callable[[], dict] | None:
        """The pending surrogate update as a work item (any one rank may run it), or None."""
        if self.pending is None or self.surrogate.chunk_rows:
            return None
        current = self.pending
        return lambda: self.surrogate.trained(current)

    def adopt(self, trained: dict) -> None:
        """Take the pending update's result, computed on whichever rank ran `deferred`."""
        self.surrogate.adopt(self.pending, trained)
        self.pending = None

    def flush(self) -> None:
        """Run the pending update here (on every rank alike), if no executor round has."""
        if self.pending is not None:
            self.adopt(self.surrogate.trained(self.pending))

    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any]) -> torch.Tensor:
        features = self.surrogate.features_of(tasks)
        if self.allocation == "equal":
            return self.base.queries(theta, generator, tasks, guides=self._guides(features, theta))
        counts = self.allocate(tasks)
        cap = 4 * self.base.tangents
        original = self.base.tangents
        self.base.tangents = cap
        try:
            points = self.base.queries(theta, generator, tasks, guides=self._guides(features, theta))
        finally:
            self.base.tangents = original
        slots = torch.arange(cap)[None, :] >= counts[:, None]
        if self.base.difference == "central":
            slots = torch.cat([slots, slots], dim=1)
        return points.masked_fill(slots[:, :, None], math.nan)

    def allocate(self, tasks: Sequence[Any]) -> torch.Tensor:
        """Tangents per task, summing to B·K: ∝ the predicted residual size, at least 1, at most 4K."""
        batch, per_task, cap = len(tasks), self.base.tangents, 4 * self.base.tangents
        known = [self.task_residuals[n] for n in (self._name(t) for t in tasks) if n in self.task_residuals]
        fallback = sum(known) / len(known) if known else 1.0
        scale = torch.tensor([math.sqrt(max(self.task_residuals.get(self._name(t), fallback), 1e-300))
                              for t in tasks], dtype=torch.float64)
        total = batch * per_task
        counts = torch.ones(batch, dtype=torch.long)
        for _ in range(total - batch):  # greedy: each extra tangent where it cuts Σ r_b²/K_b most
            gain = scale**2 / counts / (counts + 1)
            gain[counts >= cap] = -1.0
            counts[int(torch.argmax(gain))] += 1
        return counts

    @staticmethod
    def _name(task: Any) -> str:
        return str(getattr(task, "name", "") or id(task))

    # ---- the estimate ----------------------------------------------------------------------
    def _coefficients(self, c: torch.Tensor, s: torch.Tensor, moments: _Moments) -> torch.Tensor:
        """Per-sample β [B, width] from past moments plus the batch's other samples, shrunk to 0
        by its standard error (see the class docstring); then the batch joins the moments."""
        batch = moments.of(c, s)
        totals = {k: v.sum(0, keepdim=True) for k, v in batch.items()}
        past = moments.sums
        if past is not None and past["c"].shape[0] == c.shape[1]:
            totals = {k: totals[k] + self.decay * past[k] for k in totals}
        loo = {k: totals[k] - batch[k] for k in totals}
        s_sum = loo["s"]
        safe = torch.where(s_sum > 0, s_sum, 1.0)
        beta = torch.where(s_sum > 0, loo["c"] / safe, 0.0)
        spread = (loo["cc"] - 2 * beta * loo["cs"] + beta**2 * loo["ss"]).clamp(min=0.0)
        variance = torch.where(s_sum > 0, spread / safe**2, 0.0)
        shrink = torch.where(beta != 0, (1 - variance / torch.where(beta != 0, beta, 1.0) ** 2).clamp(min=0.0), 0.0)
        moments.add(batch, self.decay)
        return beta * shrink

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        self.flush()
        tangents, derivatives = self.base.directional(theta, points, values)
        features = self.surrogate.features_of(tasks)
        surrogate_gradient = self.surrogate.gradient(features, theta)
        duals = self.base.duals(tangents, self._guides(features, theta))
        known = torch.isfinite(derivatives)
        counts = known.sum(1, keepdim=True).clamp(min=1)
        f_dir = torch.where(known, derivatives, torch.zeros_like(derivatives))  # [B, K]
        # c_bi = mean_j (∂_{v_j} f) w_ji ∂_i f̂ and s_bi = mean_j (∂_{v_j} f̂) w_ji ∂_i f̂; both kinds of
        # moments are kept, so a warmed estimator can switch between a scalar and a diagonal coefficient.
        tangents_clean, duals_clean = torch.nan_to_num(tangents), torch.nan_to_num(duals)
        surrogate_derivatives = torch.einsum("bd,bkd->bk", surrogate_gradient, tangents_clean)
        weight = known / counts
        c = torch.einsum("bk,bkd->bd", f_dir * weight, duals_clean) * surrogate_gradient
        s = torch.einsum("bk,bkd->bd", surrogate_derivatives * weight, duals_clean) * surrogate_gradient
        diagonal = self._coefficients(c, s, self.moments["diagonal"])
        scalar = self._coefficients(c.sum(1, keepdim=True), s.sum(1, keepdim=True), self.moments["scalar"])
        if isinstance(self.coefficient, str):
            beta = (scalar if self.coefficient == "scalar" else diagonal).expand_as(theta)
        else:
            beta = torch.full_like(theta, self.coefficient)
        control = beta * surrogate_gradient
        control_derivatives = torch.einsum("bd,bkd->bk", control, tangents_clean)
        residual = derivatives - control_derivatives
        estimate = upstream[:, None] * control + _combine(duals, upstream[:, None] * residual, self.base.combine)
        self._measure(tasks, known, f_dir, surrogate_derivatives, residual, beta)
        self.base.remember(estimate)
        self.pending = self.surrogate.batch_of(features, theta, values[:, 0], tangents_clean, derivatives)
        if self.surrogate.chunk_rows:
            self.flush()  # the split update is collective: every rank, now
        return estimate

    def _measure(self, tasks: Sequence[Any], known: torch.Tensor, f_dir: torch.Tensor,
                 surrogate_derivatives: torch.Tensor, residual: torch.Tensor, beta: torch.Tensor) -> None:
        """Held-out quality of the surrogate and of this estimate, from this batch's tangents."""
        fs = torch.where(known, surrogate_derivatives, torch.zeros_like(surrogate_derivatives))
        rs = torch.where(known, residual, torch.zeros_like(residual))
        ff, ss, cross = float((f_dir**2).sum()), float((fs**2).sum()), float((f_dir * fs).sum())
        metrics = {"cv_coefficient": float(beta.mean())}
        if ff > 0:
            metrics["surrogate_rho2"] = float(((f_dir - fs) ** 2).sum()) / ff
            metrics["cv_variance_ratio"] = float((rs**2).sum()) / ff
        if ff > 0 and ss > 0:
            metrics["surrogate_cosine"] = cross / math.sqrt(ff * ss)
        self.last_metrics = {**metrics, **{f"surrogate_{k}": v for k, v in self.surrogate.last_metrics.items()}}
        if self.allocation == "variance":
            per_task = (rs**2).sum(1) / known.sum(1).clamp(min=1)
            for task, value, seen in zip(tasks, per_task.tolist(), known.any(1).tolist()):
                if seen:
                    name = self._name(task)
                    old = self.task_residuals.get(name)
                    self.task_residuals[name] = value if old is None else 0.5 * (old + value)

    def state_dict(self) -> dict:
        """Everything a resumed run needs for identical continuation: the surrogate (net, optimizer,
        replay buffer), its pending update's data, the coefficient's moments, the guides and the
        allocation's memory."""
        return {"surrogate": self.surrogate.state_dict(), "base": self.base.state_dict(),
                "moments": {kind: None if m.sums is None else {k: v.clone() for k, v in m.sums.items()}
                            for kind, m in self.moments.items()},
                "task_residuals": dict(self.task_residuals),
                "pending": None if self.pending is None else {k: v.clone() for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.surrogate.load_state_dict(state["surrogate"])
        self.base.load_state_dict(state["base"])
        for kind, sums in state["moments"].items():
            self.moments[kind].sums = None if sums is None else {k: v.clone() for k, v in sums.items()}
        self.task_residuals = dict(state["task_residuals"])
        self.pending = None if state["pending"] is None else {k: v.clone() for k, v in state["pending"].items()}

    def __repr__(self) -> str:
        return (f"ControlVariate({self.base!r}, {self.surrogate!r}, coefficient={self.coefficient!r}, "
                f"decay={self.decay}, allocation={self.allocation!r})")


class Exact:
    """The exact gradient of a torch-differentiable cost `fn(theta_row, task) -> scalar`.

    For the differentiable twins only: the ceiling a non-intrusive estimator is measured against.
    """

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self.fn = fn

    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any] | None = None) -> torch.Tensor:
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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return "Exact()"
