"""A compiled PETSc program as a black box: `oracle(task, setting) -> Outcome`, one process per solve.

Legacy codes are not modified: the task reaches the program the way it already reads its input
(PETSc binary files behind `-f`/`-rhs`, or any arguments `task_args` produces), the setting
reaches it as PETSc options on the command line, and the Outcome is read back from what PETSc
itself prints (`solvers.monitor_parser`). Whatever the program does — crash, hang, print garbage —
the caller gets a failed Outcome, the process group is gone and the temporary files with it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from solvers._petsc import PETSc
from solvers.linear_system import LinearSystem
from solvers.monitor_parser import UnreadableOutput, parse_solve_output
from solvers.options import format_value, option_name
from solvers.outcome import Outcome

TaskArgs = Callable[[Any, str], list[str]]

# Variables through which an MPI launcher reaches its children (mpich/hydra, Open MPI, Intel
# MPI). A program started from an MPI rank must not inherit them, or its MPI_Init would join the
# parent's job instead of starting its own; PETSC_OPTIONS would add options behind our back.
_INHERITED_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPI_LOCAL", "OMPI_", "I_MPI_", "PETSC_OPTIONS")
_HEAD_LINES, _TAIL_LINES = 10, 20
_KILL_GRACE_SECONDS = 5.0


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
                         "give task_args=callable(task, directory) -> list of arguments")
    A, b = task.petsc(PETSc.COMM_SELF)
    matrix, rhs = os.path.join(directory, "A.bin"), os.path.join(directory, "b.bin")
    write_petsc_binary(A, matrix)
    write_petsc_binary(b, rhs)
    return ["-f", matrix, "-rhs", rhs]


def child_environment() -> dict[str, str]:
    """This process's environment without MPI-launcher and PETSc-options variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}


def default_mpiexec() -> str | None:
    """The mpiexec next to the running Python (the venv's, matching the MPI PETSc was built with)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def _excerpt(text: str) -> str:
    """Head and tail of a program's output: PETSc puts its error message first, crashes print last."""
    lines = text.strip().splitlines()
    if len(lines) <= _HEAD_LINES + _TAIL_LINES:
        return "\n".join(lines)
    skipped = len(lines) - _HEAD_LINES - _TAIL_LINES
    return "\n".join(lines[:_HEAD_LINES] + [f"[... {skipped} lines ...]"] + lines[-_TAIL_LINES:])


