"""The Bratu (Gelfand) problem solved by PETSc Newton on a DMDA, as in PETSc's SNES tutorial ex5.

−Δu − λ e^u = 0 on the unit square, u = 0 on the boundary. Solutions exist for λ below the fold
λ* ≈ 6.808 and steepen towards it (u_max grows like a square root of λ* − λ), so Newton from a
zero guess takes more steps, and fails, as λ approaches the fold: an initial guess has room there.

Discretisation (ex5's): an n × n DMDA of vertices including the boundary, h = 1/(n − 1), rows
F = 4u − Σ_neighbours u − h²λe^u inside and F = 4u on the boundary (so Dirichlet rows are as well
scaled as the interior ones). The Jacobian is assembled exactly (5-point, diagonal 4 − h²λe^u);
the linear solves are PETSc LU inside `newtonls` with backtracking line search — the solver a
PETSc user runs on a problem this size. `-snes_grid_sequence k` works as in ex5: the DMDA is
created k times coarser ((n − 1)/2^k + 1 points) and PETSc refines it, so the final grid is the
same n × n.

Tolerance: every solve stops at ‖F‖ ≤ rtol·‖F(0)‖, the same absolute residual whatever the
guess. PETSc's own relative test (‖F‖ ≤ rtol·‖F(u0)‖) would demand more of a better guess.
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from problems.family import Family, check_count, check_range, format_distribution
from solvers._petsc import PETSc
from solvers.options import check_used, option_name, prefixed_options, unique_prefix
from solvers.outcome import Outcome

FOLD = 6.808124423
"""λ* of the continuous problem (the discrete fold at n = 25 lies within 0.2% of it)."""


@dataclass
class BratuTask:
    """One Bratu instance. The unknowns a guess sets are the interior vertices, `grid_shape`
    (n − 2) × (n − 2), row-major: their sine modes are the Dirichlet modes of the full grid."""

    lam: float
    n: int
    features: torch.Tensor
    name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.n - 2, self.n - 2)

    @property
    def size(self) -> int:
        return (self.n - 2) ** 2

    @property
    def reference_norm(self) -> float:
        """‖F(0)‖ = h²λ·(n − 2): the zero guess's residual, the scale every tolerance refers to."""
        return self.lam * (self.n - 2) / (self.n - 1) ** 2


def residual(u: np.ndarray, lam: float) -> np.ndarray:
    """F(u) on an m × m grid including the boundary (ex5's scaling)."""
    m = u.shape[0]
    h2 = 1.0 / (m - 1) ** 2
    F = 4.0 * u
    inner = u[1:-1, 1:-1]
    F[1:-1, 1:-1] = (4.0 * inner - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]
                     - h2 * lam * np.exp(inner))
    return F


