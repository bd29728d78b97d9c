"""3-D high-contrast diffusion with random inclusions: the jumping-coefficient operator where
algebraic multigrid's strength threshold, smoother and Chebyshev bounds are said to matter per
medium at the sizes users run (10⁵–10⁶ unknowns).

−div(k grad u) = 1 on the unit cube, u = 0 on the boundary. k is binary: 10^c inside the
inclusions, 1 outside. The inclusions are the set where a smooth unit-variance random field G
(random Fourier features, correlation length ℓ) exceeds its (1 − φ) quantile, so they cover a
fraction φ of the cube as blobs (small φ) or connected channels (larger φ); c may be negative,
which makes them insulating pockets instead of conductive ones. Discretisation: 7-point finite
differences on the n³ interior vertices (x fastest, then y, then z: PETSc DMDA's order), face
coefficients the harmonic mean of the two vertices' k (flux-continuous across a jump), A = h²
times the operator (an SPD M-matrix), b = h².

Per task: c ~ U(`contrast_range`), φ ~ U(`fraction_range`), ℓ ~ logU(`correlation_range`).
The measured headroom — best single configuration against the per-instance best — is in
benchmarks/results/scale_linear.md.
Features (4): c, φ, ℓ, h.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from problems.diffusion import harmonic_mean
from problems.family import (RANDOM_FIELD_TERMS, Family, Task, check_count, check_range, format_distribution,
                             log_uniform)


def random_field_3d(rng: np.random.Generator, correlation_length: float, n: int,
                    terms: int = RANDOM_FIELD_TERMS) -> np.ndarray:
    """A smooth zero-mean unit-variance random field (covariance ≈ exp(−|r|²/2ℓ²), random Fourier
    features) on all (n + 2)³ vertices of the unit cube, boundary included, indexed [z, y, x]."""
    frequencies = rng.normal(0.0, 1.0 / correlation_length, size=(terms, 3))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)
    t = np.arange(n + 2, dtype=np.float64) / (n + 1)
    field = np.zeros((n + 2,) * 3)
    for (fx, fy, fz), phase in zip(frequencies, phases):  # one term at a time: memory stays O(n³)
        field += np.cos((fz * t)[:, None, None] + (fy * t)[None, :, None] + (fx * t)[None, None, :] + phase)
    return np.sqrt(2.0 / terms) * field


def seven_point_matrix(k: np.ndarray) -> sp.csr_matrix:
    """h² · (−div(k grad ·)), harmonic-mean faces, on the interior of the vertex grid `k` [z, y, x]
    of shape (n + 2)³ (x fastest), couplings to boundary vertices dropped (homogeneous Dirichlet)."""
    n = k.shape[0] - 2
    inner = k[1:-1, 1:-1, 1:-1]
    faces = [harmonic_mean(inner, k[1:-1, 1:-1, 2:]), harmonic_mean(inner, k[1:-1, 2:, 1:-1]),
             harmonic_mean(inner, k[2:, 1:-1, 1:-1])]  # the +x, +y, +z face of every interior vertex
    backward = [harmonic_mean(inner, k[1:-1, 1:-1, :-2]), harmonic_mean(inner, k[1:-1, :-2, 1:-1]),
                harmonic_mean(inner, k[:-2, 1:-1, 1:-1])]
    diagonal = (sum(faces) + sum(backward)).ravel()
    offsets, bands = [], []
    for axis, stride in zip((2, 1, 0), (1, n, n * n)):  # x, y, z
        coupling = faces[2 - axis].copy()
        last = [slice(None)] * 3
        last[axis] = n - 1
        coupling[tuple(last)] = 0.0  # the last vertex along this axis couples to the boundary
        band = -coupling.ravel()[:-stride]
        offsets += [stride, -stride]
        bands += [band, band]
    return sp.diags([diagonal, *bands], [0, *offsets], format="csr")


class Contrast3D(Family):
    """Random-inclusion high-contrast diffusion on an n³ grid, k ∈ {1, 10^c}."""

    key = "contrast3d"

    def __init__(self, n: int = 32, contrast_range: Any = (-4.0, 4.0), fraction_range: Any = (0.1, 0.4),
                 correlation_range: Any = (0.05, 0.2), seed: int = 0) -> None:
        n = check_count("n", n, minimum=2)
        contrast_range = check_range("contrast_range", contrast_range, minimum=-np.inf)  # c < 0: insulating
        fraction_range = check_range("fraction_range", fraction_range)
        if fraction_range[1] >= 1:
            raise ValueError(f"fraction_range must lie in (0, 1), got {fraction_range}")
        correlation_range = check_range("correlation_range", correlation_range)
        super().__init__(seed, n=n, contrast_range=contrast_range, fraction_range=fraction_range,
                         correlation_range=correlation_range)
        self.n, self.contrast_range = n, contrast_range
        self.fraction_range, self.correlation_range = fraction_range, correlation_range

    @property
    def feature_dim(self) -> int:
        return 4

    @property
    def feature_names(self) -> tuple[str, ...]:
        return ("contrast_exponent", "fraction", "correlation_length", "h")

    def describe(self) -> str:
        return (f"Contrast3D: -div(k grad u) = 1 on the unit cube, k in {{1, 10^c}} with inclusions where a smooth "
                f"random field exceeds its quantile, 7-point harmonic-mean finite differences on {self.n}^3 "
                f"interior vertices ({self.n ** 3} unknowns); c {format_distribution(*self.contrast_range)}, "
                f"inclusion fraction {format_distribution(*self.fraction_range)}, correlation length "
                f"{format_distribution(*self.correlation_range, 'logU')}. Features: c, fraction, correlation "
                f"length, h. Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        exponent = float(rng.uniform(*self.contrast_range))
        fraction = float(rng.uniform(*self.fraction_range))
        correlation = log_uniform(rng, *self.correlation_range)
        n = self.n
        g = random_field_3d(rng, correlation, n)
        k = np.where(g > np.quantile(g, 1.0 - fraction), 10.0 ** exponent, 1.0)
        h = 1.0 / (n + 1)
        features = np.array([exponent, fraction, correlation, h])
        return Task(seven_point_matrix(k), np.full(n ** 3, h ** 2), features=torch.from_numpy(features),
                    name=self.task_name(index, n=n), grid_shape=(n, n, n),
                    parameters={"n": n, "contrast_exponent": exponent, "fraction": fraction,
                                "correlation_length": correlation})


__all__ = ["Contrast3D", "random_field_3d", "seven_point_matrix"]
