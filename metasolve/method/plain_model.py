"""A trained meta-solver as plain arrays, evaluated with numpy: deployment without torch.

`metasolve predict` sits in job scripts, where a 0.15 s program run must not wait 3 s for torch
to import. `MetaSolver.save` therefore writes, beside its torch file, `<stem>.plain.npz`: the
standardisation, the MLP's layers and a JSON header (format version, the network's spec, the
space as `Space.to_dict` data, the anchors). This module rebuilds the exact same map

    features → (features − mean)/scale → [Linear, tanh]×depth → Linear → raw θ
    raw θ_part += encode_part(clip(feature[anchor[part]]))  (textbook anchors, Interval parts)
    raw θ → setting                                          (every `Space` part kind's decode)

with numpy alone (tests/test_deploy_plain.py checks it against the torch model to 1e-12), for
one run or a table of runs in one matrix product.

A model file is data someone else may have written: everything that becomes PETSc options text
is checked (`check_identifier`, `check_value` when a model is loaded, `check_option_name` when
an options file is written), so no whitespace, newline, comment or second option can ride on a
choice value into an options file, and options that read or write files or print
(`-options_file`, viewers, monitors, logs) are refused as learned options.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from solvers.text import OPTION_NAME

FORMAT_VERSION = 1
"""Version of the plain file's layout; a loader refuses any other (an older metasolve cannot
know what a newer file means)."""

PLAIN_SUFFIX = ".plain.npz"
GUESS = "x0"
"""The setting entry that is an initial guess, not an option (as `solvers.options.split_setting`)."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VALUE_TOKEN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,+-]*$")
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_FLAG = re.compile(r"^-[A-Za-z][A-Za-z0-9_]*$")
_FORBIDDEN_WORDS = frozenset({"options", "view", "viewer", "monitor", "log", "draw", "python", "debugger", "dump",
                              "help", "malloc", "info", "file", "filename", "trap", "save", "load", "output"})
"""Words (between underscores) of option names a model may not set: they read other options
files, write or print things, or start debuggers. No solver setting worth learning contains one."""


def check_identifier(name: str, where: str) -> str:
    """A part's name or a choice's option name as stored: one identifier (no blanks, no dashes).
    Whether it is an option a model may set is checked when an options file is written
    (`check_option_name`): parts that never reach one may be named freely."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(f"{where}: name {name!r} is not an identifier (letters, digits, '_')")
    return name


def check_option_name(name: str, where: str) -> str:
    """A learned option's name: lowercase PETSc name, none of `_FORBIDDEN_WORDS`."""
    if not isinstance(name, str) or not OPTION_NAME.match(name):
        raise ValueError(f"{where}: {name!r} is not a PETSc option name (lowercase letters, digits, '_')")
    forbidden = sorted(set(name.split("_")) & _FORBIDDEN_WORDS)
    if forbidden:
        raise ValueError(f"{where}: option {name!r} is not a solver setting a model may set "
                         f"(it contains {forbidden[0]!r}: it reads files, writes or prints)")
    return name


def check_value(value: Any, where: str) -> Any:
    """A choice's option value: a finite number, a bool, None (a flag) or one plain PETSc token."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{where}: option value {value!r} is not finite")
        return value
    if isinstance(value, str) and _VALUE_TOKEN.match(value):
        return value
    raise ValueError(f"{where}: option value {value!r} is not a plain PETSc value (one token of letters, "
                     "digits, '_', '.', ',', '+', '-'): refused, it could carry other options into an options file")


def check_prefix(prefix: str) -> str:
    """An options prefix as PETSc accepts it (`PetscOptionsPrefixPush`: a letter first, no '-'),
    restricted to letters, digits and '_' so that it stays one token of an option name."""
    if prefix and (not isinstance(prefix, str) or not _PREFIX.match(prefix)):
        raise ValueError(f"invalid options prefix {prefix!r}: a letter, then letters, digits or '_' "
                         "(no leading '-', no blanks), e.g. 'heat_'")
    return prefix


def check_flag(flag: str) -> str:
    """A program's own option name such as `-x0`: one dash, a letter, letters/digits/'_'."""
    if not isinstance(flag, str) or not _FLAG.match(flag):
        raise ValueError(f"invalid option flag {flag!r}: '-' then a letter, letters, digits or '_', e.g. '-x0'")
    if set(flag[1:].lower().split("_")) & (_FORBIDDEN_WORDS - {"file", "load"}):
        raise ValueError(f"invalid option flag {flag!r}: not a program's own input option")
    return flag


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def sine_basis(n: int, modes: int) -> np.ndarray:
    """`metasolve.method.params.sine_basis` in numpy."""
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    j = np.arange(1, modes + 1, dtype=np.float64)[None, :]
    return np.sin(math.pi * i * j / (n + 1))


