"""Small linear systems built directly with SciPy, independent of the problem families."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from solvers import LinearSystem


def laplacian_1d(n: int) -> sp.csr_matrix:
    return sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")


def laplacian_2d(n: int) -> sp.csr_matrix:
    eye, t = sp.identity(n), laplacian_1d(n)
    return (sp.kron(eye, t) + sp.kron(t, eye)).tocsr()


def poisson_2d(n: int, seed: int = 0) -> LinearSystem:
    A = laplacian_2d(n)
    b = np.random.default_rng(seed).standard_normal(n * n)
    return LinearSystem(A, b, x_ref=sp.linalg.spsolve(A.tocsc(), b), name=f"poisson2d-{n}-{seed}")


def poisson_1d(n: int, seed: int = 0) -> LinearSystem:
    A = laplacian_1d(n)
    b = np.random.default_rng(seed).standard_normal(n)
    return LinearSystem(A, b, x_ref=sp.linalg.spsolve(A.tocsc(), b), name=f"poisson1d-{n}-{seed}")
