"""A time limit on an in-process solve, and the signals that must still stop it.

PETSc's iteration loop is C: a hung solve never returns to the interpreter, so neither
`solver.timeout` nor a scheduler's SIGTERM can act on it unless a Python callback runs inside
the loop. `Deadline` is that callback. Where no callback runs at all (a hang inside a
preconditioner's set-up), `solvers.process_tree.handle_first_signal` makes a second signal
end the process.
"""
from __future__ import annotations

import math
import time

from solvers._petsc import MPI, PETSc


class Deadline:
    """A KSP convergence test that ends a solve still iterating after `seconds` (DIVERGED_USER).

    A Python callback on purpose: PETSc's C loop never returns to the interpreter, so without
    one a hung solve ignores SIGTERM and SIGINT (Python only runs its signal handlers between
    bytecodes); inside this test they run every iteration, and a handler that raises (the CLI's
    exit with 128 + signal, a second SIGINT) ends the solve (`KSPOracle._solve_one` re-raises it).
    It runs before PETSc's own test and otherwise says "keep iterating", so a solve that ends in
    time is bitwise the solve without it. On more than one rank the ranks decide together, every
    `RANKS_DECIDE_EVERY` iterations (one small allreduce), else one rank would leave a collective
    iteration the others stay in. The clock starts at `start()`; the preconditioner's setup is
    not timed.

    Cost: petsc4py's dispatch of a Python callback, about half a microsecond per iteration, is
    most of it; checking the clock only every k-th iteration saves nothing measurable on one rank
    (measured on ~1 ms and ~60 ms CG + Jacobi solves when `timeout` was added).
    """

    RANKS_DECIDE_EVERY = 16

    def __init__(self, seconds: float, comm: PETSc.Comm) -> None:
        self.seconds = float(seconds)
        self.mpi = comm.tompi4py() if comm.getSize() > 1 else None
        self.end, self.expired = math.inf, False

    def start(self) -> None:
        self.end, self.expired = time.perf_counter() + self.seconds, False

    def __call__(self, ksp: PETSc.KSP, iteration: int, rnorm: float) -> int | None:
        if self.mpi is None:
            late = time.perf_counter() > self.end
        elif iteration % self.RANKS_DECIDE_EVERY == 0:
            late = self.mpi.allreduce(time.perf_counter() > self.end, op=MPI.LOR)
        else:
            return None
        if not late:
            return None
        self.expired = True
        return PETSc.KSP.ConvergedReason.DIVERGED_USER

    def attach(self, ksp: PETSc.KSP) -> None:
        """Run before the KSP's own convergence test (a Python one set by a `ksp_factory` included)."""
        own = ksp.getConvergenceTest()
        if own is None:
            ksp.addConvergenceTest(self, prepend=True)
            return
        test, args, kargs = own
        ksp.setConvergenceTest(lambda k, i, r: self(k, i, r) or test(k, i, r, *args, **kargs))


def signal_ended(error: PETSc.Error) -> BaseException | None:
    """The SystemExit/KeyboardInterrupt a signal handler raised inside a Python callback of the
    solve, which petsc4py hands back as the cause of a PETSc error: it must end the run, not
    become a failed solve."""
    cause = error.__cause__
    return cause if isinstance(cause, BaseException) and not isinstance(cause, Exception) else None

