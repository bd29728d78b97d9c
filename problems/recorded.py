"""A family over linear systems recorded from a user's own program (`metasolve record`).

`metasolve.app.record.record` runs the unmodified program with PETSc's own viewers
(`-ksp_view_mat binary:...`, `-ksp_view_rhs binary:...`) and leaves a directory

    DIR/systems/r0000-s0000/A.bin, b.bin, system.json    one per KSPSolve the program made
    DIR/runs.json                                         each run's command, arguments, systems

Task i is the i-th system in name order: training takes the first systems, evaluation the last
(index EVAL_OFFSET + j is the j-th from the end), and a config whose two sets would overlap is
refused with both counts. A recorded system has no parameters of its own to learn from, so
its features are the operator's (`[problem] features = "operator"` or `"structural"`,
`solvers.features`): the same numbers `metasolve predict --matrix A.bin --rhs b.bin` computes for
a new system of the program, or `MetaSolver.apply` for the user's KSP in memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from problems.family import Family, FrontBackSplit, Task
from solvers._petsc import PETSc

SYSTEMS = "systems"
MATRIX, RHS, METADATA = "A.bin", "b.bin", "system.json"


def system_directories(directory: Path) -> list[Path]:
    """The recorded systems under `directory`, in name order (run, then solve)."""
    root = directory / SYSTEMS
    return sorted(p for p in root.iterdir() if (p / MATRIX).is_file()) if root.is_dir() else []


def load_system(path: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """(A, b) of one recorded system as SciPy/NumPy (float64), so any rank or group can rebuild it."""
    viewer = PETSc.Viewer().createBinary(str(path / MATRIX), mode="r", comm=PETSc.COMM_SELF)
    try:
        A = PETSc.Mat().load(viewer)
    finally:
        viewer.destroy()
    try:
        indptr, indices, values = A.getValuesCSR()
        matrix = sp.csr_matrix((np.array(values, dtype=np.float64), np.array(indices), np.array(indptr)),
                               shape=A.getSize())
    finally:
        A.destroy()
    if (path / RHS).is_file():
        viewer = PETSc.Viewer().createBinary(str(path / RHS), mode="r", comm=PETSc.COMM_SELF)
        try:
            b = PETSc.Vec().load(viewer)
        finally:
            viewer.destroy()
        rhs = np.array(b.getArray(), dtype=np.float64)
        b.destroy()
    else:
        rhs = np.ones(matrix.shape[0])
    return matrix, rhs


class RecordedFamily(Family):
    """The systems `metasolve record` collected in `directory`, as tasks (operator features)."""

    key = "recorded"

    def __init__(self, seed: int = 0, directory: str = "") -> None:
        super().__init__(seed, directory=directory)
        if not directory:
            raise ValueError("recorded family: give directory = the --out directory of `metasolve record`")
        self.directory = Path(directory)
        self.systems = system_directories(self.directory)
        if not self.systems:
            raise ValueError(f"recorded family: no recorded systems under {str(self.directory)!r} "
                             f"(expected {SYSTEMS}/<name>/{MATRIX}; run `metasolve record --out {directory} -- ./app ...`)")
        self._split = FrontBackSplit(len(self.systems), "recorded family", "system",
                                     f"{self.directory} holding {len(self.systems)} systems",
                                     "record more runs or ask for fewer tasks")

    @property
    def feature_dim(self) -> int:
        return 0

    def describe(self) -> str:
        return (f"{len(self.systems)} linear systems recorded from a program's own solves in {self.directory} "
                "(PETSc binary files); features computed from each operator.")

    def _position(self, index: int) -> int:
        return self._split.position(index)

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        path = self.systems[self._position(index)]
        A, b = load_system(path)
        parameters: dict[str, Any] = {}
        if (path / METADATA).is_file():
            parameters = json.loads((path / METADATA).read_text())
        return Task(A, b, name=f"{self.key}-{path.name}", parameters=parameters)
