"""A program run's features, computed from its own arguments, without PETSc or torch.

Legacy codes usually assemble their problem themselves from a few parameters; the task a
meta-solver sees is then those parameters, and its features a fixed function of them. The same
function, stored with the trained model, computes a new run's features in `metasolve predict`,
which must start without torch or PETSc: this module imports neither.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class YoungOmega:
    """Young's optimal SOR factor for the 5-point Laplacian on the grid a run's arguments give:
    a textbook feature a model can learn a correction to (`[model] anchor`).

    `grid` names the argument(s) holding the number of grid points per direction (one name: a
    square grid or 1-D; two: x then y). Spacing h = 1/(n + offset): offset -1 when n counts the
    vertices including the boundary (PETSc's `-da_grid_x`), +1 when it counts interior points
    only (`heat_stepper -n`). With hx, hy the 5-point Jacobi matrix has spectral radius
    ρ_J = (hy² cos(π hx) + hx² cos(π hy)) / (hx² + hy²), and ω* = 2/(1 + √(1 − ρ_J²)), which is
    2/(1 + sin(π h)) on a square grid. Exact for the constant-coefficient operator at the
    asymptotic rate; what it misses (a finite tolerance, coefficients, the boundary rows) is what
    a learned correction is for.
    """

    grid: tuple[str, ...]
    offset: int = -1
    name: str = "young_omega"

    def __post_init__(self) -> None:
        if not 1 <= len(self.grid) <= 2:
            raise ValueError(f"YoungOmega needs one or two grid-size argument names, got {self.grid!r}")

    def __call__(self, arguments: Mapping[str, Any]) -> float:
        spacings = []
        for name in self.grid:
            if name not in arguments:
                raise ValueError(f"the program arguments lack -{name} (feature {self.name!r} needs it)")
            try:
                points = float(arguments[name])
            except (TypeError, ValueError):
                raise ValueError(f"argument -{name} = {arguments[name]!r} is not a number") from None
            if not (math.isfinite(points) and points + self.offset > 1):
                raise ValueError(f"argument -{name} = {arguments[name]!r} gives no grid spacing "
                                 f"h = 1/({points:g} + {self.offset}) in (0, 1) (feature {self.name!r})")
            spacings.append(1.0 / (points + self.offset))
        hx, hy = spacings[0], spacings[-1]
        rho = (hy ** 2 * math.cos(math.pi * hx) + hx ** 2 * math.cos(math.pi * hy)) / (hx ** 2 + hy ** 2)
        return 2.0 / (1.0 + math.sqrt(max(0.0, 1.0 - rho ** 2)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "young_omega", "grid": list(self.grid), "offset": self.offset, "name": self.name}


DERIVED_FEATURES = {"young_omega": YoungOmega}
"""Textbook features computed from a run's arguments, by the `kind` their `to_dict` records."""


def derived_feature(data: Mapping[str, Any]) -> YoungOmega:
    """A derived feature from its plain-data form (`{"kind": "young_omega", "grid": [...], ...}`)."""
    kind = data.get("kind")
    if kind not in DERIVED_FEATURES:
        raise ValueError(f"unknown derived feature kind {kind!r}: known kinds are {', '.join(DERIVED_FEATURES)}")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k != "kind"}
    try:
        return DERIVED_FEATURES[kind](**fields)
    except TypeError as error:
        raise ValueError(f"derived feature {dict(data)!r}: {error}") from None


@dataclass(frozen=True)
class ArgumentFeatures:
    """features = [log(value) if name in `log` else value, for name in `names`] + [f(arguments) for
    f in `derived`] (textbook features such as `YoungOmega`); `feature_names` labels them.

    Solver behaviour usually depends on products and ratios of physical parameters (a diffusion
    number κ·dt/h²), which are sums in log space: a network, or even a linear map, learns them
    from logarithms far more easily than from raw values.
    """

    names: tuple[str, ...]
    log: tuple[str, ...] = ()
    derived: tuple[YoungOmega, ...] = ()

    def __post_init__(self) -> None:
        if not (self.names or self.derived) or len(set(self.names)) != len(self.names):
            raise ValueError(f"ArgumentFeatures needs distinct argument names, got {self.names!r}")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"ArgumentFeatures: feature names {self.feature_names} repeat")
        unknown = sorted(set(self.log) - set(self.names))
        if unknown:
            raise ValueError(f"ArgumentFeatures: log names {unknown} are not among the feature names {self.names}")

    def __call__(self, arguments: Mapping[str, Any]) -> Any:
        """The features of one run as a float64 torch tensor (what a task carries)."""
        import torch  # here, not at the top: the deploy path reads features with `table`, without torch

        return torch.tensor(self.values(arguments), dtype=torch.float64)

    def table(self, runs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The features of many runs, [len(runs), len(feature_names)] float64 (deployment)."""
        return np.array([self.values(arguments) for arguments in runs], dtype=np.float64).reshape(
            len(runs), len(self.feature_names))

    def values(self, arguments: Mapping[str, Any]) -> list[float]:
        """The features of one run, in `feature_names` order."""
        missing = [n for n in self.names if n not in arguments]
        if missing:
            raise ValueError(f"the program arguments lack {missing} (features are computed from {list(self.names)})")
        values = []
        for name in self.names:
            try:
                value = float(arguments[name])
            except (TypeError, ValueError):
                raise ValueError(f"argument -{name} = {arguments[name]!r} is not a number") from None
            if name in self.log:
                if not value > 0:
                    raise ValueError(f"argument -{name} = {value!r} must be positive (its feature is its logarithm)")
                value = math.log(value)
            if not math.isfinite(value):
                raise ValueError(f"argument -{name} = {arguments[name]!r} is not finite")
            values.append(value)
        return values + [feature(arguments) for feature in self.derived]

    @property
    def feature_names(self) -> tuple[str, ...]:
        """`log(name)` for a log feature, `name` for a plain one, then the derived features' names."""
        return tuple(f"log({n})" if n in self.log else n for n in self.names) + tuple(d.name for d in self.derived)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"names": list(self.names), "log": list(self.log)}
        if self.derived:
            data["derived"] = [d.to_dict() for d in self.derived]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArgumentFeatures":
        return cls(tuple(data["names"]), tuple(data.get("log", ())),
                   tuple(derived_feature(d) for d in data.get("derived", ())))
