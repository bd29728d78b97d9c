"""A family whose tasks are runs of a user's program: `-da_grid_x 33 -rho 0.1 -nu 0.2`.

A legacy or tutorial code assembles its problem itself from a few command-line arguments, so a
task is those arguments (`solvers.program_task.ProgramTask`) and its features are a fixed
function of them (`ArgumentFeatures`: the arguments, their logarithms, textbook features such as
Young's ω* from a grid size). The same function is stored with the trained model, so `metasolve
predict` computes a new run's features from its arguments alone.

Per-run arguments come from distributions (drawn from `default_rng([seed, index])` in the order
they are given, so run i is a pure function of (seed, i) like every family) or from a table
(CSV with a header row, or TOML with `[[run]]` tables). Config form:

    [problem]
    family = "program"
    features = "family"
    [problem.params.arguments]          # command-independent run arguments
    da_grid_x = {integers = [17, 49]}   # inclusive
    da_grid_y = {same_as = "da_grid_x"}
    rho = {log_uniform = [0.01, 100.0]}
    nu = {uniform = [0.05, 0.5]}
    bc_type = "dirichlet"               # a constant: every run gets it
    [problem.params.features]           # optional: default = every drawn number (not copies), logs of log-drawn ones
    names = ["da_grid_x", "rho", "nu"]
    log = ["da_grid_x", "rho"]
    young_omega = {grid = ["da_grid_x", "da_grid_y"], offset = -1}   # h = 1/(n + offset)

or `table = "runs.csv"` (training runs: its first rows; evaluation runs: its last rows, unless
`eval_table` names a file of their own; the two never overlap, or the family says so). Relative
paths are read from the working directory. Distributions: a constant, `{uniform = [lo, hi]}`,
`{log_uniform = [lo, hi]}`, `{integers = [lo, hi]}`, `{log_integers = [lo, hi]}`,
`{choice = [a, b, ...]}`, `{same_as = "name"}`. Drawn floats keep 6 significant digits, so the
command line a run is given is exactly the value its features were computed from.
"""
from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from problems.family import EVAL_OFFSET, Family, FrontBackSplit
from solvers.program_task import ArgumentFeatures, ProgramTask, YoungOmega

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DISTRIBUTIONS = ("uniform", "log_uniform", "integers", "log_integers", "choice", "same_as")
SIGNIFICANT_DIGITS = 6


