"""[heat_stepper] A time-stepping legacy code tuned end to end through its command line: per-run SOR ω.

The program is `examples/legacy_solver/heat_stepper` (C, unmodified, its own options prefix
`heat_` and its own progress lines): implicit Euler for the heat equation, one Richardson +
forward-SOR solve per time step, each starting from the previous step's solution. A task is one
run, given by the program's own arguments `-n -kappa -dt -contrast -seed -steps`; its cost is the
run's total linear iterations as the program printed them (every solve, not the last).

Why per-run settings matter here (and why this is not a contrived win): the step matrix is
I + dt·K, and how far it is from the identity is the diffusion number c = κ·dt/h². For constant κ,
Young's theory gives the best SOR factor from the Jacobi spectral radius ρ = 4c·cos(πh)/(1 + 4c):
ω* = 2/(1 + √(1 − ρ²)), about 1 for c ≪ 1 and 2 − 2πh for c ≫ 1. Runs with c from 0.03 to 500
need ω from 1.0 to 1.9, and no single ω serves them all. An expert who knows this formula gets
close without any learning — we report it ("Young's formula") as the expert's baseline; the
learned predictor must find the same dependence from runs alone (its features are the logs of
n, κ, dt and the contrast, never c itself), and the coefficient contrast moves the true optimum
away from the formula.

The learned row is the product: `examples/heat_stepper.toml` (the program family, the run-level
cost, the options prefix, the log-mean loss are all config keys) trained by
`metasolve.app.run.run`, and the model that run saved delivered by `metasolve predict`.
Methods on unseen runs, iterations to rtol 1e-6 summed over every step of every run, every count
read from the program's own output:
- PETSc's default ω = 1;
- the best constant ω found with as many program runs as training spent (a grid of ω evaluated
  on the training runs; the strongest tuning a user would do without per-run settings);
- the learned per-run ω, *delivered by `metasolve predict`*: an options file per run, and the
  program started with `-options_file` (not through the oracle), so the whole train → predict →
  run loop is what is measured;
- Young's formula (expert, constant-coefficient theory);
- the per-run optimum on a grid (hindsight, not attainable).
A second table states the oracle's per-run overhead (files, start-up, parsing, the /proc scan)
against the run's own time. Results: benchmarks/results/heat_stepper.md.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.predict import predict  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import MODEL_FILE  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.method.cost import Iterations  # noqa: E402
from metasolve.method.measure import measure  # noqa: E402
from metasolve.method.params import Interval  # noqa: E402
from solvers.executable import ExecutableOracle, child_environment  # noqa: E402
from solvers.monitor_parser import parse_run_output  # noqa: E402
from solvers.program_task import ProgramTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROGRAM_DIR = ROOT / "examples" / "legacy_solver"
CONFIG = ROOT / "examples" / "heat_stepper.toml"
RTOL, MAX_IT = 1e-6, 10_000
STEPS = 4
"""Time steps per run (`steps` in the config's program arguments)."""
YOUNG = "Young's formula"


@dataclasses.dataclass(frozen=True)
class Budget:
    changes: dict
    """Overrides of the shipped config (none: the config as shipped)."""
    grid_step: float
    overhead_repeats: int


FULL = Budget(changes={}, grid_step=0.02, overhead_repeats=10)
QUICK = Budget(changes={"problem.train_tasks": 8, "problem.eval_tasks": 6, "train.batch_size": 4, "train.steps": 6},
               grid_step=0.06, overhead_repeats=3)


def build_program() -> str:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(PROGRAM_DIR), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"building {PROGRAM_DIR} failed:\n{result.stdout}\n{result.stderr}")
    return str(PROGRAM_DIR / "heat_stepper")


def diffusion_number(task: ProgramTask) -> float:
    a = task.arguments
    return a["kappa"] * a["dt"] * (a["n"] + 1) ** 2


def young_omega(task: ProgramTask, omega: Interval) -> float:
    """The constant-coefficient optimum: ρ_J = 4c·cos(πh)/(1+4c), ω* = 2/(1+√(1−ρ_J²))."""
    c, h = diffusion_number(task), 1.0 / (task.arguments["n"] + 1)
    rho = 4 * c * math.cos(math.pi * h) / (1 + 4 * c)
    return float(min(max(2 / (1 + math.sqrt(1 - rho ** 2)), omega.lo), omega.hi))


