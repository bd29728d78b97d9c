"""Steady convection-diffusion in a random recirculating flow: a nonsymmetric family (GMRES, BiCGStab)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from problems.family import (Family, Task, check_count, check_range, check_size_range, coarse_average,
                             five_point_matrix, format_distribution, log_uniform, random_field, reference_solution,
                             vertex_coordinates)

NORMALISATION_POINTS = 65
"""Points per axis of the fixed grid on which max |w| is normalised to 1, the same for every n."""


def stream_velocity(amplitudes: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w = (d psi/dy, -d psi/dx) for psi = sum_kl amplitudes[k-1, l-1] sin(k pi x) sin(l pi y):
    divergence-free, and psi = 0 on the boundary means no flow through the walls."""
    wavenumbers = np.pi * np.arange(1, amplitudes.shape[0] + 1, dtype=np.float64)
    sin_x, cos_x = np.sin(x[..., None] * wavenumbers), np.cos(x[..., None] * wavenumbers)
    sin_y, cos_y = np.sin(y[..., None] * wavenumbers), np.cos(y[..., None] * wavenumbers)
    wx = np.einsum("...k,kl,...l->...", sin_x, amplitudes * wavenumbers[None, :], cos_y)
    wy = -np.einsum("...k,kl,...l->...", cos_x, amplitudes * wavenumbers[:, None], sin_y)
    return wx, wy


class ConvDiff(Family):
    """-eps Laplace(u) + w . grad(u) = f on the unit square, u = 0 on the boundary: nonsymmetric.

    Velocity: w = (d psi/dy, -d psi/dx) from a random stream function
    psi = sum_{k,l=1..K} a_kl sin(k pi x) sin(l pi y), a_kl ~ N(0, 1)/(k^2 + l^2), K =
    `velocity_modes`: divergence-free recirculating cells with no flow through the walls, scaled so
    that max |w| = 1 (on a fixed 65 x 65 grid, so a task's flow does not depend on n).
    Peclet number Pe = 1/eps ~ log-uniform(`peclet_range`) per task.
    Grid: n x n interior vertices, n ~ uniform integer in `n_range` (an int fixes n), h = 1/(n+1).
    Discretisation: 5-point diffusion and first-order *upwind* convection, scaled by h^2/eps:
    diagonal 4 + Pe h (|w_x| + |w_y|), west -1 - Pe h max(w_x, 0), east -1 + Pe h min(w_x, 0)
    (likewise south/north with w_y). An M-matrix for every Pe (central differences lose that once
    the cell Peclet number Pe h |w| / 2 exceeds 1), nonsymmetric as soon as w != 0.
    Source: f = 1 + F, F a smooth unit-variance random field with correlation length ~
    log-uniform(`correlation_range`); b = h^2 Pe f.
    Features (3 * 8^2 + 3 = 195, whatever n): 8 x 8 area averages of w_x, w_y and f, then
    log10 Pe, 1/Pe and h.
    """

    key = "convdiff"
    COARSE = 8
    SCALARS = 3

    def __init__(self, n_range: Any = 32, peclet_range: Any = (1.0, 200.0), velocity_modes: int = 3,
                 correlation_range: Any = (0.1, 0.5), seed: int = 0) -> None:
        n_range = check_size_range("n_range", n_range, minimum=2)
        peclet_range = check_range("peclet_range", peclet_range)
        velocity_modes = check_count("velocity_modes", velocity_modes)
        correlation_range = check_range("correlation_range", correlation_range)
        super().__init__(seed, n_range=n_range, peclet_range=peclet_range, velocity_modes=velocity_modes,
                         correlation_range=correlation_range)
        self.n_range, self.peclet_range, self.velocity_modes = n_range, peclet_range, velocity_modes
        self.correlation_range = correlation_range

    @property
    def feature_dim(self) -> int:
        return 3 * self.COARSE ** 2 + self.SCALARS

    def describe(self) -> str:
        return (f"ConvDiff: -eps Laplace(u) + w.grad(u) = f on the unit square, Dirichlet, 5-point diffusion "
                f"and first-order upwind convection on n x n grids, n {format_distribution(*self.n_range)}; "
                f"w divergence-free from a random stream function with {self.velocity_modes}x{self.velocity_modes} "
                f"sine modes, max |w| = 1; Peclet 1/eps {format_distribution(*self.peclet_range, 'logU')}; "
                f"f = 1 + a smooth random field (correlation length "
                f"{format_distribution(*self.correlation_range, 'logU')}). Nonsymmetric. Features: "
                f"{self.COARSE}x{self.COARSE} averages of w_x, w_y, f, log10 Pe, 1/Pe, h "
                f"({self.feature_dim} numbers). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        peclet = log_uniform(rng, *self.peclet_range)
        wavenumber = np.arange(1, self.velocity_modes + 1, dtype=np.float64)
        amplitudes = rng.standard_normal((self.velocity_modes, self.velocity_modes)) \
            / (wavenumber[:, None] ** 2 + wavenumber[None, :] ** 2)
        source_field = random_field(rng, log_uniform(rng, *self.correlation_range))
        h = 1.0 / (n + 1)

        fine = np.linspace(0.0, 1.0, NORMALISATION_POINTS)
        fine_wx, fine_wy = stream_velocity(amplitudes, *np.meshgrid(fine, fine, indexing="xy"))
        speed = np.sqrt(fine_wx ** 2 + fine_wy ** 2).max()
        X, Y = vertex_coordinates(n)
        wx, wy = (w / speed for w in stream_velocity(amplitudes, X, Y))

        cell = peclet * h
        A = five_point_matrix(4.0 + cell * (np.abs(wx) + np.abs(wy)),
                              -1.0 - cell * np.maximum(wx, 0.0), -1.0 + cell * np.minimum(wx, 0.0),
                              -1.0 - cell * np.maximum(wy, 0.0), -1.0 + cell * np.minimum(wy, 0.0))
        f = 1.0 + source_field(X, Y)
        b = h ** 2 * peclet * f.ravel()
        features = np.concatenate([coarse_average(wx, self.COARSE).ravel(), coarse_average(wy, self.COARSE).ravel(),
                                   coarse_average(f, self.COARSE).ravel(), [np.log10(peclet), 1.0 / peclet, h]])
        return Task(A, b, features=torch.from_numpy(features), x_ref=reference_solution(A, b),
                    name=self.task_name(index, n=n), grid_shape=(n, n),
                    parameters={"n": n, "peclet": peclet})
