"""TOML config validation: every mistake names the key and the file."""
from __future__ import annotations

import pytest

from metasolve.app.config import ConfigError, load_config

GOOD = """
[problem]
family = "poisson1d"
params = { n = 31 }

[space.x0]
kind = "vector"
modes = 4

[train]
steps = 5
"""


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_good_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config["train"]["steps"] == 5 and config["train"]["batch_size"] == 8
    assert config["space"]["x0"] == {"kind": "vector", "basis": "sine", "modes": 4, "scale": 1.0, "decay": 0.0}
    assert config["solver"]["rtol"] == 1e-6 and isinstance(config["solver"]["rtol"], float)


@pytest.mark.parametrize("text, message", [
    (GOOD + "\n[trian]\nsteps = 3\n", "unknown section \\[trian\\]"),
    (GOOD.replace("steps = 5", "stpes = 5"), "unknown key train.stpes"),
    (GOOD.replace("steps = 5", 'steps = "5"'), "train.steps must be int, got str"),
    (GOOD.replace("steps = 5", "steps = true"), "train.steps must be int, got bool"),
    (GOOD.replace('family = "poisson1d"', ""), "missing required key problem.family"),
    (GOOD.replace('kind = "vector"', 'kind = "tensor"'), "space.x0.kind must be one of"),
    ("[space.x0]\nkind='vector'\nmodes=2\n", "missing required section \\[problem\\]"),
    (GOOD + "\n[space.omega]\nkind = 'interval'\nlo = 1.0\n", "missing required key space.omega.hi"),
    ("[problem\n", "not valid TOML"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("section, line, message", [
    ("train", "checkpoint_every = 0", "train.checkpoint_every must be >= 1"),
    ("train", "checkpoint_every = -3", "train.checkpoint_every must be >= 1"),
    ("train", "eval_every = -1", "train.eval_every must be >= 0"),
    ("train", "reference_every = -2", "train.reference_every must be >= 0"),
    ("train", "steps = 0", "train.steps must be >= 1"),
    ("train", "steps = -4", "train.steps must be >= 1"),
    ("train", "lr = inf", "train.lr must be a finite number"),
    ("train", "lr = 0.0", "train.lr must be > 0"),
    ("train", "batch_size = 100", "train.batch_size = 100 exceeds problem.train_tasks = 64"),
    ("train", "max_failed_fraction = 0.0", "train.max_failed_fraction must be in \\(0, 1\\]"),
    ("problem", "train_tasks = 0", "problem.train_tasks must be >= 1"),
    ("problem", "eval_tasks = 0", "problem.eval_tasks must be >= 1"),
    ("surrogate", "value_weight = nan", "surrogate.value_weight must be a finite number"),
    ("surrogate", "jvp_weight = -1.0", "surrogate.jvp_weight must be >= 0"),
    ("solver", "rtol = 2.0", "solver.rtol must be in \\[0, 1\\)"),
    ("solver", "rtol = nan", "solver.rtol must be a finite number"),
    ("solver", "max_it = -5", "solver.max_it must be >= 1"),
    ("solver", "atol = -5.0", "solver.atol must be >= 0"),
    ("solver", "timeout = inf", "solver.timeout must be a finite number"),
    ("solver", "ksp_type = 'cg'\noptions = { ksp_type = 'gmres' }", "ksp_type is given twice"),
    ("solver", "rtol = 1e-8\noptions = '-ksp_rtol 1e-3'", "ksp_rtol is given twice"),
    ("solver", "options = '-ksp_max_it many'", "ksp_max_it = 'many' is not a valid int"),
    ("solver", "options = 'sor -pc_type'", "value 'sor' does not follow an option name"),
    ("estimator", "eps = 0.0", "estimator.eps must be > 0"),
    ("cost", "iterations = 0", "cost.iterations must be >= 1"),
    ("space.omega", "kind = 'interval'\nlo = 2.0\nhi = 1.0", "space.omega needs lo < hi"),
    ("space.omega", "kind = 'log_interval'\nlo = 0.0\nhi = 1.0", "space.omega.lo must be > 0"),
])
def test_every_range_is_checked_before_anything_runs(tmp_path, section, line, message):
    """Each of these once failed late (ZeroDivisionError after step 1, IndexError after training,
    PETSc rejecting every solve) or silently trained nothing."""
    text = GOOD.replace("steps = 5", "") if line.startswith("steps") else GOOD
    header = f"[{section}]\n"
    text = text.replace(header, header + line + "\n") if header in text else text + f"\n{header}{line}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_options_as_a_petsc_string_and_solver_keys_moved_out_of_them(tmp_path):
    text = GOOD + "\n[solver]\noptions = \"-pc_type sor -pc_sor_forward -pc_sor_omega 1.5 -ksp_max_it 40 -x -1e-3\"\n"
    config = load_config(write(tmp_path, text))
    solver = config["solver"]
    assert solver["options"] == {"pc_sor_forward": "", "pc_sor_omega": "1.5", "x": "-1e-3"}
    assert solver["pc_type"] == "sor" and solver["max_it"] == 40


def test_a_tolerance_the_cost_replaces_is_stated_once(tmp_path, caplog):
    path = write(tmp_path, GOOD + "\n[solver]\nrtol = 1e-8\n")
    with caplog.at_level("WARNING", logger="metasolve"):
        config = load_config(path)
    assert [r.getMessage() for r in caplog.records if "solver.rtol" in r.getMessage()] == [
        f"{path}: solver.rtol = 1e-08 is replaced in training by the fixed budget of cost.kind = "
        f"{config['cost']['kind']!r}; evaluation uses [evaluate] rtol"]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
