"""How many tangents each task of a batch gets: equally, or in proportion to its predicted error.

With Q = B·K tangents per batch, the control variate's total variance Σ_b κ‖e_b‖²/K_b is
smallest for K_b ∝ ‖e_b‖ (e_b the residual ∇f − B∇f̂ of task b). ‖e_b‖ is predicted from the
task's earlier residuals (an average of (∂_v f − ∂_v(B f̂))² per task name, halved in weight each
time the task is seen; the mean over known tasks for a new one), fixed before the tangents are
drawn, so the estimate stays unbiased. Each task gets at least one and at most `4K` tangents;
unused slots are NaN points that `BlackBox` never solves.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

CAP = 4
"""A task gets at most CAP·K tangents."""


class VarianceAllocation:
    """Tangents per task ∝ the task's predicted residual (see the module docstring).

    Tasks are told apart by their `name`, which must be set (and distinct) for every task.
    `counts` is a pure function of the memory; `updated` returns the memory after a batch.
    """

    def __init__(self, tangents: int) -> None:
        self.tangents = int(tangents)
        self.task_residuals: dict[str, float] = {}

    @property
    def cap(self) -> int:
        return CAP * self.tangents

    @staticmethod
    def names(tasks: Sequence[Any]) -> list[str]:
        names = [str(task.name) for task in tasks]
        if not all(names):
            raise ValueError("allocation='variance' tells tasks apart by name: every task needs a non-empty name")
        return names

    def counts(self, tasks: Sequence[Any]) -> torch.Tensor:
        """Tangents per task, summing to B·K: ∝ the predicted residual size, at least 1, at most 4K."""
        names = self.names(tasks)
        known = [self.task_residuals[n] for n in names if n in self.task_residuals]
        fallback = sum(known) / len(known) if known else 1.0
        scale = torch.tensor([math.sqrt(max(self.task_residuals.get(n, fallback), 1e-300)) for n in names],
                             dtype=torch.float64)
        counts = torch.ones(len(names), dtype=torch.long)
        for _ in range(len(names) * (self.tangents - 1)):  # greedy: each extra tangent where it cuts Σ r_b²/K_b most
            gain = scale**2 / counts / (counts + 1)
            gain[counts >= self.cap] = -1.0
            counts[int(torch.argmax(gain))] += 1
        return counts

    def unasked(self, counts: torch.Tensor, central: bool) -> torch.Tensor:
        """[B, Q] mask of the query slots beyond each task's count (both halves for central differences)."""
        slots = torch.arange(self.cap)[None, :] >= counts[:, None]
        return torch.cat([slots, slots], dim=1) if central else slots

    def updated(self, names: Sequence[str], residual: torch.Tensor, known: torch.Tensor) -> dict[str, float]:
        """The memory after a batch: each task's mean squared residual [B, K] (over its known
        tangents) averaged with its previous value."""
        result = dict(self.task_residuals)
        rs = torch.where(known, residual, torch.zeros_like(residual))
        per_task = (rs**2).sum(1) / known.sum(1).clamp(min=1)
        for name, value, seen in zip(names, per_task.tolist(), known.any(1).tolist()):
            if seen:
                old = result.get(name)
                result[name] = value if old is None else 0.5 * (old + value)
        return result

    def state_dict(self) -> dict[str, float]:
        return dict(self.task_residuals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.task_residuals = dict(state)


__all__ = ["VarianceAllocation"]
