"""A generic PETSc SNES on a 2-D DMDA: the problem supplies residual and Jacobian, the options
database configures the solver (petsc4py's demo/bratu2d style).

A problem (`DMDAProblem`) knows its physics only: the grid a task lives on, F(u) and ∂F/∂u on
any grid of that family (coarser ones too, for `-snes_grid_sequence`), which unknowns a guess
sets, and the norm its tolerances refer to. Everything about the solver — Newton variant, line
search, linear solver, grid sequencing, tolerances — is PETSc options: the driver's defaults
(newtonls + backtracking, LU inside Newton: what a PETSc user runs on a problem this size) under
a private prefix, overridden by the setting (`split_setting`, checked as read) and by a cost's
`Budget` (`budget_options`: the Newton tolerances, since the Outcome records the Newton history).

Tolerance: every solve stops at ‖F‖ ≤ rtol·reference (the problem's `reference_norm`, e.g. the
zero guess's ‖F(0)‖), the same absolute residual whatever the guess; SNES's own relative test
(‖F‖ ≤ rtol·‖F(u0)‖) would demand more of a better guess.

On a communicator of several ranks (`comm`, e.g. a `parallel.group_size = 2` group) the DMDA,
SNES, Jacobian and linear solver are distributed, while the problem's callbacks stay whole-grid
numpy: each rank gathers the whole grid in natural order, evaluates F (or ∂F/∂u) on it
redundantly — cheap next to the distributed linear solve — and keeps its own box (or rows).
`_GridLayout` is that translation; on one rank it is the identity, so serial solves are unchanged.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from solvers._petsc import PETSc, stage
from solvers.budget import Budget, newton_options
from solvers.options import check_used, prefixed_options, split_setting, unique_prefix
from solvers.oracle import Oracle
from solvers.outcome import Outcome


class DMDAProblem(ABC):
    """A nonlinear problem on a 2-D vertex grid (boundary included), one unknown per vertex.

    Arrays handed to `residual`/`jacobian` are the whole grid (rows = y, columns = x, PETSc's
    natural ordering), on every rank also when the solve is distributed. A guess sets the unknowns
    `guess(task, u)` picks from a grid; `embed` puts them back (by default every vertex).
    """

    @abstractmethod
    def grid_shape(self, task: Any) -> tuple[int, int]:
        """Vertices per axis of the task's (final) grid."""

    @abstractmethod
    def residual(self, task: Any, u: np.ndarray) -> np.ndarray:
        """F(u) on a grid of any size of this family (grid sequencing starts coarser)."""

    @abstractmethod
    def jacobian(self, task: Any, u: np.ndarray) -> sp.csr_matrix:
        """∂F/∂u at u, rows and columns in the grid's row-major order."""

    @abstractmethod
    def reference_norm(self, task: Any) -> float:
        """The norm every tolerance refers to (e.g. ‖F(0)‖)."""

    def embed(self, task: Any, guess: np.ndarray) -> np.ndarray:
        """The grid holding a guess's unknowns (default: a guess is the whole grid)."""
        return np.asarray(guess, dtype=np.float64).reshape(self.grid_shape(task))

    def guess(self, task: Any, u: np.ndarray) -> np.ndarray:
        """The unknowns a guess sets, taken from a grid (the inverse of `embed`)."""
        return np.asarray(u, dtype=np.float64).ravel().copy()

    def guess_size(self, task: Any) -> int:
        rows, columns = self.grid_shape(task)
        return rows * columns


class DirichletInteriorTask:
    """What a task of a `DirichletInteriorProblem` carries besides its physics: the n × n vertex
    grid and the (n − 2)² interior unknowns a guess sets (a mixin for the task's dataclass)."""

    n: int

    @property
    def grid_shape(self) -> tuple[int, int]:
        """The interior vertices, row-major: their sine modes are the Dirichlet modes of the grid."""
        return (self.n - 2, self.n - 2)

    @property
    def size(self) -> int:
        return (self.n - 2) ** 2


class DirichletInteriorProblem(DMDAProblem):
    """A problem on a task's n × n vertex grid with u = 0 on the boundary, whose guess sets the
    (n − 2)² interior vertices (their sine modes are the Dirichlet modes of the full grid). The
    task carries `n`, `size` = (n − 2)² and `reference_norm`; a subclass supplies the physics
    (`residual`, `jacobian`)."""

    def grid_shape(self, task: Any) -> tuple[int, int]:
        return (task.n, task.n)

    def reference_norm(self, task: Any) -> float:
        return task.reference_norm

    def embed(self, task: Any, guess: np.ndarray) -> np.ndarray:
        return embed_interior(guess, task.n)

    def guess(self, task: Any, u: np.ndarray) -> np.ndarray:
        return np.asarray(u, dtype=np.float64)[1:-1, 1:-1].ravel().copy()

    def guess_size(self, task: Any) -> int:
        return task.size


