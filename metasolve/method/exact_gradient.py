"""The exact gradient of a differentiable twin: the ceiling a non-intrusive estimator is measured against."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from metasolve.method.estimator import Estimator


class Exact(Estimator):
    """The exact gradient of a torch-differentiable cost `fn(theta_row, task) -> scalar`.

    For the differentiable twins only (`solvers.twins`): it solves nothing beyond the centre
    (the default `queries`) and learns nothing."""

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self.fn = fn

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


__all__ = ["Exact"]
