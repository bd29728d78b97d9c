"""The one solve-and-cost path: (task, settings) → the solver's Outcomes → costs.

Every place that solves — a training round (`BlackBox`), the evaluation table, keep-better,
the diagnosis of a failed run — goes through `measure`, so that the cost's solver budget is
merged in one place (never by a caller), a failed solve is NaN with the solver's reason beside
it, and a caller counts exactly what it asked for.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metasolve.method.protocols import Cost, Oracle
from solvers.oracle import as_oracle
from solvers.outcome import Outcome

PURPOSES = ("training", "evaluation", "diagnosis")
"""Why a solve was spent: to train (the budget a learning curve is plotted against), to evaluate
a predictor (held-out costs, keep-better, the evaluation table), or to diagnose a failed run."""


@dataclass(frozen=True)
class Measurement:
    """One solve: its cost (NaN when it gave no usable value), the Outcome, and why it failed."""

    value: float
    outcome: Outcome
    failure: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None


def failure_text(outcome: Outcome) -> str:
    """Why a solve gave no usable cost, in the solver's own words where it has them."""
    if outcome.error:
        return str(outcome.error).strip()
    residuals = outcome.residuals
    if residuals is not None and len(residuals) and not all(math.isfinite(float(r)) for r in residuals):
        return f"non-finite residual norm (reason {outcome.reason})"
    if outcome.failed:
        return f"diverged (reason {outcome.reason})"
    return f"the cost is undefined for this outcome (reason {outcome.reason}, not converged)"


def measure(oracle: Oracle, cost: Cost, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Measurement]:
    """Solve `task` under every setting (∪ the cost's budget) in one `solve_many` call and cost each."""
    outcomes = as_oracle(oracle).solve_within(cost.budget, task, settings)
    results = []
    for outcome in outcomes:
        value = float(cost(outcome, task))
        results.append(Measurement(value, outcome, failure_text(outcome) if math.isnan(value) else None))
    return results


@dataclass
class SolveStats:
    """Solves spent, by purpose (`PURPOSES`), and training failures survived.

    Callers count after their executor round has gathered every result, so every MPI rank holds
    the same counts (and a resumed run the same as an uninterrupted one)."""

    solves: int = 0
    """Training solves: the centre and query solves of every step, and a supervised start's."""
    evaluation_solves: int = 0
    diagnosis_solves: int = 0
    failed_queries: int = 0
    failed_centres: int = 0

    def count(self, purpose: str, n: int) -> None:
        """Add `n` solves spent for `purpose` ("training", "evaluation" or "diagnosis")."""
        if purpose == "training":
            self.solves += int(n)
        elif purpose == "evaluation":
            self.evaluation_solves += int(n)
        elif purpose == "diagnosis":
            self.diagnosis_solves += int(n)
        else:
            raise ValueError(f"a solve's purpose must be one of {PURPOSES}, got {purpose!r}")

    def state_dict(self) -> dict[str, int]:
        return {"solves": self.solves, "evaluation_solves": self.evaluation_solves,
                "diagnosis_solves": self.diagnosis_solves, "failed_queries": self.failed_queries,
                "failed_centres": self.failed_centres}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.solves, self.evaluation_solves = int(state["solves"]), int(state["evaluation_solves"])
        self.diagnosis_solves = int(state["diagnosis_solves"])
        self.failed_queries, self.failed_centres = int(state["failed_queries"]), int(state["failed_centres"])


__all__ = ["PURPOSES", "Measurement", "SolveStats", "failure_text", "measure"]