def embed_interior(interior: np.ndarray, n: int) -> np.ndarray:
    """The full n × n grid with the interior values and a zero boundary."""
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = np.asarray(interior, dtype=np.float64).reshape(n - 2, n - 2)
    return u


@dataclass
class DMDASolve:
    """One Newton solve: its Outcome and the Newton iterations on every grid level (coarse first)."""

    outcome: Outcome
    level_iterations: list[int]
    cpu_seconds: float = 0.0
    """Process CPU time of SNESSolve: on a shared machine, the part of the wall time the solve
    actually computed."""


class _GridLayout:
    """Between one DMDA's distributed vectors and matrices (PETSc ordering, each rank its box) and
    the whole grid in natural row-major order that a `DMDAProblem` sees.

    On one rank PETSc's ordering is the natural one and every method is a plain copy (or a view).
    On several, `whole` is globalToNatural followed by a scatter to every rank, `keep_box` writes
    the rank's box (`getCorners`) into a global vector, and `set_rows` inserts the rank's rows of
    a natural-order CSR with its columns mapped to PETSc's ordering (`AO.app2petsc`).
    """

    def __init__(self, da: PETSc.DMDA) -> None:
        self.shape = tuple(da.getSizes())[::-1]
        self.distributed = da.getComm().getSize() > 1
        if self.distributed:
            self.ao = da.getAO()
            (xs, ys), (xm, ym) = da.getCorners()
            self.box = (slice(ys, ys + ym), slice(xs, xs + xm))
            self.own_rows = (np.arange(ys, ys + ym)[:, None] * self.shape[1] + np.arange(xs, xs + xm)).ravel()
            self.natural = da.createNaturalVec()
            self.to_all, self.everywhere = PETSc.Scatter.toAll(self.natural)
            self.da = da

    def whole(self, x: PETSc.Vec) -> np.ndarray:
        """The whole grid of a global vector, natural order, on every rank (a read-only view)."""
        if not self.distributed:
            return x.getArray(readonly=True).reshape(self.shape)
        self.da.globalToNatural(x, self.natural)
        self.to_all.scatter(self.natural, self.everywhere, addv=PETSc.InsertMode.INSERT_VALUES)
        return self.everywhere.getArray(readonly=True).reshape(self.shape)

    def keep_box(self, grid: np.ndarray, x: PETSc.Vec) -> None:
        """Write this rank's part of a whole grid into the global vector `x`."""
        x.setArray(grid[self.box].ravel() if self.distributed else grid.ravel())

    def put(self, grid: np.ndarray, x: PETSc.Vec) -> None:
        """A whole grid known on every rank into the global vector `x` (through the natural vector)."""
        if not self.distributed:
            x.setArray(grid.ravel())
            return
        start, end = self.natural.getOwnershipRange()
        self.natural.setArray(grid.ravel()[start:end])
        self.da.naturalToGlobal(self.natural, x)

    def set_rows(self, matrix: sp.csr_matrix, P: PETSc.Mat) -> None:
        """This rank's rows of a whole-grid, natural-order CSR (sorted indices) into P."""
        if self.distributed:
            matrix = matrix[self.own_rows]
            columns = self.ao.app2petsc(matrix.indices.astype(PETSc.IntType))
        else:
            columns = matrix.indices.astype(PETSc.IntType)
        P.setValuesCSR(matrix.indptr.astype(PETSc.IntType), columns, matrix.data)

    def destroy(self) -> None:
        if self.distributed:
            for obj in (self.to_all, self.everywhere, self.natural):
                obj.destroy()


class _Layouts(dict):
    """The `_GridLayout` of each grid level a solve visits (grid sequencing hands the callbacks
    coarser DMDAs), keyed by the DMDA's sizes, built once per solve."""

    def of(self, da: PETSc.DMDA) -> _GridLayout:
        sizes = tuple(da.getSizes())
        if sizes not in self:
            self[sizes] = _GridLayout(da)
        return self[sizes]

    def destroy(self) -> None:
        for layout in self.values():
            layout.destroy()
        self.clear()


