"""TOML run configurations, validated against a schema before anything runs.

An unknown key, a wrong type or a missing required field is a `ConfigError` naming the key and
the file: a typo in a batch job's config should fail in the first second, not after an hour.
"""
from __future__ import annotations

import copy
import logging
import math
import shlex
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
               "options": ((dict, str), {}), "command": (list, []), "timeout": (_NUMBER, 60.0),
               "isolate": (bool, False), "prefix": (str, "")},
    "space": {},
    "cost": {"kind": (str, "residual_area"), "iterations": (int, 20), "rtol": (_NUMBER, 1e-6),
             "max_it": (int, 1000), "sharpness": (_NUMBER, 4.0), "measure": (str, "flops"),
             "decades": (_NUMBER, 2.0)},
    "pretrain": {"enabled": (bool, True), "tasks": (int, 16), "search_solves": (int, 10)},
    "estimator": {"kind": (str, "control_variate"), "tangents": (int, 1), "difference": (str, "forward"),
                  "eps": (_NUMBER, 1e-3), "distribution": (str, "rademacher"), "combine": (str, "mean"),
                  "samples": (int, 1), "cost_model": (bool, True), "failure_margin": (_NUMBER, 1.0), "exploration": (_NUMBER, 0.9),
                  "temperature": (_NUMBER, 0.2),
                  "coefficient": ((str, int, float), "scalar"), "decay": (_NUMBER, 0.95),
                  "allocation": (str, "equal"), "alpha": (_NUMBER, 0.5), "memory": (int, 1),
                  "failures": (str, "drop")},
    "surrogate": {"kind": (str, "mlp"), "hidden": (int, 64), "depth": (int, 2), "lr": (_NUMBER, 1e-3), "steps": (int, 8),
                  "value_weight": (_NUMBER, 1.0), "jvp_weight": (_NUMBER, 1.0), "buffer": (int, 4096),
                  "batch_size": (int, 128), "chunk_rows": (int, 0)},
    # depth 0 (a linear map from standardised features) by default: exact for an initial guess of
    # a linear problem whose features are linear in b, and fitted in closed form by pretraining
    # (measured, Poisson1D 8 modes: depth 0 → 58 iterations, depth 2 → 1032, zero guess 1530).
    "model": {"kind": (str, "mlp"), "hidden": (int, 64), "depth": (int, 0), "normalize": (bool, True),
              "anchor": (dict, {})},
    "train": {"steps": (int, 100), "batch_size": (int, 8), "lr": (_NUMBER, 1e-3), "schedule": (str, "constant"),
              "seed": (int, 0),
              "checkpoint_every": (int, 10), "eval_every": (int, 0), "out": (str, "runs/metasolve"),
              "reference_every": (int, 0), "max_failed_fraction": (_NUMBER, 1.0), "failure_window": (int, 10),
              "surrogate_steps": (int, 10), "patience": (int, 0), "loss": (str, "mean")},
    "evaluate": {"rtol": (_NUMBER, 1e-6), "max_it": (int, 10_000), "constant_evaluations": (int, 10),
                 "constant_tasks": (int, 8), "params": (dict, {})},
    "parallel": {"group_size": (int, 1), "schedule": (str, "balanced")},
}

SPACE_PART_SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "vector": {"kind": (str, REQUIRED), "basis": (str, "sine"), "modes": (int, None), "scale": (_NUMBER, 1.0),
               "decay": (_NUMBER, 0.0)},
    "interval": {"kind": (str, REQUIRED), "lo": (_NUMBER, REQUIRED), "hi": (_NUMBER, REQUIRED)},
    "log_interval": {"kind": (str, REQUIRED), "lo": (_NUMBER, REQUIRED), "hi": (_NUMBER, REQUIRED)},
    "parameters": {"kind": (str, REQUIRED)},
    "choice": {"kind": (str, REQUIRED), "choices": (list, REQUIRED)},  # option values, or tables of options
    "integer": {"kind": (str, REQUIRED), "lo": (int, REQUIRED), "hi": (int, REQUIRED)},  # a calibrated model's own parameters, as many as the family's model has
}


