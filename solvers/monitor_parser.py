"""Reading a PETSc program's own printout back into numbers.

A compiled PETSc code cannot hand us its KSP, but every one of them honours
`-ksp_monitor_true_residual` (one line per iteration with the unpreconditioned norm
‖b − A x_i‖, comparable to `KSPOracle`'s history), `-ksp_converged_reason` (one line per solve)
and `-options_left` (PetscFinalize lists the options nobody read). This module turns that text
into a `SolveReport` or says why it cannot (`UnreadableOutput`): truncated, garbled or missing
lines must become a failed Outcome, never a silently wrong residual history.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from solvers._petsc import PETSc

_MONITOR = re.compile(
    r"^\s*(\d+) KSP \w+ resid norm (\S+) true resid norm (\S+) \|\|r\(i\)\|\|/\|\|b\|\| (\S+)\s*$")
_REASON = re.compile(r"^\s*Linear (?:\S+ )?solve (?:converged|did not converge) due to (\w+) iterations (\d+)\s*$")
_OPTION_LEFT = re.compile(r"^\s*Option left: name:-(\S+)(.*)$")

# PETSc's C names (KSPConvergedReasons) where they differ from petsc4py's attribute names.
_C_ALIASES = {"DIVERGED_ITS": "DIVERGED_MAX_IT", "DIVERGED_PC_FAILED": "DIVERGED_PCSETUP_FAILED"}
_REASON_CODES = {k: v for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}


class UnreadableOutput(Exception):
    """The program's output does not contain one complete, well-formed solve."""


@dataclass
class SolveReport:
    """The last solve a program printed, plus the command-line options it never read."""

    residuals: np.ndarray
    iterations: int
    reason: int
    unused_options: list[str] = field(default_factory=list)


def reason_code(name: str) -> int:
    """PETSc's integer KSPConvergedReason for a name as printed by `-ksp_converged_reason`."""
    code = _REASON_CODES.get(_C_ALIASES.get(name, name))
    if code is None:
        raise UnreadableOutput(f"unknown converged reason {name!r}")
    return code


def _norm(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UnreadableOutput(f"residual norm {text!r} is not a number") from None


def unused_command_line_options(text: str) -> list[str]:
    """Names (without '-') that `-options_left` reports unused and that came from the command
    line; options from files (`.petscrc`, `.info` files of binary viewers) are not ours to check."""
    names = []
    for line in text.splitlines():
        match = _OPTION_LEFT.match(line)
        if match is None:
            continue
        rest = match.group(2)
        source = rest.rsplit("source:", 1)[1].strip() if "source:" in rest else "command line"
        if source == "command line":
            names.append(match.group(1))
    return names


def parse_solve_output(text: str) -> SolveReport:
    """The last complete solve in `text`: true-residual history, iteration count and reason.

    Iteration numbers of the monitor lines must run 0, 1, 2, ... without gaps; a monitor line after
    the last reason line means the output stops inside a solve (a crash or truncation).
    """
    history: list[float] = []
    solves: list[tuple[list[float], int, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        monitor = _MONITOR.match(line)
        if monitor is not None:
            iteration = int(monitor.group(1))
            if iteration == 0:
                history = []
            if iteration != len(history):
                raise UnreadableOutput(f"line {number}: monitor iteration {iteration} follows {len(history)} lines")
            history.append(_norm(monitor.group(3)))
            continue
        reason = _REASON.match(line)
        if reason is not None:
            if not history:
                raise UnreadableOutput(f"line {number}: converged reason without residual monitor lines")
            solves.append((history, reason_code(reason.group(1)), int(reason.group(2))))
            history = []
    if history:
        raise UnreadableOutput("the output stops inside a solve (monitor lines without a converged reason)")
    if not solves:
        raise UnreadableOutput("no '-ksp_converged_reason' line: the program never finished a solve")
    residuals, code, iterations = solves[-1]
    return SolveReport(np.asarray(residuals, dtype=np.float64), iterations, code, unused_command_line_options(text))