class ProgramFamily(Family):
    """Runs of a program, their arguments drawn from `arguments` and/or read from `table`."""

    has_operator = False

    key = "program"

    def __init__(self, seed: int = 0, arguments: Mapping[str, Any] | None = None, table: str | None = None,
                 eval_table: str | None = None, features: Mapping[str, Any] | None = None) -> None:
        super().__init__(seed, arguments=dict(arguments or {}), table=table, eval_table=eval_table,
                         features=dict(features or {}))
        self.arguments = {str(name): _check_distribution(name, spec) for name, spec in (arguments or {}).items()}
        for name, spec in self.arguments.items():
            if isinstance(spec, dict) and "same_as" in spec and spec["same_as"] not in list(self.arguments)[
                    :list(self.arguments).index(name)]:
                raise ValueError(f"program argument {name!r}: same_as = {spec['same_as']!r} must name an argument "
                                 "given before it")
        if eval_table is not None and table is None:
            raise ValueError("program family: eval_table needs a table of training runs too")
        self.table = read_table(table) if table is not None else None
        self.eval_table = read_table(eval_table) if eval_table is not None else None
        if self.table is None and not self.arguments:
            raise ValueError("program family: give the run arguments as distributions (arguments = {...}) "
                             "or a table of runs (table = 'runs.csv')")
        if self.eval_table is not None and set(self.eval_table[0]) != set(self.table[0]):
            raise ValueError(f"program family: eval_table {eval_table!r} gives arguments {sorted(self.eval_table[0])}, "
                             f"table {table!r} gives {sorted(self.table[0])}")
        for rows, where in ((self.table, table), (self.eval_table, eval_table)):
            clash = sorted(set(rows[0]) & set(self.arguments)) if rows else []
            if clash:
                raise ValueError(f"program family: argument(s) {clash} are both in {where} and in arguments")
        self._split = (FrontBackSplit(len(self.table), "program family", "row", f"a table with {len(self.table)} rows",
                                      "use fewer tasks or give eval_table") if self.table is not None else None)
        self.features = self._features(features or {})

    def _features(self, spec: Mapping[str, Any]) -> ArgumentFeatures:
        unknown = sorted(set(spec) - {"names", "log", "young_omega"})
        if unknown:
            raise ValueError(f"program family features: unknown key(s) {unknown} (allowed: names, log, young_omega)")
        example = self._arguments_of(dict(self.table[0]) if self.table else {})
        if "names" in spec:
            names = tuple(spec["names"])
        else:  # every argument that varies and is a number
            names = tuple(n for n, v in example.items() if _is_number(v) and self._varies(n))
        log = tuple(spec.get("log", [n for n in names if self._is_log(n)]))
        derived = ()
        if "young_omega" in spec:
            young = spec["young_omega"]
            if not isinstance(young, Mapping) or "grid" not in young:
                raise ValueError("program family features.young_omega must be a table with grid = [names] "
                                 "(and offset, -1 for vertex counts like -da_grid_x)")
            derived = (YoungOmega(tuple(young["grid"]) if not isinstance(young["grid"], str) else (young["grid"],),
                                  int(young.get("offset", -1)), str(young.get("name", "young_omega"))),)
        features = ArgumentFeatures(names, log, derived)
        features(example)  # a missing or non-numeric argument fails here, naming it
        return features

    def _varies(self, name: str) -> bool:
        if self.table is not None and name in self.table[0]:
            return True
        spec = self.arguments.get(name)
        return isinstance(spec, dict) and "same_as" not in spec  # a copy adds no information

    def _is_log(self, name: str) -> bool:
        spec = self.arguments.get(name)
        return isinstance(spec, dict) and ("log_uniform" in spec or "log_integers" in spec)

    @property
    def feature_dim(self) -> int:
        return len(self.features.feature_names)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.features.feature_names

    def describe(self) -> str:
        parts = [f"-{name} {_describe(spec)}" for name, spec in self.arguments.items()]
        if self.table is not None:
            parts.append(f"{len(self.table)} table rows of {', '.join('-' + c for c in self.table[0])}")
        if self.eval_table is not None:
            parts.append(f"evaluation on {len(self.eval_table)} rows of their own")
        return (f"Runs of a program with arguments {'; '.join(parts)}. Features ({self.feature_dim}): "
                f"{', '.join(self.features.feature_names)}.")

    def _row_or_draw(self, index: int) -> dict[str, Any]:
        """The table row of run `index` (or {} without a table), checked against the split."""
        if self.table is None:
            return {}
        if index >= EVAL_OFFSET and self.eval_table is not None:
            position = index - EVAL_OFFSET
            if position >= len(self.eval_table):
                raise ValueError(f"program family: run {index} asks for row {position} of a table with "
                                 f"{len(self.eval_table)} rows")
            return dict(self.eval_table[position])
        return dict(self.table[self._split.position(index)])


    def _arguments_of(self, row: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        rng = rng if rng is not None else np.random.default_rng([self.seed, 0])
        drawn: dict[str, Any] = {}
        for name, spec in self.arguments.items():
            drawn[name] = _draw(spec, rng, drawn)
        return {**drawn, **row}

    def _build(self, rng: np.random.Generator, index: int) -> ProgramTask:
        arguments = self._arguments_of(self._row_or_draw(index), rng)
        return ProgramTask.create(arguments, self.features, name=self.task_name(index))


def _check_distribution(name: str, spec: Any) -> Any:
    """A constant (number, string, bool) or a one-key table naming a distribution, checked."""
    if not isinstance(spec, Mapping):
        if isinstance(spec, (list, tuple)):
            raise ValueError(f"program argument {name!r}: a list {spec!r} is not a value; "
                             f"for a choice write {{choice = {list(spec)!r}}}")
        return spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ValueError(f"program argument {name!r}: {dict(spec)!r} must be one of "
                         f"{', '.join('{' + d + ' = ...}' for d in DISTRIBUTIONS)}")
    kind, value = next(iter(spec.items()))
    if kind == "same_as":
        if not isinstance(value, str):
            raise ValueError(f"program argument {name!r}: same_as must name another argument, got {value!r}")
        return dict(spec)
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or len(value) < 1:
            raise ValueError(f"program argument {name!r}: choice must list at least one value, got {value!r}")
        return {kind: list(value)}
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise ValueError(f"program argument {name!r}: {kind} needs [lo, hi], got {value!r}")
    lo, hi = value
    integer = kind in ("integers", "log_integers")
    if integer and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"program argument {name!r}: {kind} needs integer bounds, got {value!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi) or (kind.startswith("log") and not lo > 0):
        raise ValueError(f"program argument {name!r}: {kind} needs finite lo <= hi"
                         f"{' and lo > 0' if kind.startswith('log') else ''}, got {value!r}")
    return {kind: [lo, hi]}


def _draw(spec: Any, rng: np.random.Generator, drawn: Mapping[str, Any]) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    kind, value = next(iter(spec.items()))
    if kind == "same_as":
        return drawn[value]
    if kind == "choice":
        return value[int(rng.integers(len(value)))]
    lo, hi = value
    if kind == "integers":
        return int(rng.integers(lo, hi + 1))
    if kind == "log_integers":
        return int(min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 0.5)))))
    sample = rng.uniform(lo, hi) if kind == "uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return float(f"{sample:.{SIGNIFICANT_DIGITS}g}")


def _describe(spec: Any) -> str:
    if not isinstance(spec, Mapping):
        return f"= {spec}"
    kind, value = next(iter(spec.items()))
    return f"= -{value}" if kind == "same_as" else f"~ {kind}{value}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_cell(text: str) -> Any:
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Runs as rows of arguments: a CSV file with a header (numbers parsed, the rest kept as text)
    or a TOML file of `[[run]]` tables. Every row must give the same arguments."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"program family: no such table file {str(path)!r}")
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML: {error}") from None
        rows = data.get("run")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: a TOML table of runs needs [[run]] tables (one per run), found {sorted(data)}")
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as stream:
            reader = csv.DictReader(stream)
            rows = [{k.strip().lstrip("-"): _parse_cell(v) for k, v in row.items()} for row in reader]
        if not rows:
            raise ValueError(f"{path}: the CSV table has a header but no runs")
        if any(None in row or any(v == "" for v in row.values()) for row in rows):
            raise ValueError(f"{path}: every CSV row must give a value for every column")
    else:
        raise ValueError(f"program family: table {str(path)!r} must be a .csv or .toml file")
    columns = list(rows[0])
    for number, row in enumerate(rows):
        if list(row) != columns and set(row) != set(columns):
            raise ValueError(f"{path}: run {number} gives arguments {sorted(row)}, the first run {sorted(columns)}")
    return rows
