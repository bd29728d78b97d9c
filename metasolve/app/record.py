"""`metasolve record -- ./app ARGS`: collect the linear systems a user's program solves, unmodified.

PETSc can already write every system a `KSPSolve` sees: `-ksp_view_mat binary:A.bin::append`
and `-ksp_view_rhs binary:b.bin::append` append the operator and right-hand side of each solve
to PETSc binary files, and `-ksp_view ascii:...` says which solver the program configured. So
the program runs exactly as the user runs it, with three more options (under its solver's
options prefix, `prefix`). Afterwards the appended files are cut into one directory per system
(`problems.recorded` reads them), each with the run's arguments, and a starter config
`out/train.toml` is (re)written that trains on everything recorded so far:

    metasolve record --out rec -- ./app -n 64 -steps 8      # as often as there are runs to collect
    metasolve train rec/train.toml                          # learns from the recorded systems
    metasolve predict <out>/run/meta_solver.pt --out job --matrix A.bin --rhs b.bin

The binary files are cut by reading PETSc's own format headers (`MAT_FILE_CLASSID`, sizes,
row lengths, then indices and values; `VEC_FILE_CLASSID`, size, values; big-endian, 32-bit
indices as the pip-built PETSc has them); a file that does not end exactly where its last
object ends is an error, never a silently shifted system.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from problems.recorded import MATRIX, METADATA, RHS, SYSTEMS, system_directories
from solvers.executable import child_environment
from solvers.options import option_name
from solvers.program_task import parse_arguments

MAT_FILE_CLASSID, VEC_FILE_CLASSID = 1211216, 1211214
RUNS, STARTER = "runs.json", "train.toml"
VALIDATION = 16
"""Validation tasks `metasolve.app.run` takes just after the training tasks (its keep-better)."""
_INT, _SCALAR = np.dtype(">i4"), np.dtype(">f8")


@dataclass(frozen=True)
class Recording:
    """What one `record` call collected: the new systems, every system so far, the starter config."""

    run: int
    systems: list[Path]
    total_systems: int
    config: Path
    ksp_type: str
    pc_type: str
    seconds: float


def split_binary(path: Path, classid: int) -> list[bytes]:
    """The objects appended to one PETSc binary file, each as the bytes of a file of its own."""
    data = path.read_bytes()
    pieces, at = [], 0
    while at < len(data):
        header = np.frombuffer(data, _INT, count=1, offset=at)[0] if at + 4 <= len(data) else None
        if header != classid:
            raise ValueError(f"{path}: object at byte {at} has class id {header}, expected {classid} (not a PETSc "
                             "binary file of this kind, or 64-bit indices)")
        if classid == MAT_FILE_CLASSID:
            rows, _, nonzeros = np.frombuffer(data, _INT, count=3, offset=at + 4)
            end = at + 16 + 4 * int(rows) + 4 * int(nonzeros) + 8 * int(nonzeros)
        else:
            (size,) = np.frombuffer(data, _INT, count=1, offset=at + 4)
            end = at + 8 + 8 * int(size)
        if end > len(data):
            raise ValueError(f"{path}: the object at byte {at} runs past the end of the file ({end} > {len(data)})")
        pieces.append(data[at:end])
        at = end
    return pieces


def solver_types(view: str) -> tuple[str, str, str]:
    """(KSP type, PC type, SOR sweep or '') of the first solver `-ksp_view` printed."""
    ksp = re.search(r"KSP Object:.*?\n\s*type: (\S+)", view)
    pc = re.search(r"PC Object:.*?\n\s*type: (\S+)", view)
    sweep = re.search(r"type = (local_forward|local_backward|local_symmetric|forward|backward|symmetric)", view)
    return (ksp.group(1) if ksp else "gmres", pc.group(1) if pc else "ilu", sweep.group(1) if sweep else "")


def record(command: Sequence[str], out: str | Path, prefix: str = "", timeout: float | None = 600.0,
           quiet: bool = True) -> Recording:
    """Run `command` once with PETSc's viewers on its solver (options `prefix`), add the systems it
    solved to `out`, and rewrite `out/train.toml` to train on all of them.

    The program's own output goes to `out/runs/r<run>.log`. It must exit with status 0 and read
    the viewer options (a solver under another prefix would leave them unread: then `prefix` is
    wrong, and this says so).
    """
    command = [str(c) for c in command]
    if not command:
        raise ValueError("record: give the program to run, e.g. metasolve record --out rec -- ./app -n 64")
    if shutil.which(command[0]) is None:
        raise ValueError(f"record: program {command[0]!r} not found or not executable")
    if prefix:
        option_name(prefix)
    out = Path(out).resolve()
    runs_file = out / RUNS
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else []
    run = len(runs)
    raw = out / "runs" / f"r{run:04d}"
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    viewers = [f"-{prefix}ksp_view_mat", f"binary:{raw / MATRIX}::append",
               f"-{prefix}ksp_view_rhs", f"binary:{raw / RHS}::append",
               f"-{prefix}ksp_view", f"ascii:{raw / 'ksp_view.txt'}", "-options_left"]
    log = out / "runs" / f"r{run:04d}.log"
    begin = time.perf_counter()
    with log.open("wb") as stream:
        try:
            result = subprocess.run(command + viewers, stdin=subprocess.DEVNULL, stdout=stream,
                                    stderr=subprocess.STDOUT, env=child_environment(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"record: {command[0]} did not finish within {timeout:g} s (log: {log})") from None
    seconds = time.perf_counter() - begin
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"record: {' '.join(command)} exited with status {result.returncode}; "
                           f"its output:\n{text[-3000:]}")
    unread = sorted(set(re.findall(r"Option left: name:-(\S+)", text)) & {f"{prefix}ksp_view_mat",
                                                                          f"{prefix}ksp_view_rhs"})
    if unread or not (raw / MATRIX).is_file():
        raise RuntimeError(f"record: {command[0]} solved no linear system under the options prefix {prefix!r} "
                           f"(options never read: {unread or 'none'}); if its solver has a prefix, pass --prefix")
    matrices = split_binary(raw / MATRIX, MAT_FILE_CLASSID)
    rhs = split_binary(raw / RHS, VEC_FILE_CLASSID) if (raw / RHS).is_file() else []
    if rhs and len(rhs) != len(matrices):
        raise RuntimeError(f"record: {len(matrices)} matrices but {len(rhs)} right-hand sides were written")
    ksp_type, pc_type, sweep = solver_types((raw / "ksp_view.txt").read_text(errors="replace")
                                            if (raw / "ksp_view.txt").is_file() else "")
    arguments = _arguments(command[1:])
    systems = []
    for solve, matrix in enumerate(matrices):
        where = out / SYSTEMS / f"r{run:04d}-s{solve:04d}"
        where.mkdir(parents=True, exist_ok=True)
        (where / MATRIX).write_bytes(matrix)
        if rhs:
            (where / RHS).write_bytes(rhs[solve])
        (where / METADATA).write_text(json.dumps({"run": run, "solve": solve, "command": command,
                                                  "arguments": arguments}, indent=1) + "\n")
        systems.append(where)
    shutil.rmtree(raw)
    runs.append({"run": run, "command": command, "prefix": prefix, "systems": len(systems),
                 "ksp_type": ksp_type, "pc_type": pc_type, "sor_sweep": sweep, "seconds": seconds})
    runs_file.write_text(json.dumps(runs, indent=1) + "\n")
    total = len(system_directories(out))
    config = write_starter_config(out, total, ksp_type, pc_type, sweep)
    if not quiet:
        print(f"record: run {run} of {command[0]} solved {len(systems)} system(s) ({ksp_type} + {pc_type}); "
              f"{total} recorded in {out}; train with: metasolve train {config}")
    return Recording(run, systems, total, config, ksp_type, pc_type, seconds)


def run_record(command: Sequence[str], out: str | Path, prefix: str = "") -> int:
    """`metasolve record --out DIR -- ./app ARGS`: `record`, its errors as one line and an exit code
    (2: the command line is wrong; 1: the program failed or solved nothing under `prefix`)."""
    import sys

    try:
        record(command, out, prefix=prefix, quiet=False)
    except ValueError as error:
        print(f"metasolve record: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"metasolve {error}", file=sys.stderr)
        return 1
    return 0


def _arguments(tokens: Sequence[str]) -> dict[str, str]:
    try:
        return parse_arguments(tokens)
    except ValueError:  # positional arguments: keep the raw command only
        return {}


def write_starter_config(out: Path, systems: int, ksp_type: str, pc_type: str, sweep: str) -> Path:
    """`out/train.toml`: a config that trains on the recorded systems with the program's solver.

    Systems are split in recording order: training first, then up to `VALIDATION` systems on which
    the run compares its untrained, supervised-start and trained weights, then a quarter (at least
    one) held out for the evaluation table.

    With SOR the learned setting is ω (Richardson + SOR is where it matters most); with any other
    preconditioner, the choice among a few a PETSc user would try.
    """
    if systems < 2:
        raise_note = ("# Only one system is recorded so far: record more runs (the same command with other "
                      "arguments)\n# before training; training and evaluation need one system each at least.\n")
    else:
        raise_note = ""
    evaluation = max(1, systems // 4)
    rest = max(1, systems - evaluation)
    # The run checks its supervised start on up to 16 systems after the training ones (keep-better):
    # they must come before the evaluation systems.
    train = max(1, rest - VALIDATION if rest >= 2 * VALIDATION else rest // 2)
    batch = min(8, train)
    lines = [f"# Written by `metasolve record`: trains on the {systems} system(s) recorded in this directory:",
             f"# the first {train} train, the next {min(VALIDATION, train)} check the supervised start, the last "
             f"{evaluation} evaluate. Edit freely.",
             raise_note.rstrip("\n"),
             "[problem]", 'family = "recorded"', f'params = {{ directory = "{out}" }}',
             'features = "operator"    # computed from A and b: what `metasolve predict --matrix` computes too',
             f"train_tasks = {train}", f"eval_tasks = {evaluation}", ""]
    if pc_type == "sor":
        options = "-ksp_norm_type unpreconditioned" + (
            " -pc_sor_forward" if sweep in ("forward", "local_forward") else
            " -pc_sor_backward" if sweep in ("backward", "local_backward") else "")
        lines += ["[solver]", f'ksp_type = "{ksp_type}"', 'pc_type = "sor"', f'options = "{options}"', "",
                  "[space.pc_sor_omega]", 'kind = "interval"', "lo = 1.0", "hi = 1.98", "",
                  "[cost]", 'kind = "iteration_proxy"', "rtol = 1e-6", "max_it = 3000", "",
                  "[estimator]", 'kind = "control_variate"', "eps = 1e-2", ""]
    else:
        lines += ["[solver]", f'ksp_type = "{ksp_type}"', f'pc_type = "{pc_type}"', "",
                  "[space.pc_type]", 'kind = "choice"',
                  f"choices = {json.dumps(sorted({pc_type, 'jacobi', 'sor', 'ilu'}))}", "",
                  "[cost]", 'kind = "log_work"', "rtol = 1e-6", "max_it = 3000", "",
                  "[estimator]", 'kind = "score_function"', ""]
    lines += ["[model]", "hidden = 16", "depth = 1", "",
              "[train]", "steps = 40", f"batch_size = {batch}", "lr = 1e-2", 'schedule = "cosine"',
              f'out = "{out / "run"}"', ""]
    path = out / STARTER
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path


__all__ = ["Recording", "record", "run_record", "split_binary", "write_starter_config"]
