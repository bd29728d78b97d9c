"""The meta-solver: task features → raw θ → a setting, deployable in front of a user's KSP."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metasolve.method.files import CheckpointError, load_file
from metasolve.method.params import Space
from solvers._petsc import PETSc
from solvers.deploy import applied

EXPORT_VERSION = 1
"""Layout version of `export()`; `from_export` refuses any other."""


class MetaSolver(nn.Module):
    """An MLP from (standardised) task features to θ, with the space that decodes θ.

    The last layer starts at zero, so an untrained meta-solver predicts θ = 0 for every task: the
    space's neutral setting (a zero initial guess, mid-interval options). Training then only
    has to learn the per-instance correction.

    `features` says what the task features were: "operator" or "structural"
    (`solvers.features.FEATURE_FUNCTIONS` of (A, b), recomputable for any user's system at
    deployment) or the name of their source (default "task": whatever the tasks carried).

    `anchor = {part: feature index}` makes a textbook formula the starting point of a scalar
    `Interval`/`LogInterval` part: that part's θ is `part.encode_clipped(raw feature value)` (the
    feature before standardisation, e.g. Young's ω* among the operator features) plus the
    network's output. The zero-initialised network then deploys the formula itself, and training
    learns only its correction — measured on per-instance SOR ω, the anchored predictor got
    closer to the per-instance optimum than the same network without the anchor and than the
    formula alone (benchmarks/results/options.md).
    """

    def __init__(self, feature_dim: int, space: Space, hidden: int = 64, depth: int = 2,
                 features: str = "task", anchor: Mapping[str, int] | None = None) -> None:
        super().__init__()
        if feature_dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"MetaSolver needs feature_dim >= 1, hidden >= 1, depth >= 0; got "
                             f"{feature_dim}, {hidden}, {depth}")
        self.space = space
        anchor = _checked_anchor(anchor or {}, space, feature_dim)
        self.spec = {"feature_dim": feature_dim, "hidden": hidden, "depth": depth, "features": features,
                     "anchor": anchor}
        self._anchored = [(name, space.parts[name], space.slices[name].start, index) for name, index in anchor.items()]
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
        features = features.to(torch.float64)
        theta = self.net((features - self.feature_mean) / self.feature_scale)
        return theta + self.anchor_offset(features) if self._anchored else theta

    def anchor_offset(self, features: torch.Tensor) -> torch.Tensor:
        """θ of the anchors' formulas, [..., space.dim] (zero in parts without an anchor): what
        `forward` adds to the network's output."""
        offset = features.new_zeros((*features.shape[:-1], self.space.dim), dtype=torch.float64)
        for name, part, column, index in self._anchored:
            values = features[..., index].to(torch.float64)
            if not torch.all(torch.isfinite(values)):
                raise ValueError(f"the anchor of {name!r} (feature {index}) is not finite: "
                                 f"{values[~torch.isfinite(values)][:3].tolist()}")
            offset[..., column] = part.encode_clipped(values)
        return offset

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
        """The torch file `path` and, beside it, `<stem>.plain.npz`: the same model as plain arrays,
        which `metasolve predict` evaluates with numpy (`metasolve.method.plain_model`), without
        importing torch. The plain file is written (and its choices checked) first."""
        from metasolve.method.plain_model import plain_path

        self.export_plain(plain_path(path))
        torch.save({"meta_solver": self.export()}, path)

    def export(self) -> dict[str, Any]:
        """Everything needed to rebuild this meta-solver, as plain data and tensors (no pickled
        objects), so it loads with `torch.load(weights_only=True)`."""
        return {"format_version": EXPORT_VERSION, "spec": dict(self.spec), "space": self.space.to_dict(),
                "state": self.state_dict()}

    def on_grid(self, grid_shape: Sequence[int]) -> "MetaSolver":
        """The same predictor deploying on another grid: train where solves are cheap, deploy
        where they are expensive. Every sine-basis `Vector` part is rebuilt on `grid_shape` with
        its modes, scale and decay; the weights and the feature normalisation are kept.

        Exact because the discrete sine modes are samples of sin(jπx) at the interior vertices
        of any grid (`metasolve.method.params.sine_basis`): a coefficient means the same function
        on every grid. A vector in the identity basis has no such meaning and is refused."""
        exported = self.export()
        parts = []
        for name, part in exported["space"]["parts"]:
            if part["kind"] == "vector":
                if part["basis"] != "sine":
                    raise ValueError(f"space part {name!r} is a vector in the {part['basis']!r} basis: only sine "
                                     "modes mean the same function on another grid")
                if len(part["n"]) != len(grid_shape):
                    raise ValueError(f"space part {name!r} lives on a {len(part['n'])}-D grid, not on "
                                     f"{tuple(grid_shape)}")
                part = {**part, "n": [int(s) for s in grid_shape]}
            parts.append([name, part])
        return MetaSolver.from_export({**exported, "space": {"parts": parts}}, source="on_grid")

    def export_plain(self, path: str | Path) -> None:
        """Write the plain-array twin of this meta-solver (`metasolve.method.plain_model.write_plain`)."""
        from metasolve.method.plain_model import write_plain
        from metasolve.method.params import ANCHOR_CLIP

        arrays = {"feature_mean": self.feature_mean.detach().numpy(), "feature_scale": self.feature_scale.detach().numpy()}
        for i, layer in enumerate(m for m in self.net if isinstance(m, nn.Linear)):
            arrays[f"weight_{i}"] = layer.weight.detach().numpy()
            arrays[f"bias_{i}"] = layer.bias.detach().numpy()
        write_plain(path, self.spec, self.space.to_dict(), arrays, ANCHOR_CLIP)

    @classmethod
    def from_export(cls, exported: Any, source: str = "the exported meta-solver") -> "MetaSolver":
        """Inverse of `export`; anything malformed is a ValueError naming `source` and the problem."""
        if not isinstance(exported, Mapping) or not {"spec", "space", "state"} <= set(exported):
            raise ValueError(f"{source}: holds no meta-solver (expected 'spec', 'space' and 'state')")
        version = exported.get("format_version", EXPORT_VERSION)  # files from before versions: version 1
        if version != EXPORT_VERSION:
            raise ValueError(f"{source}: meta-solver format_version {version!r} is not supported by this metasolve "
                             f"(it reads version {EXPORT_VERSION})")
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


def _checked_anchor(anchor: Mapping[str, int], space: Space, feature_dim: int) -> dict[str, int]:
    """The anchor as plain data {part name: feature index}, or a ValueError naming what is wrong."""
    from metasolve.method.params import Interval

    if not isinstance(anchor, Mapping):
        raise ValueError(f"anchor must map part names to feature indices, got {anchor!r}")
    checked = {}
    for name, index in anchor.items():
        if name not in space.parts:
            raise ValueError(f"anchor names part {name!r}, which the space {space!r} does not have")
        if not isinstance(space.parts[name], Interval):
            raise ValueError(f"anchor part {name!r} is {space.parts[name]!r}: only a scalar Interval or "
                             "LogInterval part can start at a formula's value")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < feature_dim:
            raise ValueError(f"anchor feature index for {name!r} must be an integer in [0, {feature_dim}), "
                             f"got {index!r}")
        checked[str(name)] = int(index)
    return checked
