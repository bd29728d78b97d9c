"""A task that *is* a program's own command line: `-n 48 -kappa 0.3 -dt 0.01`.

Legacy codes usually assemble their problem themselves from a few parameters; the task a
meta-solver sees is then those parameters, and its features a fixed function of them
(`ArgumentFeatures`). The same function, stored with the trained model, lets `metasolve predict`
compute the features of a new run from the same arguments (metasolve/predict.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from solvers.arguments import DERIVED_FEATURES, ArgumentFeatures, YoungOmega, derived_feature  # noqa: F401
from solvers.text import parse_arguments  # noqa: F401  (re-exported)


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


