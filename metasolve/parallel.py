"""Executors: `executor.map(fn, items)` serially or across MPI ranks, with the same result.

SPMD, like data-parallel training: every rank calls `map` with the same `fn` and `items`. Items
are cut into contiguous blocks, one per worker — a rank, or a group of `group_size` ranks that
solve each item together on their sub-communicator. Block sizes differ by at most one, the first
`len(items) % workers` workers taking the longer ones (`block`). Each worker runs `fn` on its
block and the blocks are all-gathered and concatenated, so every rank gets the list the serial
executor returns, bit for bit, whatever the number of ranks — provided `fn(item)` depends on
the item alone (a rank's private state, such as a random generator it advances, must not leak in).
"""
from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from solvers._petsc import MPI, PETSc

Item = TypeVar("Item")
Result = TypeVar("Result")


def block(n_items: int, n_workers: int, worker: int) -> range:
    """Indices of the items `worker` solves: a contiguous block, sizes differing by at most one."""
    base, extra = divmod(n_items, n_workers)
    start = worker * base + min(worker, extra)
    return range(start, start + base + (worker < extra))


class RemoteError(RuntimeError):
    """An exception raised by `fn` on one rank, raised again on every rank.

    Only text travels between ranks (exceptions need not be picklable): the failing rank, the
    item's index, the original type's name and message; the remote traceback is the `__cause__`.
    """

    def __init__(self, rank: int, index: int, kind: str, message: str) -> None:
        super().__init__(f"item {index} failed on rank {rank}: {kind}: {message}")
        self.rank, self.index, self.kind, self.message = rank, index, kind, message


class _RemoteTraceback(Exception):
    """Carries the traceback text of the failing rank, so it is printed under the RemoteError."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


class SerialExecutor:
    """One process: `map` is a list comprehension and exceptions propagate unchanged."""

    rank = 0
    size = 1
    is_root = True
    solve_comm = PETSc.COMM_SELF

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        return [fn(item) for item in items]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""


class MPIExecutor:
    """Split `map` across the ranks of `comm` (collective: every rank must construct it and call `map`).

    With `group_size = g > 1`, `comm` is split into size/g groups of g consecutive ranks; every
    rank of a group calls `fn(item)` for the group's items, solving collectively on
    `solve_comm` (the group's communicator for PETSc), and the group's rank 0 contributes the
    results. With g = 1 each rank solves alone on `PETSc.COMM_SELF`.

    If `fn` raises on any rank, every rank raises `RemoteError` naming the rank, the item and
    the original message; a worker stops at its first failure (a group decides together after
    each item, so its ranks stay in step). One limit no executor can lift: a rank that raises in
    the middle of a collective solve leaves the rest of its group waiting inside PETSc.
    """

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD, group_size: int = 1) -> None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if self.size % group_size:
            raise ValueError(f"group_size = {group_size} does not divide the {self.size} MPI ranks")
        self.is_root = self.rank == 0
        self.group_size = group_size
        self.workers, self.worker = self.size // group_size, self.rank // group_size
        self.group = comm.Split(color=self.worker, key=self.rank)
        self.solve_comm = PETSc.COMM_SELF if group_size == 1 else PETSc.Comm(self.group)

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
        """`[fn(item) for item in items]` on every rank; one all-gather, in which only leaders send results."""
        items = list(items)
        results, error = [], None
        for index in block(len(items), self.workers, self.worker):
            try:
                results.append(fn(items[index]))
            except Exception as exc:
                error = (self.rank, index, type(exc).__name__, str(exc), traceback.format_exc())
            if self.group.allreduce(error is not None, op=MPI.LOR):
                break
        is_leader = self.group.Get_rank() == 0
        gathered = self.comm.allgather((results if is_leader else None, error))
        errors = [error for _, error in gathered if error is not None]
        if errors:
            rank, index, kind, message, text = min(errors, key=lambda e: (e[1], e[0]))
            raise RemoteError(rank, index, kind, message) from _RemoteTraceback(text)
        return [result for leader_results, _ in gathered if leader_results is not None for result in leader_results]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. a checkpoint only the root has read)."""
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()


ABORT_GRACE_SECONDS = 1.0


def abort_on_uncaught_exception() -> None:
    """Let an exception that escapes on one rank end the whole MPI job instead of hanging it.

    Without this, the other ranks wait forever in their next collective. The installed
    `sys.excepthook` prints the traceback as before, then calls `MPI.COMM_WORLD.Abort(1)` when
    there is more than one rank. Installing it twice is harmless.
    """
    previous = sys.excepthook
    if getattr(previous, "aborts_mpi", False):
        return

    def print_and_abort(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        rank = MPI.COMM_WORLD.Get_rank()
        print(f"error on rank {rank}: {kind.__name__}: {value}", file=sys.stderr, flush=True)
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        if MPI.COMM_WORLD.Get_size() > 1:
            # MPI_Abort kills every rank at once, output still in flight included: give the
            # launcher a moment to forward what this rank (and others failing alike) printed.
            time.sleep(ABORT_GRACE_SECONDS)
            MPI.COMM_WORLD.Abort(1)

    print_and_abort.aborts_mpi = True  # type: ignore[attr-defined]
    sys.excepthook = print_and_abort