def _at_least(bound: int) -> tuple[Any, str]:
    return (lambda v: v >= bound), f">= {bound}"


_POSITIVE = (lambda v: v > 0), "> 0"
_NON_NEGATIVE = (lambda v: v >= 0), ">= 0"
_FRACTION = (lambda v: 0 < v < 1), "in (0, 1)"

# "section.key" -> (predicate, what it must be): ranges a type cannot say. A value outside them
# would fail later (a ZeroDivisionError after step 1, an IndexError after training, PETSc
# rejecting a tolerance in every solve) or silently do nothing (steps = 0).
RANGES: dict[str, tuple[Any, str]] = {
    "problem.train_tasks": _at_least(1), "problem.eval_tasks": _at_least(1),
    "solver.rtol": ((lambda v: 0 <= v < 1), "in [0, 1) (PETSc's KSPSetTolerances)"),
    "solver.atol": _NON_NEGATIVE, "solver.timeout": _POSITIVE,
    "cost.iterations": _at_least(1), "cost.rtol": _FRACTION, "cost.max_it": _at_least(1), "cost.sharpness": _POSITIVE,
    "cost.decades": _NON_NEGATIVE,
    "estimator.tangents": _at_least(1), "estimator.eps": _POSITIVE, "estimator.temperature": _NON_NEGATIVE,
    "surrogate.hidden": _at_least(1), "surrogate.depth": _at_least(0), "surrogate.lr": _POSITIVE,
    "surrogate.steps": _at_least(0), "surrogate.chunk_rows": _at_least(0),
    "surrogate.value_weight": _NON_NEGATIVE, "surrogate.jvp_weight": _NON_NEGATIVE,
    "model.hidden": _at_least(1), "model.depth": _at_least(0),
    "train.steps": _at_least(1), "train.batch_size": _at_least(1), "train.lr": _POSITIVE,
    "train.checkpoint_every": _at_least(1), "train.eval_every": _at_least(0), "train.reference_every": _at_least(0),
    "train.max_failed_fraction": ((lambda v: 0 < v <= 1), "in (0, 1]"), "train.failure_window": _at_least(1),
    "train.surrogate_steps": _at_least(0),
    "evaluate.rtol": _FRACTION, "evaluate.max_it": _at_least(1),
    "parallel.group_size": _at_least(1), "problem.seed": _NON_NEGATIVE,
    "solver.max_it": ((lambda v: 1 <= v < 2**31), ">= 1 and < 2^31 (a PetscInt)"),
    "pretrain.tasks": _NON_NEGATIVE, "pretrain.search_solves": _at_least(2), "train.patience": _NON_NEGATIVE,
    "evaluate.constant_evaluations": _NON_NEGATIVE, "evaluate.constant_tasks": _at_least(1),
    "vector.modes": ((lambda v: v is None or v >= 1), ">= 1"), "vector.scale": _POSITIVE,
    "vector.decay": _NON_NEGATIVE,
}


