"""The Bratu (Gelfand) problem solved by PETSc Newton on a DMDA, as in PETSc's SNES tutorial ex5.

−Δu − λ e^u = 0 on the unit square, u = 0 on the boundary. Solutions exist for λ below the fold
λ* ≈ 6.808 and steepen towards it (u_max grows like a square root of λ* − λ), so Newton from a
zero guess takes more steps, and fails, as λ approaches the fold: an initial guess has room there.

Discretisation (ex5's): an n × n DMDA of vertices including the boundary, h = 1/(n − 1), rows
F = 4u − Σ_neighbours u − h²λe^u inside and F = 4u on the boundary (so Dirichlet rows are as well
scaled as the interior ones). The Jacobian is assembled exactly (5-point, diagonal 4 − h²λe^u).

This module is the physics only: `BratuProblem` hands F, ∂F/∂u and the grid to the generic DMDA
Newton driver (`solvers.dmda_snes`), which PETSc options configure — by default LU inside
`newtonls` with backtracking line search, the solver a PETSc user runs on a problem this size;
`-snes_grid_sequence k` works as in ex5 (the DMDA is created k times coarser, (n − 1)/2^k + 1
points, and PETSc refines it, so the final grid is the same n × n). Every solve stops at
‖F‖ ≤ rtol·‖F(0)‖, the same absolute residual whatever the guess.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from problems.family import Family, check_count, check_range, format_distribution
from solvers._petsc import PETSc
from solvers.dmda_snes import DirichletInteriorProblem, DirichletInteriorTask, DMDASNESOracle, DMDASolve
from solvers.dmda_snes import embed_interior as embed

FOLD = 6.808124423
"""λ* of the continuous problem (the discrete fold at n = 25 lies within 0.2% of it)."""


@dataclass
class BratuTask(DirichletInteriorTask):
    """One Bratu instance. The unknowns a guess sets are the interior vertices, `grid_shape`
    (n − 2) × (n − 2), row-major: their sine modes are the Dirichlet modes of the full grid."""

    lam: float
    n: int
    features: torch.Tensor
    name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_norm(self) -> float:
        """‖F(0)‖ = h²λ·(n − 2): the zero guess's residual, the scale every tolerance refers to."""
        return self.lam * (self.n - 2) / (self.n - 1) ** 2


def residual(u: np.ndarray, lam: float) -> np.ndarray:
    """F(u) on an m × m grid including the boundary (ex5's scaling)."""
    m = u.shape[0]
    h2 = 1.0 / (m - 1) ** 2
    F = 4.0 * u
    inner = u[1:-1, 1:-1]
    F[1:-1, 1:-1] = (4.0 * inner - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]
                     - h2 * lam * np.exp(inner))
    return F


