"""PETSc's command-line text, read and written without loading PETSc (or torch).

The one place where option names are checked, values become PETSc's text and a program's
arguments are parsed: training (`solvers.options`, `solvers.program_task`) and the torch-free
deployment path (`metasolve predict`) use the same functions, so what a deployed options file
says is what the training solves were given.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def option_name(key: str) -> str:
    """Normalise `-pc_sor_omega` / `pc_sor_omega` to `pc_sor_omega`, rejecting malformed names."""
    name = key.lstrip("-")
    if not OPTION_NAME.match(name):
        raise ValueError(f"invalid PETSc option name {key!r}: use lowercase letters, digits and '_'")
    return name


def format_value(value: Any) -> str:
    """PETSc's textual form of an option value; floats keep every digit."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise ValueError(f"non-finite option value {value!r}")
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_arguments(tokens: Sequence[str]) -> dict[str, str]:
    """`['-n', '48', '-kappa', '0.3']` → `{'n': '48', 'kappa': '0.3'}` (a flag without a value → '')."""
    arguments: dict[str, str] = {}
    key = None
    for token in tokens:
        if token.startswith("-") and len(token) > 1 and not is_number(token):
            key = token[1:]
            arguments[key] = ""
        elif key is None:
            raise ValueError(f"program argument {token!r} does not follow an option name (-name value)")
        else:
            arguments[key] = token
            key = None
    return arguments
