"""A linear system A x = b as a task for the KSP oracle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from solvers._petsc import PETSc


@dataclass
class LinearSystem:
    """`A` is a PETSc `Mat` or a SciPy sparse matrix, `b` a PETSc `Vec` or a NumPy array.

    SciPy/NumPy inputs can be distributed to any communicator (every rank holds the whole
    system, each keeps its row block), which is what lets any MPI rank or group solve any task.
    A PETSc `Mat` is used as given and must live on the oracle's communicator.
    """

    A: Any
    b: Any
    features: torch.Tensor | None = None
    x_ref: np.ndarray | None = None
    name: str = ""
    _on_comm: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.A, PETSc.Mat):
            rows, cols = self.A.getSize()
        elif sp.issparse(self.A):
            self.A = sp.csr_matrix(self.A, dtype=np.float64)
            rows, cols = self.A.shape
        else:
            raise TypeError(f"LinearSystem: A must be a PETSc Mat or a SciPy sparse matrix, got {type(self.A).__name__}")
        if rows != cols:
            raise ValueError(f"LinearSystem: A must be square, got {rows}x{cols}")
        if isinstance(self.b, PETSc.Vec):
            n_b = self.b.getSize()
        else:
            self.b = np.ascontiguousarray(self.b, dtype=np.float64)
            if self.b.ndim != 1:
                raise ValueError(f"LinearSystem: b must be a vector, got shape {self.b.shape}")
            n_b = self.b.shape[0]
        if n_b != rows:
            raise ValueError(f"LinearSystem: A is {rows}x{cols} but b has {n_b} entries")
        if self.features is not None:
            self.features = torch.as_tensor(self.features, dtype=torch.float64)
        if self.x_ref is not None:
            self.x_ref = np.asarray(self.x_ref, dtype=np.float64)

    @property
    def size(self) -> int:
        return self.A.getSize()[0] if isinstance(self.A, PETSc.Mat) else self.A.shape[0]

    def b_array(self) -> np.ndarray:
        """The whole right-hand side as a NumPy array (gathered if `b` is distributed)."""
        return self.b if isinstance(self.b, np.ndarray) else gather(self.b)

    def petsc(self, comm: PETSc.Comm) -> tuple[PETSc.Mat, PETSc.Vec]:
        """(A, b) as PETSc objects on `comm`, built once per communicator and reused."""
        key = comm.tompi4py().py2f()
        if key not in self._on_comm:
            self._on_comm[key] = (self._matrix_on(comm), self._rhs_on(comm))
        return self._on_comm[key]

    def _matrix_on(self, comm: PETSc.Comm) -> PETSc.Mat:
        if isinstance(self.A, PETSc.Mat):
            if self.A.getComm().getSize() != comm.getSize():
                raise ValueError("LinearSystem: the PETSc Mat lives on a communicator of size "
                                 f"{self.A.getComm().getSize()}, the oracle solves on one of size {comm.getSize()}")
            return self.A
        n = self.A.shape[0]
        mat = PETSc.Mat().create(comm=comm)
        mat.setSizes(((PETSc.DECIDE, n), (PETSc.DECIDE, n)))
        mat.setType(PETSc.Mat.Type.AIJ)
        mat.setUp()
        start, end = mat.getOwnershipRange()
        block = self.A[start:end]
        mat.setPreallocationCSR((block.indptr.astype(PETSc.IntType), block.indices.astype(PETSc.IntType), block.data))
        mat.assemble()
        return mat

    def _rhs_on(self, comm: PETSc.Comm) -> PETSc.Vec:
        if isinstance(self.b, PETSc.Vec):
            return self.b
        vec = PETSc.Vec().createMPI(self.b.shape[0], comm=comm) if comm.getSize() > 1 \
            else PETSc.Vec().createSeq(self.b.shape[0], comm=comm)
        start, end = vec.getOwnershipRange()
        vec.setArray(self.b[start:end])
        return vec


def gather(vec: PETSc.Vec) -> np.ndarray:
    """The whole of a (possibly distributed) Vec as a NumPy array, on every rank."""
    if vec.getComm().getSize() == 1:
        return vec.getArray().copy()
    scatter, whole = PETSc.Scatter.toAll(vec)
    scatter.scatter(vec, whole, addv=PETSc.InsertMode.INSERT_VALUES)
    return whole.getArray().copy()