class PlainPart:
    """One part of the space: its width in θ and its decode of a batch of raw rows [B, dim]."""

    def __init__(self, name: str, data: Mapping[str, Any]) -> None:
        self.name, self.kind = name, data.get("kind")
        where = f"space part {name!r}"
        try:
            if self.kind in ("interval", "log_interval"):
                self.lo, self.hi = float(data["lo"]), float(data["hi"])
                if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi) or (
                        self.kind == "log_interval" and not self.lo > 0):
                    raise ValueError(f"bad bounds ({self.lo}, {self.hi})")
                self.dim = 1
            elif self.kind == "vector":
                shape = tuple(int(n) for n in data["n"])
                self.size, self.scale = int(np.prod(shape)), float(data["scale"])
                if data["basis"] == "identity":
                    self.basis, self.dim = None, self.size
                elif data["basis"] == "sine":
                    modes = int(data["modes"])
                    factors = [sine_basis(n, modes) for n in shape]
                    basis = factors[0] if len(factors) == 1 else np.kron(factors[0], factors[1])
                    k = np.arange(1, modes + 1, dtype=np.float64)
                    squared = k**2 if len(shape) == 1 else (k[:, None] ** 2 + k[None, :] ** 2).reshape(-1)
                    self.basis = basis * (squared / squared[0]) ** (-float(data["decay"]) / 2)
                    self.dim = self.basis.shape[1]
                else:
                    raise ValueError(f"unknown basis {data['basis']!r}")
            elif self.kind == "choice":
                self.choices = list(data["choices"])
                self.expands = all(isinstance(c, Mapping) for c in self.choices)
                for c in self.choices:
                    if self.expands:
                        for key, value in c.items():
                            check_identifier(key, f"{where}: choice {c!r}")
                            check_value(value, f"{where}: choice {c!r}")
                    else:
                        check_value(c, f"{where}")
                self.dim = len(self.choices)
            elif self.kind == "integer":
                self.lo, self.hi = int(data["lo"]), int(data["hi"])
                self.dim = 1
            else:
                raise ValueError(f"unknown kind {self.kind!r}")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where} ({self.kind}): {error}") from None
        check_identifier(name, where)

    def encode_clipped(self, values: np.ndarray, clip: float) -> np.ndarray:
        """Raw θ whose decode is `values` (an anchor's formula), the inverse of the part's decode with
        the fraction clipped to [clip, 1 − clip] (`metasolve.method.params.Interval.encode_clipped`)."""
        if self.kind == "interval":
            fraction = (values - self.lo) / (self.hi - self.lo)
        else:
            log_lo, log_hi = math.log(self.lo), math.log(self.hi)
            fraction = (np.log(np.maximum(values, 1e-300)) - log_lo) / (log_hi - log_lo)
        p = np.clip(fraction, clip, 1.0 - clip)
        return np.log(p / (1.0 - p))

    def decode(self, raw: np.ndarray) -> list[Any]:
        """The setting values of a batch of raw rows [B, dim], one per row."""
        if self.kind == "interval":
            return (self.lo + (self.hi - self.lo) * _sigmoid(raw[:, 0])).tolist()
        if self.kind == "log_interval":
            log_lo, log_hi = math.log(self.lo), math.log(self.hi)
            return np.exp(log_lo + (log_hi - log_lo) * _sigmoid(raw[:, 0])).tolist()
        if self.kind == "vector":
            coefficients = self.scale * raw
            vectors = coefficients if self.basis is None else coefficients @ self.basis.T
            return list(np.ascontiguousarray(vectors))
        if self.kind == "choice":
            return [self.choices[k] for k in np.argmax(raw, axis=1)]
        centre = self.lo - 0.5 + (self.hi - self.lo + 1) * _sigmoid(raw[:, 0])
        return [int(v) for v in np.clip(np.floor(centre + 0.5), self.lo, self.hi).astype(np.int64)]


