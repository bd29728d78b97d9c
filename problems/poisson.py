"""Poisson families: the NI-GBMS 1-D benchmark and a 2-D family assembled on a PETSc DMDA."""
from __future__ import annotations

from numbers import Real

import numpy as np
import scipy.sparse as sp
import torch

from problems.family import (Family, Task, check_count, check_range, coarse_average, format_distribution,
                             reference_solution, sine_coefficients, sine_modes)
from solvers._petsc import PETSc


class Poisson1D(Family):
    """-u'' = f on (0, 1), u(0) = u(1) = 0: the benchmark of NI-GBMS (Arisaka & Li, ICML 2024).

    Matrix: A = tridiag(-1, 2, -1) on the n interior points, i.e. h^2 times the second difference
    (h = 1/(n+1)); the scaling changes no iteration count of a relative-tolerance solve.
    Solution: x_i = sum_{k=1..n} a_k sin(k pi i/(n+1)) with independent a_k ~ N(0, s_k^2), where
    t_k = -1 + 2(k-1)/(n-1) and the mode profile is s_k = 1 - |t_k| (a tent peaking at the middle
    frequency, modes 1 and n absent) or, for a fraction `difficult_fraction` of the tasks,
    s_k = t_k^2 (weight at both ends of the spectrum). Right-hand side b = A x: mode k of b has
    standard deviation lambda_k s_k, lambda_k = 4 sin^2(k pi/(2(n+1))), which for the tent grows
    with frequency up to about k = 0.6 n. Jacobi-type smoothers kill the high modes of the error
    fast and leave the low ones behind: that slow tail is what a learned initial guess removes.
    Features: the n sine coefficients of b. They hold exactly the information of b, but as
    uncorrelated coordinates: b's raw entries are so correlated that the directions carrying its
    low modes have ~1e-6 of the variance, and a network standardising them per entry learns a
    guess for those modes about as slowly as an ill-conditioned least-squares fit.
    `x_ref` is the exact discrete solution x.
    """

    key = "poisson1d"

    def __init__(self, n: int = 31, seed: int = 0, difficult_fraction: float = 0.01) -> None:
        n = check_count("n", n, minimum=2)
        if isinstance(difficult_fraction, bool) or not isinstance(difficult_fraction, Real) \
                or not 0.0 <= difficult_fraction <= 1.0:
            raise ValueError(f"difficult_fraction must lie in [0, 1], got {difficult_fraction!r}")
        super().__init__(seed, n=n, difficult_fraction=float(difficult_fraction))
        self.n, self.difficult_fraction = n, float(difficult_fraction)
        self.matrix = sp.diags([-np.ones(n - 1), 2.0 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
        self.modes = sine_modes(n, n)
        t = np.linspace(-1.0, 1.0, n)
        self.profiles = {False: 1.0 - np.abs(t), True: t ** 2}

    @property
    def feature_dim(self) -> int:
        return self.n

    def describe(self) -> str:
        return (f"Poisson1D (NI-GBMS benchmark): tridiag(-1, 2, -1) on n = {self.n} interior points; "
                f"solutions are sine series with independent N(0, s_k^2) coefficients, s_k a tent over the "
                f"frequencies (peak at the middle, modes 1 and n absent) or, with probability "
                f"{self.difficult_fraction:g}, s_k = t_k^2 (both ends of the spectrum); b = A x. "
                f"Features: the {self.feature_dim} sine coefficients of b. Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        difficult = bool(rng.random() < self.difficult_fraction)
        coefficients = rng.normal(0.0, self.profiles[difficult])
        x = self.modes @ coefficients
        b = self.matrix @ x
        features = (2.0 / (self.n + 1)) * (self.modes.T @ b)
        return Task(self.matrix, b, features=torch.from_numpy(features), x_ref=x,
                    name=self.task_name(index, n=self.n), grid_shape=(self.n,),
                    parameters={"difficult": difficult})


def dmda_laplacian(n: int) -> sp.csr_matrix:
    """h^2 (-Laplace_h) on an n x n DMDA (5-point star, Dirichlet), as SciPy CSR.

    Assembled the way a PETSc user would (MatSetValuesStencil on a DMDA matrix, on COMM_SELF),
    so the family exercises the same ordering and storage a PETSc application has.
    """
    da = PETSc.DMDA().create(dim=2, sizes=(n, n), dof=1, stencil_width=1,
                             stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
    mat = da.createMat()
    row, col = PETSc.Mat.Stencil(), PETSc.Mat.Stencil()
    (x_start, x_end), (y_start, y_end) = da.getRanges()
    for j in range(y_start, y_end):
        for i in range(x_start, x_end):
            row.index = (i, j)
            mat.setValueStencil(row, row, 4.0)
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                if 0 <= i + di < n and 0 <= j + dj < n:
                    col.index = (i + di, j + dj)
                    mat.setValueStencil(row, col, -1.0)
    mat.assemble()
    indptr, indices, values = mat.getValuesCSR()
    csr = sp.csr_matrix((values.copy(), indices.copy(), indptr.copy()), shape=(n * n, n * n))
    mat.destroy()
    da.destroy()
    return csr


class Poisson2D(Family):
    """-Laplace(u) = f on the unit square, u = 0 on the boundary, 5-point stencil on n x n interior vertices.

    Matrix: A = h^2 (-Laplace_h) (4 on the diagonal, -1 per neighbour, h = 1/(n+1)), assembled on
    a PETSc DMDA and converted to SciPy CSR; unknowns ordered j*n + i (x fastest).
    Right-hand side: b = sum_{k,l=1..n} c_kl sin(k pi x) sin(l pi y) at the vertices, every one of
    the n^2 modes present with an independent coefficient c_kl ~ N(0, (k^2 + l^2)^(-beta)); the
    spectral slope beta ~ U(slope_range) per task mixes rough (beta = 0: white noise) and smooth
    (beta = 3) right-hand sides; b is then scaled to unit RMS. Because coefficients are
    independent across all modes, solutions do not sit in a small fixed subspace (where PETSc's
    fischer/POD guesses would be unbeatable, see docs/architecture.md).
    Features (2 * 12^2 = 288): 12 x 12 area averages of b and the amplitudes of its 12 x 12 lowest
    sine modes (zero for modes a grid smaller than 12 lacks).
    """

    key = "poisson2d"
    COARSE = 12
    MODES = 12

    def __init__(self, n: int = 32, seed: int = 0, slope_range: tuple[float, float] = (0.0, 3.0)) -> None:
        n = check_count("n", n, minimum=2)
        slope_lo, slope_hi = check_range("slope_range", slope_range, minimum=-np.inf)
        super().__init__(seed, n=n, slope_range=(slope_lo, slope_hi))
        self.n, self.slope_range = n, (slope_lo, slope_hi)
        self.matrix = dmda_laplacian(n)
        self.modes = sine_modes(n, n)
        k = np.arange(1, n + 1, dtype=np.float64)
        self.wavenumber_squared = k[:, None] ** 2 + k[None, :] ** 2

    @property
    def feature_dim(self) -> int:
        return self.COARSE ** 2 + self.MODES ** 2

    def describe(self) -> str:
        return (f"Poisson2D: 5-point Laplacian (4, -1) on a {self.n} x {self.n} DMDA, Dirichlet; right-hand "
                f"sides are sums of all {self.n ** 2} sine modes with independent N(0, (k^2+l^2)^-beta) "
                f"coefficients, spectral slope beta {format_distribution(*self.slope_range)} per task, scaled to "
                f"unit RMS. Features: {self.COARSE}x{self.COARSE} averages of b and its {self.MODES}x{self.MODES} "
                f"lowest sine amplitudes ({self.feature_dim} numbers). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        slope = float(rng.uniform(*self.slope_range))
        coefficients = rng.standard_normal((self.n, self.n)) * self.wavenumber_squared ** (-slope / 2.0)
        grid = self.modes @ coefficients @ self.modes.T
        grid *= self.n / np.linalg.norm(grid)
        b = grid.ravel()
        features = np.concatenate([coarse_average(grid, self.COARSE).ravel(),
                                   sine_coefficients(grid, self.MODES).ravel()])
        return Task(self.matrix, b, features=torch.from_numpy(features), x_ref=reference_solution(self.matrix, b),
                    name=self.task_name(index, n=self.n), grid_shape=(self.n, self.n),
                    parameters={"slope": slope})
