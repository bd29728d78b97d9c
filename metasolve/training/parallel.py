"""Executors: `executor.map(fn, items)` serially or across MPI ranks, with the same result.

SPMD, like data-parallel training: every rank calls `map` with the same `fn` and `items`. Each
worker — a rank, or a group of `group_size` ranks that solve each item together on their
sub-communicator — runs `fn` on the items assigned to it; the results are all-gathered and
placed by item index, so every rank gets the list the serial executor returns, bit for bit,
whatever the number of ranks and whatever the assignment — provided `fn(item)` depends on the
item alone (a rank's private state, such as a random generator it advances, must not leak in).

Two schedules decide who solves what:
- `static`: contiguous blocks whose sizes differ by at most one (`block`).
- `balanced` (default): longest expected first (LPT, Graham 1969), each item to the worker that
  is free first. The expected cost of an item is the wall time the same key took the last time
  it was solved (every worker's measured seconds travel in the all-gather, so every rank holds
  the same numbers and computes the same order); unseen keys cost the mean of the known ones.
  With one rank per worker the items are handed out as the ranks free up: a counter in an MPI
  window on rank 0, which each rank increments atomically (`Fetch_and_op`, a few µs, no help
  from rank 0 needed) to take the next item in that order. Expected costs then only set the
  order; who runs what follows the actual costs, so a mispredicted item, a rank that entered
  the round late (the root writes metrics and checkpoints) or a machine shared with other jobs
  no longer leaves a worker idle at the all-gather. A group of ranks (`group_size` > 1) gets
  its items by LPT on the expected costs, decided ahead. Solve costs within one batch differ
  by 10x and more (grid sizes, iteration counts); with contiguous blocks the rank that drew the
  slow block makes every other rank wait at the all-gather. LPT's makespan is at most
  4/3 − 1/(3P) of the optimum, and within one item's cost of the mean load.

Rounds too short to share. Sharing a round saves (total − makespan) seconds of solving and costs
the exchange: what the busiest worker's round took beyond its own work (the all-gather, and
waiting for a worker that started late), measured on every rank and carried, one round late, in
the next all-gather (so every rank holds the same number). The busiest worker's, not the largest
on any rank: a worker with less work waits for the busiest one, and that wait is the imbalance
(makespan − mean load) the saving already counts. When the expected saving is below that
overhead, every rank computes every item itself — no message at all, the same results bit for
bit, since `fn(item)` depends on the item alone — and the job runs at the one-rank speed instead
of below it. Timings are not updated in such a round (they would differ between ranks); every
`REFRESH`-th replicated round is shared again to re-measure. Decisions use only numbers every
rank holds, so all ranks decide alike.

The all-gather carries bytes a fast pickler wrote: a torch tensor travels as its numpy array,
rebuilt bit for bit on arrival (torch's own pickling of a surrogate update — weights, Adam
moments, generator state: some 30 small tensors — is an order of magnitude slower to write and
to read, and cost a round of ~1 ms solves more than its solves). A rank reads only the others'
contributions and keeps its own results as they are, as the serial executor returns them.

A stop request (SIGTERM/SIGINT, `agree_to_stop`) travels in the same all-gather: each rank adds
its own, read when it sends, and every rank acts on the first in rank order. A training step then
has one collective, not a second one that waits for the root's metrics and checkpoint writes; only
a step without a shared round (all replicated) agrees with a collective of its own.
"""
from __future__ import annotations

import atexit
import heapq
import io
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from metasolve.method.protocols import SerialExecutor  # noqa: F401  (the serial executor lives beside the protocol)
from solvers._petsc import MPI, PETSc

Item = TypeVar("Item")
Result = TypeVar("Result")

SCHEDULES = ("static", "balanced")
REFRESH = 8
"""A replicated round is shared again after this many, to re-measure what sharing costs."""

_WINDOWS: list[Any] = []
"""The executors' MPI windows, freed together (collectively, in creation order reversed) at exit,
before MPI finalizes: a window left open makes UCX print warnings to stdout at exit."""


