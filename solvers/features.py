"""Operator features: what a numerical analyst reads off a matrix before choosing solver settings.

`operator_features(A, b)` describes any linear system from its PETSc `Mat` (and `Vec`) alone, so
a family with no hand-made features, a matrix loaded from a PETSc binary file, or a user's own
system at deployment all get the same numbers, computed the same way in training and in use.
Everything is computed with PETSc itself, non-intrusively: the matrix is read, never changed,
and the short Krylov run below never reads the options database. `structural_features(A, b)`
is the cheap subset without that Krylov run (`STRUCTURAL_FEATURE_NAMES`: the first thirteen
entries and ||b||), for choices — which solver — that symmetry and dominance already decide.

The features (`OPERATOR_FEATURE_NAMES`, float64, in this order):

- size and sparsity: log10 of the number of rows; mean and max nonzeros per row.
- the diagonal D: log10 of mean |a_ii|; its coefficient of variation; log10(max|a_ii|/min|a_ii|)
  (a high-contrast coefficient shows up here); the fraction of rows with a_ii <= 0.
- dominance: r_i = sum_{j != i} |a_ij| / |a_ii|; mean and max of r_i, the fraction of rows
  with r_i <= 1 (weakly diagonally dominant), and the Gershgorin bounds of D^-1 A,
  [min_i 1 - r_i, max_i 1 + r_i], which contain every eigenvalue of D^-1 A (for a_ii > 0).
- symmetry: ||A - A^T||_F / ||A||_F (0 for a symmetric matrix).
- spectrum of the Jacobi-preconditioned operator D^-1 A, from `steps` Krylov iterations with
  PETSc's Jacobi PC and `KSPSetComputeEigenvalues` (the machinery behind
  `-ksp_chebyshev_esteig`): CG for a symmetric matrix with a positive diagonal (Lanczos), GMRES
  otherwise (Arnoldi). Ritz values approach the extreme eigenvalues from inside, fastest where the
  start vector has weight. Features: min and max real part of the Ritz values, max |imaginary
  part|, log10 of the ratio of the largest to the smallest Ritz modulus (a condition estimate),
  and the Krylov iterations actually taken (fewer than `steps` when the solve converged).
- derived quantities an analyst computes from those: the Jacobi spectral radius
  rho_J = max_i |1 - theta_i| over the Ritz values theta_i (the iteration matrix of Jacobi is
  I - D^-1 A), log10(1 - rho_J) (the Jacobi gap, which the iteration count scales with), and
  Young's optimal SOR factor omega* = 2 / (1 + sqrt(1 - rho_J^2)), optimal for consistently
  ordered matrices (5-point stencils in natural order); 2 when rho_J >= 1.
- the right-hand side: log10 ||b||_2 and its weight on the slow end of the spectrum,
  w_b = theta_min / R(b), R(b) = b^T D^-1 A D^-1 b / b^T D^-1 b. With M = D^-1/2 A D^-1/2
  (similar to D^-1 A) and c = D^-1/2 b = sum_i gamma_i u_i in M's eigenvectors, R(b) is the
  Rayleigh quotient sum_i gamma_i^2 lambda_i / sum_i gamma_i^2: the mean eigenvalue under b's
  spectral weights. So w_b = 1 when b lies entirely in the slowest direction, lambda_min/lambda_max
  when it lies in the fastest, and in between it says how much of b the slow modes carry (the
  part a stationary iteration removes last). Without b both are 0.

The Krylov run starts from a fixed pseudo-random vector, 1 + U(-1/2, 1/2) drawn by global index
(so partition-independent and deterministic), never from b: a b with little weight somewhere in
the spectrum (smooth, or an eigenvector) would hide that end from the Ritz values, and the
operator's features should not depend on b. Its positive mean gives weight on the positive Perron
vector of an M-matrix, i.e. on the slowest mode, which sets rho_J.

Cost: one transpose (symmetry), one pass over the local rows, `steps` Krylov
iterations (about `steps` matrix-vector products) and one more product for R(b) — measured against one solve in
`benchmarks/options.py`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from solvers._petsc import PETSc

OPERATOR_FEATURE_NAMES: tuple[str, ...] = (
    "log10_rows", "nnz_per_row_mean", "nnz_per_row_max",
    "log10_diag_mean", "diag_cv", "log10_diag_contrast", "nonpositive_diag_fraction",
    "offdiag_ratio_mean", "offdiag_ratio_max", "dominant_row_fraction", "gershgorin_lower", "gershgorin_upper",
    "asymmetry",
    "ritz_min", "ritz_max", "ritz_imag_max", "log10_ritz_condition", "krylov_iterations",
    "jacobi_spectral_radius", "log10_jacobi_gap", "sor_omega_star",
    "log10_rhs_norm", "rhs_slow_weight",
)
"""Names of `operator_features`' entries, in order."""

