"""[tutorials] PETSc's own tutorial programs, built unchanged, tuned per run through the config route only.

Two programs from PETSc 3.26.1's sources (`examples/petsc_tutorials/Makefile` downloads the
sdist with pip and compiles them against the venv's PETSc, not a line changed):
- `ksp/tutorials/ex29`: −div(ρ ∇u) = f on a DMDA, ρ in the centre block; a run is
  `-da_grid_x -da_grid_y -rho -nu`;
- `snes/tutorials/ex5`: Bratu, −Δu − λeᵘ = 0; a run is `-da_grid_x -da_grid_y -par`, and its cost
  is the linear iterations of every Newton step.
Both solve with Richardson + forward SOR, where the per-run ω matters (Young's ω* from the grid
size is the textbook answer). The learned per-run ω is trained by `metasolve.app.run.run` on the
shipped configs (`examples/petsc_tutorials/*_omega.toml`) — exactly what `metasolve train` runs —
and delivered by the `metasolve predict` command: one options file per run, then the program
started with `-options_file` outside the oracle, its count read from its own output and compared
with the count of the same setting inside training's solve path.

Baselines on the same unseen runs, iterations to rtol 1e-6 (every solve of the run):
PETSc's default (ω = 1); the best constant ω by a grid on the training runs and by Optuna (TPE),
each with as many program runs as the learned predictor's training spent (its supervised start
included); Young's formula from the grid sizes (0 runs); the per-run optimum on a fine grid
(hindsight, a 0.02 grid over [1.3, 1.99] refined to 0.005 around its minimum); and, stricter than
any constant a user could find, the best constant on the unseen runs themselves (hindsight, the
same grid). "Headroom captured" = (best constant − learned) / (best constant − per-run optimum),
with the better of the two equal-run constants; the goals table also gives it against the
hindsight constant. "weights kept" says which weights keep-better deployed: the supervised start
(per-run golden-section search around Young's ω* on 16 training runs, then a ridge fit of the
correction), or those trained through the solver after it. Results: benchmarks/results/tutorials.md.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.method.cost import Iterations  # noqa: E402
from metasolve.method.measure import measure  # noqa: E402
from solvers.executable import child_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "examples" / "petsc_tutorials"
PROGRAMS = {"ex29": "ex29_omega.toml", "ex5": "ex5_omega.toml"}
OPTION = "pc_sor_omega"
SEEDS = (0, 1)
COARSE, FINE = 0.02, 0.005
OPTIMUM_FROM = 1.3
"""The hindsight search starts here: every per-run optimum measured on both programs lies above 1.6
(landscapes on 16 ex29 and 8 ex5 runs at step 0.02-0.03 over [1, 1.99]), and ω < 1.3 costs
thousands of iterations per solve."""
YOUNG = "Young's formula"
REASON = re.compile(r"Linear solve (converged|did not converge) due to (\w+) iterations (\d+)")
"""PETSc's own `-ksp_converged_reason` line: what the delivered run is counted from."""


