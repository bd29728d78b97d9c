"""The NI-GBMS control variate: a forward gradient corrected by a learned surrogate's exact gradient.

h = B∇f̂ + mean_j[(∂_{v_j} f − ∂_{v_j}(B f̂)) w_j] with a differentiable surrogate f̂ of the cost.

Why it is never worse than the forward gradient. Write e = ∇f − B∇f̂. For any B fixed before
the sample's tangents are drawn, E[h] = B∇f̂ + E[w vᵀ]e = ∇f: unbiased, and its error is the
forward gradient's applied to e, E‖h − ∇f‖² = κ/K · ‖e‖² (κ = d − 1 Rademacher, d + 1
Gaussian; see `ForwardGradient`). Averaged over tasks and θ, for a diagonal B,
    E‖e‖² = Σ_i E[∂_i f²] − 2β_i E[∂_i f ∂_i f̂] + β_i² E[∂_i f̂²],
a parabola in each β_i, minimal at β_i* = E[∂_i f ∂_i f̂]/E[∂_i f̂²] (the classical optimal
control-variate coefficient) where it equals Σ_i E[∂_i f²](1 − r_i²), r_i the correlation:
≤ E‖∇f‖², the forward gradient's (β = 0) value, with equality only for a useless surrogate.
The scalar β* is the same with the sums over i taken first. β = 1 is better than β = 0 only
if β* > 1/2: a wrong surrogate makes NI-GBMS worse than no surrogate, the optimal β never.

The estimator is a composition, one job per collaborator:
- `base` (`ForwardGradient`): the tangents, their duals and the finite differences;
- `coefficient` (`metasolve.method.coefficient.Coefficient`): β, fixed or estimated online;
- `allocation` (`metasolve.method.allocation.VarianceAllocation`, optional): tangents per task;
- `surrogate` (`metasolve.method.surrogate.Surrogate`): f̂, its gradient, its online training.
This class combines them into the estimate and declares, once per step, what they learn from it
(`deferred`): the surrogate's update on the step's values and directional derivatives, β's
moments, the allocation's residual memory and the guided tangents' memory — all computed with
the state the estimate used, so every estimate's surrogate and β never saw its own tangents.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from metasolve.method.allocation import VarianceAllocation
from metasolve.method.coefficient import Coefficient
from metasolve.method.estimator import Deferred, Estimator
from metasolve.method.forward_gradient import ForwardGradient, combine_derivatives
from metasolve.method.surrogate import Surrogate


@dataclass(frozen=True)
class _Parts:
    """One estimate and the quantities the learning and the metrics read from it."""

    estimate: torch.Tensor               # [B, d]
    tangents: torch.Tensor               # [B, K, d], NaN rows for unasked slots
    derivatives: torch.Tensor            # [B, K] finite differences ∂_v f, NaN if missing
    known: torch.Tensor                  # [B, K] bool
    surrogate_derivatives: torch.Tensor  # [B, K] ∂_v f̂
    residual: torch.Tensor               # [B, K] ∂_v f − ∂_v(B f̂)
    beta: torch.Tensor                   # [B, d]
    c: torch.Tensor                      # [B, d] the coefficient's regression sums, this batch
    s: torch.Tensor                      # [B, d]


def _quality(parts: _Parts) -> dict[str, float]:
    """Held-out quality of the surrogate and of the estimate, from the batch's tangents (which the
    surrogate has not trained on): gradient cosine, ρ² = Σ(∂_v f − ∂_v f̂)²/Σ(∂_v f)²
    (= ‖∇f − ∇f̂‖²/‖∇f‖² in expectation for isotropic tangents), the variance ratio
    Σ(∂_v f − ∂_v(B f̂))²/Σ(∂_v f)² against the forward gradient, and the mean coefficient."""
    known = parts.known
    f_dir = torch.where(known, parts.derivatives, torch.zeros_like(parts.derivatives))
    fs = torch.where(known, parts.surrogate_derivatives, torch.zeros_like(parts.surrogate_derivatives))
    rs = torch.where(known, parts.residual, torch.zeros_like(parts.residual))
    ff, ss, cross = float((f_dir**2).sum()), float((fs**2).sum()), float((f_dir * fs).sum())
    metrics = {"cv_coefficient": float(parts.beta.mean())}
    if ff > 0:
        metrics["surrogate_rho2"] = float(((f_dir - fs) ** 2).sum()) / ff
        metrics["cv_variance_ratio"] = float((rs**2).sum()) / ff
    if ff > 0 and ss > 0:
        metrics["surrogate_cosine"] = cross / math.sqrt(ff * ss)
    return metrics


def _cloned(pending: dict[str, Any] | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in pending.items()}


class ControlVariate(Estimator):
    """h = B∇f̂ + mean_j[(∂_{v_j} f − ∂_{v_j}(B f̂)) w_j] (see the module docstring).

    `coefficient`: 1.0 is NI-GBMS (B = 1), 0.0 the plain forward gradient, "scalar" (default) and
    "diagonal" estimate the optimal β online (`Coefficient`). `decay` weighs β's past batches.
    `allocation="variance"` gives tasks tangents ∝ their predicted residual (`VarianceAllocation`).

    The surrogate's update is only needed by the next estimate, so it is declared deferred work
    that `BlackBox` runs as one more item of the next executor round: under MPI one rank trains
    the surrogate while the others solve, and every rank adopts the result — the same surrogate,
    bit for bit, as updating right away. Guided tangents, query allocation and a split surrogate
    update (`chunk_rows > 0`, collective) need it before the next queries instead.
    """

    def __init__(self, base: ForwardGradient, surrogate: Surrogate, coefficient: float | str = "scalar",
                 decay: float = 0.95, allocation: str = "equal") -> None:
        if allocation not in ("equal", "variance"):
            raise ValueError(f"allocation must be 'equal' or 'variance', got {allocation!r}")
        if allocation == "variance" and base.combine != "mean":
            raise ValueError("allocation='variance' needs combine='mean'")
        self.base, self.surrogate = base, surrogate
        self.coefficient = Coefficient(coefficient, decay)
        self.allocation = VarianceAllocation(base.tangents) if allocation == "variance" else None
        self.pending: dict[str, Any] | None = None  # the last estimate's data, not yet learned from
        self.quality: dict[str, float] = {}  # `_quality` of the last estimate learned from

    @property
    def guided(self) -> bool:
        return self.base.distribution == "guided"

    # ---- the estimate (pure) ---------------------------------------------------------------------
    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any]) -> torch.Tensor:
        guides = self.surrogate.gradient(self.surrogate.features_of(tasks), theta) if self.guided else None
        if self.allocation is None:
            return self.base.queries(theta, generator, tasks, guides=guides)
        counts = self.allocation.counts(tasks)
        points = self.base.queries(theta, generator, tasks, guides=guides, tangents=self.allocation.cap)
        unasked = self.allocation.unasked(counts, central=self.base.difference == "central")
        return points.masked_fill(unasked[:, :, None], math.nan)

    def _parts(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor, upstream: torch.Tensor,
               features: torch.Tensor) -> _Parts:
        tangents, derivatives = self.base.directional(theta, points, values)
        surrogate_gradient = self.surrogate.gradient(features, theta)
        duals = self.base.duals(tangents, surrogate_gradient if self.guided else None)
        known = torch.isfinite(derivatives)
        weight = known / known.sum(1, keepdim=True).clamp(min=1)
        f_dir = torch.where(known, derivatives, torch.zeros_like(derivatives))
        # c_bi = mean_j (∂_{v_j} f) w_ji ∂_i f̂ and s_bi = mean_j (∂_{v_j} f̂) w_ji ∂_i f̂ (`Coefficient`).
        tangents_clean, duals_clean = torch.nan_to_num(tangents), torch.nan_to_num(duals)
        surrogate_derivatives = torch.einsum("bd,bkd->bk", surrogate_gradient, tangents_clean)
        c = torch.einsum("bk,bkd->bd", f_dir * weight, duals_clean) * surrogate_gradient
        s = torch.einsum("bk,bkd->bd", surrogate_derivatives * weight, duals_clean) * surrogate_gradient
        beta = self.coefficient.beta(c, s)
        control = beta * surrogate_gradient
        residual = derivatives - torch.einsum("bd,bkd->bk", control, tangents_clean)
        estimate = upstream[:, None] * control + combine_derivatives(duals, upstream[:, None] * residual,
                                                                     self.base.combine)
        return _Parts(estimate, tangents, derivatives, known, surrogate_derivatives, residual, beta, c, s)

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        return self._parts(theta, points, values, upstream, self.surrogate.features_of(tasks)).estimate

    # ---- what the estimate teaches (deferred) ------------------------------------------------------
    def observe(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                upstream: torch.Tensor, tasks: Sequence[Any]) -> None:
        self.pending = {"theta": theta.detach().clone(), "points": points.detach().clone(),
                        "values": values.detach().clone(), "upstream": upstream.detach().clone(),
                        "features": self.surrogate.features_of(tasks)}
        if self.allocation is not None:
            self.pending["names"] = VarianceAllocation.names(tasks)

    def _pending_parts(self, pending: dict[str, Any]) -> _Parts:
        return self._parts(pending["theta"], pending["points"], pending["values"], pending["upstream"],
                           pending["features"])

    def _surrogate_data(self, pending: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The surrogate's training data from one estimate: values and directional derivatives."""
        tangents, derivatives = self.base.directional(pending["theta"], pending["points"], pending["values"])
        return Surrogate.batch_of(pending["features"], pending["theta"], pending["values"][:, 0],
                                  torch.nan_to_num(tangents), derivatives)

    def deferred(self) -> Deferred | None:
        """The surrogate's update, β's moments, the allocation's and the guides' memory."""
        if self.pending is None:
            return None
        pending = self.pending

        def learn() -> dict[str, Any]:
            parts = self._pending_parts(pending)  # the state is still the one the estimate used
            result: dict[str, Any] = {"moments": self.coefficient.updated(parts.c, parts.s),
                                      "recent": self.base.remembered(parts.estimate), "quality": _quality(parts)}
            if self.allocation is not None:
                result["task_residuals"] = self.allocation.updated(pending["names"], parts.residual, parts.known)
            result["surrogate"] = self.surrogate.trained(self._surrogate_data(pending))
            return result

        urgent = self.guided or self.allocation is not None or self.surrogate.chunk_rows > 0
        return Deferred(learn, before_queries=urgent)

    def adopt(self, result: dict[str, Any]) -> None:
        if self.pending is None:
            raise RuntimeError("ControlVariate.adopt without an observed estimate to learn from")
        self.surrogate.adopt(self._surrogate_data(self.pending), result["surrogate"])
        self.coefficient.moments = result["moments"]
        self.base.recent = list(result["recent"])
        if self.allocation is not None:
            self.allocation.task_residuals = dict(result["task_residuals"])
        self.quality = dict(result["quality"])
        self.pending = None

    # ---- reporting and state ----------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """`_quality` of the latest estimate (on its own tangents, held out from the surrogate) and
        the surrogate's latest update (its loss and seconds)."""
        quality = _quality(self._pending_parts(self.pending)) if self.pending is not None else self.quality
        return {**quality, **{f"surrogate_{k}": v for k, v in self.surrogate.last_metrics.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs for identical continuation: the surrogate (net, optimizer,
        replay buffer), the last estimate's data not yet learned from, β's moments, the guides and
        the allocation's memory."""
        return {"surrogate": self.surrogate.state_dict(), "base": self.base.state_dict(),
                "moments": self.coefficient.state_dict(),
                "task_residuals": self.allocation.state_dict() if self.allocation is not None else {},
                "pending": _cloned(self.pending), "quality": dict(self.quality)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.surrogate.load_state_dict(state["surrogate"])
        self.base.load_state_dict(state["base"])
        self.coefficient.load_state_dict(state["moments"])
        if self.allocation is not None:
            self.allocation.load_state_dict(state["task_residuals"])
        self.pending = _cloned(state["pending"])
        self.quality = dict(state["quality"])

    def __repr__(self) -> str:
        allocation = "equal" if self.allocation is None else "variance"
        return (f"ControlVariate({self.base!r}, {self.surrogate!r}, coefficient={self.coefficient!r}, "
                f"decay={self.coefficient.decay}, allocation={allocation!r})")


__all__ = ["ControlVariate"]
