"""`metasolve predict`: a trained setting delivered to an unmodified program through files it reads.

A PETSc program reads its solver options from the options database, and the database reads
files: `-options_file job/metasolve.opts`. So the learned setting of one run becomes a text
file of `-<prefix>name value` lines, and a learned initial guess a PETSc binary vector (plus the
program's guess flag, e.g. `-x0 job/x0.bin`, in the same file: programs read that flag through
the database too). Nothing about the program changes; the job script gains one option.

The options file reproduces training, not only the learned option: it also holds the solver
options every training run had and the program does not set itself (`Delivery.base_options`:
the config's solver options, its `ksp_type`/`pc_type`), under the program's prefix, and the
monitor without which Richardson with a fast-path preconditioner (SOR) skips PETSc's convergence
test (rich.c; every training run had one). What cannot be reproduced is refused with the reason.

The loop, end to end (`examples/legacy_solver/README.md` runs it on `heat_stepper`):

1. train through the program (`ExecutableOracle`) on tasks given as its own arguments, then
   `save_for_program(model, meta, Delivery.for_oracle(oracle, features))` (as `metasolve train`
   does): the meta-solver (`MetaSolver.save`: a torch file and its
   plain-array twin `<stem>.plain.npz`) and, beside it, `<stem>.delivery.json`
   (`metasolve.app.delivery`) saying which arguments are the features, the program's options
   prefix and the training solver's options;
2. `metasolve predict model.pt --out job -- -n 48 -kappa 0.3 -dt 0.01` computes the features of
   this run from the same arguments and writes `job/metasolve.opts` (and `job/x0.bin`);
   `--table runs.csv` does that for many runs in one call (`job/<id>/metasolve.opts`);
3. `heat_stepper -n 48 -kappa 0.3 -dt 0.01 -options_file job/metasolve.opts`.

This path imports neither torch nor PETSc (`metasolve.method.plain_model` evaluates the model with
numpy, the guess is written in PETSc's binary format by hand), so it fits in a job script
(benchmarks/results/predict.md). For a model trained on matrix files (the oracle's `-f A.bin
-rhs b.bin`), `--matrix A.bin --rhs b.bin` computes the model's operator features from the same
files; only that route loads PETSc.
"""
from __future__ import annotations

import csv
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metasolve.app.delivery import Delivery, delivery_path, load_delivery, save_for_program
from metasolve.method.plain_model import GUESS, PlainModel, check_option_name, check_prefix, load_plain, plain_path
from solvers.text import format_value, is_number, parse_arguments

__all__ = ["Delivery", "delivery_path", "describe", "load_delivery", "needs_monitor", "predict", "predict_table",
           "run_predict", "save_for_program", "write_petsc_vector"]

OPTIONS_FILE = "metasolve.opts"
GUESS_FILE = "x0.bin"
INDEX_FILE = "index.csv"
VEC_FILE_CLASSID = 1211214
"""PETSc's class id of a Vec in its binary format (petscvec.h: VEC_FILE_CLASSID)."""
FAST_RICHARDSON_PCS = frozenset({"sor", "hypre", "telescope", "shell"})
"""Preconditioners with their own Richardson iteration (PCApplyRichardson): KSPRICHARDSON hands
them the whole solve, without PETSc's convergence test, unless a monitor is attached (rich.c)."""
MONITOR = ("ksp_monitor", "ascii:/dev/null")
"""The monitor that keeps Richardson's convergence test: it only has to exist, so it prints nowhere."""
_RUN_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_COLUMN = re.compile(r"^-?[A-Za-z][A-Za-z0-9_]*$")
_PATH_TOKEN = re.compile(r"^[^\s#'\"]+$")


def _one_line(text: str) -> str:
    """Text for a comment line of an options file: no line break can start an option."""
    return re.sub(r"\s+", " ", text)


def load_model(model: str | Path) -> PlainModel:
    """The plain twin beside `model`; a model saved before there was one is converted through torch
    (slow: torch is imported) with a note saying how to avoid that."""
    model = Path(model)
    plain = plain_path(model)
    if plain.is_file():
        return load_plain(plain)
    if not model.is_file():
        raise ValueError(f"no such model file: {model}")
    print(f"metasolve: note: {model} has no plain twin {plain.name}; loading it through torch (slow). "
          "Re-save it with MetaSolver.save to predict without torch.", file=sys.stderr)
    from metasolve.method.meta_solver import MetaSolver

    with tempfile.TemporaryDirectory(prefix="metasolve-plain-") as scratch:
        MetaSolver.load(model).export_plain(Path(scratch) / "model.plain.npz")
        return load_plain(Path(scratch) / "model.plain.npz")