@functools.lru_cache(maxsize=8)
def _pattern(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR structure of the m × m Jacobian, its constant values and where the interior diagonal sits."""
    index = np.arange(m * m).reshape(m, m)
    interior = np.zeros((m, m), dtype=bool)
    interior[1:-1, 1:-1] = True
    rows, cols, vals = [index.ravel()], [index.ravel()], [np.full(m * m, 4.0)]
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r = index[1:-1, 1:-1].ravel()
        rows.append(r)
        cols.append(index[1 + di:m - 1 + di, 1 + dj:m - 1 + dj].ravel())
        vals.append(-np.ones(r.size))
    matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m))
    matrix.sort_indices()
    diagonal = np.array([matrix.indptr[i] + np.searchsorted(matrix.indices[matrix.indptr[i]:matrix.indptr[i + 1]], i)
                         for i in index[interior]])
    return matrix.indptr.astype(PETSc.IntType), matrix.indices.astype(PETSc.IntType), matrix.data, diagonal


def jacobian(u: np.ndarray, lam: float) -> sp.csr_matrix:
    """∂F/∂u on an m × m grid, exact."""
    m = u.shape[0]
    indptr, indices, data, diagonal = _pattern(m)
    values = data.copy()
    values[diagonal] = 4.0 - lam * np.exp(u[1:-1, 1:-1].ravel()) / (m - 1) ** 2
    return sp.csr_matrix((values, indices, indptr), shape=(m * m, m * m))


def embed(interior: np.ndarray, n: int) -> np.ndarray:
    """The full n × n grid with the interior values and a zero boundary."""
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = np.asarray(interior, dtype=np.float64).reshape(n - 2, n - 2)
    return u


@dataclass
class BratuSolve:
    """One Newton solve: its Outcome and the Newton iterations on every grid level (coarse first)."""

    outcome: Outcome
    level_iterations: list[int]
    cpu_seconds: float = 0.0
    """Process CPU time of SNESSolve: on a shared machine, the part of the wall time the solve
    actually computed."""


class BratuOracle:
    """PETSc SNES (newtonls + bt, LU) on the Bratu DMDA as a pure function of (task, setting).

    A setting holds `u0` (interior values; absent = zero guess) and PETSc options, which go into
    the database under a private prefix and are checked to have been read. `Outcome.residuals`
    is ‖F‖ per Newton step on the final grid, `solution` the interior values, `flops` PETSc's flop
    count of the solve (LU, vector work; not the Python residual/Jacobian callbacks).
    """

    return_solution = True
    COST_BUDGET = frozenset({"ksp_max_it", "ksp_rtol", "ksp_atol"})
    """The linear-solver budget a training or evaluation cost sends (`Cost.overrides`): a Newton
    solve with LU has no such budget and stops at its own tolerance, so these keys are dropped."""

    def __init__(self, rtol: float = 1e-10, max_it: int = 50, options: Mapping[str, Any] | None = None) -> None:
        if not 0 < rtol < 1 or max_it < 1:
            raise ValueError(f"BratuOracle needs 0 < rtol < 1 and max_it >= 1, got {rtol}, {max_it}")
        self.rtol, self.max_it = float(rtol), int(max_it)
        self.options = {option_name(k): v for k, v in (options or {}).items()}
        self.prefix = unique_prefix("bratu")

    def __call__(self, task: BratuTask, setting: Mapping[str, Any] | None = None) -> Outcome:
        return self.solve(task, setting or {}).outcome

    def solve_many(self, task: BratuTask, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return [self(task, s) for s in settings]

    def solve(self, task: BratuTask, setting: Mapping[str, Any]) -> BratuSolve:
        options = dict(self.options)
        u0 = None
        for key, value in setting.items():
            if key == "u0":
                u0 = np.asarray(value, dtype=np.float64)
                if u0.shape != (task.size,) or not np.all(np.isfinite(u0)):
                    raise ValueError(f"u0 must be {task.size} finite interior values, got shape {u0.shape}")
            elif option_name(key) not in self.COST_BUDGET:
                options[option_name(key)] = value
        levels = int(options.get("snes_grid_sequence", 0))
        coarse = (task.n - 1) / 2 ** levels + 1
        if levels and (coarse != int(coarse) or coarse < 3):
            raise ValueError(f"snes_grid_sequence {levels} needs (n - 1)/2^{levels} + 1 to be an integer >= 3, "
                             f"n = {task.n}")
        if levels and u0 is not None:
            raise ValueError("a guess u0 lives on the final grid; snes_grid_sequence starts on a coarser one")
        with prefixed_options(self.prefix, options):
            result = self._run(task, int(coarse), u0)
            check_used(self.prefix, options, "the Bratu SNES (newtonls, LU)")
        return result

    def _run(self, task: BratuTask, m: int, u0: np.ndarray | None) -> BratuSolve:
        begin = time.perf_counter()
        da = PETSc.DMDA().create(dim=2, sizes=(m, m), dof=1, stencil_width=1,
                                 stencil_type=PETSc.DMDA.StencilType.STAR, comm=PETSc.COMM_SELF)
        snes = PETSc.SNES().create(comm=PETSc.COMM_SELF)
        history: list[tuple[int, float]] = []
        failure: list[str] = []
        try:
            snes.setDM(da)
            snes.setFunction(self._function(task.lam, failure), da.createGlobalVec())
            snes.setJacobian(self._jacobian(task.lam, failure))
            snes.setType(PETSc.SNES.Type.NEWTONLS)
            snes.getLineSearch().setType("bt")
            snes.getKSP().setType(PETSc.KSP.Type.PREONLY)
            snes.getKSP().getPC().setType(PETSc.PC.Type.LU)
            snes.setTolerances(rtol=0.0, atol=self.rtol * task.reference_norm, stol=0.0, max_it=self.max_it)
            snes.setMonitor(lambda s, its, norm: history.append((s.getDM().getSizes()[0], float(norm))))
            snes.setOptionsPrefix(self.prefix)
            snes.setFromOptions()
            snes.setUp()  # matrices and the LU's symbolic setup: what a code solving many tasks keeps
            x = da.createGlobalVec()
            if u0 is None:
                x.set(0.0)
            else:
                x.setArray(embed(u0, m).ravel())
            setup_seconds = time.perf_counter() - begin
            start, start_cpu, start_flops = time.perf_counter(), time.process_time(), PETSc.Log.getFlops()
            try:
                snes.solve(None, x)
            except PETSc.Error as error:
                message = failure[0] if failure else f"PETSc error in SNESSolve: {error}"
                return BratuSolve(Outcome.failure(message, seconds=time.perf_counter() - start), [])
            seconds, flops = time.perf_counter() - start, PETSc.Log.getFlops() - start_flops
            cpu_seconds = time.process_time() - start_cpu
            reason = int(snes.getConvergedReason())
            final_grid = snes.getSolution().getSize() == task.n ** 2
            solution = snes.getSolution().getArray().reshape(task.n, task.n)[1:-1, 1:-1].ravel().copy() \
                if final_grid else None
        finally:
            snes.destroy()
            da.destroy()
        sizes = [size for size, _ in history]
        level_iterations = [sizes.count(size) - 1 for size in dict.fromkeys(sizes)]
        final = np.array([norm for size, norm in history if size == task.n])
        error = failure[0] if failure else (None if reason > 0 else f"SNES did not converge (reason {reason})")
        if error is None and solution is None:  # grid sequencing gave up on a coarser grid
            error = f"SNES stopped on a coarser grid ({sizes[-1]} x {sizes[-1]}, reason {reason})"
        outcome = Outcome(residuals=final, iterations=len(final) - 1, reason=reason, converged=error is None,
                          seconds=seconds, solution=solution, error=error, setup_seconds=setup_seconds,
                          hit_max_it=reason == PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT, norm_type="function",
                          flops=flops)
        return BratuSolve(outcome, level_iterations, cpu_seconds)

    @staticmethod
    def _function(lam: float, failure: list[str]):
        def evaluate(_snes: PETSc.SNES, x: PETSc.Vec, f: PETSc.Vec) -> None:
            m = int(round(math.sqrt(x.getSize())))
            value = residual(x.getArray(readonly=True).reshape(m, m), lam)
            if not np.all(np.isfinite(value)) and not failure:
                failure.append("the residual overflowed (e^u too large: Newton left the solution's basin)")
            f.setArray(value.ravel())
        return evaluate

    @staticmethod
    def _jacobian(lam: float, failure: list[str]):
        def evaluate(_snes: PETSc.SNES, x: PETSc.Vec, _J: PETSc.Mat, P: PETSc.Mat) -> None:
            m = int(round(math.sqrt(x.getSize())))
            matrix = jacobian(x.getArray(readonly=True).reshape(m, m), lam)
            P.zeroEntries()
            P.setValuesCSR(matrix.indptr.astype(PETSc.IntType), matrix.indices.astype(PETSc.IntType), matrix.data)
            P.assemble()
        return evaluate

    def __repr__(self) -> str:
        return f"BratuOracle(rtol={self.rtol}, max_it={self.max_it}, options={self.options})"


class Bratu(Family):
    """Bratu instances with λ ~ U(lam_range) on an n × n DMDA (n − 1 divisible by 2^k for grid sequencing).

    Features: the Legendre polynomials P_1..P_degree of λ mapped onto [−1, 1] over `lam_range`:
    λ is all a task exposes, and a linear meta-solver on these features represents any smooth map
    λ → guess to the accuracy of a degree-`degree` polynomial, fitted in closed form.
    """

    key = "bratu"

    def __init__(self, n: int = 25, seed: int = 0, lam_range: tuple[float, float] = (0.5, 6.6), degree: int = 6) -> None:
        n = check_count("n", n, minimum=4)
        lo, hi = check_range("lam_range", lam_range)
        if hi >= FOLD:
            raise ValueError(f"lam_range must stay below the fold λ* ≈ {FOLD:.3f} (no solution beyond), got {lam_range!r}")
        degree = check_count("degree", degree)
        super().__init__(seed, n=n, lam_range=(lo, hi), degree=degree)
        self.n, self.lam_range, self.degree = n, (lo, hi), degree

    @property
    def feature_dim(self) -> int:
        return self.degree

    def describe(self) -> str:
        return (f"Bratu: -Δu - λe^u = 0 on the unit square, u = 0 on the boundary, {self.n} x {self.n} DMDA (ex5), "
                f"λ {format_distribution(*self.lam_range)} (fold λ* ≈ {FOLD:.3f}). Features: Legendre P1..P{self.degree} "
                f"of λ. Seed {self.seed}.")

    def oracle(self) -> BratuOracle:
        """The solver that comes with the family (`solver.kind = "family"` in a config)."""
        return BratuOracle()

    def features(self, lam: float) -> torch.Tensor:
        lo, hi = self.lam_range
        t = 0.0 if hi == lo else 2.0 * (lam - lo) / (hi - lo) - 1.0
        values = np.polynomial.legendre.legvander(np.array([t]), self.degree)[0, 1:]
        return torch.from_numpy(values)

    def _build(self, rng: np.random.Generator, index: int) -> BratuTask:
        lam = float(rng.uniform(*self.lam_range))
        return BratuTask(lam=lam, n=self.n, features=self.features(lam), name=self.task_name(index, n=self.n),
                         parameters={"lam": lam})


__all__ = ["FOLD", "Bratu", "BratuOracle", "BratuSolve", "BratuTask", "embed", "jacobian", "residual"]
