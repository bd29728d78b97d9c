"""A PETSc KSP linear solve as a black box: `oracle(task, setting) -> Outcome`."""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc
from solvers.linear_system import LinearSystem, gather
from solvers.options import option_name, prefixed_options, unique_prefix, unused_options
from solvers.outcome import Outcome

class KSPOracle:
    """PETSc KSP as a pure function of (task, setting).

    Every call builds a fresh KSP on `comm`, so nothing set for one solve reaches the next; the
    setting's options go into the options database under a prefix private to this oracle and are
    deleted after the solve. Settings that differ only in `x0` share one KSP, so the operator and
    the preconditioner are set up once for all of them (`solve_many`).
    """

    def __init__(
        self,
        ksp_type: str = "cg",
        pc_type: str = "jacobi",
        rtol: float = 1e-6,
        atol: float = 1e-50,
        divtol: float = 1e4,
        max_it: int = 10_000,
        options: Mapping[str, Any] | None = None,
        comm: PETSc.Comm | None = None,
        return_solution: bool = False,
    ) -> None:
        self.ksp_type = ksp_type
        self.pc_type = pc_type
        self.rtol, self.atol, self.divtol, self.max_it = float(rtol), float(atol), float(divtol), int(max_it)
        self.options = {option_name(k): v for k, v in (options or {}).items()}
        self.comm = comm if comm is not None else PETSc.COMM_SELF
        self.return_solution = return_solution
        self.prefix = unique_prefix("ms")

    @classmethod
    def from_ksp(cls, ksp: PETSc.KSP, comm: PETSc.Comm | None = None, **overrides: Any) -> "KSPOracle":
        """Wrap a user's configured KSP: its types, tolerances and options become the base.

        Options are read from the database under the KSP's own prefix (or the unprefixed
        `ksp_*`/`pc_*` ones when it has none), i.e. what its `setFromOptions` would read.
        """
        rtol, atol, divtol, max_it = ksp.getTolerances()
        prefix = ksp.getOptionsPrefix() or ""
        options = {}
        for key, value in PETSc.Options().getAll().items():
            if prefix and key.startswith(prefix):
                options[key[len(prefix):]] = value
            elif not prefix and key.startswith(("ksp_", "pc_")):
                options[key] = value
        for key in ("ksp_type", "pc_type", "ksp_rtol", "ksp_atol", "ksp_divtol", "ksp_max_it"):
            options.pop(key, None)
        config = dict(ksp_type=ksp.getType(), pc_type=ksp.getPC().getType(), rtol=rtol, atol=atol,
                      divtol=divtol, max_it=max_it, options=options, comm=comm)
        config.update(overrides)
        return cls(**config)

    def __call__(self, task: LinearSystem, setting: Mapping[str, Any] | None = None) -> Outcome:
        return self.solve_many(task, [setting or {}])[0]

    def solve_many(self, task: LinearSystem, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """Solve `task` once per setting, setting up the preconditioner once per distinct options."""
        parsed = [self._parse(task, s) for s in settings]
        outcomes: list[Outcome | None] = [None] * len(parsed)
        groups: dict[tuple, list[int]] = {}
        for i, (options, _) in enumerate(parsed):
            groups.setdefault(tuple(sorted((k, repr(v)) for k, v in options.items())), []).append(i)
        for indices in groups.values():
            options = parsed[indices[0]][0]
            guesses = [parsed[i][1] for i in indices]
            for i, outcome in zip(indices, self._solve_group(task, options, guesses)):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _parse(self, task: LinearSystem, setting: Mapping[str, Any]) -> tuple[dict, np.ndarray | None]:
        options = dict(self.options)
        x0 = None
        for key, value in setting.items():
            if key == "x0":
                x0 = np.asarray(value, dtype=np.float64)
                if x0.shape != (task.size,):
                    raise ValueError(f"x0 has shape {x0.shape}, the system has {task.size} unknowns")
                if not np.all(np.isfinite(x0)):
                    raise ValueError("x0 contains non-finite values")
            else:
                options[option_name(key)] = value
        return options, x0

    def _new_ksp(self, A: PETSc.Mat, norm: PETSc.KSP.NormType) -> PETSc.KSP:
        ksp = PETSc.KSP().create(comm=self.comm)
        ksp.setOperators(A)
        ksp.setType(self.ksp_type)
        ksp.getPC().setType(self.pc_type)
        ksp.setTolerances(rtol=self.rtol, atol=self.atol, divtol=self.divtol, max_it=self.max_it)
        ksp.setNormType(norm)
        ksp.setOptionsPrefix(self.prefix)
        ksp.setFromOptions()
        return ksp

    def _set_up(self, A: PETSc.Mat) -> tuple[PETSc.KSP, str]:
        """A set-up KSP measuring the unpreconditioned norm, or its default norm where unsupported."""
        ksp = self._new_ksp(A, PETSc.KSP.NormType.UNPRECONDITIONED)
        try:
            ksp.setUp()
            return ksp, "unpreconditioned"
        except PETSc.Error:
            ksp.destroy()
        ksp = self._new_ksp(A, PETSc.KSP.NormType.DEFAULT)
        ksp.setUp()
        return ksp, "preconditioned"

    def _solve_group(self, task: LinearSystem, options: dict, guesses: list[np.ndarray | None]) -> list[Outcome]:
        A, b = task.petsc(self.comm)
        outcomes = []
        with prefixed_options(self.prefix, options):
            start, start_flops = time.perf_counter(), PETSc.Log.getFlops()
            try:
                ksp, norm_type = self._set_up(A)
            except PETSc.Error as error:
                message = f"PETSc error during KSP setup ({self.ksp_type}/{self.pc_type}): {error}"
                return [Outcome.failure(message, seconds=time.perf_counter() - start) for _ in guesses]
            setup_seconds, setup_flops = time.perf_counter() - start, PETSc.Log.getFlops() - start_flops
            try:
                self._record_history(ksp)
                x = A.createVecRight()
                for i, x0 in enumerate(guesses):
                    outcomes.append(self._solve_one(ksp, b, x, x0, setup_seconds, norm_type, setup_flops))
                    if i == 0:
                        unused = unused_options(self.prefix, list(options))
                        if unused:
                            raise ValueError(
                                f"unknown or inapplicable PETSc option(s) {unused} for "
                                f"ksp_type={ksp.getType()} pc_type={ksp.getPC().getType()}: PETSc never read them")
            finally:
                ksp.destroy()
        return outcomes

    @staticmethod
    def _record_history(ksp: PETSc.KSP) -> None:
        """Residual norms recorded in C (no Python call per iteration, so no overhead on the solve).

        Richardson with a preconditioner that has a fast Richardson path (SOR among them) skips
        its convergence test unless a monitor is attached (PETSc's rich.c), so there an empty
        monitor is attached to keep iteration counts meaningful.
        """
        ksp.setConvergenceHistory(length=ksp.getTolerances()[3] + 1, reset=True)
        if ksp.getType() == PETSc.KSP.Type.RICHARDSON:
            ksp.setMonitor(lambda *_: None)

    def _solve_one(self, ksp: PETSc.KSP, b: PETSc.Vec, x: PETSc.Vec, x0: np.ndarray | None,
                   setup_seconds: float, norm_type: str, setup_flops: float = 0.0) -> Outcome:
        if x0 is None:
            x.zeroEntries()
            ksp.setInitialGuessNonzero(False)
        else:
            start, end = x.getOwnershipRange()
            x.setArray(x0[start:end])
            ksp.setInitialGuessNonzero(True)
        begin, begin_flops = time.perf_counter(), PETSc.Log.getFlops()
        try:
            ksp.solve(b, x)
        except PETSc.Error as error:
            return Outcome.failure(f"PETSc error in KSPSolve: {error}", seconds=time.perf_counter() - begin)
        seconds, flops = time.perf_counter() - begin, PETSc.Log.getFlops() - begin_flops
        reason = int(ksp.getConvergedReason())
        return Outcome(
            residuals=np.array(ksp.getConvergenceHistory(), dtype=np.float64),
            iterations=int(ksp.getIterationNumber()),
            reason=reason,
            converged=reason > 0,
            seconds=seconds,
            solution=gather(x) if self.return_solution else None,
            setup_seconds=setup_seconds,
            hit_max_it=reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT,
            norm_type=norm_type,
            flops=flops,
            setup_flops=setup_flops,
        )