class PlainModel:
    """The numpy twin of a `MetaSolver`: `settings(features [B, F]) -> [setting per row]`."""

    def __init__(self, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], source: str = "model") -> None:
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: plain model format_version {version!r} is not supported by this metasolve "
                             f"(it reads version {FORMAT_VERSION}); re-save the model with this version")
        try:
            self.spec = dict(header["spec"])
            self.parts = [PlainPart(name, data) for name, data in header["space"]["parts"]]
            self.feature_dim, depth = int(self.spec["feature_dim"]), int(self.spec["depth"])
            self.mean = np.asarray(arrays["feature_mean"], dtype=np.float64)
            self.scale = np.asarray(arrays["feature_scale"], dtype=np.float64)
            self.layers = [(np.asarray(arrays[f"weight_{i}"], dtype=np.float64),
                            np.asarray(arrays[f"bias_{i}"], dtype=np.float64)) for i in range(depth + 1)]
            anchor = self.spec.get("anchor") or {}
            self.anchor_clip = float(header.get("anchor_clip", 1e-4))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: malformed plain model ({type(error).__name__}: {error})") from None
        self.dim = sum(p.dim for p in self.parts)
        width = self.feature_dim
        for i, (weight, bias) in enumerate(self.layers):
            if weight.ndim != 2 or weight.shape[1] != width or bias.shape != weight.shape[:1]:
                raise ValueError(f"{source}: layer {i} has shape {weight.shape}/{bias.shape}, expected inputs {width}")
            width = weight.shape[0]
        if width != self.dim or self.mean.shape != (self.feature_dim,) or self.scale.shape != (self.feature_dim,):
            raise ValueError(f"{source}: the network's widths do not match its space (dim {self.dim}) or features")
        names = [p.name for p in self.parts]
        self.anchor: dict[int, int] = {}
        for part, feature in anchor.items():
            if part not in names or not isinstance(feature, int) or not 0 <= feature < self.feature_dim:
                raise ValueError(f"{source}: anchor {part!r} -> {feature!r} names no part or feature")
            index = names.index(part)
            if self.parts[index].kind not in ("interval", "log_interval"):
                raise ValueError(f"{source}: anchor on part {part!r} ({self.parts[index].kind}): anchors apply "
                                 "to interval and log_interval parts only")
            self.anchor[index] = feature

    @property
    def features(self) -> str:
        """What the features were: 'operator', 'structural' or a task family's own name."""
        return str(self.spec.get("features", "task"))

    def theta(self, features: np.ndarray) -> np.ndarray:
        """Raw θ [B, dim] for features [B, feature_dim] (as `MetaSolver.forward`)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"the model expects {self.feature_dim} features per task, got shape {features.shape}")
        h = (features - self.mean) / self.scale
        for weight, bias in self.layers[:-1]:
            h = np.tanh(h @ weight.T + bias)
        weight, bias = self.layers[-1]
        theta = h @ weight.T + bias
        start = 0
        for index, part in enumerate(self.parts):
            if index in self.anchor:
                values = features[:, self.anchor[index]]
                if not np.all(np.isfinite(values)):
                    raise ValueError(f"the anchor of {part.name!r} (feature {self.anchor[index]}) is not finite: "
                                     f"{values[~np.isfinite(values)][:3].tolist()}")
                theta[:, start] += part.encode_clipped(values, self.anchor_clip)
            start += part.dim
        return theta

    def decode(self, theta: np.ndarray) -> list[dict[str, Any]]:
        """Settings of raw θ rows [B, dim] (as `Space.decode`, row by row)."""
        if not np.all(np.isfinite(theta)):
            raise ValueError("θ contains non-finite values (NaN or inf): the features are outside what the "
                             "model (or its anchor) can map")
        settings: list[dict[str, Any]] = [{} for _ in range(theta.shape[0])]
        start = 0
        for part in self.parts:
            values = part.decode(theta[:, start:start + part.dim])
            start += part.dim
            for setting, value in zip(settings, values):
                entries = value if part.kind == "choice" and part.expands else {part.name: value}
                clash = sorted(set(entries) & set(setting))
                if clash:
                    raise ValueError(f"part {part.name!r} sets {clash}, already set by another part of the space")
                setting.update(entries)
        return settings

    def settings(self, features: np.ndarray) -> list[dict[str, Any]]:
        return self.decode(self.theta(features))


def plain_path(model: str | Path) -> Path:
    """`run/meta_solver.pt` → `run/meta_solver.plain.npz` (a `.npz` path is its own plain file)."""
    model = Path(model)
    return model if model.name.endswith(".npz") else model.with_name(model.stem + PLAIN_SUFFIX)


def write_plain(path: str | Path, spec: Mapping[str, Any], space: Mapping[str, Any],
                arrays: Mapping[str, np.ndarray], anchor_clip: float) -> None:
    """Write the plain file (checked by loading it back in memory first: a model whose choices
    could not be delivered safely is refused when saved, not when a job script runs).
    `anchor_clip`: `metasolve.method.params.ANCHOR_CLIP`, stored so the two cannot drift apart."""
    header = {"format_version": FORMAT_VERSION, "spec": dict(spec), "space": dict(space),
              "anchor_clip": float(anchor_clip)}
    PlainModel(json.loads(json.dumps(header)), arrays, source=str(path))
    with open(path, "wb") as stream:
        np.savez(stream, header=np.array(json.dumps(header)), **{k: np.asarray(v, dtype=np.float64)
                                                                 for k, v in arrays.items()})


def load_plain(path: str | Path) -> PlainModel:
    """Read a plain file without pickle; anything malformed is a ValueError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(str(arrays.pop("header")))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ValueError(f"{path}: not a plain meta-solver file ({type(error).__name__}: {error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a plain meta-solver file (no header)")
    return PlainModel(header, arrays, source=str(path))