STRUCTURAL_FEATURE_NAMES: tuple[str, ...] = OPERATOR_FEATURE_NAMES[:13] + ("log10_rhs_norm",)
"""Names of `structural_features`' entries, in order: the operator features one pass over the
entries gives (sparsity, diagonal, dominance, symmetry), without the Krylov run."""

DEFAULT_STEPS = 50
"""Krylov iterations for the spectral estimates. Measured on `Diffusion` (n 12-40, 12 tasks),
Young's omega* from the Ritz values vs from ARPACK's exact rho_J: 20 steps err by -0.010 on
average (-0.041 worst), 30 by -0.0017 (-0.016), 50 by < 1e-4 (-0.0003). The count needed grows
like sqrt(condition number), i.e. with the grid's n; PETSc's own Chebyshev estimator uses 10,
enough for bounds with a safety factor, not for omega*."""

SYMMETRY_TOLERANCE = 1e-12
"""Relative ||A - A^T||_F below which A counts as symmetric (Lanczos/CG instead of Arnoldi/GMRES)."""

_START_SEED = 20240229


def structural_features(A: Any, b: Any = None) -> np.ndarray:
    """The float64 vector named by `STRUCTURAL_FEATURE_NAMES`: what one pass over A's entries and
    one transpose tell, at a fifth of `operator_features`' cost (measured at 53k unknowns: 6.6 ms
    against 34 ms, where one matrix-vector product takes 0.15 ms and a solve 30 ms to 1 s).

    Why a second, cheaper set: choosing *which* solver to run is decided mostly by symmetry, sign
    and dominance (CG needs an SPD matrix; upwind convection shows as asymmetry that grows with
    the Péclet number; contrast and anisotropy show on the diagonal and in the off-diagonal
    ratios), while the Krylov run of `operator_features` costs about `steps` products — as much
    as a whole fast solve. A per-instance choice pays its features on every solve it deploys to,
    so a choice read from cheap features keeps more of what it wins (`benchmarks/discrete.py`).
    Same inputs and determinism as `operator_features`.
    """
    A, b, diagonal, structure, asymmetry = _structure(A, b)
    diagonal.destroy()
    return _finite([*structure.values(), asymmetry, _rhs_norm_log(b)], STRUCTURAL_FEATURE_NAMES)


