"""[mpi_throughput] Does a second MPI rank ever slow a job down? Whole `metasolve train` commands on
1 and 2 ranks, start-up included, for the shipped examples (at reduced steps), the demo config,
~1 ms solves at batch 16 and 64, and this section's heterogeneous family; then that family's
training steps per second with the clock started after start-up, static vs balanced schedule.

Whole commands: `benchmarks/mpi_step.py --command` runs the recipe `metasolve train` runs
(`metasolve.app.run.run`, one torch thread) on a shipped config changed with
`metasolve.app.config.override`, and reports how many executor rounds ran replicated (every rank
computing every item itself because sharing would cost more than it saves,
`metasolve.training.parallel`). The clock is this process's, around `mpiexec`. Runs alternate
1 rank, 2 ranks, 2 ranks, 1 rank, ... so a load change on the shared machine hits both alike; the
median and the minimum over repeats are reported. `identical` compares the saved meta-solver of
the 1- and 2-rank runs bit for bit.

Steps per second (`benchmarks/mpi_step.py`: the same builder and trainer, timers around each part
of a step): the heterogeneous family the balanced schedule is for (variable-coefficient
diffusion, grids 12–40, learned per-instance SOR ω with an iteration cost: one task's solves cost
up to ~10x another's). Next to the wall times, the deterministic proxy: the load imbalance
(slowest rank's solve flops over the mean) of the static and the balanced assignment, from
PETSc's flop counts per task, over random batches.

Timing of machinery: it builds experiments and drives the executors (the library's internals)
directly, to time the solve phase alone (`tests/test_benchmarks_measure_product.py`).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.mpi_step import PARTS
from metasolve.app.config import parse_config
from metasolve.app.experiment import build_experiment
from metasolve.app.report import markdown_table
from metasolve.training.parallel import SerialExecutor, block, longest_first
from solvers._petsc import PETSc

ROOT = Path(__file__).resolve().parent.parent

HETEROGENEOUS = """
[problem]
family = "diffusion"
params = {{ n_range = [12, 40], contrast_range = [0.2, 2.5] }}
train_tasks = {tasks}
eval_tasks = 2

[solver]
ksp_type = "richardson"
pc_type = "sor"
options = {{ pc_sor_forward = "" }}

[space.pc_sor_omega]
kind = "interval"
lo = 1.0
hi = 2.0

[cost]
kind = "iteration_proxy"
rtol = 1e-6
max_it = 300

[estimator]
kind = "control_variate"
tangents = 1
eps = 1e-2

[surrogate]
chunk_rows = {chunk_rows}

[model]
hidden = 32
depth = 1

[train]
steps = {steps}
batch_size = 16
lr = 1e-2

[parallel]
schedule = "{schedule}"
"""

COMMANDS = {
    "poisson1d, batch 16 (~1 ms solves)": ("examples/poisson1d_defaults.toml", {"train.steps": 100}),
    "poisson1d, batch 64 (~1 ms solves)": ("examples/poisson1d_defaults.toml", {"train.steps": 50, "train.batch_size": 64}),
    "diffusion 12-40 (heterogeneous)": (None, {}),
    "demo (Bratu, Newton)": ("metasolve/app/demo.toml", {"train.steps": 20}),
    "examples/sor_omega": ("examples/sor_omega.toml", {"train.steps": 40}),
    "examples/solver_choice": ("examples/solver_choice.toml", {"train.steps": 10}),
    "examples/scale_bratu": ("examples/scale_bratu.toml", {}),
    "examples/wall_model": ("examples/wall_model.toml", {"train.steps": 10, "train.eval_every": 10}),
    "examples/heat_stepper": ("examples/heat_stepper.toml", {"train.steps": 6}),
}
"""Whole commands: name -> (config relative to the repository, overrides); None: HETEROGENEOUS
at 40 steps, 64 tasks. heat_stepper needs its program built (`make legacy-solver`); without it,
it is left out and the table says so."""

QUICK = ("poisson1d, batch 16 (~1 ms solves)", "diffusion 12-40 (heterogeneous)", "demo (Bratu, Newton)")


def _environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _mpiexec() -> str:
    return str(Path(sys.executable).parent / "mpiexec")


def _children_cpu() -> float:
    """User + system seconds of every finished child so far: a run's CPU, which other jobs on the
    machine do not inflate the way they inflate its wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def whole_command(config: Path, overrides: dict, ranks: int, out: Path) -> dict:
    """One `metasolve train`-equivalent command under mpiexec: wall seconds (start-up included),
    executor rounds, the saved meta-solver."""
    begin, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, "-m", "benchmarks.mpi_step", "--command",
                           str(config), str(out), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=3600, env=_environment(), cwd=ROOT)
    seconds, cpu = time.perf_counter() - begin, _children_cpu() - cpu
    if done.returncode != 0:  # one config's failure is a row of the table, not the end of the section
        return {"seconds": seconds, "cpu": cpu, "failed": done.stderr[-2000:], "rounds": 0, "replicated": 0,
                "model": None}
    return {"seconds": seconds, "cpu": cpu, **json.loads((out / "executor.json").read_text()),
            "model": torch.load(out / "meta_solver.pt", weights_only=True)}