def write_petsc_vector(path: str | Path, values: np.ndarray, int64: bool = False) -> None:
    """A Vec in PETSc's binary format, as `VecView` writes it and `VecLoad` reads it: big-endian
    class id and length (PetscInt: 4 bytes, 8 with 64-bit indices), then the entries as doubles."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    header = np.array([VEC_FILE_CLASSID, values.size], dtype=">i8" if int64 else ">i4")
    with open(path, "wb") as stream:
        stream.write(header.tobytes())
        stream.write(values.astype(">f8").tobytes())


def needs_monitor(options: Mapping[str, str]) -> bool:
    """Whether a solve with these options (name → text, no prefix) may take Richardson's fast path
    (`PCApplyRichardson`), which the training runs never took: they all had a monitor, and any
    monitor switches that path off (rich.c). On plain strings, without PETSc, and broader than
    `solvers.options.needs_monitor` (SOR only: the path that skips the test altogether): hypre's
    and telescope's paths test on their own terms, which are not the training's either. A type
    the options do not give counts as possible (the program may set it in code)."""
    ksp, pc = options.get("ksp_type"), options.get("pc_type")
    if options.get("ksp_richardson_self_scale", "false") not in ("false", "0", "no"):
        return False
    scale = options.get("ksp_richardson_scale")
    if scale is not None and (not is_number(scale) or float(scale) != 1.0):
        return False
    if any(name.startswith("ksp_monitor") and name != "ksp_monitor_cancel" for name in options):
        return False
    richardson = ksp == "richardson" or (ksp is None and pc in FAST_RICHARDSON_PCS)
    fast_pc = pc in FAST_RICHARDSON_PCS or (pc is None and ksp == "richardson")
    return richardson and fast_pc


def describe(setting: Mapping[str, Any]) -> str:
    """`pc_sor_omega = 1.8312, x0 = <vector of 2304>`."""
    return ", ".join(f"{k} = <vector of {len(v)}>" if isinstance(v, np.ndarray) else f"{k} = {v:.6g}"
                     if isinstance(v, float) else f"{k} = {v}" for k, v in setting.items())


@dataclass
class Run:
    """One run to predict for: its name, its own arguments (name → text) and its features."""

    name: str
    arguments: dict[str, str] = field(default_factory=dict)
    size: int | None = None


class Writer:
    """Turns settings into options files for one model and delivery (the per-run part is small)."""

    def __init__(self, model: Path, delivery: Delivery, prefix: str | None) -> None:
        self.model, self.delivery = model, delivery
        self.model_line = f"# model: {_one_line(os.path.abspath(model))}"
        self.prefix = check_prefix(delivery.prefix if prefix is None else prefix)
        if delivery.unreproducible:
            raise ValueError(f"{model}: an options file cannot reproduce this model's training runs: "
                             f"{delivery.unreproducible}")
        self.warnings: list[str] = []
        if delivery.base_options is None:
            self.warnings.append(f"{model} records no training solver (saved before metasolve recorded it): "
                                 "the options file holds only the learned options, and the run reproduces training "
                                 "only if the program sets the rest itself (and, for Richardson + SOR, attaches a "
                                 "monitor). Re-save it with save_for_program(..., Delivery.for_oracle(oracle, ...)).")

    def options(self, setting: Mapping[str, Any], run: Run) -> tuple[dict[str, str], np.ndarray | None]:
        """The run's options (name → text, base under learned) and its initial guess."""
        guess = None
        learned: dict[str, str] = {}
        for name, value in setting.items():
            if name == GUESS:
                guess = np.asarray(value, dtype=np.float64)
                if run.size is not None and guess.shape != (run.size,):
                    raise ValueError(f"{GUESS} has shape {guess.shape}, the system has {run.size} unknowns")
                if not np.all(np.isfinite(guess)):
                    raise ValueError(f"{GUESS} contains non-finite values")
            else:
                learned[check_option_name(name, f"{self.model}: learned option")] = format_value(value)
        options = {**(self.delivery.base_options or {}), **learned}
        full = {f"{self.prefix}{name}": text for name, text in options.items()}
        for argument, value in run.arguments.items():
            if argument in full and value != full[argument]:
                source = "learned" if argument[len(self.prefix):] in learned else "trained with"
                raise ValueError(f"{run.name}: the run sets -{argument} {value}, but the model was {source} "
                                 f"-{argument} {full[argument]}: it does not apply to a different solver")
        return options, guess

    def prepared(self, setting: Mapping[str, Any], run: Run, directory: str) -> Delivered:
        """The run's files for `directory` (an absolute path), checked, not yet written."""
        options, guess = self.options(setting, run)
        base = self.delivery.base_options or {}

        def line(name: str) -> str:
            return f"-{self.prefix}{name}" + (f" {options[name]}" if options[name] else "")

        lines = [f"# learned by metasolve for: {_one_line(run.name)}", self.model_line]
        if base:
            lines += ["# the training runs' solver options"] + [line(n) for n in options if n in base and n not in setting]
        lines += ["# learned"] + [line(n) for n in options if n in setting]
        if guess is not None:
            guess_path = os.path.join(directory, GUESS_FILE)
            if not _PATH_TOKEN.match(guess_path):
                raise ValueError(f"--out: the guess file's path {guess_path!r} has blanks, quotes or '#': "
                                 "PETSc would split it into several options; choose a plainer directory")
            lines.append(f"{self.delivery.guess_flag} {guess_path}")
        if self.delivery.base_options is not None and needs_monitor(options):
            lines += ["# Richardson with this preconditioner tests convergence only under a monitor (PETSc's rich.c),",
                      "# as every training run had; this one prints nowhere",
                      f"-{self.prefix}{MONITOR[0]} {MONITOR[1]}"]
        return Delivered(directory, "\n".join(lines) + "\n", guess)

    def write(self, delivered: Delivered) -> Path:
        if delivered.guess is not None:
            write_petsc_vector(os.path.join(delivered.directory, GUESS_FILE), delivered.guess, self.delivery.petsc_int64)
        options_file = os.path.join(delivered.directory, OPTIONS_FILE)
        with open(options_file, "w") as stream:
            stream.write(delivered.text)
        return Path(options_file)


