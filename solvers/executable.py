"""A compiled PETSc program as a black box: `oracle(task, setting) -> Outcome`, one process per run.

Legacy codes are not modified: the task reaches the program the way it already reads its input
(PETSc binary files behind `-f`/`-rhs`, its own arguments for a `ProgramTask`, or anything
`task_args` produces), the setting reaches it as PETSc options on the command line, and the
Outcome is read back from what PETSc itself prints (`solvers.monitor_parser`).

A run is the unit: a time-stepping code solves once per step, a nonlinear code once per Newton
step, and the run's cost is all of it. The Outcome of a run therefore carries every solve the
program printed (`Outcome.solves`) and aggregates the ones selected (`select`):

- `iterations`: their total linear iterations (`count="linear"`, the default: for a nonlinear
  solve, the linear iterations of its Newton steps) or their total Newton iterations
  (`count="nonlinear"`);
- `residuals`: their histories concatenated in print order (true residual norms, or SNES
  function norms). For a single solve this is exactly the solve's history, so every existing cost
  means what it meant; for a run, a cost that sums over the history (`IterationProxy`) sums over
  every solve, and `metasolve.method.run_cost.RunIterationProxy` normalises each solve by its own initial
  residual (PETSc's relative test), which is what a run of many right-hand sides needs;
- `converged`/`reason`/`hit_max_it`: a run is converged when every selected solve converged and
  failed when any failed (its reason is the first failure's) unless `tolerate_failures=True`,
  which judges the run by its last selected solve only. For a nonlinear solve it is the SNES that
  is judged: a Newton step whose inexact linear solve hit its budget is the SNES's business;
- `seconds`: the run's wall time (program start-up, files and parsing included).

Whatever the program does — crash, hang, print garbage, start descendants that leave its process
group, receive SIGTERM with us — the caller gets a failed Outcome (or the signal, after cleanup),
the program's whole process tree is gone and the temporary files with it (`solvers.process_tree`).
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc
from solvers.budget import Budget, linear_options, newton_options, reference_norm
from solvers.linear_system import LinearSystem
from solvers.monitor_parser import LinearSolve, NonlinearSolve, RunReport, Solve, UnreadableOutput, parse_run_output
from solvers.options import command_line, option_name, split_setting
from solvers.oracle import Oracle
from solvers.outcome import Outcome
from solvers.process_tree import (MARKER, Interrupted, deliver, kill_tree, new_marker, signals_blocked, start_ticks,
                                  stop_on_signals, wait)
from solvers.program_task import ProgramTask

TaskArgs = Callable[[Any, str], list[str]]

# Variables through which an MPI launcher reaches its children (mpich/hydra, Open MPI, Intel
# MPI). A program started from an MPI rank must not inherit them, or its MPI_Init would join the
# parent's job instead of starting its own; PETSC_OPTIONS would add options behind our back.
_INHERITED_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPI_LOCAL", "OMPI_", "I_MPI_", "PETSC_OPTIONS")
_HEAD_LINES, _TAIL_LINES = 10, 20
_EXCERPT_BYTES = 16_384
"""Bytes read from each end of a stream for an error message: a 200 MB output costs two reads."""
_LINE_CHARS = 400
"""Longest line kept in an error message; PETSc's own lines are far shorter."""
_MAX_LINE = 1 << 16
"""Lines are read in pieces of at most this many characters, so one endless line cannot fill memory."""
_COUNTS = ("linear", "nonlinear")


def write_petsc_binary(obj: PETSc.Mat | PETSc.Vec, path: str) -> None:
    """Write a Mat or Vec the way `MatLoad`/`VecLoad` read it (PETSc's binary format)."""
    viewer = PETSc.Viewer().createBinary(path, mode="w", comm=PETSc.COMM_SELF)
    try:
        obj.view(viewer)
    finally:
        viewer.destroy()


