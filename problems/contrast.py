"""High-contrast diffusion: binary media with conductivity jumps of several orders of magnitude."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from problems.diffusion import harmonic_mean
from problems.family import (Family, Task, check_range, check_size_range, five_point_matrix, format_distribution,
                             log_uniform, random_field, reference_solution, vertex_coordinates)


class HighContrast(Family):
    """-div(k grad u) = f on the unit square, u = 0 on the boundary, k binary: 1 or 10^c.

    Per task: a smooth unit-variance random field G (correlation length ~ log-uniform
    (`correlation_range`)) is thresholded, k = 10^c where G > t and 1 elsewhere, so the high-
    conductivity phase forms connected channels and inclusions covering a fraction ~ U(`fraction_range`)
    of the square (t is G's matching quantile on the grid); contrast exponent c ~ U(`contrast_range`);
    n ~ uniform integer in `n_range`. Discretisation as `Diffusion`: vertex-centred 5-point, harmonic-mean
    faces, A = h^2 times the operator (an SPD M-matrix). b = h^2 (1 + F), F an independent field.
    Why: jumps of 10^2..10^6 make algebraic multigrid's coarsening and smoothing choices
    (strength threshold, Chebyshev bounds) matter, and differently per medium.
    Features (4): c, the high-conductivity fraction, the correlation length, h.
    """

    key = "contrast"

    def __init__(self, n_range: Any = (100, 128), contrast_range: Any = (2.0, 6.0), fraction_range: Any = (0.2, 0.5),
                 correlation_range: Any = (0.05, 0.2), seed: int = 0) -> None:
        n_range = check_size_range("n_range", n_range, minimum=2)
        contrast_range = check_range("contrast_range", contrast_range)
        fraction_range = check_range("fraction_range", fraction_range)
        if fraction_range[1] >= 1:
            raise ValueError(f"fraction_range must lie in (0, 1), got {fraction_range}")
        correlation_range = check_range("correlation_range", correlation_range)
        super().__init__(seed, n_range=n_range, contrast_range=contrast_range, fraction_range=fraction_range,
                         correlation_range=correlation_range)
        self.n_range, self.contrast_range = n_range, contrast_range
        self.fraction_range, self.correlation_range = fraction_range, correlation_range

    @property
    def feature_dim(self) -> int:
        return 4

    def describe(self) -> str:
        return (f"HighContrast: -div(k grad u) = f, k in {{1, 10^c}} from a thresholded smooth random field, "
                f"5-point harmonic-mean finite differences on n x n grids, n {format_distribution(*self.n_range)}; "
                f"c {format_distribution(*self.contrast_range)}, high-k fraction "
                f"{format_distribution(*self.fraction_range)}, correlation length "
                f"{format_distribution(*self.correlation_range, 'logU')}; f = 1 + a smooth random field. "
                f"Features: c, fraction, correlation length, h (4 numbers). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        exponent = float(rng.uniform(*self.contrast_range))
        fraction = float(rng.uniform(*self.fraction_range))
        correlation = log_uniform(rng, *self.correlation_range)
        medium, source = random_field(rng, correlation), random_field(rng, correlation)
        h = 1.0 / (n + 1)
        g = medium(*vertex_coordinates(n, boundary=True))
        k = np.where(g > np.quantile(g, 1.0 - fraction), 10.0 ** exponent, 1.0)
        east_faces = harmonic_mean(k[1:-1, :-1], k[1:-1, 1:])
        north_faces = harmonic_mean(k[:-1, 1:-1], k[1:, 1:-1])
        west, east = east_faces[:, :-1], east_faces[:, 1:]
        south, north = north_faces[:-1, :], north_faces[1:, :]
        A = five_point_matrix(west + east + south + north, -west, -east, -south, -north)
        b = h ** 2 * (1.0 + source(*vertex_coordinates(n))).ravel()
        features = np.array([exponent, fraction, correlation, h])
        return Task(A, b, features=torch.from_numpy(features), x_ref=reference_solution(A, b),
                    name=self.task_name(index, n=n), grid_shape=(n, n),
                    parameters={"n": n, "contrast_exponent": exponent, "fraction": fraction,
                                "correlation_length": correlation})
