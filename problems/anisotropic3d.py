"""3-D axis-aligned anisotropic diffusion: the operator where algebraic multigrid's strength
threshold and smoother are said to matter per instance at the sizes users run (10⁵–10⁶ unknowns).

−(u_xx + ε_y u_yy + ε_z u_zz) = f on the unit cube, u = 0 on the boundary, 7-point finite
differences on the n × n × n interior vertices (x fastest, then y, then z: PETSc DMDA's order),
A = h² times the operator (SPD M-matrix), b = h²(1 + ½ sin πx sin πy sin πz).

Per task: ε_y and ε_z are drawn log-uniformly from `epsilon_range`, independently, so the set
mixes nearly isotropic operators (threshold 0 is right), plane anisotropy (one weak axis) and
line anisotropy (two weak axes), where GAMG must drop the weak couplings to coarsen along the
strong ones. The measured headroom — best single setting against the per-instance best — is in
benchmarks/results/scale_linear.md.
Features (3): log10 ε_y, log10 ε_z, h.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from problems.family import Family, Task, check_count, check_range, format_distribution, log_uniform


def anisotropic_matrix_3d(n: int, epsilon_y: float, epsilon_z: float) -> sp.csr_matrix:
    """h² · (−∂xx − ε_y ∂yy − ε_z ∂zz), 7-point, on the n³ interior vertices (x fastest), Dirichlet."""
    eye = sp.identity(n, format="csr")
    second = sp.diags([-np.ones(n - 1), 2.0 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    A = (sp.kron(eye, sp.kron(eye, second)) + epsilon_y * sp.kron(eye, sp.kron(second, eye))
         + epsilon_z * sp.kron(second, sp.kron(eye, eye)))
    return sp.csr_matrix(A)


class Anisotropic3D(Family):
    """Axis-aligned anisotropic diffusion on an n³ grid, ε_y, ε_z ~ logU(`epsilon_range`)."""

    key = "anisotropic3d"

    def __init__(self, n: int = 32, epsilon_range: Any = (1e-3, 1.0), seed: int = 0) -> None:
        n = check_count("n", n, minimum=2)
        epsilon_range = check_range("epsilon_range", epsilon_range)
        if epsilon_range[1] > 1.0:
            raise ValueError(f"epsilon_range must lie in (0, 1] (x is the strong axis), got {epsilon_range}")
        super().__init__(seed, n=n, epsilon_range=epsilon_range)
        self.n, self.epsilon_range = n, epsilon_range

    @property
    def feature_dim(self) -> int:
        return 3

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("log10_epsilon_y", "log10_epsilon_z", "h")

    def describe(self) -> str:
        return (f"Anisotropic3D: -(u_xx + eps_y u_yy + eps_z u_zz) = f on the unit cube, 7-point finite differences "
                f"on {self.n}^3 interior vertices ({self.n ** 3} unknowns); eps_y, eps_z "
                f"{format_distribution(*self.epsilon_range, 'logU')} independently. Features: log10 eps_y, "
                f"log10 eps_z, h. Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        epsilon_y = log_uniform(rng, *self.epsilon_range)
        epsilon_z = log_uniform(rng, *self.epsilon_range)
        n = self.n
        h = 1.0 / (n + 1)
        s = np.sin(np.pi * np.arange(1, n + 1) * h)
        source = 1.0 + 0.5 * np.einsum("k,j,i->kji", s, s, s)
        features = np.array([np.log10(epsilon_y), np.log10(epsilon_z), h])
        return Task(anisotropic_matrix_3d(n, epsilon_y, epsilon_z), h ** 2 * source.ravel(),
                    features=torch.from_numpy(features), name=self.task_name(index, n=n), grid_shape=(n, n, n),
                    parameters={"n": n, "epsilon_y": epsilon_y, "epsilon_z": epsilon_z})


__all__ = ["Anisotropic3D", "anisotropic_matrix_3d"]