def operator_features(A: Any, b: Any = None, steps: int = DEFAULT_STEPS) -> np.ndarray:
    """The float64 vector named by `OPERATOR_FEATURE_NAMES` for the system A x = b.

    `A`: a square PETSc `Mat` (AIJ, or any type PETSc converts to AIJ; any communicator) or a
    SciPy sparse matrix; `b`: a PETSc `Vec` with A's row layout, a NumPy array of A's size, or
    None. Deterministic: the same (A, b) give bitwise the same features on the same ranks.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"operator_features: steps must be an integer >= 2, got {steps!r}")
    A, b, diagonal, structure, asymmetry = _structure(A, b)
    symmetric = asymmetry < SYMMETRY_TOLERANCE and structure["nonpositive_diag_fraction"] == 0.0
    ritz, iterations = _krylov(A, steps, symmetric)

    real = ritz.real
    ritz_min, ritz_max = float(real.min()), float(real.max())
    moduli = np.abs(ritz)
    condition = math.log10(moduli.max() / moduli.min()) if moduli.min() > 0 else math.log10(moduli.max() / 1e-300)
    rho = float(np.max(np.abs(1.0 - ritz)))
    gap = max(1.0 - rho, 1e-16)
    omega_star = 2.0 / (1.0 + math.sqrt(1.0 - rho * rho)) if rho < 1.0 else 2.0
    slow_weight = 0.0 if b is None else ritz_min / _jacobi_rayleigh_quotient(A, b, diagonal)
    diagonal.destroy()

    values = [*structure.values(), asymmetry,
              ritz_min, ritz_max, float(np.max(np.abs(ritz.imag))), condition, float(iterations),
              rho, math.log10(gap), omega_star, _rhs_norm_log(b), slow_weight]
    return _finite(values, OPERATOR_FEATURE_NAMES)


def _structure(A: Any, b: Any) -> tuple[PETSc.Mat, PETSc.Vec | None, PETSc.Vec, dict[str, float], float]:
    """Checked (A, b), A's diagonal, its row statistics and its asymmetry: the part both feature
    sets share."""
    A = _as_mat(A)
    rows, cols = A.getSize()
    if rows != cols:
        raise ValueError(f"operator_features: A must be square, got {rows}x{cols}")
    b = _as_vec(b, A)
    comm = A.getComm().tompi4py()
    diagonal = A.getDiagonal()
    local_diag = diagonal.getArray().copy()
    zero = np.flatnonzero(local_diag == 0.0)
    first_zero = comm.allreduce(int(zero[0]) + A.getOwnershipRange()[0] if zero.size else rows, op=_min())
    if first_zero < rows:
        diagonal.destroy()
        raise ValueError(f"operator_features: A has a zero diagonal entry in row {first_zero}; "
                         "the Jacobi-scaled features need a nonzero diagonal")
    csr = _local_csr(A)
    return A, b, diagonal, _row_statistics(csr, local_diag, comm), _asymmetry(A, csr, comm)


def _rhs_norm_log(b: PETSc.Vec | None) -> float:
    return 0.0 if b is None else math.log10(b.norm())


def _finite(values: list[float], names: tuple[str, ...]) -> np.ndarray:
    features = np.array(values, dtype=np.float64)
    if not np.all(np.isfinite(features)):
        bad = [name for name, value in zip(names, features) if not np.isfinite(value)]
        raise ValueError(f"operator_features: non-finite feature(s) {bad} (is A or b non-finite?)")
    return features


FEATURE_FUNCTIONS = {"operator": operator_features, "structural": structural_features}
"""Features computed from (A, b) alone, by name: what `MetaSolver.features_of` recomputes for a
user's own system at deployment, and what `problems.family.with_features` puts on a family."""


def _min() -> Any:
    from mpi4py import MPI

    return MPI.MIN


def _as_mat(A: Any) -> PETSc.Mat:
    if isinstance(A, PETSc.Mat):
        return A
    if sp.issparse(A):
        csr = sp.csr_matrix(A, dtype=np.float64)
        if csr.shape[0] != csr.shape[1]:
            raise ValueError(f"operator_features: A must be square, got {csr.shape[0]}x{csr.shape[1]}")
        return PETSc.Mat().createAIJ(csr.shape, csr=(csr.indptr.astype(PETSc.IntType),
                                                     csr.indices.astype(PETSc.IntType), csr.data),
                                     comm=PETSc.COMM_SELF)
    raise TypeError(f"operator_features: A must be a PETSc Mat or a SciPy sparse matrix, got {type(A).__name__}")