# "section.key" -> the values it may take: a misspelt kind fails when the file is read, not after
# run.json is written and every task's features are computed.
CHOICES: dict[str, tuple[str, ...]] = {
    "problem.features": ("auto", "family", "operator", "structural", "both"),
    "solver.kind": ("ksp", "executable", "family"),
    "cost.kind": ("residual_area", "log_residual", "iteration_proxy", "run_iteration_proxy", "work", "log_work",
                  "log_error"),
    "cost.measure": ("flops", "seconds"),
    "estimator.kind": ("control_variate", "forward", "spsa", "finite_difference", "score_function"),
    "estimator.difference": ("forward", "central"),
    "estimator.distribution": ("rademacher", "gaussian", "orthogonal", "guided"),
    "estimator.failures": ("drop", "penalize"),
    "estimator.combine": ("mean", "projection"),
    "estimator.allocation": ("equal", "variance"),
    "surrogate.kind": ("mlp", "log_affine", "family"),
    "model.kind": ("mlp", "shared"),
    "train.schedule": ("constant", "cosine"),
    "train.loss": ("mean", "log_mean"),
    "parallel.schedule": ("static", "balanced"),
    "vector.basis": ("sine", "identity"),
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
        if types is _NUMBER and not math.isfinite(value):
            raise ConfigError(f"{source}: {where}.{key} must be a finite number, got {value!r}")
        result[key] = float(value) if types is _NUMBER else value
        table = given.get("kind") if where.startswith("space.") else where
        allowed = CHOICES.get(f"{table}.{key}")
        if allowed is not None and result[key] not in allowed:
            raise ConfigError(f"{source}: {where}.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        rule = RANGES.get(f"{table}.{key}")
        if rule is not None and not rule[0](result[key]):
            raise ConfigError(f"{source}: {where}.{key} must be {rule[1]}, got {value!r}")
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
    _check_across_sections(raw, config, source)
    return config


# PETSc options with a key of their own in [solver]: given in both places they would silently
# override each other (the options database wins over the KSPSetType call).
_SOLVER_KEYS = {"ksp_type": "ksp_type", "pc_type": "pc_type", "ksp_rtol": "rtol", "ksp_atol": "atol",
                "ksp_max_it": "max_it"}


def parse_options(text: str, where: str = "options") -> dict[str, str]:
    """A PETSc options string (`"-pc_type sor -pc_sor_forward -pc_sor_omega 1.5"`) as a dict.

    PETSc's own rule: a token starting with '-' that is not a number names an option; the next
    token is its value unless it names an option too (then the first is a flag, value "").
    """
    def is_name(token: str) -> bool:
        if not token.startswith("-"):
            return False
        try:
            float(token)
        except ValueError:
            return True
        return False

    options: dict[str, str] = {}
    tokens = shlex.split(text)
    i = 0
    while i < len(tokens):
        if not is_name(tokens[i]):
            raise ConfigError(f"{where}: value {tokens[i]!r} does not follow an option name")
        name = tokens[i].lstrip("-")
        has_value = i + 1 < len(tokens) and not is_name(tokens[i + 1])
        options[name] = tokens[i + 1] if has_value else ""
        i += 2 if has_value else 1
    return options


def _check_across_sections(raw: dict, config: dict, source: str) -> None:
    """Constraints between keys, and PETSc options given twice."""
    problem, train, solver = config["problem"], config["train"], config["solver"]
    if train["batch_size"] > problem["train_tasks"]:
        raise ConfigError(f"{source}: train.batch_size = {train['batch_size']} exceeds problem.train_tasks = "
                          f"{problem['train_tasks']} (a batch draws distinct training tasks)")
    if train["patience"] and not train["eval_every"]:
        raise ConfigError(f"{source}: train.patience = {train['patience']} counts held-out evaluations, and "
                          f"train.eval_every = 0 makes none: set train.eval_every (e.g. 5)")
    if isinstance(solver["options"], str):
        solver["options"] = parse_options(solver["options"], f"{source}: solver.options")
    given = raw.get("solver", {})
    for option, key in _SOLVER_KEYS.items():
        if option not in solver["options"] or solver["kind"] == "executable":  # a program gets its options verbatim
            continue
        if key in given:
            raise ConfigError(f"{source}: {option} is given twice, as solver.{key} = {given[key]!r} and in "
                              f"solver.options = {solver['options'][option]!r}; keep one")
        value = solver["options"].pop(option)
        types, _ = SCHEMA["solver"][key]
        try:
            converted = value if types is str else (float(value) if types is _NUMBER else int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: solver.options {option} = {value!r} is not a valid "
                              f"{'number' if types is _NUMBER else types.__name__}") from None
        solver[key] = _check_section("solver", source, {key: converted}, {key: SCHEMA["solver"][key]})[key]
    if solver["kind"] == "executable":  # a program reads its solver from the options database
        for key in ("ksp_type", "pc_type"):
            if given.get(key, SCHEMA["solver"][key][1]) != SCHEMA["solver"][key][1]:
                raise ConfigError(f"{source}: solver.{key} = {given[key]!r} does not reach a program (kind = "
                                  f"'executable'), which reads its solver from its options database: give it as "
                                  f"solver.options = \"-{key} {given[key]} ...\"")
    for name, value in solver["options"].items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: solver.options {name} must be finite, got {value!r}")
    for key in ("rtol", "atol", "max_it"):
        if key in given and given[key] != SCHEMA["solver"][key][1]:  # stated when the file is read
            later = "; evaluation uses [evaluate] " + key if key != "atol" else ""
            logging.getLogger("metasolve").warning(
                "%s: solver.%s = %r is replaced in training by the fixed budget of cost.kind = %r%s",
                source, key, given[key], config["cost"]["kind"], later)


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
        if kind == "log_interval" and not parts[name]["lo"] > 0:
            raise ConfigError(f"{source}: space.{name}.lo must be > 0 for a log_interval, got {parts[name]['lo']!r}")
        if kind == "choice":
            _check_choices(name, parts[name]["choices"], source)
        if kind in ("interval", "log_interval", "integer") and not parts[name]["lo"] < parts[name]["hi"]:
            raise ConfigError(f"{source}: space.{name} needs lo < hi, got lo = {parts[name]['lo']!r}, "
                              f"hi = {parts[name]['hi']!r}")
    return parts


def _check_choices(name: str, choices: list, source: str) -> None:
    """At least two distinct choices, all option values or all tables of options (the Choice part's rules)."""
    tables = [isinstance(c, dict) for c in choices]
    if len(choices) < 2 or (any(tables) and not all(tables)) or len({repr(c) for c in choices}) != len(choices):
        raise ConfigError(f"{source}: space.{name}.choices must list at least two distinct choices, all option "
                          f"values or all tables of options, got {choices!r}")


def override(config: dict, changes: dict[str, Any], source: str = "<config>") -> dict:
    """`config` with dotted keys replaced (`{"train.steps": 150}`), validated again: how a
    benchmark runs a shipped config at another scale without assembling the experiment by hand."""
    changed = copy.deepcopy(config)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        table = changed
        for part in path:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: cannot override {dotted}: {part} is not a table")
        table[key] = value
    return validate(changed, f"{source} (with {', '.join(changes)} overridden)")


def _default_text(default: Any) -> str:
    if default is REQUIRED:
        return "(required)"
    if isinstance(default, str):
        return repr(default)
    return str(default)


def config_reference(section: str | None = None, brief: bool = False) -> str:
    """Every key of the schema with its type, default, range and allowed values: the config
    reference, generated from the schema so it cannot drift (`metasolve config`, docs/config.md)."""
    if section is not None and section not in SCHEMA:
        raise ConfigError(f"unknown section [{section}] (sections: {', '.join(SCHEMA)})")
    lines = []
    for name, schema in SCHEMA.items():
        if section is not None and name != section:
            continue
        if name == "space":
            lines.append("[space.<name>]  one table per learned part; kind = " + " | ".join(SPACE_PART_SCHEMA))
            for kind, keys in SPACE_PART_SCHEMA.items():
                extra = ", ".join(f"{k} = {_default_text(d)}" for k, (_, d) in keys.items() if k != "kind")
                lines.append(f"  kind = {kind!r}: {extra or '(no keys)'}")
            continue
        lines.append(f"[{name}]")
        for key, (types, default) in schema.items():
            if brief:
                lines.append(f"  {key} = {_default_text(default)}")
                continue
            kinds = " | ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            rule = RANGES.get(f"{name}.{key}")
            allowed = CHOICES.get(f"{name}.{key}")
            notes = (f"; {rule[1]}" if rule else "") + (f"; one of {', '.join(map(repr, allowed))}" if allowed else "")
            lines.append(f"  {key} = {_default_text(default)}    ({kinds}{notes})")
    return "\n".join(lines)


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
