"""[executable] Per-instance SOR ω for a compiled PETSc program, learned through its command line only.

The program is `examples/legacy_solver` (unmodified): every solve is one process started by
`ExecutableOracle`, the task reaches it as PETSc binary files, ω as `-pc_sor_omega`, and the
result comes back from `-ksp_monitor_true_residual`. The learned row is the product:
`examples/sor_omega.toml` (`diffusion` on grids 12..40, Richardson + forward SOR, where the best ω
moves from task to task; operator features, which `metasolve predict --matrix` computes from the
same files) pointed at the program (`solver.kind = "executable"`) with this benchmark's budget,
trained by `metasolve.app.run.run`. On unseen tasks
we compare iterations to rtol 1e-6 for PETSc's default ω = 1, the best constant ω found with as
many program runs as training spent, the learned per-instance ω, and the per-instance optimum.
The optimum's grid search runs in-process (`KSPOracle`, same PETSc, same options: thousands of
solves in seconds); every number in the table is then measured by the program, and the
in-process oracle must report the same iteration counts (the agreement line). A second table
times one subprocess solve against one in-process solve of the same task.
Results: benchmarks/results/executable.md.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.evaluation import evaluate  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.method.cost import Iterations  # noqa: E402
from metasolve.method.measure import measure  # noqa: E402
from metasolve.method.params import Interval  # noqa: E402
from problems.diffusion import Diffusion  # noqa: E402
from solvers import ExecutableOracle, KSPOracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROGRAM_DIR = ROOT / "examples" / "legacy_solver"
CONFIG = ROOT / "examples" / "sor_omega.toml"
RTOL, ATOL, DIVTOL, MAX_IT = 1e-6, 1e-50, 1e4, 10_000
SOLVER = {"ksp_type": "richardson", "pc_type": "sor"}
FORWARD_SOR = {"pc_sor_forward": ""}
OMEGA = Interval(1.4, 1.98)
"""ω's search range for every method: below 1.4 every task is far from its optimum, at 2 SOR diverges."""
GRID_STEP = 0.005
"""Resolution of the per-instance optimum: iterations change by at most a few per 0.005 of ω here."""
PROXY_MAX_IT = 1000
"""Training solves run this many iterations: above every task's count anywhere in OMEGA (at most ~900)."""
EPS = 0.05
"""Central-difference step in raw θ: Δω ≈ 0.007 at mid-range, a few iterations' change (above the proxy's
sub-iteration noise, below the width of the V around the optimum)."""
SEED = 0


@dataclasses.dataclass(frozen=True)
class Budget:
    train_tasks: int
    batch: int
    steps: int
    eval_tasks: int
    overhead_repeats: int


FULL = Budget(train_tasks=12, batch=4, steps=30, eval_tasks=16, overhead_repeats=20)
QUICK = Budget(train_tasks=4, batch=2, steps=4, eval_tasks=4, overhead_repeats=5)


