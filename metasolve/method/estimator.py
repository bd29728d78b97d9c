"""The gradient estimator's lifecycle: the hooks `BlackBox` and the `Trainer` call, and when.

An estimator turns solves at planned points into ∂L/∂θ. It may also *learn* from those solves
(a surrogate, a cost model, the moments of a control-variate coefficient, the memory of guided
tangents). Learning is kept out of the estimate itself, in the style of optax: the estimate is
a pure function of the estimator's state and the step's data, and the state changes in one
declared place, run once per step by the driver. One training step, as `BlackBox` drives it on
every MPI rank alike:

    work = estimator.deferred()                  # what the last estimate left to learn, or None
    if work is not None and work.before_queries:
        estimator.adopt(work.run())              # here, on every rank
    points = estimator.queries(theta, generator, tasks)
    ... one executor round: every task with its points, and work.run as one more item ...
    estimator.adopt(result of work.run)          # on every rank, whichever rank ran it
    estimate = estimator.gradient(theta, points, values, upstream, tasks)   # backward: pure
    estimator.observe(theta, points, values, upstream, tasks)              # backward: keep the data

Why this shape: `gradient` can be called again (a reference comparison, a test) and give the same
answer; no MPI collective and no training runs inside autograd's backward; and the learning —
the largest cost of a step besides the solves — becomes one work item that one rank runs while
the others solve (`metasolve.training.parallel.MPIExecutor` balances it like a solve), with every
rank adopting the result, identical to learning in place. `tests/test_estimator_conformance.py`
checks these contracts on every estimator.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Deferred:
    """Learning an estimate left for later: `run()` computes it, `Estimator.adopt(result)` takes it.

    `run` may execute on any one rank (its result is sent to all), so it must only read the
    estimator's state, or change it in ways `adopt` then overwrites on every rank alike.
    `before_queries`: the next `queries` depend on the result (guided tangents follow the
    surrogate; query allocation follows the residuals), or `run` is collective (a surrogate
    update split over the ranks): then every rank runs it itself before the next queries
    instead of one rank during the next executor round.
    """

    run: Callable[[], Any]
    before_queries: bool = False


class Estimator(ABC):
    """Base of every gradient estimator; the hooks below are all that callers use.

    Only `gradient` must be written; every other hook has a default that suits an estimator
    without state (`ForwardGradient` with random tangents, `Exact`).
    """

    uses_centre: bool = True
    """Whether the estimate needs the centre's value f(θ). When it does, `BlackBox` zeroes the
    gradient of a sample whose centre solve failed (a difference against nothing is meaningless);
    an estimator that uses the centre only as an optional baseline (a score function on purely
    discrete settings) sets False, so a failing deployed choice still moves the policy."""

    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any]) -> torch.Tensor:
        """The points to solve besides each centre, [B, Q, d] float64; a NaN point is not solved.

        Called once per step in the forward pass, before the executor round, on every rank with the
        same `generator` state. Default: no points (an estimate from the centre alone)."""
        return theta.new_zeros((theta.shape[0], 0, theta.shape[1]), dtype=torch.float64)

    @abstractmethod
    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        """∂L/∂θ [B, d] from `values` [B, 1 + Q] (column 0 the centre, NaN a failed or unasked solve)
        and ∂L/∂f `upstream` [B].

        Called in the backward pass. It must have no side effects: no learning, no collective, no
        change to `state_dict()` — called twice, it returns the same tensor."""

    def observe(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                upstream: torch.Tensor, tasks: Sequence[Any]) -> None:
        """Keep what `deferred` will learn from (the data only; the learning is `deferred`'s).

        Called once per estimate, by the driver, right after `gradient` with the same arguments.
        Default: nothing to keep."""

    def deferred(self) -> Deferred | None:
        """The learning the last observed estimate left, or None when there is none.

        Called at the start of each training round's forward pass on every rank. Default: None."""
        return None

    def adopt(self, result: Any) -> None:
        """Take `deferred().run()`'s result, computed here or on another rank; called on every rank.

        Default: an estimator that declares no work has nothing to adopt."""
        raise RuntimeError(f"{type(self).__name__} declared no deferred work, so it has nothing to adopt")

    def settle(self) -> None:
        """Run the deferred work here and now, on every rank alike (the Trainer before steps on the
        `surrogate_objective`, which must see this step's solves; a driver outside `BlackBox`)."""
        work = self.deferred()
        if work is not None:
            self.adopt(work.run())

    def surrogate_objective(self, theta: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor | None:
        """A differentiable stand-in for the solver's cost at θ, [B], or None when there is none.

        Called by the Trainer for its `surrogate_steps` (optimizer steps that need no solve), after
        `settle()`. Default: None."""
        return None

    def metrics(self) -> dict[str, float]:
        """Online quality of the latest estimate (a surrogate's held-out cosine, β, ...), for the
        Trainer's metrics row after each step. Must not change the state. Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit, as tensors and plain data
        (checkpoints load with `weights_only=True`). Default: no state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`. Default: the state must be empty."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


__all__ = ["Deferred", "Estimator"]
