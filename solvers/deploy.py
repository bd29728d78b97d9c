"""A learned setting on a user's own KSP, applied as strictly as training applied it.

    with applied(ksp, setting, x):
        ksp.solve(b, x)

The setting goes the way it went in training (`split_setting`): options into the database
under the KSP's own prefix, read by `KSPSetFromOptions`, and after the block checked with
`PetscOptionsUsed` — a misspelt or inapplicable learned option raises the same `ValueError` as in
training instead of being ignored by PETSc. The options database is then left exactly as it was
found: options the block added are deleted, a user's own values (and their used-flags) restored.
An `x0` is copied into `x` with the nonzero-initial-guess flag, which is reset afterwards.
Richardson gets the monitor without which its fast SOR path skips the convergence test.

The KSP itself keeps the applied options after the block: PETSc has no undo, and deleting an
option does not return a solver to its previous value.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from types import TracebackType
from typing import Any

from solvers._petsc import PETSc
from solvers.ksp import keep_convergence_test, operators_if_set
from solvers.options import check_used, prefixed_options, split_setting


class applied:
    """Apply `setting` to the user's `ksp` (and its `x0` to `x`) for the duration of a `with` block.

    Solve inside the block: options a preconditioner reads only at setup (`sub_pc_type`,
    `pc_factor_levels`) are read by that solve, and the check runs after it. A KSP that was
    already set up is reset (operators kept) when the setting has options, so those options take
    effect instead of being silently skipped by the existing setup. The setting is checked
    (names, a finite `x0` of the right size) when the object is made; an object never entered
    warns, since nothing was applied.
    """

    def __init__(self, ksp: PETSc.KSP, setting: Mapping[str, Any], x: PETSc.Vec | None = None) -> None:
        self.guess, self.options, _ = split_setting(setting, size=x.getSize() if x is not None else None)
        if self.guess is not None and x is None:
            raise ValueError("the setting has an initial guess 'x0': pass the solution Vec x")
        self.ksp, self.x = ksp, x
        self.prefix = ksp.getOptionsPrefix() or ""
        self._stack: ExitStack | None = None
        self._entered = False

    def __enter__(self) -> PETSc.KSP:
        self._entered = True
        ksp = self.ksp
        with ExitStack() as stack:
            stack.enter_context(prefixed_options(self.prefix, self.options))
            nonzero = ksp.getInitialGuessNonzero()
            stack.callback(ksp.setInitialGuessNonzero, nonzero)
            if self.options:
                operators = operators_if_set(ksp)
                if operators is not None:
                    ksp.reset()
                    ksp.setOperators(*operators)
                ksp.setFromOptions()
            keep_convergence_test(ksp)
            if self.guess is not None:
                start, end = self.x.getOwnershipRange()
                self.x.setArray(self.guess[start:end])
                ksp.setInitialGuessNonzero(True)
            self._stack = stack.pop_all()
        return ksp

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        assert self._stack is not None
        try:
            if kind is None:
                check_used(self.prefix, self.options,
                           f"ksp_type={self.ksp.getType()} pc_type={self.ksp.getPC().getType()}")
        finally:
            self._stack.close()

    def __del__(self) -> None:
        if not getattr(self, "_entered", True):
            warnings.warn("a setting was prepared for a KSP but never applied: use it as "
                          "`with MetaSolver.apply(setting, ksp, x): ksp.solve(b, x)`", RuntimeWarning, stacklevel=2)
