"""Differentiable torch twins of two simple PETSc solvers, for measuring gradient estimators.

A twin reproduces, operation by operation, the residual-norm history a `KSPOracle` records
(unpreconditioned 2-norm, iterations 0..k), so autograd through the twin gives the *exact*
gradient of any cost built on that history. Estimators are judged against it; the twins never
stand in for a user's solver.

Shapes: `A` is n×n (SciPy sparse, NumPy or torch), `b` and `x0` are `[n]` or `[B, n]`
(broadcast together; `x0=None` is PETSc's zero guess); the history is `[k + 1]` or
`[B, k + 1]`, differentiable with respect to `b` and `x0`. Everything is float64.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

Matrix = sp.spmatrix | sp.sparray | np.ndarray | torch.Tensor
Vector = np.ndarray | torch.Tensor
ResidualHistory = Callable[..., torch.Tensor]


def jacobi_residuals(A: Matrix, b: Vector, x0: Vector | None, iterations: int) -> torch.Tensor:
    """‖b − A x_i‖₂ for i = 0..k of x_{i+1} = x_i + D⁻¹(b − A x_i).

    PETSc's `-ksp_type richardson -pc_type jacobi` (scale 1) with a monitor attached.
    """
    matrix, b, x0 = _prepare(A, b, x0, iterations)
    diagonal = _diagonal(matrix)
    if torch.any(diagonal == 0):
        raise ValueError("jacobi_residuals: A has a zero on its diagonal, Jacobi is undefined")
    inverse_diagonal = 1.0 / diagonal  # PCJacobi stores the reciprocal and multiplies by it
    x = x0
    r = b - _matvec(matrix, x)
    norms = [torch.linalg.vector_norm(r, dim=-1)]
    for _ in range(iterations):
        x = x + r * inverse_diagonal
        r = b - _matvec(matrix, x)
        norms.append(torch.linalg.vector_norm(r, dim=-1))
    return torch.stack(norms, dim=-1)


def cg_residuals(A: Matrix, b: Vector, x0: Vector | None, iterations: int) -> torch.Tensor:
    """Residual norms of unpreconditioned conjugate gradients, iterations 0..k.

    PETSc's `-ksp_type cg -pc_type none`. Like PETSc, the twin reports the norm of the
    recursively updated residual r ← r − αAp, which equals ‖b − A x_i‖₂ in exact arithmetic and
    tracks PETSc's numbers to round-off. Once the residual is exactly zero (PETSc would stop
    with `CONVERGED_ATOL`) the remaining entries are zero, with zero, finite gradients.
    """
    matrix, b, x0 = _prepare(A, b, x0, iterations)
    r = b - _matvec(matrix, x0)
    rr = _dot(r, r)
    norms = [torch.linalg.vector_norm(r, dim=-1)]
    p = r
    for _ in range(iterations):
        w = _matvec(matrix, p)
        alpha = _safe_divide(rr, _dot(p, w))
        r = r - alpha * w
        rr_next = _dot(r, r)
        norms.append(torch.linalg.vector_norm(r, dim=-1))
        p = r + _safe_divide(rr_next, rr) * p
        rr = rr_next
    return torch.stack(norms, dim=-1)


TWINS: dict[tuple[str, str], ResidualHistory] = {
    ("richardson", "jacobi"): jacobi_residuals,
    ("cg", "none"): cg_residuals,
}


def twin_for(ksp_type: str, pc_type: str) -> ResidualHistory:
    """The twin of PETSc's (`ksp_type`, `pc_type`), e.g. `twin_for("cg", "none")`."""
    try:
        return TWINS[(ksp_type, pc_type)]
    except KeyError:
        supported = ", ".join(f"{k}+{p}" for k, p in TWINS)
        raise ValueError(f"no differentiable twin for ksp_type={ksp_type!r} pc_type={pc_type!r}; "
                         f"supported: {supported}") from None


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 0 where numerator is exactly 0 (a converged solve).

    The inner `where` keeps 0/0 out of the graph entirely, so its gradient stays finite too.
    """
    done = numerator == 0
    return torch.where(done, torch.zeros_like(numerator), numerator / torch.where(done, 1.0, denominator))


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(dim=-1, keepdim=True)


def _matvec(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    columns = x.reshape(-1, x.shape[-1]).transpose(0, 1)
    return (matrix @ columns).transpose(0, 1).reshape(x.shape)


def _diagonal(matrix: torch.Tensor) -> torch.Tensor:
    if not matrix.is_sparse:
        return torch.diagonal(matrix).clone()
    rows, columns = matrix.indices()
    on_diagonal = rows == columns
    diagonal = torch.zeros(matrix.shape[0], dtype=torch.float64)
    diagonal[rows[on_diagonal]] = matrix.values()[on_diagonal]
    return diagonal


def _as_torch_matrix(A: Matrix) -> torch.Tensor:
    """SciPy sparse → coalesced torch COO; NumPy or torch dense → dense torch; all float64."""
    if sp.issparse(A):
        coo = sp.coo_matrix(A, dtype=np.float64)
        coo.sum_duplicates()
        indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
        return torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data), coo.shape,
                                       dtype=torch.float64, check_invariants=True).coalesce()
    if isinstance(A, torch.Tensor):
        if A.layout not in (torch.strided, torch.sparse_coo):
            A = A.to_sparse_coo()
        return A.to(torch.float64).coalesce() if A.is_sparse else A.to(torch.float64)
    if isinstance(A, np.ndarray):
        return torch.as_tensor(A, dtype=torch.float64)
    raise ValueError(f"A must be a SciPy sparse matrix, a NumPy array or a torch tensor, "
                     f"got {type(A).__name__}")


def _prepare(A: Matrix, b: Vector, x0: Vector | None,
             iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    matrix = _as_torch_matrix(A)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(matrix.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    n = matrix.shape[0]
    b = torch.as_tensor(b, dtype=torch.float64)
    if b.dim() not in (1, 2) or b.shape[-1] != n:
        raise ValueError(f"b has shape {tuple(b.shape)}, expected [{n}] or [B, {n}] for A of size {n}")
    if x0 is None:
        return matrix, b, torch.zeros_like(b)  # b − A·0 is b exactly, as PETSc's zero guess
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    if x0.dim() not in (1, 2) or x0.shape[-1] != n:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}, expected [{n}] or [B, {n}] for A of size {n}")
    if b.dim() == x0.dim() == 2 and 1 not in (b.shape[0], x0.shape[0]) and b.shape[0] != x0.shape[0]:
        raise ValueError(f"b has {b.shape[0]} right-hand sides but x0 has {x0.shape[0]} guesses")
    return matrix, b, x0
