"""TOML config validation: every mistake names the key and the file."""
from __future__ import annotations

import pytest

from metasolve.config import ConfigError, load_config

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


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
