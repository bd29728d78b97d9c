"""The meta-solver: task features → raw θ → a setting, deployable in front of a user's KSP."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metasolve.params import Space
from solvers._petsc import PETSc
from solvers.options import format_value, option_name


class MetaSolver(nn.Module):
    """An MLP from (standardised) task features to θ, with the space that decodes θ.

    The last layer starts at zero, so an untrained meta-solver predicts θ = 0 for every task: the
    space's neutral setting (a zero initial guess, mid-interval options). Training then only
    has to learn the per-instance correction.
    """

    def __init__(self, feature_dim: int, space: Space, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"MetaSolver needs feature_dim >= 1, hidden >= 1, depth >= 0; got "
                             f"{feature_dim}, {hidden}, {depth}")
        self.space = space
        self.spec = {"feature_dim": feature_dim, "hidden": hidden, "depth": depth}
        layers: list[nn.Module] = []
        width = feature_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        last = nn.Linear(width, space.dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last).double()
        self.register_buffer("feature_mean", torch.zeros(feature_dim, dtype=torch.float64))
        self.register_buffer("feature_scale", torch.ones(feature_dim, dtype=torch.float64))

    def fit_normalizer(self, tasks: Sequence[Any]) -> None:
        """Standardise features with statistics of the training tasks (no gradient, no solves)."""
        features = torch.stack([t.features for t in tasks])
        self.feature_mean.copy_(features.mean(0))
        self.feature_scale.copy_(features.std(0).clamp(min=1e-12) if len(tasks) > 1 else torch.ones_like(features[0]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.spec["feature_dim"]:
            raise ValueError(f"features have width {features.shape[-1]}, the meta-solver expects "
                             f"{self.spec['feature_dim']}")
        return self.net((features.to(torch.float64) - self.feature_mean) / self.feature_scale)

    def predict(self, task: Any) -> dict[str, Any]:
        """The setting for one task, e.g. {"x0": ndarray, "pc_sor_omega": 1.83}."""
        with torch.no_grad():
            return self.space.decode(self(task.features[None, :])[0])

    @staticmethod
    def apply(setting: Mapping[str, Any], ksp: PETSc.KSP, x: PETSc.Vec | None = None) -> None:
        """Put a predicted setting on a user's own KSP: options go into the database under the
        KSP's prefix and are read by `setFromOptions`; an `x0` is copied into `x` and marked as a
        nonzero initial guess."""
        prefix = ksp.getOptionsPrefix() or ""
        database = PETSc.Options()
        for key, value in setting.items():
            if key == "x0":
                continue
            database.setValue(f"-{prefix}{option_name(key)}", format_value(value))
        ksp.setFromOptions()
        if "x0" in setting:
            if x is None:
                raise ValueError("the setting has an initial guess 'x0': pass the solution Vec x to apply()")
            x0 = np.asarray(setting["x0"], dtype=np.float64)
            start, end = x.getOwnershipRange()
            if x0.shape != (x.getSize(),):
                raise ValueError(f"x0 has shape {x0.shape}, the Vec has {x.getSize()} entries")
            x.setArray(x0[start:end])
            ksp.setInitialGuessNonzero(True)

    def save(self, path: str | Path) -> None:
        torch.save({"meta_solver": self.export()}, path)

    def export(self) -> dict[str, Any]:
        """Everything needed to rebuild this meta-solver elsewhere (pickled space, weights)."""
        return {"spec": dict(self.spec), "space": self.space, "state": self.state_dict()}

    @classmethod
    def load(cls, path: str | Path) -> "MetaSolver":
        """Load from `save` output or from a training checkpoint."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "meta_solver" not in state:
            raise ValueError(f"{path} holds no meta-solver (expected a MetaSolver.save file or a checkpoint)")
        exported = state["meta_solver"]
        meta = cls(space=exported["space"], **exported["spec"])
        meta.load_state_dict(exported["state"])
        return meta
