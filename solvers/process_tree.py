"""Leaving nothing running: a child program's whole process tree, found through /proc, and
SIGTERM/SIGINT turned into an orderly stop of it.

A program may start descendants that leave its process group (`setsid`, an MPI launcher's
proxies, a daemonising helper); `killpg` misses those, and a killed parent's orphans are
re-parented to init, where the parent-pid links no longer reach them. So every child is started
with a unique environment variable (`MARKER`) that its descendants inherit, and the tree is the
union of the parent-pid closure and every process whose initial environment carries the marker
(`/proc/<pid>/environ`, readable for our own processes). Linux only; no psutil needed.

Signals: a batch scheduler sends SIGTERM before the kill, a user presses Ctrl-C. Python's default
SIGTERM action ends the interpreter at once — no `finally`, no temporary-directory cleanup, the
child orphaned. `stop_on_signals` turns a default-disposition SIGTERM/SIGINT into an exception
while a program runs, so the tree is killed and temporary files removed as the stack unwinds;
`deliver` then ends the process with the signal's own status, which a scheduler understands.
`handle_first_signal` lets a second signal act by default, even where no Python runs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

MARKER = "METASOLVE_PROCESS_TREE"
_counter = itertools.count()
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_KILL_ROUNDS = 10
_KILL_PAUSE = 0.01


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while a program ran (a BaseException, like KeyboardInterrupt,
    so no `except Exception` in between swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def new_marker() -> str:
    """A value for MARKER unique to one program run."""
    return f"{os.getpid()}-{next(_counter)}-{os.urandom(4).hex()}"


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, start time in clock ticks since boot) of every live process in /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != b"Z":
                yield int(entry), int(fields[1]), int(fields[19])


def start_ticks(pid: int) -> int:
    """When `pid` started (clock ticks since boot); 0 if unknown. Its descendants started later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _carries(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return needle in environ.read().split(b"\0")
    except OSError:
        return False


def tree(root: int | None, marker: str, since: int = 0) -> set[int]:
    """Live processes descended from `root` or carrying `MARKER=marker` (never this process).
    Only processes started at or after tick `since` (the program's start) can carry the marker,
    so only their environments are read."""
    table = list(_processes())
    needle = f"{MARKER}={marker}".encode()
    members = {pid for pid, _, started in table if started >= since and _carries(pid, needle)}
    if root is not None:
        members.add(root)
    children: dict[int, list[int]] = {}
    for pid, parent, _ in table:
        children.setdefault(parent, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in members:
                members.add(child)
                stack.append(child)
    live = {pid for pid, _, _ in table}
    return (members & live) - {os.getpid()}


def kill_tree(process: subprocess.Popen | None, marker: str, since: int = 0) -> None:
    """SIGKILL the program's process group and every process of its tree, then reap the program.

    Repeated until a scan finds nothing, since a process may fork between a scan and its kill.
    Once the program itself is reaped its pid may be reused, so only the marker finds its
    leftovers; the marker alone also finds a program whose Popen was cut short (process None).
    SIGTERM/SIGINT wait (blocked) until the tree is gone.
    """
    with signals_blocked():
        running = process is not None and process.poll() is None
        if running:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for _ in range(_KILL_ROUNDS):
            running = running and process.poll() is None
            members = tree(process.pid if running else None, marker, since)
            if not members:
                break
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(_KILL_PAUSE)  # SIGKILL is asynchronous: let the kernel finish before rescanning
        if process is not None:
            process.wait()


def wait(process: subprocess.Popen, timeout: float | None) -> bool:
    """Wait for the program to exit; False if `timeout` seconds passed first. A pidfd wakes us the
    moment it exits (Popen.wait with a timeout polls, with up to 50 ms of latency per run)."""
    try:
        descriptor = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([descriptor], [], [], timeout)
    finally:
        os.close(descriptor)
    if ready:
        process.wait()
    return bool(ready)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGTERM/SIGINT wait (pending) until the block is done: for cleanup that must not be cut short."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGTERM/SIGINT whose disposition is the default (end the process at once, no
    cleanup) raise `Interrupted` instead (main thread only: Python handles signals there alone).

    A Python handler already installed is left alone: if it raises (KeyboardInterrupt, SystemExit)
    the exception unwinds through the caller's cleanup like any other; if it only records the
    signal (a trainer finishing its step first), the running program is left to finish.
    """
    installed = []
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _raise)
                installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            signal.signal(signum, signal.SIG_DFL)


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def deliver(interrupted: Interrupted) -> None:
    """After cleanup, end the process as the signal's default action would have: killed by it
    (the status a batch scheduler reads as "terminated")."""
    signal.signal(interrupted.signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [interrupted.signum])
    os.kill(os.getpid(), interrupted.signum)
    raise interrupted  # not reached: the default action ends the process


_SA_RESETHAND = 0x80000000  # Linux's value for x86-64 and arm64


class _SigAction(ctypes.Structure):
    """glibc's `struct sigaction` (a 1024-bit signal mask)."""

    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


def handle_first_signal(signum: int, handler: Callable[[int, Any], None]) -> bool:
    """Install `handler` for the first `signum` only; the second acts as if there were none.

    A Python handler runs between bytecodes, never inside PETSc's C code: a solve hung where no
    Python callback runs (a preconditioner's set-up) would ignore every SIGTERM and SIGINT. The
    kernel's SA_RESETHAND restores the default action as it delivers the first signal, so the
    handler still gets its chance (a trainer finishing and checkpointing its step) and a second
    signal ends the process at once, wherever it is — the "press Ctrl-C twice" a user expects.
    Returns whether the one-shot flag could be set (Linux with glibc; elsewhere only `handler`
    is installed and a second signal reaches it).
    """
    signal.signal(signum, handler)
    found = _action(signum)
    if found is None:
        return False
    libc, action = found
    action.flags |= _SA_RESETHAND
    return libc.sigaction(signum, ctypes.byref(action), None) == 0


def handles_first_signal_only(signum: int) -> bool:
    """Whether the current handler of `signum` was installed by `handle_first_signal` (so that a
    caller replacing it for a while can put back exactly what it found)."""
    found = _action(signum)
    return found is not None and bool(found[1].flags & _SA_RESETHAND)


def _action(signum: int) -> tuple[ctypes.CDLL, _SigAction] | None:
    """libc and the current `sigaction` of `signum` (None where glibc's layout does not apply)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    action = _SigAction()
    if libc.sigaction(signum, None, ctypes.byref(action)) != 0:
        return None
    return libc, action