def build_program() -> str:
    """The legacy program's path, built with the Makefile it ships with (quick when up to date)."""
    result = subprocess.run(["make", "--no-print-directory", "-C", str(PROGRAM_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"building {PROGRAM_DIR / 'legacy_solver'} failed:\n{result.stdout}\n{result.stderr}")
    return str(PROGRAM_DIR / "legacy_solver")


def config_for(program: str, budget: Budget) -> dict:
    """`examples/sor_omega.toml` pointed at the program, with the in-process oracle's configuration
    spelled as its command-line options (`ksp_norm_type unpreconditioned` makes it test the norm
    KSPOracle tests), this benchmark's ω range, cost budget, estimator and training budget."""
    return override(load_config(CONFIG), {
        "problem.train_tasks": budget.train_tasks, "problem.eval_tasks": budget.eval_tasks,
        "solver": {"kind": "executable", "command": [program], "timeout": 60.0, "options": {
            **SOLVER, **FORWARD_SOR, "ksp_norm_type": "unpreconditioned", "ksp_rtol": RTOL, "ksp_atol": ATOL,
            "ksp_divtol": DIVTOL, "ksp_max_it": MAX_IT}},
        "space.pc_sor_omega": {"kind": "interval", "lo": OMEGA.lo, "hi": OMEGA.hi},
        "cost.max_it": PROXY_MAX_IT, "estimator.difference": "central", "estimator.eps": EPS,
        "pretrain.enabled": False, "train.steps": budget.steps, "train.batch_size": budget.batch, "train.lr": 3e-2,
        "train.seed": SEED, "evaluate.rtol": RTOL, "evaluate.max_it": MAX_IT, "evaluate.constant_evaluations": 0},
        str(CONFIG))


def in_process_oracle() -> KSPOracle:
    return KSPOracle(rtol=RTOL, atol=ATOL, divtol=DIVTOL, max_it=MAX_IT, options=FORWARD_SOR, **SOLVER)


def iterations(outcomes: Sequence[Any], cost: Iterations, task: Any) -> list[float]:
    values = [cost(o, task) for o in outcomes]
    return [cost.failure_value(task) if math.isnan(v) else v for v in values]


def best_constant(program: ExecutableOracle, tasks: Sequence[Any], solves: int) -> tuple[float, int, int]:
    """(ω, grid points, program runs): the evenly spaced ω in OMEGA with the fewest total iterations
    over the training tasks, with at most `solves` program runs (training's budget)."""
    points = solves // len(tasks)
    if points < 1:
        raise ValueError(f"a budget of {solves} solves cannot try one ω on {len(tasks)} tasks")
    grid = np.linspace(OMEGA.lo, OMEGA.hi, points + 2)[1:-1]
    cost = Iterations(RTOL, MAX_IT)
    totals = np.zeros(points)
    for task in tasks:
        results = measure(program, cost, task, [{"pc_sor_omega": float(w)} for w in grid])
        totals += iterations([r.outcome for r in results], cost, task)
    return float(grid[int(np.argmin(totals))]), points, points * len(tasks)


def omega_grid() -> np.ndarray:
    count = int(round((OMEGA.hi - OMEGA.lo) / GRID_STEP))
    return np.round(OMEGA.lo + GRID_STEP * np.arange(1, count), 6)


def grid_iterations(oracle: KSPOracle, tasks: Sequence[Any], grid: np.ndarray) -> np.ndarray:
    """[tasks, grid] iterations to tolerance, in-process."""
    cost = Iterations(RTOL, MAX_IT)
    return np.array([iterations(oracle.solve_many(t, [{"pc_sor_omega": float(w)} for w in grid]), cost, t)
                     for t in tasks])


def overhead(program: ExecutableOracle, oracle: KSPOracle, repeats: int) -> tuple[list[dict], dict]:
    """Wall time of one call, alternating the two oracles so machine noise hits both alike."""
    task = Diffusion(n_range=32, seed=SEED).eval_tasks(1)[0]
    setting = {"pc_sor_omega": 1.8}
    times: dict[str, list[float]] = {"program": [], "in-process": [], "fixed": []}
    counts = set()
    for _ in range(repeats):
        for name, call in (("in-process", lambda: oracle(task, setting)), ("program", lambda: program(task, setting)),
                           ("fixed", lambda: program(task, {**setting, "ksp_max_it": 0}))):
            begin = time.perf_counter()
            outcome = call()
            times[name].append(time.perf_counter() - begin)
            if name != "fixed":
                counts.add(outcome.iterations)
    median = {name: float(np.median(values)) for name, values in times.items()}
    rows = [{"measure": "KSPOracle call, in-process: fresh KSP, setup, solve (median ms)",
             "value": 1e3 * median["in-process"]},
            {"measure": "ExecutableOracle call: write files, start program, solve, parse (median ms)",
             "value": 1e3 * median["program"]},
            {"measure": "ExecutableOracle call with ksp_max_it 0: the fixed cost of a run (median ms)",
             "value": 1e3 * median["fixed"]},
            {"measure": "ratio program / in-process", "value": median["program"] / median["in-process"]}]
    details = {"task": task.name, "unknowns": task.size, "repeats": repeats, "iterations": sorted(counts),
               "median_seconds": median}
    return rows, details


def plot(path: Path, optimum: Sequence[float], learned: Sequence[float], constant: float,
         history: Sequence[Mapping[str, Any]]) -> Path:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    lo, hi = min(optimum + learned) - 0.02, max(optimum + learned) + 0.02
    left.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="ω = optimum")
    left.axhline(constant, color="tab:orange", lw=1, label=f"best constant {constant:.3f}")
    left.scatter(optimum, learned, label="learned, unseen tasks")
    left.set_xlabel("per-instance optimal ω")
    left.set_ylabel("ω used")
    left.set_title("ω on unseen tasks")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot([r["solves"] for r in history], [r["loss"] for r in history])
    right.set_xlabel("program runs")
    right.set_ylabel("batch mean smoothed iterations")
    right.set_title("training through the command line")
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _method_row(name: str, how: str, spent: str, omegas: Sequence[float], counts: Sequence[float],
                optimum_total: float, seconds: Sequence[float]) -> dict:
    total = float(np.sum(counts))
    spread = f"{min(omegas):.3f}" if max(omegas) - min(omegas) < 5e-4 else f"{min(omegas):.3f}–{max(omegas):.3f}"
    return {"method": name, "how ω is chosen": how, "solves to choose ω": spent, "ω on unseen tasks": spread,
            "mean iterations": total / len(counts), "total iterations": int(total),
            "× optimum": total / optimum_total, "median s per run": float(np.median(seconds))}


def run(out: Path, quick: bool = False) -> dict:
    budget = QUICK if quick else FULL
    begin = time.perf_counter()
    config = config_for(build_program(), budget)
    oracle = in_process_oracle()
    phases: dict[str, float] = {}

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-executable-") as directory:
        result = run_config(config, Path(directory) / "run", quiet=True)
    experiment = result.experiment
    program, meta, family = experiment.blackbox.oracle, experiment.meta_solver, experiment.family
    train_tasks, eval_tasks = experiment.train_tasks, experiment.eval_tasks
    training_solves = result.solves["training"]
    phases["training (run)"] = time.perf_counter() - start

    start = time.perf_counter()
    constant, constant_points, constant_solves = best_constant(program, train_tasks, training_solves)
    phases["best constant"] = time.perf_counter() - start

    start = time.perf_counter()
    grid = omega_grid()
    table = grid_iterations(oracle, eval_tasks, grid)
    optimum = {t.name: float(grid[int(np.argmin(row))]) for t, row in zip(eval_tasks, table)}
    hindsight = float(grid[int(np.argmin(table.sum(axis=0)))])
    phases["per-instance grid (in-process)"] = time.perf_counter() - start

    start = time.perf_counter()
    learned = {t.name: meta.predict(t)["pc_sor_omega"] for t in eval_tasks}
    choices: dict[str, Callable[[Any], dict]] = {
        "default": lambda t: {},
        "best constant": lambda t: {"pc_sor_omega": constant},
        "learned": lambda t: {"pc_sor_omega": learned[t.name]},
        "per-instance optimum": lambda t: {"pc_sor_omega": optimum[t.name]},
        "best constant in hindsight": lambda t: {"pc_sor_omega": hindsight},
    }
    evaluation = evaluate(experiment, eval_tasks, {k: v for k, v in choices.items() if k != "learned"})
    phases["evaluation (program)"] = time.perf_counter() - start

    start = time.perf_counter()
    cost = Iterations(RTOL, MAX_IT)
    agree, compared, mismatches = 0, 0, []
    for name, choose in choices.items():
        for task, count in zip(eval_tasks, evaluation[name]["iterations"]):
            reference = iterations([measure(oracle, cost, task, [choose(task)])[0].outcome], cost, task)[0]
            compared += 1
            if reference == count:
                agree += 1
            else:
                mismatches.append({"method": name, "task": task.name, "program": count, "in-process": reference})
    phases["agreement check (in-process)"] = time.perf_counter() - start

    start = time.perf_counter()
    overhead_rows, overhead_details = overhead(program, oracle, budget.overhead_repeats)
    phases["overhead"] = time.perf_counter() - start

    optimum_total = float(np.sum(evaluation["per-instance optimum"]["iterations"]))
    n_train, n_eval = len(train_tasks), len(eval_tasks)
    describe = {
        "default": ("PETSc's default, no option given", "0", [1.0] * n_eval),
        "best constant": (f"{constant_points} evenly spaced ω on the {n_train} training tasks, through the program",
                          str(constant_solves), [constant] * n_eval),
        "learned": (f"`{CONFIG.name}` trained by `run` on the {n_train} training tasks, through the program",
                    str(training_solves), list(learned.values())),
        "per-instance optimum": (f"grid of {len(grid)} ω (step {GRID_STEP}) per unseen task, in-process",
                                 f"{len(grid)} per task", list(optimum.values())),
        "best constant in hindsight": ("the same grid's best single ω over the unseen tasks (not attainable)",
                                       f"{len(grid)} per task", [hindsight] * n_eval),
    }
    rows = [_method_row(name, how, spent, omegas, evaluation[name]["iterations"], optimum_total,
                        evaluation[name]["seconds"]) for name, (how, spent, omegas) in describe.items()]
    totals = {r["method"]: r["total iterations"] for r in rows}
    gap = totals["best constant"] - totals["per-instance optimum"]
    closed = (totals["best constant"] - totals["learned"]) / gap if gap > 0 else float("nan")
    program_seconds = [s for name in describe for s in evaluation[name]["seconds"]]

    figure = plot(out / "executable.png", list(optimum.values()), list(learned.values()), constant, experiment.trainer.history)
    seconds = time.perf_counter() - begin
    markdown = "\n".join([
        f"`examples/legacy_solver` (compiled C, unmodified) tuned through its command line: `diffusion` family, "
        f"grids {config['problem']['params']['n_range'][0]}–{config['problem']['params']['n_range'][1]}, Richardson + forward SOR "
        f"(`-pc_sor_forward -ksp_norm_type unpreconditioned`), ω = `-pc_sor_omega` in ({OMEGA.lo}, {OMEGA.hi}). "
        f"Iterations to rtol {RTOL:g} on {n_eval} unseen tasks (`eval_tasks`), every count measured by the program. "
        f"Training: {n_train} tasks, batch {budget.batch}, {budget.steps} steps, central forward gradient "
        f"(ε = {EPS} in raw θ) with the surrogate control variate, cost = smoothed iteration count over "
        f"{PROXY_MAX_IT} iterations; the meta-solver reads the {config['problem']['features']} features of each task's "
        f"matrix ({family.feature_dim} numbers). Trained by `metasolve.app.run.run` on `examples/{CONFIG.name}` "
        f"overridden; the run deployed its {result.kept} weights.",
        "",
        markdown_table(rows),
        "",
        f"The learned ω closes **{100 * closed:.0f}%** of the gap between the best constant at equal budget "
        f"({totals['best constant']:.0f} iterations) and the per-instance optimum ({totals['per-instance optimum']:.0f}); "
        f"against PETSc's default it needs {totals['default'] / totals['learned']:.1f}× fewer iterations.",
        f"Program vs in-process `KSPOracle`, same task and setting: **{agree} of {compared}** iteration counts "
        f"identical{'' if not mismatches else f' (mismatches: {mismatches})'}.",
        *(["Quick run: a smoke test of the pipeline; a few steps on a few tasks learn little."] if quick else []),
        "With one parameter (d = 1) the control variate's estimate equals the central difference itself "
        "(v = ±1, so the surrogate's terms cancel); the surrogate starts to matter for d > 1.",
        "",
        f"Per-call cost on {overhead_details['task']} ({overhead_details['unknowns']} unknowns, ω = 1.8, "
        f"{overhead_details['iterations']} iterations both ways), median of {overhead_details['repeats']} "
        f"alternating calls:",
        "",
        markdown_table(overhead_rows),
        "",
        f"Program runs: {training_solves} training + {constant_solves} constant search + "
        f"{len(program_seconds)} evaluation + {2 * overhead_details['repeats']} overhead; median "
        f"{np.median(program_seconds):.2f} s per evaluation run. Wall time {seconds:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f". Plot: `{figure.name}`.",
    ])
    return {"summary": rows, "markdown": markdown, "overhead": overhead_rows, "overhead_details": overhead_details,
            "gap_closed": closed, "agreement": {"identical": agree, "compared": compared, "mismatches": mismatches},
            "training_solves": training_solves, "constant": constant, "hindsight_constant": hindsight,
            "learned_omega": learned, "optimal_omega": optimum, "history": experiment.trainer.history, "phases": phases}
