"""Steady nonlinear diffusion solved by PETSc Newton on a DMDA: a harder Newton problem than Bratu.

−∇·(κ(u)∇u) = a·sin(πx)sin(πy) on the unit square, u = 0 on the boundary, κ(u) = 1 + μu².
The continuous operator is −ΔK(u) with K(u) = u + μu³/3 (Kirchhoff), so the solution is unique
and has no fold to fail at; but from the zero guess the first Newton step solves the κ = 1
problem, u₁ ≈ a/(2π²)·sin·sin, which overshoots the solution (K(u) ≈ u₁) by a factor of about
(μu₁²/3)^(1/3) when μu₁² ≫ 1, and Newton then walks back down a cubic for several steps before
its quadratic phase. So Newton from zero needs clearly more steps than Bratu, a guess has room, and
grid sequencing (the coarse grid pays for that walk cheaply) is strong.

Discretisation: conservative 5-point differences on an n × n vertex grid including the boundary,
h = 1/(n − 1), the face coefficient the mean of its two vertices' κ; interior rows are multiplied
by h² (F = Σ_faces κ_f (u_P − u_nb) − h²f_P, which is Bratu's 4u − Σu at μ = 0) and boundary rows
are F = 4u, so every row is O(1) as in PETSc's ex5. The Jacobian is assembled exactly: the
κ′(u) = 2μu terms make it nonsymmetric, so a Krylov method inside Newton is GMRES (with GAMG),
not CG.

This module is the physics only, as `problems.bratu`: `NonlinearDiffusionProblem` hands F, ∂F/∂u
and the grid to the generic DMDA Newton driver (`solvers.dmda_snes`); `-snes_grid_sequence k`
works on any n with (n − 1)/2^k + 1 an integer ≥ 3.
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
from solvers.dmda_snes import DirichletInteriorProblem, DirichletInteriorTask, DMDASNESOracle

NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))
"""(row, column) offsets of the four faces of a vertex, in the order the Jacobian stores them."""


@dataclass
class NonlinearDiffusionTask(DirichletInteriorTask):
    """One instance: κ = 1 + mu·u², forcing amplitude `amplitude`. A guess sets the interior
    vertices, `grid_shape` (n − 2) × (n − 2), row-major (their sine modes are the Dirichlet modes)."""

    mu: float
    amplitude: float
    n: int
    features: torch.Tensor
    name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_norm(self) -> float:
        """‖F(0)‖ = h²·a·‖sin(πx)sin(πy)‖ over the interior: the zero guess's residual, the scale
        every tolerance refers to (computed from the same forcing array the residual uses)."""
        return float(np.linalg.norm(forcing(self.n, self.amplitude)))


def forcing(m: int, amplitude: float) -> np.ndarray:
    """h²·f on an m × m grid (zero on the boundary rows, which carry no forcing)."""
    s = np.sin(np.pi * np.linspace(0.0, 1.0, m))
    f = amplitude * np.outer(s, s) / (m - 1) ** 2
    f[0, :] = f[-1, :] = f[:, 0] = f[:, -1] = 0.0
    return f


def residual(u: np.ndarray, mu: float, amplitude: float) -> np.ndarray:
    """F(u) on an m × m grid including the boundary (h²-scaled interior rows, boundary rows 4u)."""
    m = u.shape[0]
    kappa = 1.0 + mu * u * u
    F = 4.0 * u
    centre, kappa_centre = u[1:-1, 1:-1], kappa[1:-1, 1:-1]
    flux = np.zeros_like(centre)
    for di, dj in NEIGHBOURS:
        neighbour = u[1 + di:m - 1 + di, 1 + dj:m - 1 + dj]
        kappa_face = 0.5 * (kappa_centre + kappa[1 + di:m - 1 + di, 1 + dj:m - 1 + dj])
        flux += kappa_face * (centre - neighbour)
    F[1:-1, 1:-1] = flux - forcing(m, amplitude)[1:-1, 1:-1]
    return F


@functools.lru_cache(maxsize=8)
def _pattern(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR structure of the m × m Jacobian and the permutation taking its coordinate-list values
    (every diagonal, then the interior rows' four neighbour blocks in `NEIGHBOURS` order) to CSR order."""
    index = np.arange(m * m).reshape(m, m)
    rows, cols = [index.ravel()], [index.ravel()]
    for di, dj in NEIGHBOURS:
        rows.append(index[1:-1, 1:-1].ravel())
        cols.append(index[1 + di:m - 1 + di, 1 + dj:m - 1 + dj].ravel())
    rows_all, cols_all = np.concatenate(rows), np.concatenate(cols)
    position = sp.csr_matrix((np.arange(1.0, rows_all.size + 1), (rows_all, cols_all)), shape=(m * m, m * m))
    position.sort_indices()
    order = position.data.astype(np.int64) - 1
    return position.indptr.astype(PETSc.IntType), position.indices.astype(PETSc.IntType), order


def jacobian(u: np.ndarray, mu: float) -> sp.csr_matrix:
    """∂F/∂u on an m × m grid, exact (the forcing does not depend on u)."""
    m = u.shape[0]
    indptr, indices, order = _pattern(m)
    kappa = 1.0 + mu * u * u
    dkappa = 2.0 * mu * u
    centre, kappa_centre, dkappa_centre = u[1:-1, 1:-1], kappa[1:-1, 1:-1], dkappa[1:-1, 1:-1]
    diagonal = np.full((m, m), 4.0)
    diagonal[1:-1, 1:-1] = 0.0
    off_diagonal = []
    for di, dj in NEIGHBOURS:
        window = (slice(1 + di, m - 1 + di), slice(1 + dj, m - 1 + dj))
        difference = centre - u[window]
        kappa_face = 0.5 * (kappa_centre + kappa[window])
        diagonal[1:-1, 1:-1] += kappa_face + 0.5 * dkappa_centre * difference
        off_diagonal.append((-kappa_face + 0.5 * dkappa[window] * difference).ravel())
    values = np.concatenate([diagonal.ravel(), *off_diagonal])[order]
    return sp.csr_matrix((values, indices, indptr), shape=(m * m, m * m))