def _identical(a: object, b: object) -> bool:
    """Bitwise equality of two saved meta-solvers (nested dicts, lists, tensors, plain values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_identical, a, b))
    return a == b or (a != a and b != b)


def commands_table(scratch: Path, repeats: int, names: list[str]) -> tuple[list[dict], dict]:
    """Every command on 1 and 2 ranks, `repeats` times, interleaved; one row per command."""
    heterogeneous = scratch / "heterogeneous.toml"
    heterogeneous.write_text(HETEROGENEOUS.format(steps=40, tasks=64, schedule="balanced", chunk_rows=0))
    runs: dict = {}
    for repeat in range(repeats):
        for name in names:
            path, overrides = COMMANDS[name]
            config = heterogeneous if path is None else ROOT / path
            for ranks in ((1, 2) if repeat % 2 == 0 else (2, 1)):
                out = scratch / f"{len(runs)}-{ranks}"
                runs.setdefault((name, ranks), []).append(whole_command(config, overrides, ranks, out))
    rows = []
    for name in names:
        one, two = runs[name, 1], runs[name, 2]
        median1, median2 = (statistics.median(r["seconds"] for r in runs[name, n]) for n in (1, 2))
        min1, min2 = (min(r["seconds"] for r in runs[name, n]) for n in (1, 2))
        rounds = sum(r["rounds"] for r in two)
        rows.append({"config": name, "1 rank s (median)": median1, "2 ranks s (median)": median2,
                     "speedup (median)": median1 / median2, "1 rank s (min)": min1, "2 ranks s (min)": min2,
                     "speedup (min)": min1 / min2,
                     "CPU s, 1 / 2 ranks (median)": f"{statistics.median(r['cpu'] for r in one):.1f} / "
                                                    f"{statistics.median(r['cpu'] for r in two):.1f}",
                     "replicated rounds": f"{sum(r['replicated'] for r in two)}/{rounds}",
                     "replicated_fraction": sum(r["replicated"] for r in two) / max(rounds, 1),
                     "identical": all(_identical(a["model"], b["model"]) for a in one for b in two),
                     "failed": sum("failed" in r for r in one + two)})
    raw = {f"{name}|{ranks}": [{k: v for k, v in r.items() if k != "model"} for r in measured]
           for (name, ranks), measured in runs.items()}
    return rows, raw


def train(ranks: int, schedule: str, steps: int, tasks: int, directory: Path) -> dict:
    """One `mpi_step.py` run of the heterogeneous family: its step.json, plus the trained weights."""
    out = directory / f"diffusion-n{ranks}-{schedule}-0"
    config = directory / f"{out.name}.toml"
    config.write_text(HETEROGENEOUS.format(steps=steps, tasks=tasks, schedule=schedule, chunk_rows=0))
    subprocess.run([_mpiexec(), "-n", str(ranks), sys.executable, "-m", "benchmarks.mpi_step", str(config), str(out)],
                   check=True, capture_output=True, text=True, timeout=3600, env=_environment(), cwd=ROOT)
    result = json.loads((out / "step.json").read_text())
    result["weights"] = torch.load(out / "weights.pt", weights_only=True)
    return result


def shares(result: dict) -> dict:
    """Mean seconds per step of each part, averaged over ranks."""
    per_rank = result["per_rank"]
    return {part: float(np.mean([r["parts"][part] for r in per_rank])) / result["steps"] for part in PARTS}


def machine_capacity() -> float:
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


def flop_proxy(tasks: int = 64, batch: int = 16, trials: int = 200) -> dict:
    """Deterministic load imbalance of the heterogeneous family: PETSc flops of each task's solves
    (centre + one query at the initial ω), then slowest-rank flops / mean for random batches cut
    into contiguous blocks (static) or assigned longest-first with the flops as costs (balanced)."""
    config = parse_config(HETEROGENEOUS.format(steps=1, tasks=tasks, schedule="balanced", chunk_rows=0), "<flop proxy>")
    experiment = build_experiment(config, SerialExecutor())
    box = experiment.blackbox
    theta = experiment.meta_solver(torch.stack([t.features for t in experiment.train_tasks])).detach()
    flops = []
    for task, row in zip(experiment.train_tasks, theta):
        setting = {**box.space.decode(row), **box.cost.overrides}
        box.oracle(task, setting)  # first solve builds the PETSc objects; not counted
        begin = PETSc.Log.getFlops()
        box.oracle.solve_many(task, [setting, setting])
        flops.append(PETSc.Log.getFlops() - begin)
    flops = np.array(flops)
    rng = np.random.default_rng(0)
    result = {"task_flops_max_over_min": float(flops.max() / flops.min())}
    for ranks in (2, 4, 8):
        static, balanced = [], []
        for _ in range(trials):
            costs = flops[rng.permutation(tasks)[:batch]].tolist()
            mean = sum(costs) / ranks
            static.append(max(sum(costs[i] for i in block(batch, ranks, w)) for w in range(ranks)) / mean)
            balanced.append(max(sum(costs[i] for i in worker) for worker in longest_first(costs, ranks)) / mean)
        result[f"static_{ranks}"], result[f"balanced_{ranks}"] = float(np.mean(static)), float(np.mean(balanced))
    return result


def run(out: Path, quick: bool = False) -> dict:
    steps, tasks, rounds, repeats = (8, 32, 1, 1) if quick else (40, 64, 3, 2)
    names = [name for name in (QUICK if quick else COMMANDS)
             if name != "examples/heat_stepper" or (ROOT / "examples/legacy_solver/heat_stepper").exists()]
    runs = [(1, "static"), (2, "static"), (2, "balanced")]
    with tempfile.TemporaryDirectory() as scratch:
        commands, commands_raw = commands_table(Path(scratch), repeats, names)
        # Rounds of every configuration in turn, the median round kept per configuration.
        repeated: dict = {}
        for _ in range(rounds):
            for ranks, schedule in runs:
                repeated.setdefault((ranks, schedule), []).append(train(ranks, schedule, steps, tasks, Path(scratch)))
    results = {key: sorted(measured, key=lambda r: r["seconds"])[len(measured) // 2] for key, measured in repeated.items()}
    serial = results[1, "static"]
    rows, parts_rows = [], []
    for (ranks, schedule), result in results.items():
        rows.append({"ranks": ranks, "schedule": schedule if ranks > 1 else "-",
                     "steps_per_second": result["steps"] / result["seconds"],
                     "speedup": serial["seconds"] / result["seconds"],
                     "identical_weights": all(torch.equal(serial["weights"][k], result["weights"][k])
                                              for k in serial["weights"])})
        step = shares(result)
        total = sum(step.values())
        parts_rows.append({"ranks": ranks, "schedule": rows[-1]["schedule"], "ms_per_step": 1e3 * total,
                           **{p: f"{100 * step[p] / total:.1f}%" for p in PARTS}})
    capacity = machine_capacity()
    proxy = flop_proxy(tasks=tasks)
    goal = results[2, "balanced"]
    goal_speedup = serial["seconds"] / goal["seconds"]
    by_name = {row["config"]: row for row in commands}
    slower = [row["config"] for row in commands if row["speedup (median)"] < 1.0 and not row["failed"]]
    batch64 = by_name.get("poisson1d, batch 64 (~1 ms solves)")
    table = [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items() if k != "replicated_fraction"}
             for row in commands]
    markdown = (
        f"Whole commands, start-up included (`metasolve train` on the config, changed as named; median and "
        f"minimum of {repeats} run(s) each, 1 and 2 ranks alternating). 2 ranks on the machine's 2 cores, "
        f"shared with other jobs: wall-time ratios within one run, but other jobs disturb them.\n\n"
        f"{markdown_table(table)}\n\n"
        f"2 ranks slower than 1 (median, commands that ran to the end): {', '.join(slower) if slower else 'none'}. "
        f"A row with `failed` > 0 timed commands that stopped with an error (`commands_raw` in the json). "
        + (f"~1 ms solves, batch 64: **{batch64['speedup (median)']:.2f}x** (goal >= 1.6x: "
           f"{'met' if batch64['speedup (median)'] >= 1.6 else 'missed'}). " if batch64 else "")
        + f"`replicated rounds`: executor rounds of the 2-rank runs in which every rank computed every item "
        f"itself (sharing measured to cost more than it saves), over all rounds, summed over repeats.\n\n"
        f"Training steps per second, heterogeneous family (Diffusion n 12-40, Richardson + forward SOR, "
        f"learned ω, IterationProxy(1e-6, max 300), control variate, batch 16 x 2 solves, {steps} steps, "
        f"{tasks} tasks), the clock started after start-up; median of {rounds} round(s):\n\n"
        f"{markdown_table(rows)}\n\n"
        f"Speed-up on 2 ranks, balanced schedule: **{goal_speedup:.2f}x** (goal >= 1.75x: "
        f"{'met' if goal_speedup >= 1.75 else 'missed'}). The machine's own ceiling for pure solves with no "
        f"communication (`benchmarks/solve_loop.py`): **{capacity:.2f}x**.\n\n"
        f"Deterministic proxy (PETSc flops per task, heterogeneous family, {tasks} tasks, random batches of "
        f"16, no clocks): one task's solves cost up to {proxy['task_flops_max_over_min']:.0f}x another's; "
        f"slowest rank over mean, static / balanced: 2 ranks {proxy['static_2']:.3f} / {proxy['balanced_2']:.3f}, "
        f"4 ranks {proxy['static_4']:.3f} / {proxy['balanced_4']:.3f}, 8 ranks {proxy['static_8']:.3f} / "
        f"{proxy['balanced_8']:.3f}.\n\n"
        f"Where a step's time goes (mean over ranks; `solve` = own solves, `gather` = waiting for the "
        f"slowest rank + all-gather, `estimator`/`network` = work every rank repeats, `surrogate` = the "
        f"surrogate's gradient at the batch's tasks, its update on the rank the schedule gave it, and "
        f"adopting the update on every rank):\n\n"
        f"{markdown_table(parts_rows)}\n")
    return {"summary": commands, "steps_per_second": rows, "parts": parts_rows, "machine_capacity": capacity,
            "flop_proxy": proxy, "speedup_2_balanced_heterogeneous": goal_speedup,
            "slower_on_2_ranks": slower, "markdown": markdown, "commands_raw": commands_raw,
            "raw": {f"diffusion 12-40 (heterogeneous)|{ranks}|{schedule}|0":
                    {key: v[key] for key in ("ranks", "steps", "seconds", "step_seconds", "per_rank", "allgather_seconds")}
                    for (ranks, schedule), v in results.items()}}
