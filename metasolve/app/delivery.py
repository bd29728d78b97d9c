"""What a model's training runs had, and how its settings reach its program: `Delivery`.

Saved beside the model as `<stem>.delivery.json` (plain JSON, readable and editable, hence checked
on load like the model: an options prefix, a guess flag or a base option is PETSc text that an
options file will carry). Read by `metasolve predict` (metasolve/app/predict.py) without torch or PETSc.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from metasolve.method.plain_model import check_flag, check_option_name, check_prefix, check_value
from solvers.arguments import ArgumentFeatures
from solvers.text import format_value

DELIVERY_VERSION = 1
_ARGUMENT = re.compile(r"^-?[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ArgumentSpec:
    """Which program arguments are the features, which enter as logarithms, and the textbook
    features derived from them: the plain data of `solvers.program_task.ArgumentFeatures`,
    evaluated without torch by `solvers.arguments` (a derived feature by its `kind`)."""

    names: tuple[str, ...]
    log: tuple[str, ...] = ()
    derived: tuple[dict, ...] = ()

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> "ArgumentSpec":
        try:
            spec = cls(tuple(data["names"]), tuple(data.get("log", ())),
                       tuple(dict(d) for d in data.get("derived", ())))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"Delivery.features: malformed ({error!r})") from None
        if not (spec.names or spec.derived) or not set(spec.log) <= set(spec.names) or any(
                not isinstance(n, str) or not _ARGUMENT.match(n) for n in spec.names):
            raise ValueError(f"Delivery.features: bad argument names {spec.names!r} / log {spec.log!r}")
        for feature in spec.derived:
            grid = feature.get("grid")
            if (feature.get("kind") != "young_omega" or not isinstance(grid, list) or not 1 <= len(grid) <= 2
                    or not all(isinstance(g, str) for g in grid) or not isinstance(feature.get("offset", -1), int)):
                raise ValueError(f"Delivery.features: unknown or malformed derived feature {feature!r} "
                                 "(known: young_omega with grid = [names], offset)")
        return spec

    def table(self, runs: Sequence[Mapping[str, str]]) -> np.ndarray:
        """The runs' features, computed as in training (`solvers.arguments.ArgumentFeatures`)."""
        return ArgumentFeatures.from_dict(self.to_dict()).table(runs)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"names": list(self.names), "log": list(self.log)}
        if self.derived:
            data["derived"] = [dict(d) for d in self.derived]
        return data