class NonlinearDiffusionProblem(DirichletInteriorProblem):
    """The residual and Jacobian handed to the generic DMDA Newton driver: a guess sets the
    interior vertices, the tolerance refers to ‖F(0)‖."""

    def residual(self, task: NonlinearDiffusionTask, u: np.ndarray) -> np.ndarray:
        return residual(u, task.mu, task.amplitude)

    def jacobian(self, task: NonlinearDiffusionTask, u: np.ndarray) -> sp.csr_matrix:
        return jacobian(u, task.mu)


class NonlinearDiffusionOracle(DMDASNESOracle):
    """The family's solver: the generic DMDA Newton driver (newtonls + bt, LU) on
    `NonlinearDiffusionProblem`. A setting holds `u0` (interior values; absent = zero guess) and
    PETSc options; with a Krylov method inside Newton use GMRES (the Jacobian is nonsymmetric)."""

    def __init__(self, rtol: float = 1e-10, max_it: int = 50, options: Mapping[str, Any] | None = None,
                 comm: PETSc.Comm | None = None) -> None:
        super().__init__(NonlinearDiffusionProblem(), rtol=rtol, max_it=max_it, options=options, comm=comm)

    def __repr__(self) -> str:
        return f"NonlinearDiffusionOracle(rtol={self.rtol}, max_it={self.max_it}, options={self.options})"


class NonlinearDiffusion(Family):
    """Instances with μ ~ U(mu_range), a ~ U(amplitude_range) on an n × n DMDA (n − 1 divisible by
    2^k for k levels of grid sequencing).

    Features: the products P_i(s)·P_j(t) of Legendre polynomials, 1 ≤ i + j ≤ `degree`, of μ and a
    mapped onto [−1, 1] over their ranges: the two parameters are all a task exposes, and a linear
    meta-solver on these features represents any smooth map (μ, a) → guess to the accuracy of a
    total-degree-`degree` polynomial.
    """

    key = "nonlinear_diffusion"

    def __init__(self, n: int = 65, seed: int = 0, mu_range: tuple[float, float] = (5.0, 20.0),
                 amplitude_range: tuple[float, float] = (50.0, 150.0), degree: int = 3) -> None:
        n = check_count("n", n, minimum=5)
        mu_range = check_range("mu_range", mu_range)
        amplitude_range = check_range("amplitude_range", amplitude_range)
        degree = check_count("degree", degree)
        super().__init__(seed, n=n, mu_range=mu_range, amplitude_range=amplitude_range, degree=degree)
        self.n, self.mu_range, self.amplitude_range, self.degree = n, mu_range, amplitude_range, degree
        self.exponents = [(i, total - i) for total in range(1, degree + 1) for i in range(total, -1, -1)]

    @property
    def feature_dim(self) -> int:
        return len(self.exponents)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"P{i}(mu)*P{j}(amplitude)" for i, j in self.exponents)

    def describe(self) -> str:
        return (f"Nonlinear diffusion: -div((1 + mu u^2) grad u) = a sin(pi x) sin(pi y) on the unit square, u = 0 on "
                f"the boundary, {self.n} x {self.n} DMDA, conservative 5-point differences. "
                f"mu {format_distribution(*self.mu_range)}, a {format_distribution(*self.amplitude_range)}. "
                f"Features: the {self.feature_dim} Legendre products P_i(mu) P_j(a), 1 <= i + j <= {self.degree}. "
                f"Seed {self.seed}.")

    def oracle(self) -> NonlinearDiffusionOracle:
        """The solver that comes with the family (`solver.kind = "family"` in a config)."""
        return NonlinearDiffusionOracle()

    def features(self, mu: float, amplitude: float) -> torch.Tensor:
        s, t = (_unit(value, bounds) for value, bounds in ((mu, self.mu_range), (amplitude, self.amplitude_range)))
        ps = np.polynomial.legendre.legvander(np.array([s]), self.degree)[0]
        pt = np.polynomial.legendre.legvander(np.array([t]), self.degree)[0]
        return torch.from_numpy(np.array([ps[i] * pt[j] for i, j in self.exponents], dtype=np.float64))

    def _build(self, rng: np.random.Generator, index: int) -> NonlinearDiffusionTask:
        mu = float(rng.uniform(*self.mu_range))
        amplitude = float(rng.uniform(*self.amplitude_range))
        return NonlinearDiffusionTask(mu=mu, amplitude=amplitude, n=self.n, features=self.features(mu, amplitude),
                                      name=self.task_name(index, n=self.n),
                                      parameters={"mu": mu, "amplitude": amplitude})


def _unit(value: float, bounds: tuple[float, float]) -> float:
    """`value` mapped affinely from [lo, hi] onto [−1, 1] (0 for a fixed value)."""
    lo, hi = bounds
    return 0.0 if hi == lo else 2.0 * (value - lo) / (hi - lo) - 1.0


__all__ = ["NonlinearDiffusion", "NonlinearDiffusionOracle", "NonlinearDiffusionProblem", "NonlinearDiffusionTask",
           "forcing", "jacobian", "residual"]
