"""Atomic checkpoints, loaded without running code, and finding the newest one that is intact.

A checkpoint is plain data (tensors, numbers, strings, lists, dicts), so it loads with
`torch.load(weights_only=True)`: a crafted file cannot run code on the machine that resumes it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from metasolve.method.files import CheckpointError, load_file

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_TEMPORARY = ".checkpoint-*.tmp"
log = logging.getLogger("metasolve")
FORMAT_VERSION = 2
"""Written into every checkpoint; a file of another format is refused by name, not misread.
2: the estimator's pending deferred work and the early-stopping state are part of the state."""

# Keys a resumed run may change. `train.steps` extends (or shortens) the run, and a cosine
# schedule is stretched to the new length from the resumed step on; the others only say how
# often to evaluate or checkpoint, where to write, how many ranks share the solves (the result
# is bitwise the same for any number), and how the final evaluation is done.
RESUMABLE = ("train.steps", "train.checkpoint_every", "train.eval_every", "train.out", "problem.eval_tasks",
             "evaluate.", "parallel.")


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(old: dict, new: dict, accepted: tuple[str, ...] = RESUMABLE) -> list[str]:
    """`key: old -> new` for every key that differs and that a resumed run may not change."""
    a, b = _flatten(old), _flatten(new)
    return [f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and not key.startswith(accepted)]


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `checkpoint-<step>.pt` via a temp file + fsync + rename, so a kill never leaves half a
    file under the real name (a kill mid-write leaves a `.checkpoint-*.tmp`, see `remove_stale`)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"checkpoint-{step:08d}.pt"
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save({**state, "format_version": FORMAT_VERSION}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except RuntimeError as error:  # torch's zip writer reports a short write as "unexpected pos"
        Path(temporary).unlink(missing_ok=True)
        free = shutil.disk_usage(directory).free
        raise OSError(errno.ENOSPC, f"writing {target} failed part-way ({free} bytes free on its device: most "
                                    f"likely no space left): {str(error).splitlines()[0]}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def remove_stale(directory: Path) -> list[Path]:
    """Delete temporary files left by writes that were killed (never a finished checkpoint)."""
    stale = sorted(directory.glob(_TEMPORARY)) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = load_file(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a metasolve checkpoint (no 'step')")
    version = state.get("format_version", 0)  # 0: written before versions were recorded
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(f"{path}: checkpoint format version {version!r}, this metasolve reads version "
                              f"{FORMAT_VERSION}: it was written by {'a newer' if newer else 'an older'} metasolve; "
                              f"start a new run (--overwrite) or use the metasolve that wrote it")
    return state


def load_latest(directory: Path) -> tuple[Path, dict[str, Any], list[Path]] | None:
    """The newest checkpoint that loads, and the newer ones that did not (reported and skipped);
    None when there are no checkpoint files at all."""
    unreadable: list[Path] = []
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path), unreadable
        except CheckpointError as error:
            log.warning("%s; falling back to the previous checkpoint", error)
            unreadable.append(path)
    if unreadable:
        raise CheckpointError(f"{directory}: no intact checkpoint to resume from "
                              f"({len(unreadable)} unreadable: {', '.join(p.name for p in unreadable)})")
    return None