@dataclass
class Delivered:
    """One run's options file text and initial guess, for its directory."""

    directory: str
    text: str
    guess: np.ndarray | None


def prepare_directory(out: Path) -> None:
    """`out` as a directory we can write into, or a ValueError saying why not."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the directory ({error.strerror or error})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the directory is not writable")


def read_table(table: Path) -> list[tuple[str, dict[str, str]]]:
    """Runs from a CSV file: an `id` column (a directory name) and one column per program argument
    (`n` or `-n`); an empty cell leaves that argument out of the run."""
    try:
        with open(table, newline="") as stream:
            rows = list(csv.reader(stream))
    except OSError as error:
        raise ValueError(f"--table {table}: cannot read it ({error.strerror or error})") from None
    except csv.Error as error:
        raise ValueError(f"--table {table}: not a CSV file ({error})") from None
    if not rows or "id" not in rows[0]:
        raise ValueError(f"--table {table}: the first row must name the columns, one of them 'id'")
    header = [h.strip() for h in rows[0]]
    for name in header:
        if name != "id" and not _COLUMN.match(name):
            raise ValueError(f"--table {table}: column {name!r} is not a program argument name")
    runs, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"--table {table} line {line}: {len(row)} cells, the header has {len(header)}")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        run_id = cells.pop("id")
        if not _RUN_ID.match(run_id) or run_id in seen:
            raise ValueError(f"--table {table} line {line}: id {run_id!r} is "
                             f"{'repeated' if run_id in seen else 'not a plain directory name'}")
        seen.add(run_id)
        runs.append((run_id, {k.lstrip("-"): v for k, v in cells.items() if v}))
    if not runs:
        raise ValueError(f"--table {table}: no runs in it")
    return runs


def _argument_runs(plain: PlainModel, delivery: Delivery, model: Path,
                   runs: Sequence[Run]) -> list[dict[str, Any]]:
    if delivery.features is None:
        raise ValueError(f"{model}: no argument features stored beside it ({delivery_path(model).name}); "
                         "save it with metasolve.app.predict.save_for_program")
    features = delivery.features.table([r.arguments for r in runs])
    if features.shape[1] != plain.feature_dim:
        raise ValueError(f"{model} expects {plain.feature_dim} features, the stored argument features give "
                         f"{features.shape[1]}")
    return plain.settings(features)


def _matrix_run(plain: PlainModel, model: Path, matrix: Path, rhs: Path | str | None) -> tuple[Run, dict[str, Any]]:
    """Features of the system in the files, computed as in training (loads PETSc, only here)."""
    if rhs is None:
        raise ValueError("--matrix needs --rhs: the right-hand side file, or --rhs ones for b = 1 (the features "
                         "depend on b)")
    for path in (matrix, rhs):
        if path != "ones" and not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
    from solvers.features import FEATURE_FUNCTIONS

    if plain.features not in FEATURE_FUNCTIONS:
        raise ValueError(f"this meta-solver was trained on {plain.features!r} features, which only their family "
                         "can compute; a meta-solver trained on features='operator' (or 'structural') deploys on "
                         "any (A, b)")
    from solvers._petsc import PETSc

    viewer = PETSc.Viewer().createBinary(str(matrix), mode="r", comm=PETSc.COMM_SELF)
    try:
        A = PETSc.Mat().load(viewer)
    finally:
        viewer.destroy()
    if rhs == "ones":
        b = A.createVecs()[1]
        b.set(1.0)
    else:
        viewer = PETSc.Viewer().createBinary(str(rhs), mode="r", comm=PETSc.COMM_SELF)
        try:
            b = PETSc.Vec().load(viewer)
        finally:
            viewer.destroy()
    features = np.asarray(FEATURE_FUNCTIONS[plain.features](A, b), dtype=np.float64)
    run = Run(str(matrix), size=A.getSize()[0])
    return run, plain.settings(features[None, :])[0]


def predict(model: str | Path, out: str | Path, arguments: Sequence[str] | None = None,
            matrix: str | Path | None = None, rhs: str | Path | None = None,
            prefix: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the learned setting of one run into `out`; returns the options file and the setting.

    Exactly one of `arguments` (the run's own command-line arguments) or `matrix` gives the task;
    `rhs` is the right-hand side file or "ones". `prefix` overrides the stored options prefix.
    """
    if (arguments is None) == (matrix is None):
        raise ValueError("give the run's program arguments or --matrix (exactly one of them)")
    model = Path(model)
    plain, delivery = load_model(model), load_delivery(model)
    writer = Writer(model, delivery, prefix)
    if arguments is not None:
        run = Run(" ".join(arguments), parse_arguments(arguments))
        setting = _argument_runs(plain, delivery, model, [run])[0]
    else:
        run, setting = _matrix_run(plain, model, Path(matrix), rhs if rhs == "ones" or rhs is None else Path(rhs))
    for warning in writer.warnings:
        print(f"metasolve: warning: {warning}", file=sys.stderr)
    out = Path(out)
    delivered = writer.prepared(setting, run, os.path.abspath(out))  # refused before anything is written
    prepare_directory(out)
    return writer.write(delivered), setting


