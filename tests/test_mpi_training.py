"""`mpiexec -n N metasolve train`: identical weights for any N, and errors that end the job."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.mpi_run import run_mpi

CLI = Path(__file__).parent / "mpi_scripts" / "metasolve_cli.py"

CONFIG = """
[problem]
family = "poisson1d"
params = {{ n = 31 }}
train_tasks = 8
eval_tasks = 3

[solver]
ksp_type = "richardson"
pc_type = "jacobi"
options = {options}

[space.x0]
kind = "vector"
modes = 6

[cost]
kind = "log_residual"
iterations = 30

[estimator]
kind = "control_variate"
tangents = 2
eps = 1e-4

[surrogate]
hidden = 16

[model]
hidden = 16
depth = 1

[train]
steps = 4
batch_size = 5
checkpoint_every = 2
seed = 3
"""


def train_on(ranks: int, tmp_path: Path, options: str = "{}"):
    config = tmp_path / f"run{ranks}.toml"
    config.write_text(CONFIG.format(options=options))
    out = tmp_path / f"out{ranks}"
    result = run_mpi(CLI, n=ranks, args=["train", config, "--out", out, "--quiet"], timeout=120)
    return result, out


def test_trained_weights_are_identical_for_1_2_and_4_ranks(tmp_path):
    weights = {}
    for ranks in (1, 2, 4):
        result, out = train_on(ranks, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[ranks] = torch.load(out / "meta_solver.pt", weights_only=False)["meta_solver"]["state"]
        assert result.stdout.count("metasolve: report") == 1  # only rank 0 prints
    for ranks in (2, 4):
        for name, tensor in weights[1].items():
            assert torch.equal(tensor, weights[ranks][name]), (ranks, name)
    assert any(t.abs().sum() > 0 for n, t in weights[1].items() if n.endswith("weight"))


@pytest.mark.parametrize("options, message", [('{ pc_sor_omega = 1.5 }', "pc_sor_omega")])
def test_a_bad_option_ends_the_mpi_job_with_a_message_naming_it(tmp_path, options, message):
    result, _ = train_on(2, tmp_path, options)
    assert result.returncode != 0
    assert message in result.stderr