def total_iterations(oracle: ExecutableOracle, task: ProgramTask, omegas: Sequence[float]) -> list[float]:
    """Iterations to RTOL over the whole run, per ω; a failed run counts MAX_IT per step."""
    results = measure(oracle, Iterations(RTOL, MAX_IT), task, [{"pc_sor_omega": float(w)} for w in omegas])
    return [float(MAX_IT * STEPS) if math.isnan(r.value) else r.value for r in results]


def best_constant(oracle: ExecutableOracle, tasks: Sequence[ProgramTask], runs_budget: int,
                  omega: Interval) -> tuple[float, int, int]:
    points = runs_budget // len(tasks)
    if points < 1:
        raise ValueError(f"{runs_budget} runs cannot try one ω on {len(tasks)} tasks")
    grid = np.linspace(omega.lo, omega.hi, points + 2)[1:-1]
    totals = np.sum([total_iterations(oracle, t, grid) for t in tasks], axis=0)
    return float(grid[int(np.argmin(totals))]), points, points * len(tasks)


def delivered_run(program: str, oracle: ExecutableOracle, task: ProgramTask, model: Path,
                  job: Path) -> tuple[int, float, float]:
    """train → predict → run: the options file written by `metasolve predict`, then the unmodified
    program with it and the options every training run had; returns (total iterations, ω written,
    program seconds) from its own output."""
    options_file, setting = predict(model, job, arguments=task.argv())
    prefix = oracle.prefix
    fixed = [a for k, v in {**oracle.options, "ksp_rtol": RTOL, "ksp_max_it": MAX_IT}.items()
             for a in (f"-{prefix}{k}", *([] if v is None or v == "" else [str(v)]))]
    begin = time.perf_counter()
    result = subprocess.run([program, *task.argv(), *fixed, "-options_file", str(options_file),
                             f"-{prefix}ksp_monitor_true_residual", f"-{prefix}ksp_converged_reason", "-options_left"],
                            capture_output=True, text=True, env=child_environment(), timeout=600)
    seconds = time.perf_counter() - begin
    if result.returncode != 0 or "Option left" in result.stdout:
        raise RuntimeError(f"delivered run of {task.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    report = parse_run_output(result.stdout)
    if not all(s.converged for s in report.solves) or len(report.solves) != STEPS:
        raise RuntimeError(f"delivered run of {task.name} did not converge in every step")
    return sum(s.iterations for s in report.solves), float(setting["pc_sor_omega"]), seconds


def overhead(program: str, oracle: ExecutableOracle, task: ProgramTask, repeats: int,
             omega: Interval) -> tuple[list[dict], dict]:
    """Oracle call vs the bare program run with the same arguments (same ω), alternating."""
    setting = {"pc_sor_omega": young_omega(task, omega), "ksp_rtol": RTOL, "ksp_max_it": MAX_IT}
    argv = [program, *task.argv(), *oracle._parse(task, setting)[0]]
    times: dict[str, list[float]] = {"oracle": [], "bare": [], "empty": []}
    iterations = set()
    for _ in range(repeats):
        begin = time.perf_counter()
        outcome = oracle(task, setting)
        times["oracle"].append(time.perf_counter() - begin)
        iterations.add(outcome.iterations)
        begin = time.perf_counter()
        subprocess.run(argv, capture_output=True, env=child_environment(), check=True)
        times["bare"].append(time.perf_counter() - begin)
        begin = time.perf_counter()
        subprocess.run([program, "-n", "2", "-steps", "1"], capture_output=True, env=child_environment(), check=True)
        times["empty"].append(time.perf_counter() - begin)
    median = {k: float(np.median(v)) for k, v in times.items()}
    rows = [
        {"measure": "bare program run, same arguments and ω (median ms)", "value": 1e3 * median["bare"]},
        {"measure": "ExecutableOracle call: files, start, run, parse, /proc scan (median ms)", "value": 1e3 * median["oracle"]},
        {"measure": "oracle overhead = call − bare run (ms)", "value": 1e3 * (median["oracle"] - median["bare"])},
        {"measure": "oracle overhead / bare run", "value": (median["oracle"] - median["bare"]) / median["bare"]},
        {"measure": "program start-up and exit: 2x2 grid, 1 step (median ms)", "value": 1e3 * median["empty"]},
    ]
    return rows, {"task": task.name, "arguments": task.arguments, "iterations": sorted(iterations),
                  "repeats": repeats, "median_seconds": median}


def plot(path: Path, tasks: Sequence[ProgramTask], omegas: Mapping[str, Sequence[float]]) -> Path:
    c = [diffusion_number(t) for t in tasks]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, marker in (("per-run optimum (grid)", "o"), ("learned, delivered", "x"), (YOUNG, "+")):
        axis.scatter(c, omegas[name], marker=marker, label=name)
    axis.axhline(omegas["best constant"][0], color="tab:orange", lw=1, label="best constant, equal runs")
    axis.set_xscale("log")
    axis.set_xlabel("diffusion number c = κ dt / h²")
    axis.set_ylabel("ω")
    axis.set_title("heat_stepper: ω per unseen run")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run(out: Path, quick: bool = False) -> dict:
    budget = QUICK if quick else FULL
    begin = time.perf_counter()
    program = build_program()
    config = override(load_config(CONFIG), {"solver.command": [program], **budget.changes}, str(CONFIG))
    phases: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="heat-stepper-"))  # the run directory and the job directories
    try:
        start = time.perf_counter()
        result = run_config(config, scratch / "run", quiet=True)
        experiment = result.experiment
        oracle, omega = experiment.blackbox.oracle, experiment.blackbox.space.parts["pc_sor_omega"]
        train_tasks, eval_tasks = experiment.train_tasks, experiment.eval_tasks
        training_runs = result.solves["training"]
        model = scratch / "run" / MODEL_FILE
        phases["training (run)"] = time.perf_counter() - start

        start = time.perf_counter()
        constant, points, constant_runs = best_constant(oracle, train_tasks, training_runs, omega)
        phases["best constant"] = time.perf_counter() - start

        start = time.perf_counter()
        grid = np.round(np.arange(omega.lo, omega.hi + 1e-9, budget.grid_step), 6)
        table = np.array([total_iterations(oracle, t, grid) for t in eval_tasks])
        optimum = [float(grid[int(np.argmin(row))]) for row in table]
        phases["per-run grid"] = time.perf_counter() - start

        start = time.perf_counter()
        delivered = [delivered_run(program, oracle, t, model, scratch / t.name) for t in eval_tasks]
        phases["predict + delivered runs"] = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch)

    start = time.perf_counter()
    omegas = {"default": [1.0] * len(eval_tasks), "best constant": [constant] * len(eval_tasks),
              "learned, delivered": [d[1] for d in delivered], YOUNG: [young_omega(t, omega) for t in eval_tasks],
              "per-run optimum (grid)": optimum}
    counts: dict[str, list[float]] = {"learned, delivered": [float(d[0]) for d in delivered],
                                      "per-run optimum (grid)": [float(row.min()) for row in table]}
    for name in ("default", "best constant", YOUNG):
        counts[name] = [total_iterations(oracle, t, [w])[0] for t, w in zip(eval_tasks, omegas[name])]
    check = [total_iterations(oracle, t, [w])[0] for t, w in zip(eval_tasks, omegas["learned, delivered"])]
    phases["evaluation"] = time.perf_counter() - start

    start = time.perf_counter()
    overhead_rows, overhead_details = overhead(program, oracle, eval_tasks[int(np.argmax(counts["default"]))],
                                               budget.overhead_repeats, omega)
    phases["overhead"] = time.perf_counter() - start

    optimum_total = sum(counts["per-run optimum (grid)"])
    how = {"default": ("PETSc's default, no option", "0"),
           "best constant": (f"{points} evenly spaced ω on the {len(train_tasks)} training runs", str(constant_runs)),
           "learned, delivered": (f"`{CONFIG.name}` trained by `run` through the program; ω written by "
                                  f"`metasolve predict`, run with `-options_file`", str(training_runs)),
           YOUNG: ("expert: constant-coefficient SOR theory from c = κ·dt/h²", "0"),
           "per-run optimum (grid)": (f"grid step {budget.grid_step} per unseen run (hindsight)",
                                      f"{len(grid)} per run")}
    rows = []
    for name, (description, spent) in how.items():
        total = sum(counts[name])
        rows.append({"method": name, "how ω is chosen": description, "program runs to choose ω": spent,
                     "ω on unseen runs": f"{min(omegas[name]):.3f}–{max(omegas[name]):.3f}",
                     "total iterations": int(total), "× optimum": total / optimum_total})
    totals = {r["method"]: r["total iterations"] for r in rows}
    reduction = 1 - totals["learned, delivered"] / totals["best constant"]
    per_run = [1 - l / b for l, b in zip(counts["learned, delivered"], counts["best constant"])]
    agree = sum(int(a == b) for a, b in zip(check, counts["learned, delivered"]))
    figure = plot(out / "heat_stepper.png", eval_tasks, omegas)
    seconds = time.perf_counter() - begin
    c_values = [diffusion_number(t) for t in eval_tasks]
    markdown = "\n".join([
        f"`examples/legacy_solver/heat_stepper` (C, unmodified; prefix `{oracle.prefix}`, {STEPS} implicit-Euler steps per "
        f"run, one Richardson + forward-SOR solve per step from the previous step's solution) tuned through its "
        f"command line. {len(eval_tasks)} unseen runs with diffusion numbers c = κ·dt/h² from {min(c_values):.2g} to "
        f"{max(c_values):.2g}; iterations to rtol {RTOL:g} summed over every step of every run, read from the "
        f"program's own output. Training: `examples/{CONFIG.name}`{' (quick budget)' if quick else ''} through "
        f"`metasolve.app.run.run`: {len(train_tasks)} runs, batch {config['train']['batch_size']}, "
        f"{config['train']['steps']} steps, central forward gradient (ε = {config['estimator']['eps']}) with the "
        f"surrogate control variate, cost = smoothed total iterations of the run (`run_iteration_proxy`), loss "
        f"{config['train']['loss']}, features log n, log κ, log dt, contrast; the run deployed its {result.kept} weights.",
        "",
        markdown_table(rows),
        "",
        f"Learned per-run ω vs the best constant at equal runs: **{100 * reduction:.0f}% fewer total iterations** "
        f"(goal ≥ 20%); per run: median {100 * np.median(per_run):.0f}%, worst {100 * min(per_run):.0f}%. "
        f"Against Young's formula (an expert's closed form, no runs spent) the learned ω needs "
        f"{totals['learned, delivered'] / totals[YOUNG]:.2f}× the iterations. "
        f"The delivered runs (options file, program started by hand) and the oracle's runs with the same ω agree "
        f"on {agree} of {len(eval_tasks)} iteration totals.",
        *(["Quick run: a smoke test of the pipeline; a few steps on a few runs learn little."] if quick else []),
        "",
        f"Per-run overhead of the oracle on {overhead_details['task']} ({overhead_details['arguments']}, "
        f"{overhead_details['iterations']} iterations), median of {overhead_details['repeats']} alternating calls, "
        f"wall time on a shared, loaded machine:",
        "",
        markdown_table(overhead_rows),
        "",
        f"Program runs: {training_runs} training + {constant_runs} constant search + {table.size} grid + "
        f"{4 * len(eval_tasks)} evaluation. Wall time {seconds:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f". Plot: `{figure.name}`.",
    ])
    return {"summary": rows, "markdown": markdown, "reduction_vs_constant": reduction, "per_run_reduction": per_run,
            "constant": constant, "omegas": omegas, "counts": counts, "diffusion_numbers": c_values,
            "overhead": overhead_rows, "overhead_details": overhead_details, "training_runs": training_runs,
            "history": experiment.trainer.history, "phases": phases, "delivered_vs_oracle_agree": agree}