def build_programs() -> Path:
    """`make -C examples/petsc_tutorials` (downloads PETSc's sources with pip the first time)."""
    result = subprocess.run(["make", "--no-print-directory", "-C", str(TUTORIALS), f"PYTHON={sys.executable}"],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"building the PETSc tutorials failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return ROOT / "build" / "petsc-tutorials"


def iterations(experiment, cost: Iterations, task, omegas: Sequence[float]) -> list[float]:
    """Iterations to the evaluation tolerance of each ω (a failed run is charged the cost's failure value)."""
    results = measure(experiment.blackbox.oracle, cost, task, [{OPTION: float(w)} for w in omegas])
    return [cost.failure_value(task) if r.failed else r.value for r in results]


def per_run_optimum(experiment, cost: Iterations, task, space) -> tuple[float, float, int, list[float]]:
    """(ω, iterations, runs, the coarse grid's iterations) of the best ω on a coarse grid refined
    around its minimum."""
    lo, hi = max(space.lo, OPTIMUM_FROM), space.hi
    coarse = coarse_grid(space)
    values = iterations(experiment, cost, task, coarse)
    centre = float(coarse[int(np.argmin(values))])
    fine = np.round(np.arange(max(lo, centre - COARSE + FINE), min(hi, centre + COARSE - FINE) + 1e-9, FINE), 6)
    fine = np.array([w for w in fine if w not in set(coarse)])
    values_fine = iterations(experiment, cost, task, fine) if len(fine) else []
    omegas = np.concatenate([coarse, fine])
    every = np.concatenate([values, values_fine])
    best = int(np.argmin(every))
    return float(omegas[best]), float(every[best]), len(omegas), [float(v) for v in values]


def coarse_grid(space) -> np.ndarray:
    return np.round(np.arange(max(space.lo, OPTIMUM_FROM), space.hi + 1e-9, COARSE), 6)


def best_constant_grid(experiment, cost, tasks, budget: int, space) -> tuple[float, int]:
    points = max(1, budget // len(tasks))
    grid = np.linspace(space.lo, space.hi, points + 2)[1:-1]
    totals = np.sum([iterations(experiment, cost, t, grid) for t in tasks], axis=0)
    return float(grid[int(np.argmin(totals))]), points * len(tasks)


def best_constant_optuna(experiment, cost, tasks, budget: int, space, seed: int) -> tuple[float, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = max(1, budget // len(tasks))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda trial: float(sum(iterations(experiment, cost, t, [trial.suggest_float("w", space.lo, space.hi)])[0]
                                           for t in tasks)), n_trials=trials)
    return float(study.best_params["w"]), trials * len(tasks)


def delivered(program: Path, model: Path, task, scratch: Path, rtol: float, max_it: int) -> tuple[int, float, float]:
    """`metasolve predict` (a fresh process, as a job script runs it), then the program with the
    options file it wrote: (iterations from the program's own output, ω written, predict seconds)."""
    job = scratch / task.name
    begin = time.perf_counter()
    predicted = subprocess.run([sys.executable, "-m", "metasolve", "predict", str(model), "--out", str(job), "--",
                                *task.argv()], capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - begin
    if predicted.returncode != 0:
        raise RuntimeError(f"metasolve predict failed for {task.name}:\n{predicted.stdout}\n{predicted.stderr}")
    options_file = job / "metasolve.opts"
    omega = next(float(line.split()[1]) for line in options_file.read_text().splitlines()
                 if line.split() and line.split()[0].endswith(OPTION))
    # The user's tolerance, and a reason line to read the count from: nothing else is added.
    result = subprocess.run([str(program), *task.argv(), "-options_file", str(options_file), "-ksp_rtol", repr(rtol),
                             "-ksp_max_it", str(max_it), "-ksp_converged_reason", "-options_left"],
                            capture_output=True, text=True, env=child_environment(), timeout=600)
    if result.returncode != 0 or "Option left" in result.stdout:
        raise RuntimeError(f"delivered run of {task.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    reasons = REASON.findall(result.stdout)
    if not reasons or any(verdict != "converged" for verdict, _, _ in reasons):
        raise RuntimeError(f"delivered run of {task.name} did not converge:\n{result.stdout[-2000:]}")
    return sum(int(count) for _, _, count in reasons), omega, seconds


def one_program(name: str, seed: int, quick: bool, programs: Path) -> dict:
    from metasolve.app.run import run

    config = load_config(TUTORIALS / PROGRAMS[name])
    changes = {"problem.seed": seed, "train.seed": seed, "evaluate.constant_evaluations": 0,
               "solver.command": [str(programs / config["solver"]["command"][0].split("/")[-1])]}
    if quick:
        changes.update({"problem.train_tasks": 8, "problem.eval_tasks": 4, "train.steps": 3, "train.batch_size": 4,
                        "pretrain.tasks": 4, "pretrain.search_solves": 4})
    config = override(config, changes, str(TUTORIALS / PROGRAMS[name]))
    run_dir = Path(tempfile.mkdtemp(prefix=f"tutorial-{name}-"))
    begin = time.perf_counter()
    result = run(config, run_dir / "run", overwrite=True, quiet=True)
    train_seconds = time.perf_counter() - begin
    experiment = result.experiment
    space = experiment.blackbox.space.parts[OPTION]
    cost = Iterations(config["evaluate"]["rtol"], config["evaluate"]["max_it"])
    train_tasks, eval_tasks = experiment.train_tasks, experiment.eval_tasks
    # What the learned predictor cost: training solves (its supervised start included) and
    # keep-better's validation solves (three candidates on up to 16 tasks after the training ones).
    validation = 3 * min(16, len(train_tasks)) if config["pretrain"]["enabled"] else 0
    budget = int(result.solves["training"]) + validation

    young_index = list(experiment.family.feature_names).index("young_omega")
    omegas = {"PETSc default (ω = 1)": [None] * len(eval_tasks),
              YOUNG: [float(min(max(float(t.features[young_index]), space.lo), space.hi)) for t in eval_tasks]}
    spent = {"PETSc default (ω = 1)": 0, YOUNG: 0}
    constant, spent["best constant, grid"] = best_constant_grid(experiment, cost, train_tasks, budget, space)
    omegas["best constant, grid"] = [constant] * len(eval_tasks)
    constant, spent["best constant, Optuna"] = best_constant_optuna(experiment, cost, train_tasks, budget, space, seed)
    omegas["best constant, Optuna"] = [constant] * len(eval_tasks)

    counts = {}
    for method, chosen in omegas.items():
        counts[method] = [iterations(experiment, cost, t, [w])[0] if w is not None else
                          cost.failure_value(t) if measure(experiment.blackbox.oracle, cost, t, [{}])[0].failed else
                          measure(experiment.blackbox.oracle, cost, t, [{}])[0].value
                          for t, w in zip(eval_tasks, chosen)]

    scratch = run_dir / "jobs"
    model = result.files["model"]
    deliveries = [delivered(Path(config["solver"]["command"][0]), model, t, scratch, cost.rtol, cost.max_it)
                  for t in eval_tasks]
    learned = "learned, delivered by `metasolve predict`"
    omegas[learned] = [d[1] for d in deliveries]
    counts[learned] = [float(d[0]) for d in deliveries]
    spent[learned] = budget
    from metasolve.app.evaluation import predicted_setting

    trained = [float(predicted_setting(experiment.meta_solver, experiment.blackbox.space, t)[0][OPTION])
               for t in eval_tasks]
    inside = [iterations(experiment, cost, t, [w])[0] for t, w in zip(eval_tasks, trained)]
    optimum = [per_run_optimum(experiment, cost, t, space) for t in eval_tasks]
    hindsight = "per-run optimum (hindsight)"
    omegas[hindsight] = [o[0] for o in optimum]
    counts[hindsight] = [o[1] for o in optimum]
    spent[hindsight] = sum(o[2] for o in optimum)
    # The constant a user could not have known: the best one on the unseen runs themselves.
    table = np.array([o[3] for o in optimum])
    grid = coarse_grid(space)
    constant_hindsight = "best constant, hindsight on the unseen runs"
    omegas[constant_hindsight] = [float(grid[int(np.argmin(table.sum(axis=0)))])] * len(eval_tasks)
    counts[constant_hindsight] = [float(v) for v in table[:, int(np.argmin(table.sum(axis=0)))]]
    spent[constant_hindsight] = spent[hindsight]
    shutil.rmtree(run_dir, ignore_errors=True)

    totals = {m: float(sum(c)) for m, c in counts.items()}
    constant_total = min(totals["best constant, grid"], totals["best constant, Optuna"])
    headroom = constant_total - totals[hindsight]
    captured = (constant_total - totals[learned]) / headroom if headroom > 0 else math.nan
    young_captured = (constant_total - totals[YOUNG]) / headroom if headroom > 0 else math.nan
    strict = totals[constant_hindsight] - totals[hindsight]
    return {"program": name, "seed": seed,
            "captured_vs_hindsight_constant": (totals[constant_hindsight] - totals[learned]) / strict
            if strict > 0 else math.nan, "train_seconds": train_seconds, "training_runs": budget,
            "evaluation_runs": len(eval_tasks), "tasks": [t.name for t in eval_tasks],
            "arguments": [t.arguments for t in eval_tasks], "omegas": omegas, "counts": counts, "totals": totals,
            "runs_spent": spent, "captured": captured, "young_captured": young_captured,
            "delivered_equals_training": [int(a) == int(b) for a, b in zip(counts[learned], inside)],
            "delivered_omega_equals_model": [a == b for a, b in zip(omegas[learned], trained)],
            "inside_counts": inside, "predict_seconds": [d[2] for d in deliveries], "kept": result.kept}


def plot(path: Path, results: list[dict]) -> Path:
    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for axis, result in zip(axes[0], results):
        optimum = result["omegas"]["per-run optimum (hindsight)"]
        for method, marker in (("learned, delivered by `metasolve predict`", "x"), (YOUNG, "+")):
            axis.scatter(optimum, result["omegas"][method], marker=marker, label=method.split(",")[0])
        axis.axhline(result["omegas"]["best constant, grid"][0], color="tab:orange", lw=1, label="best constant")
        lo, hi = min(optimum), max(optimum)
        axis.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        axis.set_xlabel("per-run optimal ω (hindsight)")
        axis.set_ylabel("ω used")
        axis.set_title(f"{result['program']}, seed {result['seed']}")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(out: Path, quick: bool = False) -> dict:
    programs = build_programs()
    return render([one_program(name, seed, quick, programs) for name in PROGRAMS
                   for seed in (SEEDS[:1] if quick else SEEDS)], out)


def render(results: list[dict], out: Path) -> dict:
    """The section's tables and figure from the per-(program, seed) results."""
    rows = []
    for result in results:
        for method, total in result["totals"].items():
            spent = result["runs_spent"][method]
            rows.append({"program": result["program"], "seed": result["seed"], "method": method,
                         "program runs to choose ω": f"{spent} (hindsight)" if "hindsight" in method else spent,
                         "ω on unseen runs": "—" if result["omegas"][method][0] is None else
                         f"{min(result['omegas'][method]):.3f}–{max(result['omegas'][method]):.3f}",
                         "total iterations": int(total)})
    goals = [{"program": r["program"], "seed": r["seed"], "headroom captured (learned)": r["captured"],
              "headroom captured (Young)": r["young_captured"],
              "captured vs the hindsight constant": r.get("captured_vs_hindsight_constant", math.nan),
              "learned ahead of Young": r["totals"]["learned, delivered by `metasolve predict`"] < r["totals"][YOUNG],
              "delivered runs equal to training counts": f"{sum(r['delivered_equals_training'])}/{len(r['delivered_equals_training'])}",
              "predict seconds (median, cold process)": float(np.median(r["predict_seconds"])),
              "training runs": r["training_runs"], "training seconds": r["train_seconds"], "weights kept": r["kept"]}
             for r in results]
    figure = plot(out / "tutorials.png", results)
    markdown = "\n".join([
        "PETSc 3.26.1's own `ksp/tutorials/ex29` and `snes/tutorials/ex5`, built unchanged from the sdist, "
        "Richardson + forward SOR, per-run ω trained through the config route (`metasolve.app.run.run` on "
        "`examples/petsc_tutorials/*_omega.toml`), delivered by `metasolve predict` and `-options_file`. Iterations "
        "to rtol 1e-6 summed over the unseen runs (for ex5: every linear solve of every Newton step).", "",
        markdown_table(rows), "", "Goals (headroom = best constant at equal runs → per-run optimum):", "",
        markdown_table(goals), "", f"![ω per run]({figure.name})"])
    return {"summary": goals, "rows": rows, "results": results, "markdown": markdown}
