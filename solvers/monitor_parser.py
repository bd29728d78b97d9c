"""Reading a PETSc program's own printout back into numbers: every solve of a run.

A compiled PETSc code cannot hand us its KSP or SNES, but every one of them honours
`-ksp_monitor_true_residual` (one line per iteration with the unpreconditioned norm
‖b − A x_i‖, comparable to `KSPOracle`'s history), `-ksp_converged_reason` (one line per linear
solve, naming the solver's options prefix), `-snes_monitor` / `-snes_converged_reason` (the same
for Newton: one function norm per nonlinear iteration, one line per nonlinear solve) and
`-options_left` (PetscFinalize lists the options nobody read). A legacy program solves many
times per run — one solve per time step, one Newton solve with a linear solve per Newton step —
and prints its own chatter around PETSc's lines. This module turns the text into a `RunReport`
holding every solve in order, or says why it cannot (`UnreadableOutput`): truncated, garbled or
missing lines must become a failed Outcome, never a silently wrong history.

Nesting rule: a linear solve whose reason line appears after a nonlinear solve's `0 SNES` monitor
line and before that solve's reason line belongs to it (it is one of its Newton steps).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from solvers._petsc import PETSc

_MONITOR = re.compile(
    r"^\s*(\d+) KSP \w+ resid norm (\S+) true resid norm (\S+) \|\|r\(i\)\|\|/\|\|b\|\| (\S+)\s*$")
_REASON = re.compile(r"^\s*Linear (?:(\S+) )?solve (?:converged|did not converge) due to (\w+) iterations (\d+)\s*$")
_SNES_MONITOR = re.compile(r"^\s*(\d+) SNES Function norm (\S+)\s*$")
_SNES_REASON = re.compile(
    r"^\s*Nonlinear (?:(\S+) )?solve (?:converged|did not converge) due to (\w+) iterations (\d+)\s*$")
_OPTION_LEFT = re.compile(r"^\s*Option left: name:-(\S+)(.*)$")

# PETSc's C names (KSPConvergedReasons) where they differ from petsc4py's attribute names.
_C_ALIASES = {"DIVERGED_ITS": "DIVERGED_MAX_IT", "DIVERGED_PC_FAILED": "DIVERGED_PCSETUP_FAILED"}
_KSP_CODES = {k: v for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}
_SNES_CODES = {k: v for k, v in vars(PETSc.SNES.ConvergedReason).items() if isinstance(v, int)}
KSP_MAX_IT = PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT
SNES_MAX_IT = PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT


class UnreadableOutput(Exception):
    """The program's output does not contain complete, well-formed solves."""


@dataclass(frozen=True)
class LinearSolve:
    """One KSPSolve as printed: true-residual norms from iteration 0, the same divided by ‖b‖ (the
    monitor's last column: what PETSc's default relative test compares with rtol, for a nonzero
    initial guess too), iterations, KSPConvergedReason, and the options prefix of the KSP that
    printed it ("" for none)."""

    prefix: str
    residuals: np.ndarray
    iterations: int
    reason: int
    relative: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def converged(self) -> bool:
        return self.reason > 0

    @property
    def usable(self) -> bool:
        """Converged, or stopped only by its iteration budget (data for fixed-budget costs)."""
        return self.reason > 0 or self.reason == KSP_MAX_IT

    @property
    def linear_iterations(self) -> int:
        return self.iterations


@dataclass(frozen=True)
class NonlinearSolve:
    """One SNESSolve as printed: function norms from iteration 0, Newton iterations,
    SNESConvergedReason, prefix, and the linear solves of its Newton steps in order."""

    prefix: str
    residuals: np.ndarray
    iterations: int
    reason: int
    linear: tuple[LinearSolve, ...] = ()

    @property
    def converged(self) -> bool:
        return self.reason > 0

    @property
    def usable(self) -> bool:
        return self.reason > 0 or self.reason == SNES_MAX_IT

    @property
    def linear_iterations(self) -> int:
        return sum(s.iterations for s in self.linear)


Solve = LinearSolve | NonlinearSolve


@dataclass
class RunReport:
    """Every outermost solve of a run in print order (a nonlinear solve holds its linear ones),
    plus the command-line options the program never read."""

    solves: list[Solve]
    unused_options: list[str] = field(default_factory=list)


def _code(name: str, codes: dict[str, int], kind: str) -> int:
    code = codes.get(_C_ALIASES.get(name, name)) if kind == "linear" else codes.get(name)
    if code is None:
        raise UnreadableOutput(f"unknown {kind} converged reason {name!r}")
    return code


