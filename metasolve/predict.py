"""`metasolve predict`: a trained setting delivered to an unmodified program through files it reads.

A PETSc program reads its solver options from the options database, and the database reads
files: `-options_file job/metasolve.opts`. So the learned setting of one run becomes a text
file of `-<prefix>name value` lines, and a learned initial guess a PETSc binary vector (plus the
program's guess flag, e.g. `-x0 job/x0.bin`, in the same file: programs read that flag through
the database too). Nothing about the program changes; the job script gains one option.

The loop, end to end (`examples/legacy_solver/README.md` runs it on `heat_stepper`):

1. train through the program (`ExecutableOracle`) on tasks given as its own arguments
   (`ProgramTask` with `ArgumentFeatures`), then `save_for_program(model, meta, features,
   prefix)`: the meta-solver (`MetaSolver.save`) and, beside it, `<model>.delivery.json` saying
   which arguments are the features and under which options prefix the program's solver reads;
2. `metasolve predict model.pt --out job -- -n 48 -kappa 0.3 -dt 0.01` computes the features of
   this run from the same arguments and writes `job/metasolve.opts` (and `job/x0.bin`);
3. `heat_stepper -n 48 -kappa 0.3 -dt 0.01 -options_file job/metasolve.opts`.

For a model trained on matrix files (the oracle's `-f A.bin -rhs b.bin`), `--matrix A.bin
--rhs b.bin` computes the model's operator features from the same files (`MetaSolver.features_of`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metasolve.meta_solver import MetaSolver
from solvers._petsc import PETSc
from solvers.executable import write_petsc_binary
from solvers.linear_system import LinearSystem
from solvers.options import option_name, split_setting
from solvers.program_task import ArgumentFeatures, ProgramTask, parse_arguments

OPTIONS_FILE = "metasolve.opts"
GUESS_FILE = "x0.bin"


@dataclass(frozen=True)
class Delivery:
    """How a model's settings reach its program: the features of a run's arguments, the options
    prefix of the program's solver, and the flag through which it reads an initial guess."""

    features: ArgumentFeatures | None = None
    prefix: str = ""
    guess_flag: str = "-x0"

    def __post_init__(self) -> None:
        if self.prefix:
            option_name(self.prefix)
        if not self.guess_flag.startswith("-"):
            raise ValueError(f"guess_flag must be an option such as '-x0', got {self.guess_flag!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features.to_dict() if self.features else None, "prefix": self.prefix,
                "guess_flag": self.guess_flag}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Delivery":
        features = data.get("features")
        return cls(ArgumentFeatures.from_dict(features) if features else None, data.get("prefix", ""),
                   data.get("guess_flag", "-x0"))


def delivery_path(model: str | Path) -> Path:
    model = Path(model)
    return model.with_name(f"{model.stem}.delivery.json")


def save_for_program(path: str | Path, meta: MetaSolver, delivery: Delivery) -> None:
    """`MetaSolver.save(path)` plus `<path stem>.delivery.json` (plain JSON: readable, editable)."""
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


def _load_vector(path: Path) -> PETSc.Vec:
    viewer = PETSc.Viewer().createBinary(str(path), mode="r", comm=PETSc.COMM_SELF)
    try:
        return PETSc.Vec().load(viewer)
    finally:
        viewer.destroy()


def matrix_task(matrix: Path, rhs: Path | None) -> LinearSystem:
    """The task the oracle wrote as files; its features are the model's to compute (`features_of`)."""
    for path in (matrix, rhs):
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
    viewer = PETSc.Viewer().createBinary(str(matrix), mode="r", comm=PETSc.COMM_SELF)
    try:
        A = PETSc.Mat().load(viewer)
    finally:
        viewer.destroy()
    if rhs is not None:
        b = _load_vector(rhs)
    else:  # the legacy programs' default right-hand side
        b = A.createVecs()[1]
        b.set(1.0)
    return LinearSystem(A, b, name=str(matrix))


def describe(setting: dict[str, Any]) -> str:
    """`pc_sor_omega = 1.8312, x0 = <vector of 2304>`."""
    return ", ".join(f"{k} = <vector of {len(v)}>" if k == "x0" else f"{k} = {v:.6g}" if isinstance(v, float)
                     else f"{k} = {v}" for k, v in setting.items())


def predict(model: str | Path, out: str | Path, arguments: Sequence[str] | None = None,
            matrix: str | Path | None = None, rhs: str | Path | None = None,
            prefix: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the learned setting of one run into `out`; returns the options file and the setting.

    Exactly one of `arguments` (the run's own command-line arguments) or `matrix` gives the task.
    `prefix` overrides the stored options prefix.
    """
    if (arguments is None) == (matrix is None):
        raise ValueError("give the run's program arguments or --matrix (exactly one of them)")
    meta = MetaSolver.load(model)
    delivery = load_delivery(model)
    if arguments is not None:
        if delivery.features is None:
            raise ValueError(f"{model}: no argument features stored beside it ({delivery_path(model).name}); "
                             "save it with metasolve.predict.save_for_program")
        values = parse_arguments(arguments)
        task: Any = ProgramTask(values, delivery.features(values), " ".join(arguments))
    else:
        task = matrix_task(Path(matrix), Path(rhs) if rhs is not None else None)
        task.features = meta.features_of(task.A, task.b)
    width = int(task.features.shape[-1])
    if width != meta.spec["feature_dim"]:
        raise ValueError(f"{model} expects {meta.spec['feature_dim']} features, this task has {width}")
    setting = meta.predict(task)
    split = split_setting(setting, size=getattr(task, "size", None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen_prefix = delivery.prefix if prefix is None else prefix
    lines = [f"# learned by metasolve for: {task.name}", f"# model: {os.path.abspath(model)}"]
    lines += [f"-{chosen_prefix}{name}" + (f" {text}" if text else "") for name, text in split.options.items()]
    if split.guess is not None:
        guess_path = (out / GUESS_FILE).resolve()
        vector = PETSc.Vec().createWithArray(split.guess, comm=PETSc.COMM_SELF)
        write_petsc_binary(vector, str(guess_path))
        vector.destroy()
        lines.append(f"{delivery.guess_flag} {guess_path}")
    options_file = out / OPTIONS_FILE
    options_file.write_text("\n".join(lines) + "\n")
    return options_file, setting
