"""A mixed family for choosing the solver per matrix: SPD anisotropic high-contrast diffusion and
nonsymmetric convection–diffusion, drawn at random.

No single Krylov method + preconditioner is best on both halves: CG with algebraic multigrid is
the method of choice for SPD diffusion but breaks down (or crawls) on strongly nonsymmetric
convection-dominated matrices, where GMRES or BiCGStab with ILU win; anisotropy and contrast move
the balance between AMG and ILU within the SPD half, the Péclet number within the other. It is
the family a per-instance choice must beat a single configuration on.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from problems.convdiff import ConvDiff
from problems.diffusion import harmonic_mean
from problems.family import (Family, Task, check_range, check_size_range, format_distribution, log_uniform,
                             five_point_matrix, random_field, vertex_coordinates)


class Mixed(Family):
    """Half SPD, half nonsymmetric tasks (each task draws its kind), on n x n grids.

    SPD: −∇·(K ∇u) = f, K = k(x, y)·diag(a, 1) with log k a smooth random field of standard
    deviation ~ U(`contrast_range`) and anisotropy a ~ logU(`anisotropy_range`); harmonic face
    averages, 5-point stencil. Nonsymmetric: `ConvDiff` (upwind, Péclet ~ logU(`peclet_range`)).
    No features of its own: the two halves have nothing in common but their matrices, and a
    user's own mixed family would have nothing else either. Wrap it with
    `problems.family.with_features(Mixed(), "structural")` (or "operator").
    """

    key = "mixed"

    def __init__(self, n_range: Any = (48, 96), contrast_range: Any = (0.5, 3.0),
                 anisotropy_range: Any = (1e-3, 1.0), peclet_range: Any = (1.0, 1000.0),
                 nonsymmetric_fraction: float = 0.5, seed: int = 0) -> None:
        n_range = check_size_range("n_range", n_range, minimum=2)
        contrast_range = check_range("contrast_range", contrast_range)
        anisotropy_range = check_range("anisotropy_range", anisotropy_range)
        peclet_range = check_range("peclet_range", peclet_range)
        if not 0.0 <= nonsymmetric_fraction <= 1.0:
            raise ValueError(f"nonsymmetric_fraction must be in [0, 1], got {nonsymmetric_fraction}")
        super().__init__(seed, n_range=n_range, contrast_range=contrast_range, anisotropy_range=anisotropy_range,
                         peclet_range=peclet_range, nonsymmetric_fraction=nonsymmetric_fraction)
        self.n_range, self.contrast_range, self.anisotropy_range = n_range, contrast_range, anisotropy_range
        self.nonsymmetric_fraction = float(nonsymmetric_fraction)
        self.convdiff = ConvDiff(n_range=n_range, peclet_range=peclet_range, seed=seed)

    @property
    def feature_dim(self) -> int:
        return 0

    def describe(self) -> str:
        return (f"Mixed: {1 - self.nonsymmetric_fraction:.0%} SPD anisotropic diffusion (contrast "
                f"{format_distribution(*self.contrast_range)}, anisotropy "
                f"{format_distribution(*self.anisotropy_range, 'logU')}), {self.nonsymmetric_fraction:.0%} "
                f"upwind convection-diffusion (Peclet {format_distribution(*self.convdiff.peclet_range, 'logU')}); "
                f"n {format_distribution(*self.n_range)}. Features: 0 of its own (the matrix's, "
                f"`problems.family.with_features`). Seed {self.seed}.")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        if rng.uniform() < self.nonsymmetric_fraction:
            task = self.convdiff.task(index)
            task.parameters["kind"] = "convdiff"
        else:
            task = self._diffusion(rng, index)
        task.name = self.task_name(index, kind=task.parameters["kind"], n=task.grid_shape[0])
        task.features = None
        return task

    def _diffusion(self, rng: np.random.Generator, index: int) -> Task:
        n = int(rng.integers(self.n_range[0], self.n_range[1] + 1))
        contrast = float(rng.uniform(*self.contrast_range))
        anisotropy = log_uniform(rng, *self.anisotropy_range)
        log_k_field, source_field = random_field(rng, 0.2), random_field(rng, 0.3)
        k = np.exp(contrast * log_k_field(*vertex_coordinates(n, boundary=True)))
        east_faces = anisotropy * harmonic_mean(k[1:-1, :-1], k[1:-1, 1:])
        north_faces = harmonic_mean(k[:-1, 1:-1], k[1:, 1:-1])
        west, east = east_faces[:, :-1], east_faces[:, 1:]
        south, north = north_faces[:-1, :], north_faces[1:, :]
        A = five_point_matrix(west + east + south + north, -west, -east, -south, -north)
        b = (1.0 + source_field(*vertex_coordinates(n))).ravel() / (n + 1) ** 2
        return Task(A, b, features=None, grid_shape=(n, n),
                    parameters={"kind": "diffusion", "n": n, "contrast": contrast, "anisotropy": anisotropy})
