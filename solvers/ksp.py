"""A PETSc KSP linear solve as a black box: `oracle(task, setting) -> Outcome`."""
from __future__ import annotations

import ctypes
import difflib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc, stage
from solvers.budget import Budget, linear_options
from solvers.deadline import Deadline, signal_ended
from solvers.linear_system import LinearSystem, gather
from solvers.options import (check_used, libpetsc, needs_monitor, prefixed_options, split_setting, unique_prefix,
                             unused_options)
from solvers.oracle import Oracle
from solvers.outcome import Outcome

logger = logging.getLogger(__name__)

KSPFactory = Callable[[PETSc.Mat], PETSc.KSP]

HISTORY_LIMIT = 10_000_001
"""Residuals recorded per solve at most (iteration 0 included): the history is allocated up front,
max_it + 1 entries, and a max_it near 2^31 (which `solver.max_it` admits) once overflowed a
PetscInt, and would reserve 16 GB. A longer solve keeps its first HISTORY_LIMIT residuals."""

NORM_TYPES = {"default": PETSc.KSP.NormType.DEFAULT, "none": PETSc.KSP.NormType.NONE,
              "preconditioned": PETSc.KSP.NormType.PRECONDITIONED,
              "unpreconditioned": PETSc.KSP.NormType.UNPRECONDITIONED, "natural": PETSc.KSP.NormType.NATURAL}
PC_SIDES = {"left": PETSc.PC.Side.LEFT, "right": PETSc.PC.Side.RIGHT, "symmetric": PETSc.PC.Side.SYMMETRIC}
_NORM_NAMES = {v: k for k, v in NORM_TYPES.items()}
_SIDE_NAMES = {v: k for k, v in PC_SIDES.items()}

_OUTPUT_ONLY = re.compile(r"(^|_)(monitor|view|converged_reason|plot|compute_eigenvalues|compute_singularvalues)")
"""Options that only print or plot (monitors, viewers, -ksp_converged_reason): a wrapped KSP drops
them, or every training solve would print."""


def keep_convergence_test(ksp: PETSc.KSP) -> None:
    """Attach an empty monitor to a Richardson KSP (once), so it tests convergence at all.

    Richardson with a preconditioner that has a fast Richardson path (SOR among them) runs
    `max_it` sweeps with no convergence test unless a monitor is attached, and reports
    CONVERGED_ITS (PETSc's rich.c). Any other KSP type is left alone.
    """
    if ksp.getType() != PETSc.KSP.Type.RICHARDSON:
        return
    if not any(monitor[0] is _no_output for monitor in ksp.getMonitor() or []):
        ksp.setMonitor(_no_output)


def _no_output(*_: Any) -> None:
    """The monitor `keep_convergence_test` attaches: it only has to exist."""


def warn_if_trapped(ksp: PETSc.KSP, options: Mapping[str, Any]) -> None:
    """Warn loudly when a user's KSP is in the Richardson trap (`solvers.options.needs_monitor`).

    The oracle's own solves attach a monitor (`keep_convergence_test`) and stop at the tolerance;
    the user's KSP, solved as it stands, would run every one of its `max_it` sweeps and report
    CONVERGED_ITS — so what training measured is not what the user's code will do.
    """
    configured = {**options, "ksp_type": ksp.getType(), "pc_type": ksp.getPC().getType()}
    if ksp.getMonitor() or not needs_monitor(configured):
        return
    prefix = ksp.getOptionsPrefix() or ""
    logger.warning(
        "Richardson trap: this KSP is Richardson + %s with no monitor, so PETSc's fast %s path (rich.c) runs all "
        "max_it = %d sweeps with no convergence test and reports CONVERGED_ITS, never stopping at rtol. The "
        "oracle's solves attach a monitor and do stop there; to solve as trained, run your code with "
        "-%sksp_monitor (or KSPMonitorSet) and make sure the deployed options file includes a monitor.",
        ksp.getPC().getType(), ksp.getPC().getType(), ksp.getTolerances()[3], prefix)


