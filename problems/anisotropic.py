"""Rotated anisotropic diffusion: the textbook case where algebraic multigrid's strength threshold matters."""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from problems.family import (Family, Task, check_range, check_size_range, format_distribution, log_uniform,
                             random_field, reference_solution, vertex_coordinates)


def rotated_anisotropic_matrix(n: int, epsilon: float, angle: float) -> sp.csr_matrix:
    """h^2 times the 9-point finite-difference -div(K grad u), K = R(angle) diag(1, epsilon) R(angle)^T,
    on the n x n interior vertices (x fastest), Dirichlet.

    -div(K grad u) = -(k11 u_xx + 2 k12 u_xy + k22 u_yy) with second differences for u_xx, u_yy and
    the product of central differences for u_xy. Symmetric positive definite: the symbol
    4 k11 s^2 + 4 k22 t^2 + 2 k12 sin(a) sin(b) (s = sin(a/2), t = sin(b/2)) is at least
    4 (k11 s^2 + k22 t^2 - 2 |k12| s t) >= 0 because k12^2 <= k11 k22. Not an M-matrix once
    k12 != 0 (positive corner couplings), which is what makes aggregation choices matter.
    """
    c, s = np.cos(angle), np.sin(angle)
    k11, k22, k12 = c * c + epsilon * s * s, s * s + epsilon * c * c, (1.0 - epsilon) * c * s
    eye = sp.identity(n, format="csr")
    second = sp.diags([-np.ones(n - 1), 2.0 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    central = sp.diags([-0.5 * np.ones(n - 1), 0.5 * np.ones(n - 1)], [-1, 1], format="csr")
    A = k11 * sp.kron(eye, second) + k22 * sp.kron(second, eye) - 2.0 * k12 * sp.kron(central, central)
    return sp.csr_matrix(A)


class RotatedAnisotropic(Family):
    """-div(K grad u) = f on the unit square, u = 0 on the boundary, K = R(angle) diag(1, epsilon) R^T.

    Per task: anisotropy epsilon ~ log-uniform(`epsilon_range`), angle ~ U(`angle_range`) (radians),
    n ~ uniform integer in `n_range`; f = 1 + a smooth unit-variance random field (correlation
    length 0.2); b = h^2 f. Discretisation: `rotated_anisotropic_matrix` (9-point, SPD).
    Why: strong coupling follows the rotated direction, so how algebraic multigrid should drop weak
    connections (`-pc_gamg_threshold`) and how hard the smoother must work change with
    (epsilon, angle) -- the classic case where one setting does not fit all.
    Features (4): log10 epsilon, cos 2 angle, sin 2 angle, h.
    """

    key = "anisotropic"

    def __init__(self, n_range: Any = (100, 128), epsilon_range: Any = (1e-3, 1e-1), angle_range: Any = (0.0, np.pi),
                 seed: int = 0) -> None:
        n_range = check_size_range("n_range", n_range, minimum=2)
        epsilon_range = check_range("epsilon_range", epsilon_range)
        angle_range = check_range("angle_range", angle_range, minimum=-np.inf)
        super().__init__(seed, n_range=n_range, epsilon_range=epsilon_range, angle_range=angle_range)
        self.n_range, self.epsilon_range, self.angle_range = n_range, epsilon_range, angle_range

    @property
    def feature_dim(self) -> int:
        return 4

    def describe(self) -> str:
        return (f"RotatedAnisotropic: -div(K grad u) = f, K = R diag(1, eps) R^T, 9-point finite differences on "
                f"n x n grids, n {format_distribution(*self.n_range)}; eps "
                f"{format_distribution(*self.epsilon_range, 'logU')}, angle "
                f"{format_distribution(*self.angle_range)} rad; f = 1 + a smooth random field. "
                f"Features: log10 eps, cos 2 angle, sin 2 angle, h (4 numbers). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        epsilon = log_uniform(rng, *self.epsilon_range)
        angle = float(rng.uniform(*self.angle_range))
        source = random_field(rng, 0.2)
        h = 1.0 / (n + 1)
        A = rotated_anisotropic_matrix(n, epsilon, angle)
        b = h ** 2 * (1.0 + source(*vertex_coordinates(n))).ravel()
        features = np.array([np.log10(epsilon), np.cos(2 * angle), np.sin(2 * angle), h])
        return Task(A, b, features=torch.from_numpy(features), x_ref=reference_solution(A, b),
                    name=self.task_name(index, n=n), grid_shape=(n, n),
                    parameters={"n": n, "epsilon": epsilon, "angle": angle})
