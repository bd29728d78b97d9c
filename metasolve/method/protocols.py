"""The public contracts between the method and the pieces a user may bring.

`BlackBox(oracle, space, cost, estimator, executor)` needs nothing from its oracle, cost and
executor beyond what is written here; any object with these methods works (duck typing, checked
by type checkers and, with `isinstance`, at run time). The estimator's contract is a base class,
`metasolve.method.estimator.Estimator`, because its hooks have defaults. The built-in implementations:
oracles `solvers.KSPOracle`, `solvers.SNESOracle`, `solvers.ExecutableOracle`; costs
`LogResidual`, `IterationProxy`, `Iterations`; executors `SerialExecutor`, `MPIExecutor`.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from metasolve.method.exact_sum import local_allreduce
from solvers._petsc import PETSc
from solvers.budget import Budget
from solvers.outcome import Outcome

Item = TypeVar("Item")
Result = TypeVar("Result")


@runtime_checkable
class Oracle(Protocol):
    """A solver as a pure function of (task, setting).

    A setting maps names to values: `x0` (or `u0`) an initial guess, anything else a PETSc option
    (`solvers.options.split_setting` is the one translation). Nothing set for one call may reach
    the next. Solver failures (divergence, a PETSc error, a crash) come back as a failed
    `Outcome`; a setting the solver cannot even read (an option PETSc never read, a malformed
    guess) raises ValueError, because training on it would learn nothing. Every solve of the
    method goes through `solve_many` (`metasolve.method.measure.measure`); `solvers.oracle.Oracle`
    is a base class that provides `__call__` from it.
    """

    def __call__(self, task: Any, setting: Mapping[str, Any] | None = None) -> Outcome: ...

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """One Outcome per setting, in order; free to share work between settings (one
        preconditioner setup for settings that differ only in the initial guess)."""
        ...


@runtime_checkable
class Cost(Protocol):
    """An Outcome (and its task) → one float; NaN when the solve gave no usable value.

    `budget` says where the cost's solves stop (a `solvers.budget.Budget`: a fixed iteration
    count, so the cost is smooth in θ, or a tolerance; None: the solver's own test), which each
    oracle turns into its own options (`solvers.oracle.Oracle.solve_within`); `failure_value` is
    what a failed solve is charged in reports (and in training under `failures="penalize"`).
    """

    budget: Budget | None

    def __call__(self, outcome: Outcome, task: Any) -> float: ...

    def failure_value(self, task: Any) -> float: ...


@runtime_checkable
class Executor(Protocol):
    """Runs one round of independent work items, serially or spread over MPI ranks.

    Every rank calls `map` with the same items and receives every result, in item order, so
    the training that follows is identical on all ranks. An exception on any rank is raised on
    every rank. `solve_comm` is the PETSc communicator a solve on this rank should use.
    """

    rank: int
    size: int
    is_root: bool
    solve_comm: Any

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item],
            keys: Sequence[Hashable] | None = None) -> list[Result]: ...

    def broadcast(self, obj: Any) -> Any: ...

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        ...

    def allreduce(self, array: Any, op: str) -> Any:
        """Elementwise "max" or "sum" of every rank's numpy `array`, on every rank."""
        ...

    def barrier(self) -> None: ...

    def agree_to_stop(self, requested: Callable[[], int | None]) -> int | None:
        """After a training step: the stop signal every rank acts on (any rank's `requested()`), or None."""
        ...


class SerialExecutor:
    """One process: `map` is a list comprehension and exceptions propagate unchanged."""

    rank = 0
    size = 1
    is_root = True
    solve_comm = PETSc.COMM_SELF

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item],
            keys: Sequence[Hashable] | None = None) -> list[Result]:
        """`keys` (for the MPI schedule) changes nothing here."""
        return [fn(item) for item in items]

    def broadcast(self, obj: Any) -> Any:
        return obj

    allreduce = staticmethod(local_allreduce)

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        """Nothing to wait for."""

    def agree_to_stop(self, requested: Callable[[], int | None]) -> int | None:
        """One process: its own stop request."""
        return requested()
