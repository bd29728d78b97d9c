"""Problem families: deterministic (parameters, seed, index) -> task maps, built by name from configs.

Training uses task indices `range(0, count)`, evaluation `range(EVAL_OFFSET, EVAL_OFFSET + count)`
(see `problems.family`).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from problems.anisotropic3d import Anisotropic3D
from problems.bratu import Bratu
from problems.channel import ChannelFamily
from problems.convdiff import ConvDiff
from problems.diffusion import Diffusion
from problems.family import EVAL_OFFSET, Family, Task
from problems.mixed import Mixed
from problems.nonlinear_diffusion import NonlinearDiffusion
from problems.poisson import Poisson1D, Poisson2D
from problems.program import ProgramFamily
from problems.recorded import RecordedFamily

FAMILIES: dict[str, type[Family]] = {
    "poisson1d": Poisson1D,
    "poisson2d": Poisson2D,
    "diffusion": Diffusion,
    "convdiff": ConvDiff,
    "mixed": Mixed,
    "channel": ChannelFamily,
    "bratu": Bratu,
    "nonlinear_diffusion": NonlinearDiffusion,
    "anisotropic3d": Anisotropic3D,
    "program": ProgramFamily,
    "recorded": RecordedFamily,
}


def family_class(name: str, params: dict[str, Any] | None = None) -> type[Family]:
    """The family class registered as `name`, after checking that it accepts `params`; a
    ValueError naming the family and what is wrong otherwise (before any task is built).

    A user's own family is named `"package.module:Class"` (importable from the working directory
    or the Python path); it must subclass `problems.family.Family`, whose docstring states the contract.
    """
    family = user_family(name) if ":" in name else FAMILIES.get(name)
    if family is None:
        raise ValueError(f"unknown problem family {name!r}: known families are {', '.join(sorted(FAMILIES))}, "
                         "or a family of your own as 'package.module:Class'")
    accepted = list(inspect.signature(family).parameters)
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for problem family {name!r}: "
                         f"it accepts {', '.join(accepted)}")
    return family


def user_family(path: str) -> type[Family]:
    """The class `"package.module:Class"` names, checked to be a `Family`; a ValueError naming `path` otherwise."""
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"problem family {path!r}: a family of your own is named 'package.module:Class'")
    if "" not in sys.path and os.getcwd() not in sys.path:  # `metasolve train` finds modules beside the config's user
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an ImportError, or whatever the module raised while importing
        raise ValueError(f"problem family {path!r}: cannot import module {module_name!r} "
                         f"({type(error).__name__}: {error}); is it on the Python path?") from None
    family = getattr(module, class_name, None)
    if family is None:
        raise ValueError(f"problem family {path!r}: module {module_name!r} has no {class_name!r}")
    if not (inspect.isclass(family) and issubclass(family, Family)) or inspect.isabstract(family):
        raise ValueError(f"problem family {path!r}: {class_name} must be a concrete subclass of problems.family.Family")
    return family


def make_family(name: str, **params: Any) -> Family:
    """The family registered as `name`, built with `params` (e.g. the [problem] table of a TOML config)."""
    return family_class(name, params)(**params)


__all__ = ["EVAL_OFFSET", "FAMILIES", "Bratu", "ChannelFamily", "ConvDiff", "Diffusion", "Family", "Mixed", "NonlinearDiffusion", "Poisson1D", "Poisson2D",
           "ProgramFamily", "RecordedFamily", "Task", "family_class", "make_family", "user_family"]