def norm_name(ksp: PETSc.KSP) -> str:
    """The KSP's residual norm as a word ("preconditioned", "unpreconditioned", ...)."""
    return _NORM_NAMES.get(ksp.getNormType(), str(ksp.getNormType()))


class KSPOracle(Oracle):
    """PETSc KSP as a pure function of (task, setting).

    Every call builds a fresh KSP on `comm`, so nothing set for one solve reaches the next; the
    setting's options go into the options database under a prefix private to this oracle and are
    deleted after the solve. Settings that differ only in `x0` share one KSP, so the operator and
    the preconditioner are set up once for all of them (`solve_many`).

    `norm_type` is the residual norm the solve tests and records. The default,
    "unpreconditioned", makes residual histories comparable across preconditioners and settings
    (‖b − Ax_k‖, what the training costs divide by ‖b‖); a KSP type that cannot measure it (left-
    preconditioned GMRES) falls back to its own default, recorded in `Outcome.norm_type`. A
    wrapped user KSP (`from_ksp`) keeps the user's norm, so iteration counts stay theirs.

    `ksp_factory(A) -> KSP` replaces the built-in configuration where a user's KSP cannot be
    copied (a DM, a separate preconditioning matrix, fieldsplit index sets): called once per
    group of settings with the task's operator, it returns a configured KSP; the setting's
    options then go under that KSP's own prefix, exactly as in deployment.

    `timeout` (seconds per solve, None: no limit) ends a solve that iterates longer as a failed
    Outcome saying so, and lets SIGTERM/SIGINT reach Python during a solve (`Deadline`). Only
    the iterations are timed: a hang inside one preconditioner application or setup is out of
    its reach (`solvers.isolated.IsolatedOracle` kills those). One such is real: PETSc 3.26.1's
    ICC factorization of some nonsymmetric operators (convdiff n = 16) loops for ever raising its
    positive-definite shift (seen under gdb: 3·10^7 shifts, its limit 5), inside PCSetUp.
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
        norm_type: str = "unpreconditioned",
        pc_side: str | None = None,
        comm: PETSc.Comm | None = None,
        return_solution: bool = False,
        ksp_factory: KSPFactory | None = None,
        timeout: float | None = None,
    ) -> None:
        if norm_type not in NORM_TYPES:
            raise ValueError(f"KSPOracle: norm_type {norm_type!r} is not one of {sorted(NORM_TYPES)}")
        if pc_side is not None and pc_side not in PC_SIDES:
            raise ValueError(f"KSPOracle: pc_side {pc_side!r} is not one of {sorted(PC_SIDES)}")
        if ksp_factory is not None and not callable(ksp_factory):
            raise ValueError("KSPOracle: ksp_factory must be a callable A -> KSP")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"KSPOracle: timeout must be > 0 seconds (or None), got {timeout!r}")
        self.ksp_type = ksp_type
        self.pc_type = pc_type
        self.rtol, self.atol, self.divtol, self.max_it = float(rtol), float(atol), float(divtol), int(max_it)
        self.options = split_setting({}, options).options
        self.norm_type, self.pc_side = norm_type, pc_side
        self.comm = comm if comm is not None else PETSc.COMM_SELF
        self.return_solution = return_solution
        self.ksp_factory = ksp_factory
        self.timeout = None if timeout is None else float(timeout)
        self.prefix = unique_prefix("ms")

    @classmethod
    def from_ksp(cls, ksp: PETSc.KSP, comm: PETSc.Comm | None = None, **overrides: Any) -> "KSPOracle":
        """Wrap a user's configured KSP so that the oracle's solves are the user's solves.

        Copied: KSP and PC type, tolerances, norm type and preconditioning side, and every option
        the KSP reads from the database — those under its prefix or, without one, the unprefixed
        options it reads (`ksp_*`, `pc_*`, `sub_*`, `mg_levels_*`, `fieldsplit_*`, ...), found by
        configuring a trial copy on the user's operators and asking PETSc which it read.
        Monitors and viewers are dropped (logged). State set through the API that the options
        database does not hold is compared, not guessed: the trial copy's `KSPView` must equal
        the user's, and anything that differs (e.g. `setGMRESRestart` called in code), a DM,
        a separate preconditioning matrix, fieldsplit index sets or an operator's null space is
        named in a warning that points to `ksp_factory`. `overrides` are constructor arguments,
        e.g. `norm_type="unpreconditioned"` for a training cost that needs true residuals.
        """
        rtol, atol, divtol, max_it = ksp.getTolerances()
        prefix = ksp.getOptionsPrefix() or ""
        options, dropped = {}, []
        found = {}
        for key, value in PETSc.Options().getAll().items():
            if prefix and not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if re.match(r"^[a-z][a-z0-9_]*$", name):
                found[name] = value
        warn_if_trapped(ksp, found)
        for name, value in found.items():
            if _OUTPUT_ONLY.search(name):
                dropped.append(name)
            else:
                options[name] = value
        for key in ("ksp_type", "pc_type", "ksp_rtol", "ksp_atol", "ksp_divtol", "ksp_max_it", "ksp_norm_type", "ksp_pc_side"):
            options.pop(key, None)
        if dropped:
            logger.info("from_ksp: dropped output-only option(s) %s (they would print on every training solve)",
                        [f"-{prefix}{name}" for name in dropped])
        config = dict(ksp_type=ksp.getType(), pc_type=ksp.getPC().getType(), rtol=rtol, atol=atol, divtol=divtol,
                      max_it=max_it, options=options, norm_type=norm_name(ksp),
                      pc_side=_SIDE_NAMES.get(ksp.getPCSide()), comm=comm)
        config.update(overrides)
        oracle = cls(**config)
        oracle._match(ksp, prefix, explicit=set(overrides))
        return oracle

    def _match(self, user: PETSc.KSP, prefix: str, explicit: set[str]) -> None:
        """Keep only the copied options a trial copy reads, and warn about what could not be copied."""
        operators = operators_if_set(user)
        trial = self._configure(PETSc.KSP().create(comm=user.getComm()))
        if operators is not None:
            trial.setOperators(*operators)
        user_view = _view(user, prefix)
        user_set_up = operators is not None and not any(
            text in user_view for text in ("PC has not been set up", "type not yet set"))
        with prefixed_options(self.prefix, self.options):
            try:
                trial.setFromOptions()
                if not user_set_up:
                    trial_view = _view(trial, self.prefix)  # compared at the user's stage
                if operators is not None:
                    trial.setUp()  # options read only at setup (sub_*, factor levels) are read now
                    trial.setUpOnBlocks()  # block preconditioners set up their blocks in KSPSolve
                    if user_set_up:
                        trial_view = _view(trial, self.prefix)
                unread = unused_options(self.prefix, list(self.options)) if operators is not None else []
            finally:
                trial.destroy()
        for name in unread:
            del self.options[name]
        if unread and prefix:
            logger.warning("from_ksp: your KSP never reads %s either; not copied", [f"-{prefix}{n}" for n in unread])
        problems = _uncopyable(user, operators, prefix)
        if operators is None:
            problems.append("the KSP has no operators yet, so options read only at setup (sub_, mg_levels_, ...) "
                            "could not be checked: call setOperators before from_ksp")
        elif "type not yet set" not in user_view and not explicit & {
                "ksp_type", "pc_type", "rtol", "atol", "divtol", "max_it", "options", "norm_type", "pc_side"}:
            difference = [line for line in difflib.unified_diff(user_view.splitlines(), trial_view.splitlines(),
                                                                 "your KSP", "copy", n=0, lineterm="")
                          if line[:1] in "+-" and not line.startswith(("---", "+++"))]
            if difference:
                problems.append("its KSPView differs from the copy's (state set in code?):\n    "
                                + "\n    ".join(difference[:12]))
        if problems:
            logger.warning("from_ksp cannot reproduce this KSP exactly; pass KSPOracle(ksp_factory=...) "
                           "that builds it from A. " + " ".join(f"[{p}]" for p in problems))

    def budget_options(self, budget: Budget, task: LinearSystem) -> dict[str, Any]:
        """`ksp_rtol`/`ksp_atol`/`ksp_max_it`: KSPConvergedDefault divides by ‖b‖ (for a nonzero
        guess too), the cost's reference norm, when the norm is the unpreconditioned one."""
        return linear_options(budget)

    def solve_many(self, task: LinearSystem, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """Solve `task` once per setting, setting up the preconditioner once per distinct options."""
        parsed = [split_setting(s, self.options, size=task.size) for s in settings]
        outcomes: list[Outcome | None] = [None] * len(parsed)
        groups: dict[tuple, list[int]] = {}
        for i, split in enumerate(parsed):
            groups.setdefault(tuple(sorted(split.options.items())), []).append(i)
        for indices in groups.values():
            guesses = [parsed[i].guess for i in indices]
            for i, outcome in zip(indices, self._solve_group(task, parsed[indices[0]].options, guesses)):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _configure(self, ksp: PETSc.KSP) -> PETSc.KSP:
        """The built-in configuration, under the oracle's private prefix (options are read later)."""
        ksp.setType(self.ksp_type)
        ksp.getPC().setType(self.pc_type)
        ksp.setTolerances(rtol=self.rtol, atol=self.atol, divtol=self.divtol, max_it=self.max_it)
        ksp.setNormType(NORM_TYPES[self.norm_type])
        if self.pc_side is not None:
            ksp.setPCSide(PC_SIDES[self.pc_side])
        ksp.setOptionsPrefix(self.prefix)
        return ksp

    def _new_ksp(self, A: PETSc.Mat) -> PETSc.KSP:
        if self.ksp_factory is None:
            ksp = self._configure(PETSc.KSP().create(comm=self.comm))
            ksp.setOperators(A)
            return ksp
        ksp = self.ksp_factory(A)
        if not isinstance(ksp, PETSc.KSP):
            raise TypeError(f"ksp_factory returned {type(ksp).__name__}, not a PETSc KSP")
        return ksp

    def _set_up(self, ksp: PETSc.KSP) -> None:
        """Read the options and set up; an unsupported default norm falls back to the KSP's own."""
        ksp.setFromOptions()
        ksp.setConvergenceHistory(length=min(ksp.getTolerances()[3] + 1, HISTORY_LIMIT), reset=True)
        keep_convergence_test(ksp)
        try:
            ksp.setUp()
        except PETSc.Error:
            if self.ksp_factory is not None or self.norm_type != "unpreconditioned":
                raise
            ksp.setNormType(PETSc.KSP.NormType.DEFAULT)  # norms are resolved first thing in KSPSetUp
            ksp.setUp()

    def _solve_group(self, task: LinearSystem, options: dict[str, str], guesses: list[np.ndarray | None]) -> list[Outcome]:
        A, b = task.petsc(self.comm)
        flops, start = self._flops(), time.perf_counter()
        ksp = self._new_ksp(A)
        prefix = ksp.getOptionsPrefix() or ""
        try:
            with prefixed_options(prefix, options):
                try:
                    with stage("oracle setup"):
                        self._set_up(ksp)
                except PETSc.Error as error:
                    if (interrupt := signal_ended(error)) is not None:
                        raise interrupt from None
                    message = f"PETSc error during KSP setup ({ksp.getType()}/{ksp.getPC().getType()}): {error}"
                    return [Outcome.failure(message, seconds=time.perf_counter() - start) for _ in guesses]
                setup_seconds, setup_flops = time.perf_counter() - start, self._flops() - flops
                x = A.createVecRight()
                deadline = Deadline(self.timeout, ksp.getComm()) if self.timeout is not None else None
                if deadline is not None:
                    deadline.attach(ksp)
                outcomes = []
                for i, x0 in enumerate(guesses):
                    with stage("oracle solve"):
                        outcomes.append(self._solve_one(ksp, b, x, x0, setup_seconds, setup_flops, deadline))
                    if i == 0:
                        check_used(prefix, options, f"ksp_type={ksp.getType()} pc_type={ksp.getPC().getType()}")
                return outcomes
        finally:
            ksp.destroy()

    def _flops(self) -> float:
        """PETSc's flop counter summed over the solve's communicator."""
        local = PETSc.Log.getFlops()
        return local if self.comm.getSize() == 1 else self.comm.tompi4py().allreduce(local)

    def _solve_one(self, ksp: PETSc.KSP, b: PETSc.Vec, x: PETSc.Vec, x0: np.ndarray | None,
                   setup_seconds: float, setup_flops: float, deadline: Deadline | None = None) -> Outcome:
        if x0 is None:
            x.zeroEntries()
            ksp.setInitialGuessNonzero(False)
        else:
            start, end = x.getOwnershipRange()
            x.setArray(x0[start:end])
            ksp.setInitialGuessNonzero(True)
        flops, begin = self._flops(), time.perf_counter()
        if deadline is not None:
            deadline.start()
        try:
            ksp.solve(b, x)
        except PETSc.Error as error:
            if (interrupt := signal_ended(error)) is not None:
                raise interrupt from None
            return Outcome.failure(f"PETSc error in KSPSolve: {error}", seconds=time.perf_counter() - begin)
        seconds = time.perf_counter() - begin
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
            norm_type=norm_name(ksp),
            flops=self._flops() - flops,
            setup_flops=setup_flops,
            error=f"timed out after {self.timeout:g} s (solver.timeout), at iteration {ksp.getIterationNumber()}"
            if deadline is not None and deadline.expired else None,
        )

    def __repr__(self) -> str:
        if self.ksp_factory is not None:
            return f"KSPOracle(ksp_factory={self.ksp_factory!r}, options={self.options})"
        return (f"KSPOracle(ksp_type={self.ksp_type!r}, pc_type={self.pc_type!r}, rtol={self.rtol}, "
                f"max_it={self.max_it}, norm_type={self.norm_type!r}, options={self.options}"
                + (f", timeout={self.timeout:g})" if self.timeout is not None else ")"))


