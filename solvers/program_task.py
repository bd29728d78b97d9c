"""A task that *is* a program's own command line: `-n 48 -kappa 0.3 -dt 0.01`.

Legacy codes usually assemble their problem themselves from a few parameters; the task a
meta-solver sees is then those parameters, and its features a fixed function of them
(`ArgumentFeatures`). The same function, stored with the trained model, lets `metasolve predict`
compute the features of a new run from the same arguments (metasolve/predict.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ArgumentFeatures:
    """features = [log(value) if name in `log` else value, for name in `names`].

    Solver behaviour usually depends on products and ratios of physical parameters (a diffusion
    number κ·dt/h²), which are sums in log space: a network, or even a linear map, learns them
    from logarithms far more easily than from raw values.
    """

    names: tuple[str, ...]
    log: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"ArgumentFeatures needs distinct argument names, got {self.names!r}")
        unknown = sorted(set(self.log) - set(self.names))
        if unknown:
            raise ValueError(f"ArgumentFeatures: log names {unknown} are not among the feature names {self.names}")

    def __call__(self, arguments: Mapping[str, Any]) -> torch.Tensor:
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
        return torch.tensor(values, dtype=torch.float64)

    def to_dict(self) -> dict[str, list[str]]:
        return {"names": list(self.names), "log": list(self.log)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArgumentFeatures":
        return cls(tuple(data["names"]), tuple(data.get("log", ())))


@dataclass
class ProgramTask:
    """One run of a program: its task arguments (without the leading '-') and their features."""

    arguments: dict[str, Any]
    features: torch.Tensor
    name: str = ""

    @classmethod
    def create(cls, arguments: Mapping[str, Any], features: ArgumentFeatures, name: str = "") -> "ProgramTask":
        arguments = dict(arguments)
        label = name or " ".join(f"-{k} {v}" for k, v in arguments.items())
        return cls(arguments, features(arguments), label)

    def argv(self) -> list[str]:
        return [token for key, value in self.arguments.items() for token in (f"-{key}", str(value))]


def parse_arguments(tokens: Sequence[str]) -> dict[str, str]:
    """`['-n', '48', '-kappa', '0.3']` → `{'n': '48', 'kappa': '0.3'}` (a flag without a value → '')."""
    arguments: dict[str, str] = {}
    key = None
    for token in tokens:
        if token.startswith("-") and len(token) > 1 and not _is_number(token):
            key = token[1:]
            arguments[key] = ""
        elif key is None:
            raise ValueError(f"program argument {token!r} does not follow an option name (-name value)")
        else:
            arguments[key] = token
            key = None
    return arguments


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
