"""Atomic checkpoints and finding the newest one that is intact."""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `checkpoint-<step>.pt` via a temp file + rename, so a kill never leaves half a file
    under the real name; keep the newest `keep` so a damaged newest one still has a predecessor."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"checkpoint-{step:08d}.pt"
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return target


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in `directory`, newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a truncated or corrupt one is reported and skipped."""
    for path in list_checkpoints(directory):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a metasolve checkpoint (no 'step')")
            return path, state
        except Exception as error:  # noqa: BLE001 — any unreadable file is skipped the same way
            warnings.warn(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); "
                          "falling back to the previous one", RuntimeWarning, stacklevel=2)
    return None