def operators_if_set(ksp: PETSc.KSP) -> tuple[PETSc.Mat, PETSc.Mat] | None:
    """The KSP's (A, P) if set; KSPGetOperators would create empty ones, so ask KSPGetOperatorsSet."""
    lib = libpetsc()
    lib.KSPGetOperatorsSet.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    has_a, has_p = ctypes.c_int(0), ctypes.c_int(0)
    if lib.KSPGetOperatorsSet(ctypes.c_void_p(ksp.handle), ctypes.byref(has_a), ctypes.byref(has_p)) != 0:
        raise RuntimeError("KSPGetOperatorsSet failed")
    return ksp.getOperators() if has_a.value else None


def _uncopyable(ksp: PETSc.KSP, operators: tuple[PETSc.Mat, PETSc.Mat] | None, prefix: str) -> list[str]:
    """State a KSP holds outside the options database that an oracle cannot rebuild per task."""
    problems = []
    if ksp.getPC().getDM():
        problems.append("a DM is attached; the oracle solves each task's own A without it")
    if operators is not None:
        A, P = operators
        if A.handle != P.handle:
            problems.append("a separate preconditioning matrix; the oracle preconditions with each task's A")
        if A.getNullSpace() or A.getNearNullSpace():
            problems.append("your operator carries a (near) null space; attach it to every task's A")
    if ksp.getPC().getType() == PETSc.PC.Type.FIELDSPLIT:
        problems.append("fieldsplit index sets set in code (PCFieldSplitSetIS) are not copied")
    if ksp.getConvergenceTest() is not None:
        problems.append("a convergence test set in code is not copied")
    return problems


def _view(ksp: PETSc.KSP, prefix: str) -> str:
    """KSPView as text, with the options prefix taken out so two KSPs can be compared."""
    handle, path = tempfile.mkstemp(prefix="metasolve-kspview-", suffix=".txt")
    os.close(handle)
    try:
        viewer = PETSc.Viewer().createASCII(path, comm=ksp.getComm())
        ksp.view(viewer)
        viewer.destroy()
        with open(path) as stream:
            text = stream.read()
    finally:
        os.unlink(path)
    if prefix:
        text = text.replace(f"({prefix}", "(").replace("() ", "").replace(f"-{prefix}", "-")
    return text
