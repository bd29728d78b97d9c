"""TOML run configurations, validated against a schema before anything runs.

An unknown key, a wrong type or a missing required field is a `ConfigError` naming the key and
the file: a typo in a batch job's config should fail in the first second, not after an hour.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file that does not match the schema."""


REQUIRED = object()
_NUMBER = (int, float)

# section -> key -> (accepted types, default or REQUIRED)
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "problem": {"family": (str, REQUIRED), "params": (dict, {}), "seed": (int, 0),
                "train_tasks": (int, 64), "eval_tasks": (int, 16), "features": (str, "auto")},
    "solver": {"kind": (str, "ksp"), "ksp_type": (str, "cg"), "pc_type": (str, "jacobi"),
               "rtol": (_NUMBER, 1e-6), "atol": (_NUMBER, 1e-50), "max_it": (int, 10_000),
               "options": (dict, {}), "command": (list, []), "timeout": (_NUMBER, 60.0),
               "isolate": (bool, False)},
    "space": {},
    "cost": {"kind": (str, "log_residual"), "iterations": (int, 20), "rtol": (_NUMBER, 1e-6),
             "max_it": (int, 200), "sharpness": (_NUMBER, 4.0)},
    "estimator": {"kind": (str, "control_variate"), "tangents": (int, 1), "difference": (str, "forward"),
                  "eps": (_NUMBER, 1e-3), "distribution": (str, "rademacher"), "combine": (str, "mean"),
                  "coefficient": ((str, int, float), "scalar"), "decay": (_NUMBER, 0.95),
                  "allocation": (str, "equal"), "alpha": (_NUMBER, 0.5), "memory": (int, 1),
                  "failures": (str, "drop")},
    "surrogate": {"kind": (str, "mlp"), "hidden": (int, 64), "depth": (int, 2), "lr": (_NUMBER, 1e-3), "steps": (int, 1),
                  "value_weight": (_NUMBER, 1.0), "jvp_weight": (_NUMBER, 1.0), "buffer": (int, 4096),
                  "batch_size": (int, 128)},
    "model": {"kind": (str, "mlp"), "hidden": (int, 64), "depth": (int, 2), "normalize": (bool, True)},
    "train": {"steps": (int, 100), "batch_size": (int, 8), "lr": (_NUMBER, 1e-3), "schedule": (str, "constant"),
              "seed": (int, 0),
              "checkpoint_every": (int, 10), "eval_every": (int, 0), "out": (str, "runs/metasolve"),
              "reference_every": (int, 0)},
    "evaluate": {"rtol": (_NUMBER, 1e-6), "max_it": (int, 10_000)},
    "parallel": {"group_size": (int, 1), "schedule": (str, "balanced")},
}

SPACE_PART_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "vector": {"kind": (str, REQUIRED), "basis": (str, "sine"), "modes": (int, None), "scale": (_NUMBER, 1.0),
               "decay": (_NUMBER, 0.0)},
    "interval": {"kind": (str, REQUIRED), "lo": (_NUMBER, REQUIRED), "hi": (_NUMBER, REQUIRED)},
    "log_interval": {"kind": (str, REQUIRED), "lo": (_NUMBER, REQUIRED), "hi": (_NUMBER, REQUIRED)},
    "parameters": {"kind": (str, REQUIRED)},  # a calibrated model's own parameters, as many as the family's model has
}


def _check_section(where: str, source: str, given: dict, schema: dict) -> dict:
    result = {}
    for key in given:
        if key not in schema:
            raise ConfigError(f"{source}: unknown key {where}.{key} (allowed: {', '.join(sorted(schema))})")
    for key, (types, default) in schema.items():
        if key not in given:
            if default is REQUIRED:
                raise ConfigError(f"{source}: missing required key {where}.{key}")
            result[key] = copy.deepcopy(default)
            continue
        value = given[key]
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ConfigError(f"{source}: {where}.{key} must be {expected}, got {type(value).__name__} {value!r}")
        result[key] = float(value) if types is _NUMBER else value
    return result


def validate(raw: dict, source: str = "<config>") -> dict:
    """The config with defaults filled in; raises ConfigError naming the offending key and file."""
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}] (allowed: {', '.join(SCHEMA)})")
    if "problem" not in raw:
        raise ConfigError(f"{source}: missing required section [problem]")
    config = {}
    for section, schema in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        if section == "space":
            config[section] = _validate_space(given, source)
        else:
            config[section] = _check_section(section, source, given, schema)
    return config


def _validate_space(given: dict, source: str) -> dict:
    if not given:
        raise ConfigError(f"{source}: [space] needs at least one part, e.g. [space.x0] kind = \"vector\"")
    parts = {}
    for name, part in given.items():
        if not isinstance(part, dict):
            raise ConfigError(f"{source}: space.{name} must be a table with a 'kind'")
        kind = part.get("kind")
        if kind not in SPACE_PART_SCHEMA:
            raise ConfigError(f"{source}: space.{name}.kind must be one of {sorted(SPACE_PART_SCHEMA)}, got {kind!r}")
        parts[name] = _check_section(f"space.{name}", source, part, SPACE_PART_SCHEMA[kind])
    return parts


def parse_config(text: str, source: str) -> dict:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    return validate(raw, source)


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    return parse_config(text, str(path))
