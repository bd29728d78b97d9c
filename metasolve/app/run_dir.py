"""A run directory belongs to one run: its config and code fingerprint are recorded in `run.json`.

Training into a directory that holds another run's checkpoints or model is refused unless asked
to overwrite, and `--resume` refuses a run with a different config except for the differences in
`RESUMABLE`, which change neither the steps already taken nor how the next ones are drawn.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from metasolve.training.checkpoint import RESUMABLE, config_differences, list_checkpoints, load_latest

log = logging.getLogger("metasolve")
RECORD = "run.json"
# Files a run writes into its directory, and nothing else: `--overwrite` deletes only these.
ARTEFACTS = (RECORD, "metrics.jsonl", "meta_solver.pt", "meta_solver.plain.npz", "meta_solver.delivery.json",
             "pretrained.pt", "evaluation.json", "report.md", "learning_curve.png", "iterations.png")


LOCK = ".lock"
_held: dict[Path, int] = {}  # run directory -> descriptor of its lock file, while this process runs in it


class RunDirectoryError(ValueError):
    """The output directory holds a different run (or nothing to resume); the message says what to do."""


def lock(out: Path) -> None:
    """Hold `out/.lock` exclusively for as long as this process runs in `out` (released by
    `release`, or by the kernel when the process dies, however it dies). A second job in the
    same directory — a Slurm resubmission overlapping its predecessor — is refused at once
    instead of interleaving metrics and deleting the other's temporary checkpoint."""
    key = out.resolve()
    if key in _held:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunDirectoryError(f"{out}: cannot write the run directory ({error.strerror or error}); "
                                f"choose a writable --out") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise RunDirectoryError(f"{out} is in use by another running job (pid {holder}); wait for it to "
                                    f"finish or choose another --out") from None
        raise
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held[key] = descriptor


def release(out: Path) -> None:
    """Let another job use `out` (the lock file stays; it is the lock, not a sign of a run)."""
    descriptor = _held.pop(out.resolve(), None)
    if descriptor is not None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def code_fingerprint() -> str:
    """SHA-256 over the source of metasolve, solvers and problems: which code wrote a run."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("metasolve", "solvers", "problems"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _holds_a_run(out: Path) -> bool:
    """Only checkpoints and a model are worth protecting; a run that stopped before its first
    checkpoint left nothing a new run could lose."""
    return bool(list_checkpoints(out / "checkpoints")) or (out / "meta_solver.pt").exists()


def _recorded(out: Path) -> dict | None:
    path = out / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(f"{path}: unreadable run record ({error}); use --overwrite to start a new run") from None


def remove_run(out: Path) -> None:
    """Delete what a run wrote into `out` (its known files and checkpoints), nothing else."""
    for name in ARTEFACTS:
        (out / name).unlink(missing_ok=True)
    for path in list_checkpoints(out / "checkpoints"):
        path.unlink()
    for path in (out / "checkpoints").glob(".checkpoint-*.tmp") if (out / "checkpoints").is_dir() else []:
        path.unlink()


def claim(out: Path, config: dict, resume: bool = False, overwrite: bool = False) -> dict:
    """Make `out` this run's directory and return its record; call on the root rank only.

    Refuses (RunDirectoryError) to train over another run without `overwrite`, and to resume a
    run whose config differs outside `RESUMABLE`. A changed code fingerprint on resume is
    reported, not refused: resuming after a bug fix is legitimate, but it is stated.
    """
    record = {"config": config, "code": code_fingerprint(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    lock(out)
    if overwrite:
        if resume:
            raise RunDirectoryError("--resume and --overwrite contradict each other: choose one")
        remove_run(out)
    else:
        previous = _recorded(out)
        if previous is None and not resume and _holds_a_run(out):
            raise RunDirectoryError(f"{out} holds checkpoints or a model of a run with no record ({RECORD}); "
                                    f"use --resume to continue it, --overwrite to replace it, or choose another --out")
        if previous is None and resume and _holds_a_run(out):
            # A run with no record (written before records existed): its newest checkpoint says.
            found = load_latest(out / "checkpoints")
            metadata = found[1].get("metadata", {}) if found else {}
            previous = {"config": metadata["config"], "code": metadata.get("code")} if "config" in metadata else None
        if previous is not None and not resume and _holds_a_run(out):
            differences = config_differences(previous.get("config", {}), config, accepted=())
            what = f"a run with a different config ({'; '.join(differences)})" if differences else "a run of this config"
            raise RunDirectoryError(f"{out} already holds {what}; use --resume to continue it, --overwrite to "
                                    f"replace it, or choose another --out")
        if previous is not None and resume:
            differences = config_differences(previous.get("config", {}), config)
            if differences:
                raise RunDirectoryError(f"--resume: {out} holds a run with a different config ({'; '.join(differences)}); "
                                        f"a resumed run may change only {', '.join(RESUMABLE)}")
            if previous.get("code") != record["code"]:
                log.warning("resuming %s with different code (fingerprint %s, the run was started with %s)",
                            out, record["code"], previous.get("code"))
            record["started"] = previous.get("started", record["started"])
    try:
        (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    except OSError as error:
        raise RunDirectoryError(f"{out / RECORD}: cannot write the run record ({error.strerror or error})") from None
    return record