def reason_code(name: str) -> int:
    """PETSc's integer KSPConvergedReason for a name as printed by `-ksp_converged_reason`."""
    return _code(name, _KSP_CODES, "linear")


def _norm(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UnreadableOutput(f"residual norm {text!r} is not a number") from None


def _prefix(text: str | None) -> str:
    return text or ""


def unused_command_line_options(lines: Iterable[str]) -> list[str]:
    """Names (without '-') that `-options_left` reports unused and that came from the command
    line; options from files (`.petscrc`, `.info` files of binary viewers) are not ours to check."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    names = []
    for line in lines:
        match = _OPTION_LEFT.match(line)
        if match is not None:
            rest = match.group(2)
            source = rest.rsplit("source:", 1)[1].strip() if "source:" in rest else "command line"
            if source == "command line":
                names.append(match.group(1))
    return names


class _Reader:
    """Line-by-line state machine behind `parse_run_output` (one pass, constant memory per line)."""

    def __init__(self) -> None:
        self.solves: list[Solve] = []
        self.unused: list[str] = []
        self.history: list[float] = []        # the linear solve being printed
        self.relative: list[float] = []
        self.newton: list[float] | None = None  # the nonlinear solve being printed
        self.inner: list[LinearSolve] = []

    def feed(self, number: int, line: str) -> None:
        if (monitor := _MONITOR.match(line)) is not None:
            iteration = int(monitor.group(1))
            self._count(number, iteration, self.history, "monitor")
            if iteration == 0:
                self.relative.clear()
            self.history.append(_norm(monitor.group(3)))
            self.relative.append(_norm(monitor.group(4)))
        elif (reason := _REASON.match(line)) is not None:
            if not self.history and self.newton is None:
                raise UnreadableOutput(f"line {number}: converged reason without residual monitor lines")
            solve = LinearSolve(_prefix(reason.group(1)), np.asarray(self.history, dtype=np.float64),
                                int(reason.group(3)), reason_code(reason.group(2)),
                                np.asarray(self.relative, dtype=np.float64))
            self.history, self.relative = [], []
            (self.inner if self.newton is not None else self.solves).append(solve)
        elif (monitor := _SNES_MONITOR.match(line)) is not None:
            iteration = int(monitor.group(1))
            if iteration == 0 and self.newton:
                raise UnreadableOutput(f"line {number}: a nonlinear solve starts before the previous one printed its reason")
            if self.newton is None:
                self.newton = []
            self._count(number, iteration, self.newton, "SNES monitor")
            self.newton.append(_norm(monitor.group(2)))
        elif (reason := _SNES_REASON.match(line)) is not None:
            if not self.newton:
                raise UnreadableOutput(f"line {number}: nonlinear converged reason without SNES monitor lines")
            self.solves.append(NonlinearSolve(_prefix(reason.group(1)), np.asarray(self.newton, dtype=np.float64),
                                              int(reason.group(3)), _code(reason.group(2), _SNES_CODES, "nonlinear"),
                                              tuple(self.inner)))
            self.newton, self.inner = None, []
        elif line.lstrip().startswith("Option left:"):
            self.unused += unused_command_line_options([line])

    @staticmethod
    def _count(number: int, iteration: int, history: list[float], what: str) -> None:
        if iteration == 0:
            history.clear()
        if iteration != len(history):
            raise UnreadableOutput(f"line {number}: {what} iteration {iteration} follows {len(history)} lines")

    def finish(self) -> RunReport:
        if self.history:
            raise UnreadableOutput("the output stops inside a solve (monitor lines without a converged reason)")
        if self.newton is not None:
            raise UnreadableOutput("the output stops inside a nonlinear solve (SNES monitor lines without a reason)")
        if not self.solves:
            raise UnreadableOutput("no '-ksp_converged_reason' line: the program never finished a solve")
        return RunReport(self.solves, self.unused)


def parse_run_output(lines: Iterable[str]) -> RunReport:
    """Every solve in the output (a string or an iterable of lines, e.g. an open file).

    Iteration numbers of monitor lines must run 0, 1, 2, ... without gaps; a monitor line after
    the last reason line means the output stops inside a solve (a crash or truncation). Lines
    that are none of PETSc's (the program's own chatter) are skipped.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    reader = _Reader()
    for number, line in enumerate(lines, start=1):
        reader.feed(number, line)
    return reader.finish()