def _as_vec(b: Any, A: PETSc.Mat) -> PETSc.Vec | None:
    """b as a Vec with A's row layout (a NumPy b holds the whole vector; each rank keeps its rows)."""
    if b is None:
        return None
    rows = A.getSize()[0]
    if isinstance(b, PETSc.Vec):
        if b.getSize() != rows:
            raise ValueError(f"operator_features: A has {rows} rows but b has {b.getSize()} entries")
        if b.getOwnershipRange() != A.getOwnershipRange():
            raise ValueError("operator_features: b's row layout differs from A's")
    else:
        array = np.asarray(b, dtype=np.float64)
        if array.ndim != 1 or array.shape[0] != rows:
            raise ValueError(f"operator_features: A has {rows} rows but b has shape {array.shape}")
        b = A.createVecLeft()
        start, end = b.getOwnershipRange()
        b.setArray(array[start:end])
    if not b.norm() > 0:
        raise ValueError("operator_features: b is zero (or not finite); pass b=None for features of A alone")
    return b


def _local_csr(A: PETSc.Mat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's rows as CSR (global column indices); non-AIJ types are converted first."""
    try:
        return A.getValuesCSR()
    except PETSc.Error:
        converted = A.convert(PETSc.Mat.Type.AIJ)
        try:
            return converted.getValuesCSR()
        finally:
            converted.destroy()


def _row_statistics(csr: tuple[np.ndarray, np.ndarray, np.ndarray], diag: np.ndarray, comm: Any) -> dict[str, float]:
    """Sparsity, diagonal and dominance statistics of this rank's rows `csr`, reduced over all ranks."""
    from mpi4py import MPI

    indptr, _, values = csr
    counts = np.diff(indptr).astype(np.float64)
    abs_sums = np.add.reduceat(np.abs(values), indptr[:-1]) if values.size else np.zeros(diag.size)
    abs_sums[counts == 0] = 0.0
    abs_diag = np.abs(diag)
    ratio = (abs_sums - abs_diag) / abs_diag
    rows = comm.allreduce(diag.size)

    def total(x: np.ndarray) -> float:
        return float(comm.allreduce(float(np.sum(x))))

    def extreme(x: np.ndarray, op: Any, empty: float) -> float:
        return float(comm.allreduce(float(op(x)) if x.size else empty, op=MPI.MAX if op is np.max else MPI.MIN))

    diag_mean = total(abs_diag) / rows
    diag_var = max(total(abs_diag ** 2) / rows - diag_mean ** 2, 0.0)
    return {
        "log10_rows": math.log10(rows),
        "nnz_per_row_mean": total(counts) / rows,
        "nnz_per_row_max": extreme(counts, np.max, -np.inf),
        "log10_diag_mean": math.log10(diag_mean),
        "diag_cv": math.sqrt(diag_var) / diag_mean,
        "log10_diag_contrast": math.log10(extreme(abs_diag, np.max, -np.inf) / extreme(abs_diag, np.min, np.inf)),
        "nonpositive_diag_fraction": total(diag <= 0) / rows,
        "offdiag_ratio_mean": total(ratio) / rows,
        "offdiag_ratio_max": extreme(ratio, np.max, -np.inf),
        "dominant_row_fraction": total(ratio <= 1.0 + 1e-12) / rows,
        "gershgorin_lower": 1.0 - extreme(ratio, np.max, -np.inf),
        "gershgorin_upper": 1.0 + extreme(ratio, np.max, -np.inf),
    }


def _asymmetry(A: PETSc.Mat, csr: tuple[np.ndarray, np.ndarray, np.ndarray], comm: Any) -> float:
    """||A - A^T||_F / ||A||_F, with PETSc's own transpose.

    When A is structurally symmetric (every PDE stencil matrix here), A^T's local rows hold the
    same column indices in the same (sorted) order as A's, so the difference is one subtraction
    of the two value arrays (measured at 53k unknowns: 3.3 ms, against 8.5 ms for forming A - A^T
    with a general sparse axpy, the fallback for any other pattern). Every rank takes the same
    path: the pattern test is reduced over all of them."""
    from mpi4py import MPI

    indptr, columns, values = csr
    norm = math.sqrt(comm.allreduce(float(np.dot(values, values))))
    if norm == 0:
        raise ValueError("operator_features: A is the zero matrix")
    transpose = A.transpose(PETSc.Mat())   # a new matrix: transpose() without one works in place
    try:
        t_indptr, t_columns, t_values = _local_csr(transpose)
        same = np.array_equal(indptr, t_indptr) and np.array_equal(columns, t_columns)
        if comm.allreduce(same, op=MPI.LAND):
            return math.sqrt(comm.allreduce(float(np.sum((values - t_values) ** 2)))) / norm
        transpose.axpy(-1.0, A)
        return float(transpose.norm(PETSc.NormType.FROBENIUS)) / norm
    finally:
        transpose.destroy()


def _start_vector(A: PETSc.Mat) -> PETSc.Vec:
    """1 + U(-1/2, 1/2) noise, drawn by global index so every partition sees the same vector."""
    vec = A.createVecLeft()
    start, end = vec.getOwnershipRange()
    noise = np.random.default_rng(_START_SEED).uniform(-0.5, 0.5, size=vec.getSize())
    vec.setArray(1.0 + noise[start:end])
    return vec


def _jacobi_rayleigh_quotient(A: PETSc.Mat, b: PETSc.Vec, diagonal: PETSc.Vec) -> float:
    """R(b) = b^T D^-1 A D^-1 b / b^T D^-1 b: the Rayleigh quotient of M = D^-1/2 A D^-1/2 at
    c = D^-1/2 b, i.e. the mean eigenvalue of M under c's spectral weights."""
    scaled, image = b.duplicate(), b.duplicate()
    try:
        scaled.pointwiseDivide(b, diagonal)
        A.mult(scaled, image)
        return float(scaled.dot(image)) / float(scaled.dot(b))
    finally:
        scaled.destroy()
        image.destroy()


def _krylov(A: PETSc.Mat, steps: int, symmetric: bool) -> tuple[np.ndarray, int]:
    """Ritz values of D^-1 A from `steps` Jacobi-preconditioned CG (symmetric) or GMRES iterations
    from the fixed start vector, and the iterations taken. The KSP gets no options prefix and never
    calls setFromOptions, so the user's options database cannot change it."""
    rhs, x = _start_vector(A), A.createVecRight()
    ksp = PETSc.KSP().create(comm=A.getComm())
    try:
        ksp.setOperators(A)
        ksp.setType(PETSc.KSP.Type.CG if symmetric else PETSc.KSP.Type.GMRES)
        if not symmetric:
            ksp.setGMRESRestart(steps)
        ksp.getPC().setType(PETSc.PC.Type.JACOBI)
        ksp.setTolerances(rtol=1e-13, atol=0.0, divtol=1e10, max_it=steps)
        ksp.setNormType(PETSc.KSP.NormType.PRECONDITIONED)
        ksp.setComputeEigenvalues(True)
        ksp.solve(rhs, x)
        iterations = int(ksp.getIterationNumber())
        ritz = np.asarray(ksp.computeEigenvalues(), dtype=np.complex128) if iterations > 0 else np.zeros(0)
    finally:
        ksp.destroy()
        rhs.destroy()
        x.destroy()
    if ritz.size == 0:
        raise ValueError("operator_features: the Krylov run took no iteration")
    return ritz, iterations


__all__ = ["DEFAULT_STEPS", "FEATURE_FUNCTIONS", "OPERATOR_FEATURE_NAMES", "STRUCTURAL_FEATURE_NAMES",
           "operator_features", "structural_features"]