def predict_table(model: str | Path, table: str | Path, out: str | Path,
                  prefix: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """One options file per run of `table` (`out/<id>/metasolve.opts`), one network evaluation for
    all of them, and `out/index.csv` (id, options file, the scalar settings)."""
    model, out = Path(model), Path(out)
    plain, delivery = load_model(model), load_delivery(model)
    writer = Writer(model, delivery, prefix)
    rows = read_table(Path(table))
    runs = [Run(run_id, arguments) for run_id, arguments in rows]
    settings = _argument_runs(plain, delivery, model, runs)
    for warning in writer.warnings:
        print(f"metasolve: warning: {warning}", file=sys.stderr)
    root = os.path.abspath(out)
    delivered = [writer.prepared(setting, run, os.path.join(root, run.name))  # refused before anything is written
                 for run, setting in zip(runs, settings)]
    prepare_directory(out)
    files = []
    try:
        for item in delivered:
            if not os.path.isdir(item.directory):
                os.mkdir(item.directory)
            files.append(writer.write(item))
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write the options files ({error.strerror or error})") from None
    scalar = [k for k, v in settings[0].items() if not isinstance(v, np.ndarray)]
    index = out / INDEX_FILE
    with open(index, "w", newline="") as stream:
        writer_csv = csv.writer(stream)
        writer_csv.writerow(["id", "options_file", *scalar])
        for run, path, setting in zip(runs, files, settings):
            writer_csv.writerow([run.name, str(path), *(format_value(setting[k]) for k in scalar)])
    return index, settings


def run_predict(model: Path, out: Path, arguments: list[str] | None, table: Path | None, matrix: Path | None,
                rhs: Path | None, prefix: str | None) -> int:
    """`metasolve predict`: exit status 0, or 2 with a message naming the problem (printed here).

    Exactly one of `arguments` (a run's own arguments, after `--`), `table` (a CSV of runs) or
    `matrix` (with `rhs`: a file or the word `ones`) gives the task(s).
    """
    given = sum(x is not None for x in (arguments, table, matrix))
    try:
        if given != 1:
            raise ValueError("give exactly one of: the run's program arguments (after --), --table runs.csv, "
                             "or --matrix A.bin --rhs b.bin")
        if rhs is not None and matrix is None:
            raise ValueError("--rhs goes with --matrix")
        if table is not None:
            index, settings = predict_table(model, table, out, prefix)
            print(f"metasolve: {len(settings)} runs -> {Path(out) / '<id>' / OPTIONS_FILE} (index: {index}); "
                  f"add -options_file {Path(out) / '<id>' / OPTIONS_FILE} to each run")
            return 0
        rhs_value = "ones" if rhs is not None and str(rhs) == "ones" else rhs
        options_file, setting = predict(model, out, arguments=arguments, matrix=matrix, rhs=rhs_value, prefix=prefix)
    except ValueError as error:
        print(f"metasolve: predict: {error}", file=sys.stderr)
        return 2
    print(f"metasolve: {describe(setting)} -> {options_file}; add -options_file {options_file} to the run")
    return 0
