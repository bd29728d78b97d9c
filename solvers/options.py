"""Setting PETSc options for one solve and proving they were used.

PETSc silently ignores options nobody reads, so a misspelt `pc_sor_omgea` would otherwise
train a network against a constant. After a solve we ask `PetscOptionsUsed` (not wrapped by
petsc4py, reached through ctypes on the already-loaded libpetsc) whether each option was read.
"""
from __future__ import annotations

import ctypes
import glob
import itertools
import os
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import petsc4py

from solvers._petsc import PETSc
from solvers.text import OPTION_NAME, format_value, option_name  # noqa: F401  (re-exported)

_prefix_counter = itertools.count()


def unique_prefix(stem: str = "metasolve") -> str:
    """A fresh options prefix, so concurrent or successive solvers never share options."""
    return f"{stem}{os.getpid()}_{next(_prefix_counter)}_"


class SplitSetting(NamedTuple):
    """A setting taken apart: the initial guess, PETSc options (name → text), everything else."""

    guess: np.ndarray | None
    options: dict[str, str]
    other: dict[str, Any]


def split_setting(setting: Mapping[str, Any], base: Mapping[str, Any] | None = None, *, guess: str = "x0",
                  size: int | None = None, keep: Collection[str] = ()) -> SplitSetting:
    """The one path from a setting to PETSc options, shared by every oracle and by deployment.

    `setting[guess]` becomes a float64 vector (checked: 1-D, finite, `size` entries if given),
    names in `keep` are passed through untouched (e.g. a wall model's parameters), and every
    other entry is a PETSc option: its name normalised (`-pc_sor_omega` → `pc_sor_omega`), its
    value in PETSc's text form, laid over the `base` options. Options are text from here on, so
    two settings that mean the same options compare equal and the database sees exactly what
    a command line would carry.
    """
    options = {option_name(k): format_value(v) for k, v in (base or {}).items()}
    other: dict[str, Any] = {}
    vector = None
    for key, value in setting.items():
        if key == guess:
            vector = np.array(value, dtype=np.float64)
            if size is not None and vector.shape != (size,):
                raise ValueError(f"{guess} has shape {vector.shape}, the system has {size} unknowns")
            if vector.ndim != 1 or vector.size == 0:
                raise ValueError(f"{guess} must be a non-empty vector, got shape {vector.shape}")
            if not np.all(np.isfinite(vector)):
                raise ValueError(f"{guess} contains non-finite values")
        elif key in keep:
            other[key] = value
        else:
            options[option_name(key)] = format_value(value)
    return SplitSetting(vector, options, other)


def command_line(options: Mapping[str, str], prefix: str = "") -> list[str]:
    """`options` (from `split_setting`) as command-line arguments: `-<prefix>name [value]`."""
    arguments = []
    for name, text in options.items():
        arguments += [f"-{prefix}{name}"] + ([text] if text else [])
    return arguments


