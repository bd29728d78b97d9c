"""Problem families: deterministic (parameters, seed, index) -> task maps, built by name from configs.

Training uses task indices `range(0, count)`, evaluation `range(EVAL_OFFSET, EVAL_OFFSET + count)`
(see `problems.family`).
"""
from __future__ import annotations

import inspect
from typing import Any

from problems.bratu import Bratu
from problems.channel import ChannelFamily
from problems.convdiff import ConvDiff
from problems.diffusion import Diffusion
from problems.family import EVAL_OFFSET, Family, Task
from problems.mixed import Mixed
from problems.poisson import Poisson1D, Poisson2D

FAMILIES: dict[str, type[Family]] = {
    "poisson1d": Poisson1D,
    "poisson2d": Poisson2D,
    "diffusion": Diffusion,
    "convdiff": ConvDiff,
    "mixed": Mixed,
    "channel": ChannelFamily,
    "bratu": Bratu,
}


def make_family(name: str, **params: Any) -> Family:
    """The family registered as `name`, built with `params` (e.g. the [problem] table of a TOML config)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown problem family {name!r}: known families are {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[name]
    accepted = list(inspect.signature(family).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for problem family {name!r}: "
                         f"it accepts {', '.join(accepted)}")
    return family(**params)


__all__ = ["EVAL_OFFSET", "FAMILIES", "Bratu", "ChannelFamily", "ConvDiff", "Diffusion", "Family", "Mixed", "Poisson1D", "Poisson2D", "Task",
           "make_family"]
