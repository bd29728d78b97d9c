"""`mpiexec -n N metasolve train`: identical weights for any N, schedule and isolation, and errors that end the job."""
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
isolate = {isolate}

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
chunk_rows = {chunk_rows}

[model]
hidden = 16
depth = 1

[train]
steps = 4
batch_size = 5
checkpoint_every = 2
seed = 3

[parallel]
schedule = "{schedule}"
"""

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def train_on(ranks: int, tmp_path: Path, options: str = "{}", schedule: str = "balanced", isolate: bool = False,
             chunk_rows: int = 0):
    name = f"{ranks}-{schedule}-{'isolated' if isolate else 'in-process'}-{chunk_rows}"
    config = tmp_path / f"run{name}.toml"
    config.write_text(CONFIG.format(options=options, schedule=schedule, isolate=str(isolate).lower(),
                                    chunk_rows=chunk_rows))
    out = tmp_path / f"out{name}"
    result = run_mpi(CLI, n=ranks, args=["train", config, "--out", out, "--quiet"], timeout=120)
    return result, out


def test_trained_weights_are_identical_for_1_2_and_4_ranks_any_schedule_with_or_without_isolation(tmp_path):
    """Runs: 1 rank; 2 and 4 ranks, balanced schedule; 2 ranks with every solve in an isolated
    worker process. Every one must end with the same weights, bit for bit. (The static schedule's
    results are checked bit for bit against serial in test_parallel.)"""
    runs = [(1, "balanced", False), (2, "balanced", False), (4, "balanced", False), (2, "balanced", True)]
    weights = {}
    for ranks, schedule, isolate in runs:
        result, out = train_on(ranks, tmp_path, schedule=schedule, isolate=isolate)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[ranks, schedule, isolate] = torch.load(out / "meta_solver.pt", weights_only=False)["meta_solver"]["state"]
        assert result.stdout.count("metasolve: report") == 1  # only rank 0 prints
    reference = weights[runs[0]]
    for run in runs[1:]:
        for name, tensor in reference.items():
            assert torch.equal(tensor, weights[run][name]), (run, name)
    assert any(t.abs().sum() > 0 for n, t in reference.items() if n.endswith("weight"))


def test_a_split_surrogate_update_gives_identical_weights_for_1_2_and_4_ranks(tmp_path):
    """`chunk_rows = 3`: the surrogate's minibatch (current batch plus replay: 5, 10, 15, 20 rows in
    the 4 steps) is cut into 2, 4, 5, 7 chunks that the ranks share, their gradients summed in
    fixed point; 1 rank computes every chunk. The weights must agree to the bit."""
    weights = {}
    for ranks in (1, 2, 4):
        result, out = train_on(ranks, tmp_path, chunk_rows=3)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[ranks] = torch.load(out / "meta_solver.pt", weights_only=False)["meta_solver"]["state"]
    for ranks in (2, 4):
        for name, tensor in weights[1].items():
            assert torch.equal(tensor, weights[ranks][name]), (ranks, name)


@pytest.mark.parametrize("options, message", [('{ pc_sor_omega = 1.5 }', "pc_sor_omega")])
def test_a_bad_option_ends_the_mpi_job_with_a_message_naming_it(tmp_path, options, message):
    result, _ = train_on(2, tmp_path, options)
    assert result.returncode != 0
    assert message in result.stderr


def test_sigterm_to_one_non_root_rank_stops_every_rank_after_one_step_and_resume_is_bitwise(tmp_path):
    """The stop request travels in the step's all-gather: a signal to the last rank alone (once only
    the root's was heard) stops both ranks after the same step, exit 143, with a checkpoint from
    which a resumed run ends bitwise where an uninterrupted one does."""
    from metasolve.training.checkpoint import list_checkpoints, load_checkpoint

    steps = 400
    config = tmp_path / "long.toml"
    text = CONFIG.format(options="{}", schedule="balanced", isolate="false", chunk_rows=0)
    config.write_text(text.replace("steps = 4", f"steps = {steps}").replace("checkpoint_every = 2", "checkpoint_every = 1000"))
    out = tmp_path / "signalled"
    result = run_mpi(Path(__file__).parent / "mpi_scripts" / "signal_one_rank.py", n=2,
                     args=[out / "metrics.jsonl", "train", config, "--out", out, "--quiet"], timeout=300)
    assert result.returncode == 143, result.stderr[-3000:]
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    stopped = load_checkpoint(checkpoint)["step"]
    assert 3 <= stopped < steps
    assert result.stderr.count(f"stopped by SIGTERM after step {stopped}") == 2, result.stderr[-3000:]  # both ranks
    assert not (out / "meta_solver.pt").exists()
    resumed = run_mpi(CLI, n=2, args=["train", config, "--out", out, "--quiet", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_mpi(CLI, n=1, args=["train", config, "--out", tmp_path / "straight", "--quiet"], timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    mine, theirs = (torch.load(d / "meta_solver.pt", weights_only=False)["meta_solver"]["state"]
                    for d in (out, tmp_path / "straight"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