@contextmanager
def prefixed_options(prefix: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Put `options` into the global database under `prefix`; afterwards leave it as found.

    Each option is deleted before it is set, so PETSc's used-flag starts clear and
    `unused_options` tells whether *this* solve read it. Afterwards an option that was already
    there (a user's own `-mycode_pc_sor_omega 1.2`) gets its old value and used-flag back; one
    that was not is deleted.
    """
    db = PETSc.Options()
    names = [f"{prefix}{option_name(k)}" for k in options]
    previous = {name: (db.getString(f"-{name}"), used) for name in names
                if (used := _was_used(name)) is not None}
    try:
        for name, value in zip(names, options.values()):
            db.delValue(f"-{name}")
            db.setValue(f"-{name}", format_value(value))
        yield
    finally:
        for name in names:
            db.delValue(f"-{name}")
            if name in previous:
                value, used = previous[name]
                db.setValue(f"-{name}", value)
                if used:
                    db.getString(f"-{name}")  # reading marks it used again, as it was


def _was_used(name: str) -> bool | None:
    """None if `name` is not in the database, else whether PETSc had read it before we looked."""
    used = not unused_options("", [name])  # first: hasName itself marks the option used
    return used if PETSc.Options().hasName(f"-{name}") else None


def _libpetsc() -> ctypes.CDLL:
    config = petsc4py.get_config()
    arch = config.get("PETSC_ARCH") or ""
    for libdir in (os.path.join(config["PETSC_DIR"], arch, "lib"), os.path.join(config["PETSC_DIR"], "lib")):
        # pip's PETSc wheel ships libpetsc.so as a linker script, so try every candidate.
        for candidate in sorted(glob.glob(os.path.join(libdir, "libpetsc.*")), key=len, reverse=True):
            try:
                lib = ctypes.CDLL(candidate)
            except OSError:
                continue
            lib.PetscOptionsUsed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
            lib.PetscOptionsUsed.restype = ctypes.c_int
            return lib
    raise RuntimeError(f"cannot locate libpetsc under PETSC_DIR={config['PETSC_DIR']!r}")


_LIB: ctypes.CDLL | None = None


def libpetsc() -> ctypes.CDLL:
    """The loaded libpetsc, for the few calls petsc4py does not wrap."""
    global _LIB
    if _LIB is None:
        _LIB = _libpetsc()
    return _LIB


def unused_options(prefix: str, names: list[str]) -> list[str]:
    """The names among `names` (set under `prefix`) that PETSc never read."""
    lib = libpetsc()
    unused = []
    for name in names:
        flag = ctypes.c_int(0)
        if lib.PetscOptionsUsed(None, f"{prefix}{name}".encode(), ctypes.byref(flag)) != 0:
            raise RuntimeError(f"PetscOptionsUsed failed for {name!r}")
        if not flag.value:
            unused.append(name)
    return unused


FAST_RICHARDSON_WITHOUT_TEST = frozenset({"sor"})
"""Preconditioners whose fast Richardson path (`PCApplyRichardson`) applies `max_it` sweeps with no
convergence test and reports CONVERGED_ITS: SOR's calls MatSOR with its · max_it sweeps (PETSc's
sor.c). PCMG's and hypre's fast paths test their tolerance; the others have none."""


def needs_monitor(options: Mapping[str, Any]) -> bool:
    """Whether a KSP configured by `options` (names without the solver's prefix) falls into the
    Richardson trap: Richardson with a preconditioner in `FAST_RICHARDSON_WITHOUT_TEST`, scale 1,
    and no monitor. PETSc (rich.c) then takes the preconditioner's fast path, which runs all
    `max_it` sweeps without ever testing the residual and reports CONVERGED_ITS; any monitor
    (`-ksp_monitor`, or a program's `-ksp_monitor_true_residual`) switches that path off, so a
    deployed options file for such a KSP must carry one."""
    given = {option_name(k): format_value(v) for k, v in options.items()}
    if given.get("ksp_type") != "richardson" or given.get("pc_type") not in FAST_RICHARDSON_WITHOUT_TEST:
        return False
    scale = given.get("ksp_richardson_scale")
    if scale is not None and float(scale) != 1.0:
        return False  # the fast path needs scale 1
    return not any(name.startswith("ksp_monitor") and name != "ksp_monitor_cancel" for name in given)


class UnreadOption(ValueError):
    """A setting's PETSc option that the solver never read: a misspelt name, or an option of
    another solver (a PC-specific option under a Choice over PCs). A config mistake, not a failed solve."""


def check_used(prefix: str, names: Collection[str], solver: str) -> None:
    """Raise the one error training and deployment give for an option PETSc never read.

    PETSc itself ignores such an option silently, so a misspelt `pc_sor_omgea` would train (or
    deploy) a constant. `solver` names what was configured, e.g. "ksp_type=cg pc_type=sor".
    """
    unused = unused_options(prefix, list(names))
    if unused:
        raise UnreadOption(f"unknown or inapplicable PETSc option(s) {unused} for {solver}: PETSc never read them")
