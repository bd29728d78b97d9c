"""The meta-solver: task features → raw θ → a setting, deployable in front of a user's KSP."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metasolve.checkpoint import CheckpointError, load_file
from metasolve.params import Space
from solvers._petsc import PETSc
from solvers.deploy import applied


class MetaSolver(nn.Module):
    """An MLP from (standardised) task features to θ, with the space that decodes θ.

    The last layer starts at zero, so an untrained meta-solver predicts θ = 0 for every task: the
    space's neutral setting (a zero initial guess, mid-interval options). Training then only
    has to learn the per-instance correction.

    `features` says what the task features were: "operator" or "structural"
    (`solvers.features.FEATURE_FUNCTIONS` of (A, b), recomputable for any user's system at
    deployment) or the name of their source (default "task": whatever the tasks carried).
    """

    def __init__(self, feature_dim: int, space: Space, hidden: int = 64, depth: int = 2,
                 features: str = "task") -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"MetaSolver needs feature_dim >= 1, hidden >= 1, depth >= 0; got "
                             f"{feature_dim}, {hidden}, {depth}")
        self.space = space
        self.spec = {"feature_dim": feature_dim, "hidden": hidden, "depth": depth, "features": features}
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

    def features_of(self, A: Any, b: Any = None) -> torch.Tensor:
        """A user's own system's features, computed as in training, for `predict` at deployment.

        Only features that are a function of (A, b) alone can be recomputed here: a meta-solver
        trained on operator or structural features (`solvers.features.FEATURE_FUNCTIONS`) needs
        nothing else. A family's hand-made features are that family's to compute.
        """
        from solvers.features import FEATURE_FUNCTIONS

        if self.spec["features"] not in FEATURE_FUNCTIONS:
            raise ValueError(f"this meta-solver was trained on {self.spec['features']!r} features, which only "
                             "their family can compute; a meta-solver trained on features='operator' "
                             "(or 'structural') deploys on any (A, b)")
        return torch.from_numpy(FEATURE_FUNCTIONS[self.spec["features"]](A, b))

    def predict(self, task: Any) -> dict[str, Any]:
        """The setting for one task, e.g. {"x0": ndarray, "pc_sor_omega": 1.83}.

        A task without `features` (a user's own `LinearSystem(A, b)`) gets them from `features_of`.
        """
        features = task.features if task.features is not None else self.features_of(task.A, task.b)
        with torch.no_grad():
            return self.space.decode(self(features[None, :])[0])

    @staticmethod
    def apply(setting: Mapping[str, Any], ksp: PETSc.KSP, x: PETSc.Vec | None = None) -> applied:
        """Put a predicted setting on a user's own KSP for one solve (`solvers.deploy.applied`)::

            with MetaSolver.apply(setting, ksp, x):
                ksp.solve(b, x)

        Options go under the KSP's prefix and are checked as read, exactly as in training, and
        removed afterwards; `x0` is copied into `x` as a nonzero initial guess.
        """
        return applied(ksp, setting, x)

    def save(self, path: str | Path) -> None:
        torch.save({"meta_solver": self.export()}, path)

    def export(self) -> dict[str, Any]:
        """Everything needed to rebuild this meta-solver, as plain data and tensors (no pickled
        objects), so it loads with `torch.load(weights_only=True)`."""
        return {"spec": dict(self.spec), "space": self.space.to_dict(), "state": self.state_dict()}

    @classmethod
    def from_export(cls, exported: Any, source: str = "the exported meta-solver") -> "MetaSolver":
        """Inverse of `export`; anything malformed is a ValueError naming `source` and the problem."""
        if not isinstance(exported, Mapping) or not {"spec", "space", "state"} <= set(exported):
            raise ValueError(f"{source}: holds no meta-solver (expected 'spec', 'space' and 'state')")
        try:
            space = Space.from_dict(exported["space"])
            meta = cls(space=space, **exported["spec"])
            meta.load_state_dict(exported["state"])
        except (ValueError, TypeError, KeyError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{source}: malformed meta-solver ({type(error).__name__}: {reason})") from None
        return meta

    @classmethod
    def load(cls, path: str | Path) -> "MetaSolver":
        """Load from `save` output or from a training checkpoint, without running code from the file.

        The file is read with `torch.load(weights_only=True)`: tensors and plain data only, so a
        crafted file that would run code is refused; every error names the file.
        """
        state = load_file(Path(path), what="meta-solver")
        if not isinstance(state, Mapping) or "meta_solver" not in state:
            raise CheckpointError(f"{path}: holds no meta-solver (expected a MetaSolver.save file or a checkpoint)")
        try:
            return cls.from_export(state["meta_solver"], source=str(path))
        except ValueError as error:
            raise CheckpointError(str(error)) from None