class ExecutableOracle:
    """Run `command` once per solve and read the Outcome from PETSc's own monitor output.

    `options` are PETSc options given on every run (e.g. `{"ksp_type": "cg", "ksp_rtol": 1e-6}`),
    the setting's entries override them; names get `prefix` for programs whose KSP has an options
    prefix. A setting's `x0` is written to a binary file passed as `guess_flag <file>`.
    `task_args(task, directory)` returns the arguments that hand the task to the program (default
    `linear_system_files`); files it writes in `directory` are deleted after the task's solves.
    `processes > 1` launches the program with `mpiexec -n processes` (`mpiexec` defaults to the
    one next to the running Python). The program inherits no MPI-launcher variables, so each MPI
    rank of a training run can start its own program side by side. Each run adds
    `-ksp_monitor_true_residual -ksp_converged_reason -options_left`; a command-line option the
    program never read raises ValueError (a misspelt name would otherwise train against a
    constant), everything else that goes wrong is a failed Outcome.
    """

    def __init__(
        self,
        command: Sequence[str],
        task_args: TaskArgs | None = None,
        options: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        processes: int = 1,
        mpiexec: str | None = None,
        prefix: str = "",
        guess_flag: str = "-x0",
    ) -> None:
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise ValueError(f"ExecutableOracle: command must be a non-empty list of strings, got {command!r}")
        if shutil.which(command[0]) is None:
            raise ValueError(f"ExecutableOracle: program {command[0]!r} not found or not executable")
        if not timeout > 0:
            raise ValueError(f"ExecutableOracle: timeout must be positive, got {timeout!r}")
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"ExecutableOracle: processes must be an integer >= 1, got {processes!r}")
        if prefix:
            option_name(prefix)
        self.command = list(command)
        self.task_args = task_args if task_args is not None else linear_system_files
        self.options = {option_name(k): v for k, v in (options or {}).items()}
        self.timeout = float(timeout)
        self.processes = processes
        self.launcher: list[str] = []
        if processes > 1:
            mpiexec = mpiexec or default_mpiexec()
            if mpiexec is None or shutil.which(mpiexec) is None:
                raise ValueError(f"ExecutableOracle: processes={processes} needs mpiexec, not found ({mpiexec!r})")
            self.launcher = [mpiexec, "-n", str(processes)]
        self.prefix = prefix
        self.guess_flag = guess_flag

    def __call__(self, task: Any, setting: Mapping[str, Any] | None = None) -> Outcome:
        return self.solve_many(task, [setting or {}])[0]

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """One run per setting; the task's files are written once for all of them."""
        parsed = [self._parse(task, s) for s in settings]
        with tempfile.TemporaryDirectory(prefix="metasolve-exec-") as directory:
            task_arguments = [str(a) for a in self.task_args(task, directory)]
            outcomes = []
            for i, (option_arguments, x0) in enumerate(parsed):
                guess_arguments = []
                if x0 is not None:
                    path = os.path.join(directory, f"x0_{i}.bin")
                    guess = PETSc.Vec().createWithArray(x0, comm=PETSc.COMM_SELF)
                    write_petsc_binary(guess, path)
                    guess.destroy()
                    guess_arguments = [self.guess_flag, path]
                outcomes.append(self._run(task_arguments + guess_arguments + option_arguments))
        return outcomes

    def _parse(self, task: Any, setting: Mapping[str, Any]) -> tuple[list[str], np.ndarray | None]:
        """The setting's command-line options and initial guess, checked before anything runs."""
        options = dict(self.options)
        x0 = None
        for key, value in setting.items():
            if key == "x0":
                x0 = np.ascontiguousarray(value, dtype=np.float64)
                size = getattr(task, "size", None)
                if x0.ndim != 1 or (size is not None and x0.shape != (size,)):
                    raise ValueError(f"x0 has shape {x0.shape}, the system has {size} unknowns")
                if not np.all(np.isfinite(x0)):
                    raise ValueError("x0 contains non-finite values")
            else:
                options[option_name(key)] = value
        arguments = []
        for name, value in options.items():
            text = format_value(value)
            arguments += [f"-{self.prefix}{name}"] + ([text] if text else [])
        return arguments + [f"-{self.prefix}ksp_monitor_true_residual", f"-{self.prefix}ksp_converged_reason",
                            "-options_left"], x0

    def _run(self, arguments: list[str]) -> Outcome:
        argv = self.launcher + self.command + arguments
        start = time.perf_counter()
        try:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=child_environment(), start_new_session=True)
        except OSError as error:
            return Outcome.failure(f"cannot start {argv[0]!r}: {error}")
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stdout, stderr = _kill(process)
        except BaseException:
            _kill(process)
            raise
        seconds = time.perf_counter() - start
        out = stdout.decode(errors="replace")
        err = stderr.decode(errors="replace")
        name = os.path.basename(self.command[0])
        if timed_out:
            return Outcome.failure(f"{name} timed out after {self.timeout:g} s and was killed; "
                                   f"stderr:\n{_excerpt(err)}", seconds=seconds)
        if process.returncode != 0:
            return Outcome.failure(f"{name} {_exit_status(process.returncode)}; stderr:\n{_excerpt(err)}",
                                   seconds=seconds)
        try:
            report = parse_solve_output(out)
        except UnreadableOutput as problem:
            return Outcome.failure(f"{name} output unreadable: {problem}; stdout:\n{_excerpt(out)}\n"
                                   f"stderr:\n{_excerpt(err)}", seconds=seconds)
        if report.unused_options:
            raise ValueError(f"unknown or inapplicable PETSc option(s) {report.unused_options}: "
                             f"{name} never read them (command: {' '.join(argv)})")
        return Outcome(
            residuals=report.residuals,
            iterations=report.iterations,
            reason=report.reason,
            converged=report.reason > 0,
            seconds=seconds,
            hit_max_it=report.reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT,
            norm_type="unpreconditioned",
        )


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _kill(process: subprocess.Popen) -> tuple[bytes, bytes]:
    """Kill the program's whole process group (mpiexec and its ranks too) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return process.communicate(timeout=_KILL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        # A descendant that left the group still holds the pipes: stop reading, keep the reaped status.
        for pipe in (process.stdout, process.stderr):
            pipe.close()
        process.wait()
        return b"", b""
