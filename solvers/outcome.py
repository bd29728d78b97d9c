"""What one black-box solve returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Outcome:
    """Result of one solve of one task under one setting.

    `residuals` is the residual-norm history starting at iteration 0 (float64). A solve that
    only ran out of its iteration budget (`hit_max_it`) is usable data for costs measured after a
    fixed number of iterations; `failed` marks everything that is not: PETSc errors, crashes,
    divergence, non-finite residuals. `flops`/`setup_flops` are PETSc's own flop counts
    (`PetscGetFlops`) of the solve and of the setup, where the oracle counts them (0 otherwise).
    """

    residuals: np.ndarray
    iterations: int
    reason: int
    converged: bool
    seconds: float
    solution: np.ndarray | None = None
    error: str | None = None
    setup_seconds: float = 0.0
    hit_max_it: bool = False
    norm_type: str = "unpreconditioned"
    flops: float = 0.0
    setup_flops: float = 0.0
    solves: list = field(default_factory=list)
    """A program run's every solve (`solvers.monitor_parser.LinearSolve`/`NonlinearSolve`) in
    print order; the fields above aggregate them (`solvers.executable`). Empty for one in-process solve."""

    @property
    def failed(self) -> bool:
        if self.error is not None or self.residuals.size == 0:
            return True
        if not np.all(np.isfinite(self.residuals)):
            return True
        return not (self.converged or self.hit_max_it)

    @classmethod
    def failure(cls, message: str, reason: int = 0, seconds: float = 0.0) -> "Outcome":
        """An Outcome for a solve that raised or could not run; `message` says why."""
        return cls(
            residuals=np.empty(0),
            iterations=0,
            reason=reason,
            converged=False,
            seconds=seconds,
            error=message,
        )
