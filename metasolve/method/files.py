"""Loading files that metasolve wrote with `torch.save`, without running code.

Models and checkpoints are plain data (tensors, numbers, strings, lists, dicts), so they load
with `torch.load(weights_only=True)`: a crafted file cannot run code on the machine that loads
it, and a damaged one is named with what is wrong instead of a deserialiser's traceback.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint (or model) file that cannot be used; the message names the file."""


def load_file(path: Path, what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)`; any failure is a CheckpointError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what} file") from None
    except Exception as error:  # noqa: BLE001 — truncated, random, or a pickle that wants to run code
        raise CheckpointError(f"{path}: not a readable {what} ({_unreadable(error)})") from None


def _unreadable(error: Exception) -> str:
    """What is wrong with a file torch.load(weights_only=True) rejected, in words (torch's own
    message for a crafted pickle suggests loading it unsafely, and for random bytes says nothing)."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return (f"refused: it holds a pickled Python object, {found.group(1)}, that loading would construct "
                    "or call; metasolve writes only tensors and plain data")
        return "not written by torch.save: random or damaged bytes"
    if isinstance(error, EOFError) or not text:
        return "empty or truncated"
    if "central directory" in text:
        return "truncated or damaged: its zip archive is incomplete"
    return f"{type(error).__name__}: {text.splitlines()[0]}"
