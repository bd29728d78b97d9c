"""Crash isolation: an oracle's solves run in a persistent worker process that may die.

A solver that segfaults, aborts or hangs takes down the process it runs in: in-process, the
training job dies with it. PETSc 3.26.1's Chebyshev + Jacobi, for one, segfaults beyond roughly
1000–2000 iterations; legacy codes crash. `IsolatedOracle(factory)` builds the oracle inside a
worker subprocess and sends it the solves over a pipe; when the worker dies (a signal, an exit)
or stops answering (`timeout` seconds per solve), the solve becomes a failed `Outcome` naming
the signal, a fresh worker is started for the next solve, and `crashes` counts it. Training
drops the failed solve from the gradient estimate and counts it, like any other failure.

What crosses the pipe: the oracle's *recipe* once per worker (a picklable `factory`, e.g.
`functools.partial(KSPOracle, ksp_type="cheby", pc_type="jacobi")`, building an `Oracle` or a bare
`fn(task, setting)`), each task once per worker
(SciPy/NumPy data; PETSc objects cached on a communicator stay behind and are rebuilt there),
then per task the settings (and a cost's `Budget`, mapped by the worker's oracle) out and the
Outcomes back. A Python exception inside the worker (a
misspelt option: `ValueError`) is raised again in the caller: it is a mistake to fix, not a
crash to survive.

Cost: one round trip per task (all its settings go together, so `solve_many` still sets the
preconditioner up once) plus pickling settings and residual histories; measured in
`benchmarks/isolation.py`. When a request with several settings loses its worker, they are
solved again one per request, so only the settings that crash are lost.

The worker resets SIGSEGV/SIGBUS/SIGFPE/SIGILL/SIGABRT to the default action after PETSc has
installed its own handler (which would turn a signal into an `MPI_Abort` exit code), so the
parent reads the signal from the exit status. MPI launcher variables are removed from its
environment (else its `MPI_Init` would join the training job), and on Linux it is killed when
its parent dies.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from solvers.budget import Budget
from solvers.oracle import Oracle, as_oracle
from solvers.outcome import Outcome

log = logging.getLogger(__name__)

_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "MPI_LOCAL", "OMPI_", "I_MPI_")
"""Environment variables through which an MPI launcher makes a process join its job."""

_FATAL_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT")
START_TIMEOUT = 300.0
"""Seconds a worker may take to import PETSc and torch and build the oracle (slow on a loaded node)."""


class _WorkerLost(Exception):
    """The worker died or hung during a request; the message says how."""


class IsolatedOracle(Oracle):
    """`factory()`'s oracle, run in a worker subprocess; crashes and hangs become failed Outcomes.

    `timeout` is seconds per solve: a request of k settings that gets no answer within
    k·timeout kills the worker as hung. `cache` bounds the tasks a worker keeps (least recently
    used dropped). `crashes` counts workers lost; `close()` ends the worker (also at exit).
    `return_solution`, when set, is set on the worker's oracle (the `KSPOracle`/`SNESOracle`
    attribute that makes Outcomes carry the solution, which pretraining asks for).
    """

    def __init__(self, factory: Callable[[], Any], timeout: float = 60.0, cache: int = 1024) -> None:
        if not callable(factory):
            raise TypeError(f"IsolatedOracle needs a factory that builds the oracle, got {factory!r}")
        if not timeout > 0 or cache < 1:
            raise ValueError(f"IsolatedOracle needs timeout > 0 and cache >= 1, got {timeout}, {cache}")
        try:
            self._recipe = pickle.dumps(factory)
        except Exception as error:
            raise TypeError(f"IsolatedOracle: the factory {factory!r} must be picklable (a module-level "
                            f"class or function, or functools.partial of one): {error}") from None
        self.factory, self.timeout, self.cache = factory, float(timeout), int(cache)
        self.return_solution: bool | None = None  # None: as the factory's oracle does; else set there
        self.crashes = 0
        self._process: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._receive: Connection | None = None
        self._sent: OrderedDict[int, Any] = OrderedDict()  # id(task) -> task, mirrored by the worker

    def solve_many(self, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return self._solve(task, settings, None)

    def solve_within(self, budget: Budget | None, task: Any, settings: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        """The budget travels with the settings: the worker's oracle knows its own options for it."""
        return self._solve(task, settings, budget)

    def _solve(self, task: Any, settings: Sequence[Mapping[str, Any]], budget: Budget | None) -> list[Outcome]:
        settings = [dict(s) for s in settings]
        try:
            return self._request(task, settings, budget)
        except _WorkerLost as lost:
            if len(settings) == 1:
                return [Outcome.failure(str(lost))]
        return [self._solve_alone(task, setting, budget) for setting in settings]

    def _solve_alone(self, task: Any, setting: dict, budget: Budget | None) -> Outcome:
        try:
            return self._request(task, [setting], budget)[0]
        except _WorkerLost as lost:
            return Outcome.failure(str(lost))

    def _request(self, task: Any, settings: list[dict], budget: Budget | None) -> list[Outcome]:
        self._ensure_worker()
        key = id(task)
        forget, payload = [], None
        if key in self._sent:
            self._sent.move_to_end(key)
        else:
            payload = _pickled(task)
            self._sent[key] = task  # keeps the object alive, so its id is not reused
            while len(self._sent) > self.cache:
                forget.append(self._sent.popitem(last=False)[0])
        solving = _solving(task, settings)
        try:
            self._send.send((key, payload, forget, settings, budget, self.return_solution))
        except (BrokenPipeError, OSError):
            raise self._lost("died before the solve", solving) from None
        limit = self.timeout * len(settings)
        if not self._receive.poll(limit):
            self._kill()
            raise self._lost(f"hung: no answer after {limit:g} s, killed", solving)
        try:
            status, *reply = self._receive.recv()
        except (EOFError, OSError):
            raise self._lost("died during the solve", solving) from None
        if status == "raised":
            error, text = reply
            raise error from _WorkerTraceback(text)
        return reply[0]

    def _lost(self, how: str, solving: str) -> _WorkerLost:
        """Reap the worker, count it, and describe its end (signal named) and what it was solving
        (the candidate setting, not only the factory's base recipe) for the failed Outcome."""
        process = self._process
        self._reset()
        self.crashes += 1
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        message = f"isolated solver process {how} ({exit_status(code)}) {solving}; worker restarted"
        log.warning("%s [base recipe %r]", message, self.factory)
        return _WorkerLost(message)

    def _ensure_worker(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            self._reset()
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        environment = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
        environment["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        environment.setdefault("OMP_NUM_THREADS", "1")
        try:
            self._process = subprocess.Popen([sys.executable, "-c", "from solvers.isolated import worker_main; "
                                              f"worker_main({child_read}, {child_write})"],
                                             pass_fds=(child_read, child_write), env=environment,
                                             stdin=subprocess.DEVNULL)
        finally:
            os.close(child_read)
            os.close(child_write)
        self._send, self._receive = Connection(parent_write, readable=False), Connection(parent_read, writable=False)
        self._send.send_bytes(self._recipe)
        if not self._receive.poll(START_TIMEOUT):
            self._kill()
            self._reset()
            raise RuntimeError(f"IsolatedOracle: the worker did not start within {START_TIMEOUT:g} s")
        try:
            status, *reply = self._receive.recv()
        except EOFError:
            code = self._process.wait()
            self._reset()
            raise RuntimeError(f"IsolatedOracle: the worker died while starting ({exit_status(code)})") from None
        if status == "raised":
            self._kill()
            self._reset()
            error, text = reply
            raise RuntimeError(f"IsolatedOracle: building the oracle in the worker failed: {error!r}") \
                from _WorkerTraceback(text)

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def _reset(self) -> None:
        for connection in (self._send, self._receive):
            if connection is not None:
                connection.close()
        self._process, self._send, self._receive = None, None, None
        self._sent.clear()

    def close(self) -> None:
        """End the worker: it leaves its loop when its input closes."""
        process = self._process
        self._reset()
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __copy__(self) -> "IsolatedOracle":
        """A second oracle with the same recipe and a worker of its own (a shallow copy would
        share, and on deletion close, this one's pipes)."""
        twin = IsolatedOracle(self.factory, self.timeout, self.cache)
        twin.return_solution = self.return_solution
        return twin

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the worker also ends when its pipe closes
            pass

    def __repr__(self) -> str:
        return f"IsolatedOracle({self.factory!r}, timeout={self.timeout:g})"


class _WorkerTraceback(Exception):
    """The worker's traceback text, shown under an exception raised again in the caller."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def exit_status(code: int) -> str:
    """'killed by SIGSEGV (signal 11)' for a negative return code, else 'exit status N'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _solving(task: Any, settings: list[dict]) -> str:
    """'solving task NAME under setting ksp_type = 'cg', pc_type = 'icc'': what a lost worker was
    doing, vectors by their length; a request of several settings is retried one by one, and
    each retry names its own."""
    name = getattr(task, "name", "") or type(task).__name__
    if len(settings) != 1:
        return f"solving task {name!r} under one of {len(settings)} settings"
    parts = [f"{key} = <vector of {np.size(value)}>" if np.size(value) > 1 else f"{key} = {value!r}"
             for key, value in settings[0].items()]
    return f"solving task {name!r} under setting {', '.join(parts) or '{} (the base recipe)'}"


def _pickled(task: Any) -> bytes:
    """`task` as bytes for the worker. PETSc objects cached per communicator (`_on_comm` of a
    `LinearSystem`) stay behind: the worker rebuilds them from the SciPy/NumPy data."""
    if isinstance(getattr(task, "_on_comm", None), dict):
        task = copy.copy(task)
        task._on_comm = {}
    try:
        return pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise TypeError(f"IsolatedOracle: task {getattr(task, 'name', '') or task!r} cannot be sent to the worker "
                        f"process ({error}); give A and b as SciPy/NumPy data, not PETSc objects") from None


def _picklable(error: BaseException) -> BaseException:
    """`error` itself if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _serve(receive: Connection, send: Connection) -> None:
    """The worker's loop: build the oracle, then answer (task, settings) requests until EOF."""
    import solvers._petsc  # noqa: F401  (PETSc installs its signal handlers here; reset below)

    try:
        oracle = as_oracle(pickle.loads(receive.recv_bytes())())
    except Exception as error:
        send.send(("raised", _picklable(error), traceback.format_exc()))
        return
    for name in _FATAL_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    send.send(("ready",))
    tasks: dict[int, Any] = {}
    while True:
        try:
            key, payload, forget, settings, budget, return_solution = receive.recv()
        except EOFError:
            return
        if return_solution is not None:
            oracle.return_solution = return_solution
        for old in forget:
            tasks.pop(old, None)
        if payload is not None:
            tasks[key] = pickle.loads(payload)
        try:
            reply = ("ok", oracle.solve_within(budget, tasks[key], settings))
        except Exception as error:
            reply = ("raised", _picklable(error), traceback.format_exc())
        send.send(reply)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even while it hangs inside a solve."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _no_core_dumps() -> None:
    """Crashes are expected here and survived; core files in the working directory are not wanted."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def worker_main(receive_fd: int, send_fd: int) -> None:
    """Entry point of the worker process (started by `IsolatedOracle`, never by hand)."""
    _die_with_parent()
    _no_core_dumps()
    _serve(Connection(receive_fd, writable=False), Connection(send_fd, readable=False))