@functools.lru_cache(maxsize=8)
def _pattern(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR structure of the m × m Jacobian, its constant values and where the interior diagonal sits."""
    index = np.arange(m * m).reshape(m, m)
    interior = np.zeros((m, m), dtype=bool)
    interior[1:-1, 1:-1] = True
    rows, cols, vals = [index.ravel()], [index.ravel()], [np.full(m * m, 4.0)]
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r = index[1:-1, 1:-1].ravel()
        rows.append(r)
        cols.append(index[1 + di:m - 1 + di, 1 + dj:m - 1 + dj].ravel())
        vals.append(-np.ones(r.size))
    matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m))
    matrix.sort_indices()
    diagonal = np.array([matrix.indptr[i] + np.searchsorted(matrix.indices[matrix.indptr[i]:matrix.indptr[i + 1]], i)
                         for i in index[interior]])
    return matrix.indptr.astype(PETSc.IntType), matrix.indices.astype(PETSc.IntType), matrix.data, diagonal


def jacobian(u: np.ndarray, lam: float) -> sp.csr_matrix:
    """∂F/∂u on an m × m grid, exact."""
    m = u.shape[0]
    indptr, indices, data, diagonal = _pattern(m)
    values = data.copy()
    values[diagonal] = 4.0 - lam * np.exp(u[1:-1, 1:-1].ravel()) / (m - 1) ** 2
    return sp.csr_matrix((values, indices, indptr), shape=(m * m, m * m))


class BratuProblem(DirichletInteriorProblem):
    """The Bratu residual and Jacobian handed to the generic DMDA Newton driver
    (`solvers.dmda_snes`): a guess sets the interior vertices, the tolerance refers to ‖F(0)‖."""

    def residual(self, task: BratuTask, u: np.ndarray) -> np.ndarray:
        return residual(u, task.lam)

    def jacobian(self, task: BratuTask, u: np.ndarray) -> sp.csr_matrix:
        return jacobian(u, task.lam)


class BratuOracle(DMDASNESOracle):
    """The family's solver: the generic DMDA Newton driver (newtonls + bt, LU) on `BratuProblem`.

    A setting holds `u0` (interior values; absent = zero guess) and PETSc options; a cost's budget
    reaches it as Newton tolerances (`budget_options`). `solve(task, setting)` also returns the
    Newton iterations per grid level (`-snes_grid_sequence`) and the CPU time.
    """

    def __init__(self, rtol: float = 1e-10, max_it: int = 50, options: Mapping[str, Any] | None = None,
                 comm: PETSc.Comm | None = None) -> None:
        super().__init__(BratuProblem(), rtol=rtol, max_it=max_it, options=options, comm=comm)

    def __repr__(self) -> str:
        return f"BratuOracle(rtol={self.rtol}, max_it={self.max_it}, options={self.options})"


BratuSolve = DMDASolve
"""One Newton solve with its per-level iteration counts (the driver's `DMDASolve`)."""


class Bratu(Family):
    """Bratu instances with λ ~ U(lam_range) on an n × n DMDA (n − 1 divisible by 2^k for grid sequencing).

    Features: the Legendre polynomials P_1..P_degree of λ mapped onto [−1, 1] over `lam_range`:
    λ is all a task exposes, and a linear meta-solver on these features represents any smooth map
    λ → guess to the accuracy of a degree-`degree` polynomial, fitted in closed form.
    """

    key = "bratu"

    def __init__(self, n: int = 25, seed: int = 0, lam_range: tuple[float, float] = (0.5, 6.6), degree: int = 6) -> None:
        n = check_count("n", n, minimum=4)
        lo, hi = check_range("lam_range", lam_range)
        if hi >= FOLD:
            raise ValueError(f"lam_range must stay below the fold λ* ≈ {FOLD:.3f} (no solution beyond), got {lam_range!r}")
        degree = check_count("degree", degree)
        super().__init__(seed, n=n, lam_range=(lo, hi), degree=degree)
        self.n, self.lam_range, self.degree = n, (lo, hi), degree

    @property
    def feature_dim(self) -> int:
        return self.degree

    def describe(self) -> str:
        return (f"Bratu: -Δu - λe^u = 0 on the unit square, u = 0 on the boundary, {self.n} x {self.n} DMDA (ex5), "
                f"λ {format_distribution(*self.lam_range)} (fold λ* ≈ {FOLD:.3f}). Features: Legendre P1..P{self.degree} "
                f"of λ. Seed {self.seed}.")

    def oracle(self) -> BratuOracle:
        """The solver that comes with the family (`solver.kind = "family"` in a config)."""
        return BratuOracle()

    def features(self, lam: float) -> torch.Tensor:
        lo, hi = self.lam_range
        t = 0.0 if hi == lo else 2.0 * (lam - lo) / (hi - lo) - 1.0
        values = np.polynomial.legendre.legvander(np.array([t]), self.degree)[0, 1:]
        return torch.from_numpy(values)

    def _build(self, rng: np.random.Generator, index: int) -> BratuTask:
        lam = float(rng.uniform(*self.lam_range))
        return BratuTask(lam=lam, n=self.n, features=self.features(lam), name=self.task_name(index, n=self.n),
                         parameters={"lam": lam})


__all__ = ["FOLD", "Bratu", "BratuOracle", "BratuProblem", "BratuSolve", "BratuTask", "embed", "jacobian", "residual"]
