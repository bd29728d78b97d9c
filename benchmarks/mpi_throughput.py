"""[mpi_throughput] Training steps per second under `mpiexec -n 1` vs `-n 2`, and identical weights.

Both runs execute the real command line (`metasolve train`), so the measurement includes every
cost a user's batch job pays per step: the replicated network/surrogate work on each rank and one
all-gather of the step's solve results. Start-up (imports, MPI init) is excluded: the clock is
the trainer's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from metasolve.report import markdown_table

CONFIG = """
[problem]
family = "poisson2d"
params = {{ n = 48 }}
train_tasks = 32
eval_tasks = 2

[solver]
ksp_type = "richardson"
pc_type = "jacobi"

[space.x0]
kind = "vector"
modes = 8
scale = 50.0

[cost]
kind = "log_residual"
iterations = 300

[estimator]
kind = "control_variate"
tangents = 2
eps = 1e-4

[model]
depth = 0

[train]
steps = {steps}
batch_size = 8
checkpoint_every = 1000
"""


def _train(ranks: int, steps: int, directory: Path) -> tuple[float, dict]:
    config = directory / "throughput.toml"
    config.write_text(CONFIG.format(steps=steps))
    out = directory / f"n{ranks}"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "metasolve.cli", "train", str(config),
               "--out", str(out), "--quiet"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=1800,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = json.loads((out / "evaluation.json").read_text())["train_seconds"]
    weights = torch.load(out / "meta_solver.pt", weights_only=False)["meta_solver"]["state"]
    return seconds, weights


def _machine_capacity() -> float:
    """Throughput of 2 ranks over 1 running the same solves with no communication at all."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    script = Path(__file__).with_name("solve_loop.py")
    seconds = {}
    for ranks in (1, 2):
        result = subprocess.run([str(mpiexec), "-n", str(ranks), sys.executable, str(script)], check=True,
                                capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds[ranks] = float(result.stdout.split()[-1])
    return 2 * seconds[1] / seconds[2]


def run(out: Path, quick: bool = False) -> dict:
    steps = 10 if quick else 60
    with tempfile.TemporaryDirectory() as scratch:
        serial_seconds, serial_weights = _train(1, steps, Path(scratch))
        parallel_seconds, parallel_weights = _train(2, steps, Path(scratch))
    identical = all(torch.equal(serial_weights[k], parallel_weights[k]) for k in serial_weights)
    speedup = serial_seconds / parallel_seconds
    capacity = _machine_capacity()
    rows = [{"ranks": 1, "steps_per_second": steps / serial_seconds, "seconds": serial_seconds},
            {"ranks": 2, "steps_per_second": steps / parallel_seconds, "seconds": parallel_seconds}]
    markdown = (f"Poisson2D(48), Richardson + Jacobi, LogResidual(300), control variate, batch 8 x 3 solves, "
                f"{steps} steps.\n\n{markdown_table(rows)}\n\nSpeed-up n=2 / n=1: **{speedup:.2f}x** "
                f"(goal >= 1.8x: {'met' if speedup >= 1.8 else 'missed'}). Weights after {steps} steps "
                f"bitwise identical on 1 and 2 ranks: **{identical}**.\n\nThe machine's own ceiling for this "
                f"work: two ranks running the same PETSc solve loop with no communication at all deliver "
                f"**{capacity:.2f}x** the solves of one (`benchmarks/solve_loop.py`); the training speed-up is "
                f"{100 * (speedup - 1) / max(capacity - 1, 1e-9):.0f}% of that headroom.")
    return {"summary": rows, "speedup": speedup, "machine_capacity": capacity, "identical_weights": identical,
            "markdown": markdown}