@atexit.register  # after mpi4py's and petsc4py's own, so it runs before they finalize MPI
def _free_windows() -> None:
    while _WINDOWS:
        window = _WINDOWS.pop()
        window.Unlock_all()
        window.Free()


def block(n_items: int, n_workers: int, worker: int) -> range:
    """Indices of the items `worker` solves: a contiguous block, sizes differing by at most one."""
    base, extra = divmod(n_items, n_workers)
    start = worker * base + min(worker, extra)
    return range(start, start + base + (worker < extra))


def longest_first(costs: Sequence[float], n_workers: int) -> list[list[int]]:
    """Item indices per worker, by LPT: items in order of decreasing cost (ties: lower index
    first), each to the worker with the least load so far (ties: lower worker). Each worker's
    list is returned in index order. A pure function of its arguments: every rank that calls it
    with the same costs gets the same assignment."""
    loads = [(0.0, worker) for worker in range(n_workers)]
    owned: list[list[int]] = [[] for _ in range(n_workers)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, worker = heapq.heappop(loads)
        owned[worker].append(index)
        heapq.heappush(loads, (load + costs[index], worker))
    return [sorted(indices) for indices in owned]


def _tensor_from_array(array: np.ndarray, requires_grad: bool) -> Any:
    import torch

    return torch.from_numpy(array).requires_grad_(requires_grad)


class _Pickler(pickle.Pickler):
    """Pickles a plain CPU torch tensor as its numpy array (bits and dtype kept; views of one
    storage arrive as separate arrays); anything else, a tensor numpy cannot hold included, as
    pickle does. torch is looked up, not imported: without it there are no tensors to send."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is None or type(obj) is not torch.Tensor:
            return NotImplemented
        try:
            array = obj.detach().numpy()
        except (TypeError, RuntimeError):  # bfloat16, other devices, sparse, conjugate views, ...
            return NotImplemented
        return _tensor_from_array, (array, obj.requires_grad)


def dumps(obj: Any) -> bytes:
    """`obj` as bytes for the all-gather; `pickle.loads` reads it back."""
    stream = io.BytesIO()
    _Pickler(stream, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return stream.getvalue()


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


class MPIExecutor:
    """Split `map` across the ranks of `comm` (collective: every rank must construct it and call `map`).

    With `group_size = g > 1`, `comm` is split into size/g groups of g consecutive ranks; every
    rank of a group calls `fn(item)` for the group's items, solving collectively on
    `solve_comm` (the group's communicator for PETSc), and the group's rank 0 contributes the
    results. With g = 1 each rank solves alone on `PETSc.COMM_SELF`.

    `schedule` is `"balanced"` (longest expected first, costs learned per key) or `"static"`
    (contiguous blocks); see the module docstring. `item_seconds` holds the measured seconds of
    each item of the last `map` (by index, on every rank), e.g. to judge the balance.

    If `fn` raises on any rank, every rank raises `RemoteError` naming the rank, the item and
    the original message; a worker stops at its first failure (a group decides together after
    each item, so its ranks stay in step). One limit no executor can lift: a rank that raises in
    the middle of a collective solve leaves the rest of its group waiting inside PETSc.
    """

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD, group_size: int = 1, schedule: str = "balanced") -> None:
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if self.size % group_size:
            raise ValueError(f"group_size = {group_size} does not divide the {self.size} MPI ranks")
        self.is_root = self.rank == 0
        self.group_size, self.schedule = group_size, schedule
        self.workers, self.worker = self.size // group_size, self.rank // group_size
        self.group = comm.Split(color=self.worker, key=self.rank)
        self.solve_comm = PETSc.COMM_SELF if group_size == 1 else PETSc.Comm(self.group)
        self.expected_seconds: dict[Hashable, float] = {}
        self.item_seconds: list[float] = []
        self.overhead = 0.0  # seconds a shared round spends beyond its busiest worker's work (smoothed)
        self.replicated_rounds = 0  # how many rounds ran replicated since the last shared one
        self.total_rounds = self.total_replicated = 0  # rounds (`map` calls) in all, and how many ran replicated
        self._last_round = (0.0, 0.0)  # this rank's (work, overhead) in its last shared round, sent with the next
        self._stop_requested: Callable[[], int | None] = lambda: None  # read when a shared round sends
        self._stop_agreed: int | None = None  # the first stop request the shared rounds since `agree_to_stop` carried
        self._shared_since_agreed = False
        # Items handed out as ranks free up (one rank per worker, balanced): a counter on rank 0.
        # Each shared round every rank takes until it draws past the round's items, so the counter
        # ends every round at `_dealt` (the same number on every rank) without a reset.
        self.dynamic = schedule == "balanced" and group_size == 1 and self.size > 1
        self._dealt = 0
        if self.dynamic:
            self._counter = MPI.Win.Allocate(8 if self.is_root else 0, 8, comm=comm)
            if self.is_root:
                np.frombuffer(self._counter.tomemory(), dtype=np.int64)[:] = 0
            comm.Barrier()
            self._counter.Lock_all()
            _WINDOWS.append(self._counter)
            self._one, self._taken = np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64)

    def replicate(self, n_items: int, keys: Sequence[Hashable] | None) -> bool:
        """Whether every rank should compute every item of this round itself (see the module
        docstring): only with the balanced schedule, keys whose costs are all known, and a
        measured overhead larger than what sharing would save."""
        if self.schedule != "balanced" or keys is None or self.workers == 1 or not self.overhead:
            return False
        if any(key not in self.expected_seconds for key in keys) or self.replicated_rounds >= REFRESH:
            return False
        costs = [self.expected_seconds[key] for key in keys]
        loads = [sum(costs[i] for i in owned) for owned in longest_first(costs, self.workers)]
        return sum(costs) - max(loads) < self.overhead

    def assignment(self, n_items: int, keys: Sequence[Hashable] | None = None) -> list[list[int]]:
        """Item indices per worker for a `map` over `n_items` items with these `keys`, decided ahead
        (the static schedule; the balanced one for groups of ranks)."""
        if self.schedule == "static":
            return [list(block(n_items, self.workers, w)) for w in range(self.workers)]
        return longest_first(self._expected(n_items, keys), self.workers)

    def order(self, n_items: int, keys: Sequence[Hashable] | None = None) -> list[int]:
        """The order in which the balanced schedule hands items out: longest expected first
        (ties: lower index first)."""
        costs = self._expected(n_items, keys)
        return sorted(range(n_items), key=lambda i: (-costs[i], i))

    def _expected(self, n_items: int, keys: Sequence[Hashable] | None) -> list[float]:
        known = self.expected_seconds
        fallback = sum(known.values()) / len(known) if known else 1.0
        return [known.get(key, fallback) for key in keys] if keys is not None else [1.0] * n_items

    def _owned(self, n_items: int, keys: Sequence[Hashable] | None) -> Iterator[int]:
        """The indices this worker runs: decided ahead, or (`dynamic`) taken one at a time from the
        counter, in `order`, until the counter passes the round's items. Must be run to its end."""
        if not self.dynamic:
            yield from self.assignment(n_items, keys)[self.worker]
            return
        order = self.order(n_items, keys)
        while True:
            self._counter.Fetch_and_op(self._one, self._taken, 0, 0, MPI.SUM)
            self._counter.Flush(0)
            position = int(self._taken[0]) - self._dealt
            if position >= n_items:
                break
            yield order[position]
        self._dealt += n_items + self.size  # every rank drew exactly once past the items

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item],
            keys: Sequence[Hashable] | None = None) -> list[Result]:
        """`[fn(item) for item in items]` on every rank; one all-gather, in which only leaders send results.

        `keys[i]` names what item i costs to compute (e.g. its task and the number of solves):
        the balanced schedule expects an item to take as long as its key took the last time.
        Keys need not be equal across ranks, only consistent on each (the same key for the
        same work), since the measured seconds travel by item index.
        """
        items = list(items)
        if keys is not None and len(keys) != len(items):
            raise ValueError(f"map got {len(items)} items but {len(keys)} keys")
        self.total_rounds += 1
        if self.replicate(len(items), keys):
            return self._replicated(fn, items)
        self.replicated_rounds = 0
        round_begin = time.perf_counter()
        owned = self._owned(len(items), keys)
        ran, results, seconds, error = [], [], [], None
        for index in owned:
            ran.append(index)
            begin = time.perf_counter()
            try:
                results.append(fn(items[index]))
            except Exception as exc:
                error = (self.rank, index, type(exc).__name__, str(exc), traceback.format_exc())
            seconds.append(time.perf_counter() - begin)
            if self.group_size > 1 and self.group.allreduce(error is not None, op=MPI.LOR):
                break
            if error is not None:
                break
        for _ in owned:  # the counter must pass the round's items on every rank; the error ends the round
            pass
        is_leader = self.group.Get_rank() == 0
        mine = (ran[:len(results)], results, seconds) if is_leader else None
        stop = self._stop_requested()
        payloads = self.comm.allgather(dumps((mine if error is None else None, error, self._last_round, stop)))
        gathered = [(mine, error, self._last_round, stop) if rank == self.rank else pickle.loads(payload)
                    for rank, payload in enumerate(payloads)]
        self._shared_since_agreed = True
        if self._stop_agreed is None:
            self._stop_agreed = next((signum for *_, signum in gathered if signum is not None), None)
        work = sum(seconds)
        self._last_round = (work, time.perf_counter() - round_begin - work)
        # The busiest rank's overhead (ties: the lowest rank), the same number on every rank.
        _, previous = max((last for _, _, last, _ in gathered), key=lambda last: last[0])
        self.overhead = previous if not self.overhead else 0.5 * (self.overhead + previous)
        errors = [error for _, error, _, _ in gathered if error is not None]
        if errors:
            rank, index, kind, message, text = min(errors, key=lambda e: (e[1], e[0]))
            raise RemoteError(rank, index, kind, message) from _RemoteTraceback(text)
        placed: list[Any] = [None] * len(items)
        self.item_seconds = [0.0] * len(items)
        for contribution, *_ in gathered:
            if contribution is not None:
                for index, result, spent in zip(*contribution):
                    placed[index], self.item_seconds[index] = result, spent
        if keys is not None:
            self.expected_seconds.update(zip(keys, self.item_seconds))
        return placed

    def _replicated(self, fn: Callable[[Item], Result], items: list[Item]) -> list[Result]:
        """Every item on every rank, no message: an exception is the same on every rank (the
        same item fails alike everywhere), so it is raised as the serial executor raises it."""
        self.replicated_rounds += 1
        self.total_replicated += 1
        results, self.item_seconds = [], []
        for item in items:
            begin = time.perf_counter()
            results.append(fn(item))
            self.item_seconds.append(time.perf_counter() - begin)  # this rank's own: informational only
        return results

    def agree_to_stop(self, requested: Callable[[], int | None]) -> int | None:
        """The stop request every rank acts on after a step: the first (in rank order) that the
        shared rounds since the last call carried, each rank's read as it sent; with no shared
        round since, one all-gather of `requested()` now. Every rank decides alike which rounds
        are shared, so all take the same branch. `requested` is kept for the rounds to come."""
        self._stop_requested = requested
        if self._shared_since_agreed:
            agreed = self._stop_agreed
        else:
            agreed = next((signum for signum in self.comm.allgather(requested()) if signum is not None), None)
        self._stop_agreed, self._shared_since_agreed = None, False
        return agreed

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (e.g. a checkpoint only the root has read)."""
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return self.comm.allgather(obj)

    def allreduce(self, array: np.ndarray, op: str) -> np.ndarray:
        """Elementwise "max" or "sum" of every rank's `array` (integer arrays: exact, in any order)."""
        result = np.empty_like(array)
        self.comm.Allreduce(np.ascontiguousarray(array), result, op={"max": MPI.MAX, "sum": MPI.SUM}[op])
        return result

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
