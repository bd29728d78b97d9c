"""The base class of every black box: a solver as a pure function of (task, setting).

The contract, which `tests/test_oracle_conformance.py` checks on every oracle here:

- `solve_many(task, settings)` returns one `Outcome` per setting, in order, exactly what
  `[oracle(task, s) for s in settings]` would (it may share work: one preconditioner setup for
  settings that differ only in the guess; a Newton oracle may warm-start later settings from the
  first one's solution, which changes the start, not the converged result).
- The same call twice gives the same result: nothing set for one solve reaches the next.
- A setting is a guess (`x0`/`u0`) and PETSc options (`solvers.options.split_setting` is the one
  translation). An option the solver never read, or a malformed guess, raises ValueError naming
  it: training on it would learn a constant.
- A solve that fails — divergence, a PETSc error, a crash — is a failed `Outcome` whose `error`
  (or reason) says why; it never raises.
- `budget_options(budget, task)` says how this solver is told a cost's `Budget`; `solve_within`
  runs settings with it, and a solve then never runs past `budget.max_it` iterations.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from solvers.budget import Budget, linear_options
from solvers.outcome import Outcome


class Oracle(ABC):
    """A real solver behind `oracle(task, setting) -> Outcome` (see the module docstring)."""

    @abstractmethod
    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """One Outcome per setting, in order."""

    def __call__(self, task: Any, setting: Mapping[str, Any] | None = None) -> Outcome:
        return self.solve_many(task, [setting or {}])[0]

    def budget_options(self, budget: Budget, task: Any) -> dict[str, Any]:
        """The setting entries that make this solver stop where `budget` says on `task`."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to stop within a Budget: "
                                  "implement budget_options(budget, task)")

    def solve_within(self, budget: Budget | None, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """`solve_many` with the budget's options laid over every setting (None: the solver's own stop)."""
        if budget is None:
            return self.solve_many(task, settings)
        extra = self.budget_options(budget, task)
        return self.solve_many(task, [{**setting, **extra} for setting in settings])


class CallableOracle(Oracle):
    """A bare `fn(task, setting) -> Outcome` as an Oracle: settings solved one by one, a budget
    handed over as `ksp_rtol`/`ksp_atol`/`ksp_max_it` entries (what costs' `overrides` sent)."""

    def __init__(self, fn: Callable[[Any, Mapping[str, Any]], Outcome]) -> None:
        if not callable(fn):
            raise TypeError(f"an oracle must be callable as fn(task, setting) -> Outcome, got {fn!r}")
        self.fn = fn

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return [self.fn(task, setting) for setting in settings]

    def budget_options(self, budget: Budget, task: Any) -> dict[str, Any]:
        return linear_options(budget)

    def __repr__(self) -> str:
        return f"CallableOracle({self.fn!r})"


def as_oracle(oracle: Oracle | Callable[[Any, Mapping[str, Any]], Outcome]) -> Oracle:
    """`oracle` itself if it is an `Oracle`, else a bare callable wrapped in `CallableOracle`."""
    return oracle if isinstance(oracle, Oracle) else CallableOracle(oracle)


__all__ = ["CallableOracle", "Oracle", "as_oracle"]