@dataclass(frozen=True)
class Delivery:
    """How a model's settings reach its program, and what its training runs had.

    `features`: the run arguments that are the features (an `ArgumentFeatures` or its plain data);
    `prefix`: the options prefix of the program's solver; `guess_flag`: the program's option that
    reads an initial guess file; `base_options`: the options every training run had besides the
    learned ones (name → text; None: not recorded, for files written before it was); `petsc_int64`:
    the training PETSc's index width (the binary guess file's header); `unreproducible`: why an
    options file cannot reproduce the training runs (then `predict` refuses), empty if it can.
    """

    features: Any = None
    prefix: str = ""
    guess_flag: str = "-x0"
    base_options: dict[str, str] | None = None
    petsc_int64: bool = False
    unreproducible: str = ""

    def __post_init__(self) -> None:
        if self.features is not None:
            data = self.features.to_dict() if not isinstance(self.features, Mapping) else self.features
            object.__setattr__(self, "features", ArgumentSpec.from_data(data))
        check_prefix(self.prefix)
        check_flag(self.guess_flag)
        if self.base_options is not None:
            options = {}
            for name, value in dict(self.base_options).items():
                name = check_option_name(str(name).lstrip("-"), "Delivery.base_options")
                plain_text = value in (None, "") or isinstance(value, str) and _is_number(value)
                options[name] = (value or "") if plain_text else format_value(
                    check_value(value, f"Delivery.base_options {name}"))
            object.__setattr__(self, "base_options", options)
        if not isinstance(self.unreproducible, str):
            raise ValueError(f"Delivery.unreproducible must be a string, got {self.unreproducible!r}")

    @classmethod
    def for_oracle(cls, oracle: Any, features: Any = None, prefix: str | None = None,
                   budget: Any = None) -> "Delivery":
        """The delivery of a model trained through `oracle`: its options, prefix and guess flag.

        An `ExecutableOracle` gives them all; a `KSPOracle` (also inside an `IsolatedOracle`)
        gives its solver (type, tolerances, norm, options) for a program that reads them from the
        database under `prefix`; a KSP built by `ksp_factory` is recorded as unreproducible (its
        set-up is code, not options). `budget` (a `solvers.budget.Budget`: the evaluation cost's)
        is where the solves it judged stopped, so its `ksp_rtol/atol/max_it` go in too, over the
        oracle's (a Newton budget is an absolute tolerance per task: no options file holds it, so
        the program's own Newton tolerances stay). Monitor and viewer options of the training are
        left out: they print, and the monitor Richardson needs is added by `predict` itself.
        """
        from solvers.budget import linear_options
        from solvers.executable import ExecutableOracle
        from solvers.isolated import IsolatedOracle
        from solvers.ksp import KSPOracle
        from solvers.options import split_setting

        if isinstance(oracle, IsolatedOracle):
            return cls.for_oracle(oracle.factory(), features, prefix, budget)
        linear = True
        if isinstance(oracle, ExecutableOracle):
            options, unreproducible = split_setting({}, oracle.options).options, ""
            prefix = oracle.prefix if prefix is None else prefix
            flag, linear = oracle.guess_flag, oracle.count == "linear"
        elif isinstance(oracle, KSPOracle):
            options = {"ksp_type": oracle.ksp_type, "pc_type": oracle.pc_type, "ksp_rtol": format_value(oracle.rtol),
                       "ksp_atol": format_value(oracle.atol), "ksp_divtol": format_value(oracle.divtol),
                       "ksp_max_it": str(oracle.max_it), "ksp_norm_type": oracle.norm_type,
                       **({"ksp_pc_side": oracle.pc_side} if oracle.pc_side else {}), **oracle.options}
            unreproducible = ("trained on a KSP built by ksp_factory: its set-up is code, which an options file "
                              "cannot carry" if oracle.ksp_factory is not None else "")
            flag = "-x0"
        else:
            raise ValueError(f"Delivery.for_oracle: cannot read the training solver of a {type(oracle).__name__}; "
                             "give Delivery(features, prefix, guess_flag, base_options={...}) explicitly")
        if budget is not None and linear:
            options = {**options, **split_setting({}, linear_options(budget)).options}
        kept = {name: text for name, text in options.items() if _is_solver_setting(name)}
        return cls(features, prefix or "", flag, kept, unreproducible=unreproducible)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": DELIVERY_VERSION, "features": self.features.to_dict() if self.features else None,
                "prefix": self.prefix, "guess_flag": self.guess_flag, "base_options": self.base_options,
                "petsc_int64": self.petsc_int64, "unreproducible": self.unreproducible}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Delivery":
        """Inverse of `to_dict`; keys missing from older files take their defaults."""
        version = data.get("format_version", DELIVERY_VERSION)
        if version != DELIVERY_VERSION:
            raise ValueError(f"delivery format_version {version!r} is not supported by this metasolve "
                             f"(it reads version {DELIVERY_VERSION})")
        return cls(data.get("features"), data.get("prefix", ""), data.get("guess_flag", "-x0"),
                   data.get("base_options"), bool(data.get("petsc_int64", False)), data.get("unreproducible", ""))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_solver_setting(name: str) -> bool:
    try:
        check_option_name(name, "")
    except ValueError:
        return False
    return True


def delivery_path(model: str | Path) -> Path:
    model = Path(model)
    stem = model.name[:-len(".plain.npz")] if model.name.endswith(".plain.npz") else model.stem
    return model.with_name(f"{stem}.delivery.json")


def save_for_program(path: str | Path, meta: Any, delivery: Delivery) -> None:
    """`MetaSolver.save(path)` (torch file + plain twin) plus `<path stem>.delivery.json`."""
    from solvers._petsc import PETSc

    delivery = replace(delivery, petsc_int64=np.dtype(PETSc.IntType).itemsize == 8)
    meta.save(path)
    delivery_path(path).write_text(json.dumps(delivery.to_dict(), indent=1) + "\n")


def load_delivery(model: str | Path) -> Delivery:
    path = delivery_path(model)
    if not path.exists():
        return Delivery()
    try:
        return Delivery.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a delivery file written by save_for_program ({error})") from None

