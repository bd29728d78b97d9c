"""The control variate's coefficient β: a fixed number, or the optimal one estimated online.

Why the optimal β (derivation in `metasolve.method.control_variate.ControlVariate`): with
e = ∇f − B∇f̂ the estimate's error scales with E‖e‖², a parabola in each β_i minimal at
β_i* = E[∂_i f ∂_i f̂]/E[∂_i f̂²]. For any tangent law with E[w vᵀ] = I, c = (∂_v f)w_i∂_i f̂ has
mean ∂_i f ∂_i f̂ and s = (∂_v f̂)w_i∂_i f̂ has mean ∂_i f̂², so β̂ = Σc/Σs over exponentially
weighted past samples (`decay` per step) *and the other samples of the current batch*
(leave-one-out) estimates β*. For the scalar β it is the classical regression of ∂_v f on ∂_v f̂,
whose error is driven by the residual alone (c − β*s = (v·e)(w·∇f̂)): relative variance ≈ ρ²/n,
so a good surrogate's β is known precisely after few samples. β̂ for sample b never saw b's
tangents, which keeps the estimate unbiased. With β̂ unbiased and of standard error σ,
E[excess over the forward gradient] ∝ E[β̂²] − 2β*E[β̂] = σ² − β*²: never worse as long as
σ < |β*|. The shrinkage β = β̂·max(0, 1 − σ̂²/β̂²) (σ̂ from the same sums, delta method) sets β to
0 wherever the data cannot tell it from 0, so with no data, or a useless surrogate, the control
variate *is* the forward gradient. Assumptions: the joint law of (∇f, ∇f̂) drifts slowly against
the averaging window, and failed queries are missing at random.

Both kinds of moments (per coordinate and summed) are always kept, so a warmed estimator can
switch between a scalar and a diagonal coefficient.
"""
from __future__ import annotations

import math

import torch

KINDS = ("scalar", "diagonal")
KEYS = ("c", "s", "cc", "cs", "ss")
Sums = dict[str, torch.Tensor]


def _contributions(c: torch.Tensor, s: torch.Tensor) -> Sums:
    """Per-sample contributions [B, width] to the sums of c, s, c², c·s, s²."""
    return {"c": c, "s": s, "cc": c * c, "cs": c * s, "ss": s * s}


class Coefficient:
    """β [B, d] for each sample of a batch, from the moments of past batches (`moments`).

    `kind`: a number (fixed β: 1.0 is NI-GBMS, 0.0 the plain forward gradient), "scalar" or
    "diagonal" (one estimated β per θ coordinate). `decay` weighs past batches per step.
    `beta` is a pure function of the moments and the batch; `updated` returns the moments with
    the batch added, which the estimator adopts once per step.
    """

    def __init__(self, kind: float | str = "scalar", decay: float = 0.95) -> None:
        if isinstance(kind, str):
            if kind not in KINDS:
                raise ValueError(f"coefficient must be a number, 'scalar' or 'diagonal', got {kind!r}")
        elif not math.isfinite(float(kind)):
            raise ValueError(f"coefficient must be finite, got {kind}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.kind: float | str = kind if isinstance(kind, str) else float(kind)
        self.decay = float(decay)
        self.moments: dict[str, Sums | None] = {k: None for k in KINDS}

    @staticmethod
    def _widths(c: torch.Tensor, s: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"diagonal": (c, s), "scalar": (c.sum(1, keepdim=True), s.sum(1, keepdim=True))}

    def _past(self, kind: str, width: int) -> Sums | None:
        past = self.moments[kind]
        return past if past is not None and past["c"].shape[0] == width else None

    def _estimated(self, kind: str, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Leave-one-out β̂ over past moments and the batch's other samples, shrunk by its error."""
        batch = _contributions(c, s)
        totals = {k: v.sum(0, keepdim=True) for k, v in batch.items()}
        past = self._past(kind, c.shape[1])
        if past is not None:
            totals = {k: totals[k] + self.decay * past[k] for k in totals}
        loo = {k: totals[k] - batch[k] for k in totals}
        s_sum = loo["s"]
        safe = torch.where(s_sum > 0, s_sum, 1.0)
        beta = torch.where(s_sum > 0, loo["c"] / safe, 0.0)
        spread = (loo["cc"] - 2 * beta * loo["cs"] + beta**2 * loo["ss"]).clamp(min=0.0)
        variance = torch.where(s_sum > 0, spread / safe**2, 0.0)
        shrink = torch.where(beta != 0, (1 - variance / torch.where(beta != 0, beta, 1.0) ** 2).clamp(min=0.0), 0.0)
        return beta * shrink

    def beta(self, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """β [B, d] for the batch whose per-sample c, s [B, d] are given (see the module docstring)."""
        if not isinstance(self.kind, str):
            return torch.full_like(c, self.kind)
        c_kind, s_kind = self._widths(c, s)[self.kind]
        return self._estimated(self.kind, c_kind, s_kind).expand_as(c)

    def updated(self, c: torch.Tensor, s: torch.Tensor) -> dict[str, Sums | None]:
        """The moments of both kinds with this batch added (the state after the step)."""
        result: dict[str, Sums | None] = {}
        for kind, (c_kind, s_kind) in self._widths(c, s).items():
            sums = {k: v.sum(0) for k, v in _contributions(c_kind, s_kind).items()}
            past = self._past(kind, c_kind.shape[1])
            result[kind] = sums if past is None else {k: self.decay * past[k] + sums[k] for k in KEYS}
        return result

    def state_dict(self) -> dict[str, Sums | None]:
        return {kind: None if m is None else {k: v.clone() for k, v in m.items()} for kind, m in self.moments.items()}

    def load_state_dict(self, state: dict[str, Sums | None]) -> None:
        self.moments = {kind: None if m is None else {k: v.clone() for k, v in m.items()} for kind, m in state.items()}

    def __repr__(self) -> str:
        return repr(self.kind)


__all__ = ["Coefficient"]
