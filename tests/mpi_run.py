"""Launch `mpiexec -n N python script args` from a test, with a timeout that leaves no stray ranks."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def mpiexec_path() -> str:
    """The `mpiexec` of the MPI that mpi4py was built against: the one next to the venv's python."""
    beside_python = Path(sys.prefix) / "bin" / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError(f"no mpiexec in {beside_python.parent} nor on PATH")
    return found


def run_mpi(script_path: str | Path, n: int = 2, args: Sequence[object] = (), timeout: float = 120,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script_path` on `n` ranks from the repository root; output is captured as text.

    On timeout every process of the run is killed (hung MPICH ranks busy-wait: left behind, they
    would eat the cores) and `subprocess.TimeoutExpired` is raised, as `subprocess.run` does.
    Inherited `PMI_*` variables are dropped so a test run itself under mpiexec still launches a
    fresh job; one thread per rank keeps `n` ranks from oversubscribing the cores.
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PMI_")}
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    command = [mpiexec_path(), "-n", str(n), sys.executable, str(script_path), *map(str, args)]
    with subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_run(process)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_run(process: subprocess.Popen) -> None:
    """SIGTERM to mpiexec (it forwards the signal to its ranks), then SIGKILL to whatever is left.

    Hydra starts its proxies and ranks in sessions of their own, so they are found through the
    process tree while mpiexec is alive, and killed only if still the same processes (start time).
    """
    tree = _processes_below(process.pid)
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
    for pid, started in tree.items():
        if _start_time(pid) == started:
            os.kill(pid, signal.SIGKILL)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 4 onwards), or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _processes_below(root: int) -> dict[int, str]:
    """{pid: start time} of every process below `root` (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = {}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found[child] = _start_time(child)
            frontier.append(child)
    return {pid: started for pid, started in found.items() if started is not None}
