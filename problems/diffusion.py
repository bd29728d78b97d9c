"""Variable-coefficient diffusion: a family whose best solver settings move from task to task."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from problems.family import (Family, Task, check_range, check_size_range, coarse_average, five_point_matrix,
                             format_distribution, log_uniform, random_field, reference_solution, vertex_coordinates)


def harmonic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The face coefficient between two cells: exact for a 1-D layered medium, and it keeps flux
    continuous where k jumps (an arithmetic mean overstates conductance across a barrier)."""
    return 2.0 * a * b / (a + b)


class Diffusion(Family):
    """-div(k grad u) = f on the unit square, u = 0 on the boundary, k = exp(g) lognormal.

    Grid: n x n interior vertices with n ~ uniform integer in `n_range` per task (an int fixes n),
    h = 1/(n+1). Discretisation: vertex-centred 5-point finite differences; the coefficient of
    each face is the harmonic mean of k at its two vertices (k sampled at every vertex, boundary
    included). A = h^2 times the operator: a symmetric, diagonally dominant M-matrix, hence SPD.
    Coefficient: g = sigma * G with G a zero-mean, unit-variance smooth random field of Gaussian
    spectrum (covariance about exp(-r^2/(2 l^2)), random Fourier features); the contrast sigma (the
    standard deviation of log k) ~ U(`contrast_range`) and the correlation length l ~
    log-uniform(`correlation_range`) per task (sigma is the field's pointwise standard deviation; the
    spread of log k over the unit square is smaller when l is long). Source: f = 1 + F, F an independent field of the
    same kind and correlation length; b = h^2 f at the vertices.
    Why: the best SOR omega or Chebyshev bounds depend on n, sigma and l, so they vary per task.
    With Richardson + forward SOR (`pc_sor_forward`) and n in 12..40 the per-task optimal omega
    moves a lot (1.8-1.95, docs/architecture.md); `n_range=(12, 40)` reproduces that regime.
    Features (2 * 8^2 + 4 = 132, whatever n): 8 x 8 area averages of log k and of f, then sigma,
    l, h and the standard deviation of log k over the grid.
    """

    key = "diffusion"
    COARSE = 8
    SCALARS = 4

    def __init__(self, n_range: Any = (16, 32), contrast_range: Any = (0.2, 2.5),
                 correlation_range: Any = (0.1, 0.5), seed: int = 0) -> None:
        n_range = check_size_range("n_range", n_range, minimum=2)
        contrast_range = check_range("contrast_range", contrast_range, minimum=-np.inf)
        if contrast_range[0] < 0:
            raise ValueError(f"contrast_range must be non-negative, got {contrast_range}")
        correlation_range = check_range("correlation_range", correlation_range)
        super().__init__(seed, n_range=n_range, contrast_range=contrast_range, correlation_range=correlation_range)
        self.n_range, self.contrast_range, self.correlation_range = n_range, contrast_range, correlation_range

    @property
    def feature_dim(self) -> int:
        return 2 * self.COARSE ** 2 + self.SCALARS

    def describe(self) -> str:
        return (f"Diffusion: -div(k grad u) = f on the unit square, Dirichlet, 5-point vertex finite differences "
                f"with harmonic-mean faces on n x n grids, n {format_distribution(*self.n_range)}; log k a smooth "
                f"Gaussian-spectrum random field with standard deviation "
                f"{format_distribution(*self.contrast_range)} and correlation length "
                f"{format_distribution(*self.correlation_range, 'logU')}; f = 1 + an independent random field. "
                f"Features: {self.COARSE}x{self.COARSE} averages of log k and f, contrast, correlation length, h, "
                f"std of log k ({self.feature_dim} numbers). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        contrast = float(rng.uniform(*self.contrast_range))
        correlation = log_uniform(rng, *self.correlation_range)
        log_k_field, source_field = random_field(rng, correlation), random_field(rng, correlation)
        h = 1.0 / (n + 1)

        log_k = contrast * log_k_field(*vertex_coordinates(n, boundary=True))
        k = np.exp(log_k)
        east_faces = harmonic_mean(k[1:-1, :-1], k[1:-1, 1:])
        north_faces = harmonic_mean(k[:-1, 1:-1], k[1:, 1:-1])
        west, east = east_faces[:, :-1], east_faces[:, 1:]
        south, north = north_faces[:-1, :], north_faces[1:, :]
        A = five_point_matrix(west + east + south + north, -west, -east, -south, -north)

        f = 1.0 + source_field(*vertex_coordinates(n))
        b = h ** 2 * f.ravel()
        interior_log_k = log_k[1:-1, 1:-1]
        features = np.concatenate([coarse_average(interior_log_k, self.COARSE).ravel(),
                                   coarse_average(f, self.COARSE).ravel(),
                                   [contrast, correlation, h, float(np.std(interior_log_k))]])
        return Task(A, b, features=torch.from_numpy(features), x_ref=reference_solution(A, b),
                    name=self.task_name(index, n=n), grid_shape=(n, n),
                    parameters={"n": n, "contrast": contrast, "correlation_length": correlation})