def linear_system_files(task: Any, directory: str) -> list[str]:
    """`-f A.bin -rhs b.bin`: the convention of PETSc's own tutorials (ksp/tutorials/ex10.c)."""
    if not isinstance(task, LinearSystem):
        raise ValueError(f"ExecutableOracle: cannot pass a {type(task).__name__} to the program as files; "
                         "give a ProgramTask or task_args=callable(task, directory) -> list of arguments")
    A, b = task.petsc(PETSc.COMM_SELF)
    matrix, rhs = os.path.join(directory, "A.bin"), os.path.join(directory, "b.bin")
    write_petsc_binary(A, matrix)
    write_petsc_binary(b, rhs)
    return ["-f", matrix, "-rhs", rhs]


def default_task_args(task: Any, directory: str) -> list[str]:
    """A `ProgramTask`'s own arguments, a `LinearSystem` as binary files."""
    return task.argv() if isinstance(task, ProgramTask) else linear_system_files(task, directory)


def child_environment() -> dict[str, str]:
    """This process's environment without MPI-launcher and PETSc-options variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}


def default_mpiexec() -> str | None:
    """The mpiexec next to the running Python (the venv's, matching the MPI PETSc was built with)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def excerpt(path: str) -> str:
    """Head and tail of a program's output file, capped in bytes, lines and line length: PETSc puts
    its error message first, crashes print last, and a runaway program must not end up whole in
    an Outcome's error text."""
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        if size <= 2 * _EXCERPT_BYTES:
            text = stream.read().decode(errors="replace")
        else:
            head = stream.read(_EXCERPT_BYTES)
            stream.seek(size - _EXCERPT_BYTES)
            text = (head.decode(errors="replace") + f"\n[... {size - 2 * _EXCERPT_BYTES} bytes ...]\n"
                    + stream.read().decode(errors="replace"))
    lines = [line if len(line) <= _LINE_CHARS else f"{line[:_LINE_CHARS]} [... {len(line) - _LINE_CHARS} characters]"
             for line in text.strip().splitlines()]
    if len(lines) <= _HEAD_LINES + _TAIL_LINES:
        return "\n".join(lines)
    skipped = len(lines) - _HEAD_LINES - _TAIL_LINES
    return "\n".join(lines[:_HEAD_LINES] + [f"[... {skipped} lines ...]"] + lines[-_TAIL_LINES:])


def _lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as stream:
        while piece := stream.readline(_MAX_LINE):
            yield piece.rstrip("\n")


class ExecutableOracle(Oracle):
    """Run `command` once per setting and read the run's Outcome from PETSc's own printout.

    `options` are PETSc options given on every run (e.g. `{"ksp_type": "cg", "ksp_rtol": 1e-6}`),
    the setting's entries override them; names get `prefix` for programs whose solver has an
    options prefix. A setting's `x0` is written to a binary file passed as `guess_flag <file>`.
    `task_args(task, directory)` returns the arguments that hand the task to the program (default:
    a `ProgramTask`'s own arguments, a `LinearSystem` as `-f A.bin -rhs b.bin`); files it writes
    in `directory` are deleted after the task's runs.

    `nonlinear=True` for a program that solves with SNES: its monitors and reasons are read too.
    `select` chooses the solves a run's cost aggregates: None (all), an options prefix (the solves
    of that solver), or an index into the run's solves (-1: the last). `count` and
    `tolerate_failures`: see the module docstring. `timeout` in seconds per run (None or inf: no
    limit). `processes > 1` launches the program with `mpiexec -n processes`. The program inherits
    no MPI-launcher variables, so each MPI rank of a training run can start its own program side
    by side. A command-line option the program never read raises ValueError (a misspelt name
    would otherwise train against a constant); everything else that goes wrong is a failed Outcome.
    """

    def __init__(
        self,
        command: Sequence[str],
        task_args: TaskArgs | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: float | None = 30.0,
        processes: int = 1,
        mpiexec: str | None = None,
        prefix: str = "",
        guess_flag: str = "-x0",
        nonlinear: bool = False,
        select: str | int | None = None,
        count: str = "linear",
        tolerate_failures: bool = False,
    ) -> None:
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise ValueError(f"ExecutableOracle: command must be a non-empty list of strings, got {command!r}")
        if shutil.which(command[0]) is None:
            raise ValueError(f"ExecutableOracle: program {command[0]!r} not found or not executable")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"ExecutableOracle: timeout must be positive seconds, inf or None, got {timeout!r}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"ExecutableOracle: processes must be an integer >= 1, got {processes!r}")
        if count not in _COUNTS:
            raise ValueError(f"ExecutableOracle: count must be one of {_COUNTS}, got {count!r}")
        if count == "nonlinear" and not nonlinear:
            raise ValueError("ExecutableOracle: count='nonlinear' needs nonlinear=True (SNES monitors)")
        if select is not None and (isinstance(select, bool) or not isinstance(select, (int, str))):
            raise ValueError(f"ExecutableOracle: select must be None, an options prefix or a solve index, got {select!r}")
        if prefix:
            option_name(prefix)
        self.command = list(command)
        self.task_args = task_args if task_args is not None else default_task_args
        self.options = {option_name(k): v for k, v in (options or {}).items()}
        self.timeout = None if timeout is None or math.isinf(timeout) else float(timeout)
        self.processes = processes
        self.launcher: list[str] = []
        if processes > 1:
            mpiexec = mpiexec or default_mpiexec()
            if mpiexec is None or shutil.which(mpiexec) is None:
                raise ValueError(f"ExecutableOracle: processes={processes} needs mpiexec, not found ({mpiexec!r})")
            self.launcher = [mpiexec, "-n", str(processes)]
        self.prefix = prefix
        self.guess_flag = guess_flag
        self.nonlinear = bool(nonlinear)
        self.select = select
        self.count = count
        self.tolerate_failures = bool(tolerate_failures)

    def budget_options(self, budget: Budget, task: Any) -> dict[str, Any]:
        """The budget on the command line under the program's solver `prefix`: `-<prefix>ksp_*`
        for the linear solves a run counts (`count="linear"`, every KSP under that prefix, those
        inside Newton steps too), the Newton tolerances for `count="nonlinear"`."""
        if self.count == "nonlinear":
            return newton_options(budget, reference_norm(task))
        return linear_options(budget)

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """One run per setting; the task's files are written once for all of them.

        On SIGTERM (or SIGINT) with its default disposition, the running program's tree is killed
        and the files removed, then this process ends by the signal as it would have without us.
        A Python handler (KeyboardInterrupt, a trainer's stop flag) is left to decide.
        """
        parsed = [self._parse(task, s) for s in settings]
        outcomes: list[Outcome] = []
        caught = None
        with signals_blocked():
            directory = tempfile.mkdtemp(prefix="metasolve-exec-")
        try:
            with stop_on_signals():
                task_arguments = [str(a) for a in self.task_args(task, directory)]
                for i, (option_arguments, x0) in enumerate(parsed):
                    guess_arguments = []
                    if x0 is not None:
                        path = os.path.join(directory, f"x0_{i}.bin")
                        guess = PETSc.Vec().createWithArray(x0, comm=PETSc.COMM_SELF)
                        write_petsc_binary(guess, path)
                        guess.destroy()
                        guess_arguments = [self.guess_flag, path]
                    outcomes.append(self._run(task_arguments + guess_arguments + option_arguments, directory))
        except Interrupted as interrupted:
            caught = interrupted
        finally:
            with signals_blocked():
                shutil.rmtree(directory, ignore_errors=True)
        if caught is not None:
            deliver(caught)
        return outcomes

    def _parse(self, task: Any, setting: Mapping[str, Any]) -> tuple[list[str], np.ndarray | None]:
        """The setting's command-line options and initial guess, checked before anything runs."""
        split = split_setting(setting, self.options, size=getattr(task, "size", None))
        monitors = ["ksp_monitor_true_residual", "ksp_converged_reason"]
        if self.nonlinear:
            monitors += ["snes_monitor", "snes_converged_reason"]
        arguments = command_line(split.options, self.prefix) + [f"-{self.prefix}{m}" for m in monitors]
        return arguments + ["-options_left"], split.guess

    def _run(self, arguments: list[str], directory: str) -> Outcome:
        """One program run; its output goes to files (no pipe a stray descendant could hold open)."""
        argv = self.launcher + self.command + arguments
        out_path, err_path = os.path.join(directory, "stdout.txt"), os.path.join(directory, "stderr.txt")
        marker = new_marker()
        start = time.perf_counter()
        process, since = None, 0
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                           env={**child_environment(), MARKER: marker}, start_new_session=True)
            since = start_ticks(process.pid)
            timed_out = not wait(process, self.timeout)
        except OSError as error:
            if process is not None:
                raise
            return Outcome.failure(f"cannot start {argv[0]!r}: {error}")
        finally:
            seconds = time.perf_counter() - start
            kill_tree(process, marker, since)  # also whatever the program left running behind it
        name = os.path.basename(self.command[0])
        if timed_out:
            return Outcome.failure(f"{name} timed out after {self.timeout:g} s and was killed; "
                                   f"stderr:\n{excerpt(err_path)}", seconds=seconds)
        if process.returncode != 0:
            return Outcome.failure(f"{name} {_exit_status(process.returncode)}; stderr:\n{excerpt(err_path)}",
                                   seconds=seconds)
        try:
            report = parse_run_output(_lines(out_path))
        except UnreadableOutput as problem:
            return Outcome.failure(f"{name} output unreadable: {problem}; stdout:\n{excerpt(out_path)}\n"
                                   f"stderr:\n{excerpt(err_path)}", seconds=seconds)
        if report.unused_options:
            raise ValueError(f"unknown or inapplicable PETSc option(s) {report.unused_options}: "
                             f"{name} never read them (command: {' '.join(argv)})")
        return self.outcome(report, seconds)

    def outcome(self, report: RunReport, seconds: float) -> Outcome:
        """The run's Outcome from its solves, aggregated as the module docstring says."""
        selected = self._selected(report.solves)
        if isinstance(selected, str):
            return Outcome.failure(selected, seconds=seconds)
        if self.count == "nonlinear":
            selected = [s for s in selected if isinstance(s, NonlinearSolve)]
            if not selected:
                return Outcome.failure("count='nonlinear' but the program printed no nonlinear solve "
                                       "(does it call SNESSolve under the prefix given?)", seconds=seconds)
            histories = [s.residuals for s in selected]
            iterations = sum(s.iterations for s in selected)
        else:
            histories = [h for s in selected for h in _linear_histories(s)]
            iterations = sum(s.linear_iterations for s in selected)
        judged = selected[-1:] if self.tolerate_failures else selected
        converged = all(s.converged for s in judged)
        first_failure = next((s for s in judged if not s.converged), judged[-1])
        return Outcome(
            residuals=np.concatenate(histories) if histories else np.empty(0),
            iterations=iterations,
            reason=first_failure.reason,
            converged=converged,
            seconds=seconds,
            hit_max_it=not converged and all(s.usable for s in judged),
            norm_type="function" if self.count == "nonlinear" else "unpreconditioned",
            solves=list(report.solves),
        )

    def _selected(self, solves: list[Solve]) -> list[Solve] | str:
        """The solves `select` names, or why there are none."""
        if self.select is None:
            return solves
        if isinstance(self.select, int):
            if -len(solves) <= self.select < len(solves):
                return [solves[self.select]]
            return f"select={self.select} but the run printed {len(solves)} solve(s)"
        chosen = [s for s in solves if s.prefix == self.select]
        if not chosen:
            seen = sorted({s.prefix for s in solves})
            return f"select={self.select!r} but no solve printed under that prefix (prefixes seen: {seen})"
        return chosen


def _linear_histories(solve: Solve) -> list[np.ndarray]:
    return [solve.residuals] if isinstance(solve, LinearSolve) else [s.residuals for s in solve.linear]


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
