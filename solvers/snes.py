"""A PETSc SNES nonlinear solve as a black box: `oracle(task, setting) -> Outcome`.

The problem is given by NumPy callbacks on the whole state vector, which suits the small
(≤ a few hundred unknowns) problems this oracle is for: `residual(task, setting, u) -> F`,
`initial_guess(task, setting) -> u0` and optionally `jacobian(task, setting, u) -> J` (dense).
Without a Jacobian callback the oracle builds a dense forward-difference Jacobian, one residual
call per column, or one call in all when the residual is `vectorized` (accepts a batch `[m, n]`).
The linear solves are PETSc's (dense `Mat`, `preonly` + LU unless options say otherwise).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc, stage
from solvers.budget import Budget, newton_options, reference_norm
from solvers.options import check_used, prefixed_options, split_setting, unique_prefix
from solvers.oracle import Oracle
from solvers.outcome import Outcome

Residual = Callable[[Any, Mapping[str, Any], np.ndarray], np.ndarray]
Jacobian = Callable[[Any, Mapping[str, Any], np.ndarray], np.ndarray]
InitialGuess = Callable[[Any, Mapping[str, Any]], np.ndarray]

_REASONS = {v: k for k, v in vars(PETSc.SNES.ConvergedReason).items() if isinstance(v, int)}
_FD_STEP = math.sqrt(np.finfo(np.float64).eps)
_FD_TYPICAL = 1.0
"""Typical magnitude of an unknown (Dennis & Schnabel's typ_x): problems are expected to be
scaled so their unknowns are O(1) or smaller, and an unknown at or near zero still gets a step
(√eps) large enough that round-off in F does not swamp the difference."""


def reason_name(reason: int) -> str:
    return _REASONS.get(reason, str(reason))


def forward_difference_jacobian(residual: Callable[[np.ndarray], np.ndarray], u: np.ndarray,
                                f0: np.ndarray, vectorized: bool = False) -> np.ndarray:
    """Dense J[i, j] ≈ ∂F_i/∂u_j by forward differences, step √eps·max(|u_j|, 1)·sign(u_j).

    Accurate to about √eps relative, which keeps Newton's convergence quadratic down to
    round-off for the well-scaled problems this is meant for.
    """
    scale = np.maximum(np.abs(u), _FD_TYPICAL)
    steps = _FD_STEP * scale * np.where(u < 0, -1.0, 1.0)
    steps = (u + steps) - u  # the step actually representable in floating point
    shifted = u[None, :] + np.diag(steps)
    if vectorized:
        values = np.asarray(residual(shifted), dtype=np.float64)
    else:
        values = np.stack([np.asarray(residual(row), dtype=np.float64) for row in shifted])
    return ((values - f0[None, :]) / steps[:, None]).T


class SNESOracle(Oracle):
    """PETSc SNES as a pure function of (task, setting).

    A setting holds three kinds of entries: `"u0"` (an initial guess; otherwise
    `initial_guess(task, setting)`), the names in `problem_keys` (handed to the callbacks, e.g. a
    wall model's parameters) and PETSc options (everything else, e.g. `snes_linesearch_type`),
    which go into the options database under a prefix private to this oracle and are deleted
    after the solve; an option PETSc never read raises ValueError.

    `solve_many` with `warm_start=True` solves the first setting as given and starts every later
    one without its own `u0` from the first's converged solution: finite-difference queries
    around a centre then see the change of the problem, not a change of starting point.

    A solve that does not converge (line-search failure, `max_it`, NaN/Inf residual, a PETSc
    error, a Python exception in a callback) is a failed Outcome whose `error` says why.
    """

    def __init__(
        self,
        residual: Residual,
        initial_guess: InitialGuess,
        jacobian: Jacobian | None = None,
        vectorized: bool = False,
        snes_type: str = "newtonls",
        linesearch: str = "bt",
        rtol: float = 1e-10,
        atol: float = 1e-50,
        stol: float = 1e-14,
        max_it: int = 50,
        options: Mapping[str, Any] | None = None,
        problem_keys: Collection[str] = (),
        warm_start: bool = True,
        comm: PETSc.Comm | None = None,
    ) -> None:
        if not callable(residual) or not callable(initial_guess):
            raise ValueError("SNESOracle needs callable residual and initial_guess callbacks")
        if jacobian is not None and not callable(jacobian):
            raise ValueError("SNESOracle: jacobian must be callable or None")
        for name, value in (("rtol", rtol), ("atol", atol), ("stol", stol)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SNESOracle: {name} must be finite and >= 0, got {value}")
        if max_it < 1:
            raise ValueError(f"SNESOracle: max_it must be >= 1, got {max_it}")
        self.comm = comm if comm is not None else PETSc.COMM_SELF
        if self.comm.getSize() != 1:
            raise ValueError("SNESOracle: NumPy callbacks see the whole state, so it solves on a communicator "
                             f"of size 1 (each rank solves its own tasks), got size {self.comm.getSize()}")
        self.residual, self.initial_guess, self.jacobian = residual, initial_guess, jacobian
        self.vectorized = bool(vectorized)
        self.snes_type, self.linesearch = snes_type, linesearch
        self.rtol, self.atol, self.stol, self.max_it = float(rtol), float(atol), float(stol), int(max_it)
        self.options = split_setting({}, options).options
        self.problem_keys = frozenset(problem_keys)
        self.warm_start = bool(warm_start)
        self.prefix = unique_prefix("snes")

    def budget_options(self, budget: Budget, task: Any) -> dict[str, Any]:
        """The Newton tolerances (`solvers.budget.newton_options`): the Outcome's history is the
        Newton residual, so that is what a cost's budget stops. The linear solves inside keep the
        oracle's own configuration (LU by default)."""
        return newton_options(budget, reference_norm(task))

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """Solve `task` once per setting; later settings warm-start from the first's solution."""
        outcomes: list[Outcome] = []
        start_from = None
        for setting in settings:
            outcome = self._solve(task, setting, start_from)
            if self.warm_start and not outcomes and not outcome.failed:
                start_from = outcome.solution
            outcomes.append(outcome)
        return outcomes

    def _solve(self, task: Any, setting: Mapping[str, Any], start_from: np.ndarray | None) -> Outcome:
        u0, options, problem = split_setting(setting, self.options, guess="u0", keep=self.problem_keys)
        if u0 is None:
            u0 = start_from if start_from is not None else np.asarray(self.initial_guess(task, problem), np.float64)
        if u0.ndim != 1 or u0.size == 0:
            raise ValueError(f"SNESOracle: the initial guess must be a non-empty vector, got shape {u0.shape}")
        if not np.all(np.isfinite(u0)):
            raise ValueError("SNESOracle: the initial guess contains non-finite values")
        with prefixed_options(self.prefix, options):
            outcome = self._run(task, problem, options, u0.copy())
            check_used(self.prefix, options, f"snes_type={self.snes_type}")
        return outcome

    def _run(self, task: Any, problem: dict, options: dict, u0: np.ndarray) -> Outcome:
        n = u0.size
        errors: list[str] = []
        x = PETSc.Vec().createSeq(n, comm=self.comm)
        f = x.duplicate()
        matrix = PETSc.Mat().createDense((n, n), comm=self.comm)
        matrix.setUp()
        snes = PETSc.SNES().create(comm=self.comm)
        start = time.perf_counter()
        try:
            snes.setFunction(self._function(task, problem, errors), f)
            snes.setJacobian(self._jacobian_callback(task, problem, errors), matrix)
            try:
                with stage("oracle setup"):
                    self._configure(snes)
            except PETSc.Error as error:
                raise ValueError(f"PETSc rejected the SNES configuration (snes_type={self.snes_type!r}, "
                                 f"linesearch={self.linesearch!r}, options {options}): {error}") from None
            x.setArray(u0)
            try:
                with stage("oracle solve"):
                    snes.solve(None, x)
            except PETSc.Error as error:
                message = errors[0] if errors else f"PETSc error in SNESSolve: {error}"
                return Outcome.failure(message, reason=int(snes.getConvergedReason()),
                                       seconds=time.perf_counter() - start)
            seconds = time.perf_counter() - start
            reason = int(snes.getConvergedReason())
            error = errors[0] if errors else None
            if error is None and reason <= 0:
                error = f"SNES did not converge: {reason_name(reason)} after {snes.getIterationNumber()} iteration(s)"
            return Outcome(
                residuals=np.array(snes.getConvergenceHistory()[0], dtype=np.float64),
                iterations=int(snes.getIterationNumber()),
                reason=reason,
                converged=reason > 0 and error is None,
                seconds=seconds,
                solution=x.getArray().copy(),
                error=error,
                hit_max_it=reason == PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT,
                norm_type="function",
            )
        finally:
            snes.destroy()
            matrix.destroy()
            x.destroy()
            f.destroy()

    def _configure(self, snes: PETSc.SNES) -> None:
        snes.setType(self.snes_type)
        snes.setTolerances(rtol=self.rtol, atol=self.atol, stol=self.stol, max_it=self.max_it)
        snes.getLineSearch().setType(self.linesearch)
        ksp = snes.getKSP()
        ksp.setType(PETSc.KSP.Type.PREONLY)
        ksp.getPC().setType(PETSc.PC.Type.LU)
        snes.setOptionsPrefix(self.prefix)
        snes.setFromOptions()
        snes.setConvergenceHistory(length=snes.getTolerances()[3] + 1, reset=True)  # max_it after options

    def _function(self, task: Any, problem: dict, errors: list[str]) -> Callable:
        """The SNES function: an exception becomes a NaN residual (SNES stops) and a message."""
        def evaluate(_snes: PETSc.SNES, x: PETSc.Vec, f: PETSc.Vec) -> None:
            try:
                value = self._residual(task, problem, x.getArray(readonly=True).copy())
            except Exception as error:  # noqa: BLE001  (any failure of user code is data)
                if not errors:
                    errors.append(f"residual callback raised {type(error).__name__}: {error}")
                value = np.full(f.getSize(), np.nan)
            f.setArray(value)
        return evaluate

    def _residual(self, task: Any, problem: dict, u: np.ndarray) -> np.ndarray:
        value = np.asarray(self.residual(task, problem, u), dtype=np.float64)
        if value.shape != u.shape:
            raise ValueError(f"the residual has shape {value.shape}, the state {u.shape}")
        return value

    def _jacobian_callback(self, task: Any, problem: dict, errors: list[str]) -> Callable:
        def evaluate(_snes: PETSc.SNES, x: PETSc.Vec, _J: PETSc.Mat, P: PETSc.Mat) -> None:
            u = x.getArray(readonly=True).copy()
            try:
                if self.jacobian is not None:
                    dense = np.asarray(self.jacobian(task, problem, u), dtype=np.float64)
                else:
                    residual = (lambda v: self.residual(task, problem, v))
                    dense = forward_difference_jacobian(residual, u, self._residual(task, problem, u),
                                                        vectorized=self.vectorized)
                if dense.shape != (u.size, u.size):
                    raise ValueError(f"the Jacobian has shape {dense.shape}, expected {(u.size, u.size)}")
            except Exception as error:  # noqa: BLE001
                if not errors:
                    errors.append(f"Jacobian callback raised {type(error).__name__}: {error}")
                raise
            P.getDenseArray()[:] = dense
            P.assemble()
        return evaluate

    def __repr__(self) -> str:
        return (f"SNESOracle(snes_type={self.snes_type!r}, linesearch={self.linesearch!r}, rtol={self.rtol}, "
                f"atol={self.atol}, stol={self.stol}, max_it={self.max_it}, options={self.options})")