class DMDASNESOracle(Oracle):
    """PETSc SNES on `problem`'s DMDA as a pure function of (task, setting).

    A setting holds `u0` (the unknowns `problem.guess` picks; absent = zero guess) and PETSc
    options for the SNES (its KSP and PC under it: `ksp_type`, `pc_type`, `snes_linesearch_type`,
    `snes_grid_sequence`, ...). `Outcome.residuals` is ‖F‖ per Newton step on the final grid,
    `solution` the guess's unknowns of the solution, `flops` PETSc's count of the solve (linear
    algebra; not the Python residual/Jacobian callbacks), summed over `comm`.

    `comm` (default PETSc.COMM_SELF) is where the DMDA and SNES live: on several ranks every rank
    calls `solve` with the same task and setting, the problem's callbacks run on the whole grid on
    every rank, and every rank gets the same `solution` (whole grid, natural order). LU inside
    Newton (the default) needs a parallel direct solver there (MUMPS, SuperLU_dist); without one,
    set a Krylov method and preconditioner (e.g. `ksp_type cg`, `pc_type gamg`).
    """

    return_solution = True

    def __init__(self, problem: DMDAProblem, rtol: float = 1e-10, max_it: int = 50,
                 options: Mapping[str, Any] | None = None, comm: PETSc.Comm | None = None) -> None:
        if not isinstance(problem, DMDAProblem):
            raise TypeError(f"DMDASNESOracle needs a DMDAProblem, got {type(problem).__name__}")
        if not 0 < rtol < 1 or max_it < 1:
            raise ValueError(f"DMDASNESOracle needs 0 < rtol < 1 and max_it >= 1, got {rtol}, {max_it}")
        self.problem = problem
        self.rtol, self.max_it = float(rtol), int(max_it)
        self.options = split_setting({}, options).options
        self.comm = comm if comm is not None else PETSc.COMM_SELF
        if not isinstance(self.comm, PETSc.Comm):
            raise TypeError(f"DMDASNESOracle: comm must be a PETSc.Comm (e.g. PETSc.COMM_WORLD), "
                            f"got {type(comm).__name__}")
        self.prefix = unique_prefix("dmda")

    def budget_options(self, budget: Budget, task: Any) -> dict[str, Any]:
        """The Newton tolerances (the Outcome's history is Newton's); the linear solver inside keeps
        its own configuration (LU by default, or the setting's Krylov method and tolerance)."""
        return newton_options(budget, self.problem.reference_norm(task))

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return [self.solve(task, setting).outcome for setting in settings]

    def solve(self, task: Any, setting: Mapping[str, Any] | None = None) -> DMDASolve:
        """One solve with its per-level Newton counts and CPU time (`DMDASolve`)."""
        u0, options, _ = split_setting(setting or {}, self.options, guess="u0", size=self.problem.guess_size(task))
        shape = self.problem.grid_shape(task)
        levels = int(options.get("snes_grid_sequence", 0))
        coarse = tuple((size - 1) / 2 ** levels + 1 for size in shape)
        if levels and any(c != int(c) or c < 3 for c in coarse):
            raise ValueError(f"snes_grid_sequence {levels} needs (n - 1)/2^{levels} + 1 to be an integer >= 3 on "
                             f"every axis of the {shape[0]} x {shape[1]} grid")
        if levels and u0 is not None:
            raise ValueError("a guess u0 lives on the final grid; snes_grid_sequence starts on a coarser one")
        with prefixed_options(self.prefix, options):
            result = self._run(task, tuple(int(c) for c in coarse), u0)
            check_used(self.prefix, options, f"the DMDA SNES ({type(self.problem).__name__})")
        return result

    def _run(self, task: Any, start_shape: tuple[int, int], u0: np.ndarray | None) -> DMDASolve:
        begin = time.perf_counter()
        final_shape = self.problem.grid_shape(task)
        da = PETSc.DMDA().create(dim=2, sizes=start_shape[::-1], dof=1, stencil_width=1,
                                 stencil_type=PETSc.DMDA.StencilType.STAR, comm=self.comm)
        snes = PETSc.SNES().create(comm=self.comm)
        history: list[tuple[tuple[int, ...], float]] = []
        failure: list[str] = []
        layouts = _Layouts()
        try:
            snes.setDM(da)
            snes.setFunction(self._function(task, failure, layouts), da.createGlobalVec())
            snes.setJacobian(self._jacobian(task, failure, layouts))
            snes.setType(PETSc.SNES.Type.NEWTONLS)
            snes.getLineSearch().setType("bt")
            snes.getKSP().setType(PETSc.KSP.Type.PREONLY)
            snes.getKSP().getPC().setType(PETSc.PC.Type.LU)
            snes.setTolerances(rtol=0.0, atol=self.rtol * self.problem.reference_norm(task), stol=0.0,
                               max_it=self.max_it)
            snes.setMonitor(lambda s, its, norm: history.append((tuple(s.getDM().getSizes()), float(norm))))
            snes.setOptionsPrefix(self.prefix)
            snes.setFromOptions()
            self._check_parallel_factorization(snes.getKSP())
            with stage("oracle setup"):
                snes.setUp()  # matrices and the LU's symbolic setup: what a code solving many tasks keeps
            x = da.createGlobalVec()
            if u0 is None:
                x.set(0.0)
            else:
                layouts.of(da).put(self.problem.embed(task, u0), x)
            setup_seconds = time.perf_counter() - begin
            start, start_cpu, start_flops = time.perf_counter(), time.process_time(), PETSc.Log.getFlops()
            try:
                with stage("oracle solve"):
                    snes.solve(None, x)
            except PETSc.Error as error:
                message = failure[0] if failure else f"PETSc error in SNESSolve: {error}"
                return DMDASolve(Outcome.failure(message, reason=int(snes.getConvergedReason()),
                                                 seconds=time.perf_counter() - start), [])
            seconds, flops = time.perf_counter() - start, PETSc.Log.getFlops() - start_flops
            cpu_seconds = time.process_time() - start_cpu
            if self.comm.getSize() > 1:
                flops = self.comm.tompi4py().allreduce(flops)
            reason = int(snes.getConvergedReason())
            solution_vec = snes.getSolution()
            final_grid = solution_vec.getSize() == final_shape[0] * final_shape[1]
            solution = (self.problem.guess(task, np.array(layouts.of(snes.getDM()).whole(solution_vec)))
                        if final_grid else None)
        finally:
            layouts.destroy()
            snes.destroy()
            da.destroy()
        final_sizes = final_shape[::-1]
        sizes = [size for size, _ in history]
        level_iterations = [sizes.count(size) - 1 for size in dict.fromkeys(sizes)]
        final = np.array([norm for size, norm in history if size == final_sizes], dtype=np.float64)
        error = failure[0] if failure else (None if reason > 0 else f"SNES did not converge (reason {reason})")
        if error is None and solution is None:  # grid sequencing gave up on a coarser grid
            error = f"SNES stopped on a coarser grid ({sizes[-1]}, reason {reason})"
        outcome = Outcome(residuals=final, iterations=max(len(final) - 1, 0), reason=reason,
                          converged=error is None, seconds=seconds, solution=solution, error=error,
                          setup_seconds=setup_seconds,
                          hit_max_it=reason == PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT,
                          norm_type="function", flops=flops)
        return DMDASolve(outcome, level_iterations, cpu_seconds)

    def _check_parallel_factorization(self, ksp: PETSc.KSP) -> None:
        """On several ranks, LU/Cholesky needs a parallel direct solver: say so before SNESSolve
        fails deep inside PCSetUp."""
        if self.comm.getSize() == 1 or ksp.getPC().getType() not in (PETSc.PC.Type.LU, PETSc.PC.Type.CHOLESKY):
            return
        packages = ("mumps", "superlu_dist", "strumpack", "pastix")
        if not any(PETSc.Sys.hasExternalPackage(package) for package in packages):
            raise ValueError(f"DMDASNESOracle on {self.comm.getSize()} ranks: pc_type {ksp.getPC().getType()} inside "
                             f"Newton needs a parallel direct solver ({', '.join(packages)}), which this PETSc lacks; "
                             "set a Krylov method and preconditioner, e.g. ksp_type cg (gmres if nonsymmetric), "
                             "pc_type gamg")

    def _function(self, task: Any, failure: list[str], layouts: _Layouts) -> Callable:
        """The SNES function on whatever grid the DM has now; a non-finite F stops Newton with a message."""
        def evaluate(snes: PETSc.SNES, x: PETSc.Vec, f: PETSc.Vec) -> None:
            layout = layouts.of(snes.getDM())
            shape = layout.shape
            try:
                with np.errstate(over="ignore", invalid="ignore"):  # a non-finite F is reported below
                    value = np.asarray(self.problem.residual(task, layout.whole(x)), dtype=np.float64)
            except Exception as error:  # noqa: BLE001  (a failure of problem code is data)
                if not failure:
                    failure.append(f"residual raised {type(error).__name__}: {error}")
                value = np.full(shape, np.nan)
            if not np.all(np.isfinite(value)) and not failure:
                failure.append("the residual is not finite (Newton left the solution's basin?)")
            layout.keep_box(value, f)
        return evaluate

    def _jacobian(self, task: Any, failure: list[str], layouts: _Layouts) -> Callable:
        def evaluate(snes: PETSc.SNES, x: PETSc.Vec, _J: PETSc.Mat, P: PETSc.Mat) -> None:
            layout = layouts.of(snes.getDM())
            try:
                matrix = sp.csr_matrix(self.problem.jacobian(task, layout.whole(x)))
            except Exception as error:  # noqa: BLE001
                if not failure:
                    failure.append(f"Jacobian raised {type(error).__name__}: {error}")
                raise
            matrix.sort_indices()
            P.zeroEntries()
            layout.set_rows(matrix, P)
            P.assemble()
        return evaluate

    def __repr__(self) -> str:
        return (f"DMDASNESOracle({type(self.problem).__name__}(), rtol={self.rtol}, max_it={self.max_it}, "
                f"options={self.options})")


__all__ = ["DMDAProblem", "DMDASNESOracle", "DMDASolve"]
