"""[newton] The demo's learned initial guess for PETSc Newton on Bratu, against what a PETSc user would try.

The learned guess is trained by the product itself: `metasolve/app/demo.toml` (the job `make demo`
runs) through `metasolve.app.run.run` — the same estimator, learning rate, pretraining and
keep-better step — on the demo's own case (λ near the fold) and, with `problem.params`
overridden, on a wider λ range and a finer grid. The user's solver: `newtonls` + backtracking,
LU inside Newton, analytic Jacobian, on ex5's Bratu DMDA (`problems/bratu.py`); every solve stops
at ‖F‖ ≤ 1e-10·‖F(0)‖ (the same accuracy for every guess). On the run's unseen tasks, side by side:
- zero guess, and ex5's own hand-made guess (λ/(λ+1)·√(distance to the boundary));
- `-snes_grid_sequence k` (PETSc solves on k coarser grids first; best k reported), counting the
  fine-grid Newton steps and the coarse ones apart — its time and flops include every level;
- nearest-neighbour warm start: the stored solution of the training task with the closest λ;
- regression on solutions: the run's pretrained weights (`<out>/pretrained.pt`: one solve per
  training task, the solution projected on the lowest sine modes, a linear map from the features
  fitted by ridge regression with leave-one-out strength);
- learned: the weights the run deployed (the pretrained ones trained through the solver, kept
  only if they lower the training cost on validation tasks), with its solves counted.
Time is SNESSolve's (after SNESSetUp: matrices and the LU's symbolic setup, which a code solving
many tasks keeps; grid sequencing still sets up its finer levels inside the solve) plus the method's own work (features and inference, or the nearest-neighbour
search), the fastest of repeats with methods interleaved per task, as wall time and as process CPU
time: on a shared, loaded machine the CPU time is what the solve computed, the wall time also
what it waited. Flops are PETSc's count (LU and vector work; the Python residual/Jacobian
callbacks are the same for every method). Results: benchmarks/results/newton.md.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metasolve.app.config import override, parse_config  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import VALIDATION_TASKS  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.method.meta_solver import MetaSolver  # noqa: E402
from problems.bratu import Bratu, BratuOracle, BratuTask  # noqa: E402
from problems.family import Family  # noqa: E402

RTOL = 1e-10
"""The demo family's own SNES tolerance (`Bratu.oracle()`), used by the timing harness too."""
DEMO = "the demo (metasolve/app/demo.toml): n=25, λ in [6.0, 6.75] (near the fold)"
CASES = {  # name: overrides of the demo's config
    "bratu n=25, λ in [0.5, 6.6]": {"problem.params": {"n": 25, "lam_range": [0.5, 6.6]}},
    DEMO: {},
    # A finer grid: the same Newton counts, but LU per step outweighs SNESSolve's fixed cost.
    "bratu n=49, λ in [0.5, 6.6]": {"problem.params": {"n": 49, "lam_range": [0.5, 6.6]}},
}


def demo_config() -> dict:
    """The config `make demo` trains."""
    text = resources.files("metasolve.app").joinpath("demo.toml").read_text()
    return parse_config(text, "metasolve/app/demo.toml")


def ex5_guess(task: BratuTask) -> np.ndarray:
    """PETSc's ex5 FormInitialGuess: λ/(λ+1)·√(min distance to the boundary in grid units · h)."""
    n, lam = task.n, task.lam
    h = 1.0 / (n - 1)
    i = np.arange(1, n - 1)
    distance = np.minimum.outer(np.minimum(i, n - 1 - i), np.minimum(i, n - 1 - i)) * h
    return (lam / (lam + 1.0) * np.sqrt(distance)).ravel()


def timed(oracle: BratuOracle, task: BratuTask, method, repeats: int) -> tuple:
    """(BratuSolve, wall seconds, CPU seconds): guess + solve, each the fastest of `repeats` — on a
    loaded machine the minimum is the least disturbed measurement of the same deterministic work."""
    walls, cpus = [], []
    for _ in range(repeats):
        setting, overhead, overhead_cpu = method(task)
        result = oracle.solve(task, setting)
        walls.append(result.outcome.seconds + overhead)
        cpus.append(result.cpu_seconds + overhead_cpu)
    return result, float(np.min(walls)), float(np.min(cpus))


def clocked(guess):
    """`guess(task) -> setting` as `task -> (setting, wall seconds, CPU seconds)` of computing it."""
    def method(task: BratuTask) -> tuple[dict, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        setting = guess(task)
        return setting, time.perf_counter() - wall, time.process_time() - cpu
    return method


def learned_guess(meta: MetaSolver, family: Bratu, task: BratuTask) -> dict:
    """Features and inference through torch, as `MetaSolver.predict` deploys: λ → θ → the guess."""
    with torch.no_grad():
        setting = meta.space.decode(meta(family.features(task.lam)[None, :])[0])
    return {"u0": setting["u0"]}


def compiled(meta: MetaSolver, family: Family):
    """A linear meta-solver and a linear decode compose to one affine map u0 = M z + m (z the raw
    features, `family.features(**task.parameters)`): deployed in NumPy it costs one (n − 2)² x d
    product. Measured cold, right after a PETSc solve, torch inference (`learned_guess`) costs
    about as much as the Newton steps it saves (the "learned, torch inference" rows of
    benchmarks/results/newton.md)."""
    (layer,) = [m for m in meta.modules() if isinstance(m, torch.nn.Linear)]
    part = meta.space.parts["u0"]
    with torch.no_grad():
        weight = layer.weight / meta.feature_scale
        bias = layer.bias - weight @ meta.feature_mean
        M = (part.scale * part.basis @ weight).numpy()
        m = (part.scale * part.basis @ bias).numpy()

    def guess(task: Any) -> dict:
        return {"u0": M @ family.features(**task.parameters).numpy() + m}
    return guess


def trained_by_the_product(changes: dict, quick: bool) -> tuple[dict, MetaSolver, MetaSolver]:
    """`run` on the demo's config with `changes`: (what the run reports, the deployed meta-solver,
    the regression it started from — the run's pretrained weights)."""
    changes = dict(changes)
    if quick:
        changes.update({"problem.eval_tasks": 8, "train.steps": 5})
    config = override(demo_config(), changes, "metasolve/app/demo.toml")
    with tempfile.TemporaryDirectory(prefix="bench-newton-") as directory:
        out = Path(directory) / "run"
        result = run_config(config, out, quiet=True)
        candidates = torch.load(out / "pretrained.pt", weights_only=True)
    deployed = result.experiment.meta_solver
    regression = copy.deepcopy(deployed)
    regression.load_state_dict(candidates["pretrained"])
    n_train = len(result.experiment.train_tasks)
    validation = (len(candidates) + 1) * min(VALIDATION_TASKS, n_train)  # keep-better: one solve per task and candidate
    learned = {"experiment": result.experiment, "kept": result.kept, "evaluation": result.summary,
               "pretrain solves": min(config["pretrain"]["tasks"] or n_train, n_train),
               "solves": result.solves["training"] + validation, "train_seconds": result.train_seconds,
               "held-out training cost": result.experiment.trainer.progress_report}
    return learned, deployed, regression


def run_case(changes: dict, quick: bool) -> tuple[list[dict], dict]:
    learned, meta, regression = trained_by_the_product(changes, quick)
    experiment = learned["experiment"]
    family, train, eval_tasks = experiment.family, experiment.train_tasks, experiment.eval_tasks
    oracle = BratuOracle(rtol=RTOL)
    n_train = len(train)
    repeats = 3 if quick else 9
    stored = [(t.lam, oracle(t).solution) for t in train]  # what nearest-neighbour keeps: one solve per training task

    def nearest(task: BratuTask) -> dict:
        return {"u0": min(stored, key=lambda s: abs(s[0] - task.lam))[1]}

    methods = {
        "zero guess": (clocked(lambda t: {}), 0),
        "ex5 hand-made guess": (clocked(lambda t: {"u0": ex5_guess(t)}), 0),
        "grid sequencing k=1": (clocked(lambda t: {"snes_grid_sequence": 1}), 0),
        "grid sequencing k=2": (clocked(lambda t: {"snes_grid_sequence": 2}), 0),
        "grid sequencing k=3": (clocked(lambda t: {"snes_grid_sequence": 3}), 0),
        f"nearest neighbour ({n_train} solutions)": (clocked(nearest), n_train),
        "regression on solutions": (clocked(compiled(regression, family)), learned["pretrain solves"]),
        "learned, torch inference": (clocked(lambda t: learned_guess(meta, family, t)), learned["solves"]),
        "learned (the demo's recipe)": (clocked(compiled(meta, family)), learned["solves"]),
    }
    names = list(methods)
    record = {name: {"its": [], "coarse": [], "seconds": [], "cpu": [], "flops": [], "failures": 0} for name in names}
    for index, task in enumerate(eval_tasks):
        for name in names[index % len(names):] + names[:index % len(names)]:  # rotate who runs first
            result, wall, cpu = timed(oracle, task, methods[name][0], repeats)
            entry = record[name]
            if not result.outcome.converged:
                entry["failures"] += 1
                continue
            entry["its"].append(result.outcome.iterations)
            entry["coarse"].append(sum(result.level_iterations[:-1]))
            entry["seconds"].append(wall)
            entry["cpu"].append(cpu)
            entry["flops"].append(result.outcome.flops)
    rows, per_task = [], {}
    for name, (_, solves) in methods.items():
        its, coarse, seconds, cpu, flops, failures = (record[name][k] for k in
                                                      ("its", "coarse", "seconds", "cpu", "flops", "failures"))
        per_task[name] = its
        rows.append({"method": name, "mean Newton its": float(np.mean(its)) if its else math.nan,
                     "coarse-grid its": float(np.mean(coarse)) if coarse else math.nan,
                     "failures": failures, "mean ms": 1e3 * float(np.mean(seconds)) if seconds else math.nan,
                     "mean CPU ms": 1e3 * float(np.mean(cpu)) if cpu else math.nan,
                     "mean Mflop": 1e-6 * float(np.mean(flops)) if flops else math.nan, "training solves": solves})
    zero = rows[0]
    for row in rows:
        row["its vs zero"] = row["mean Newton its"] / zero["mean Newton its"] - 1.0
        row["time vs zero"] = row["mean ms"] / zero["mean ms"] - 1.0
        row["CPU time vs zero"] = row["mean CPU ms"] / zero["mean CPU ms"] - 1.0
        row["flops vs zero"] = row["mean Mflop"] / zero["mean Mflop"] - 1.0
    extras = {"kept": learned["kept"], "held-out training cost": learned["held-out training cost"],
              "run's evaluation": learned["evaluation"], "train_seconds": learned["train_seconds"],
              "per_task": per_task, "lam": [t.lam for t in eval_tasks]}
    return rows, extras


def run(out: Path, quick: bool = False) -> dict:
    summary, details, text = [], {}, []
    for case, changes in CASES.items():
        rows, extras = run_case(changes, quick)
        summary += [{"case": case, **row} for row in rows]
        details[case] = extras
        text.append(_verdict(case, rows, extras))
    _plot(details, out)
    note = " (quick mode: 8 unseen tasks, 5 training steps, numbers not meaningful)" if quick else ""
    markdown = (f"The learned guess is `metasolve/app/demo.toml` trained by `metasolve.app.run.run` (the demo's "
                f"estimator, learning rate, pretraining and keep-better step); the other cases override only "
                f"`problem.params`. PETSc newtonls + bt, LU, exact Jacobian, Bratu on ex5's DMDA, "
                f"‖F‖ ≤ {RTOL:g}·‖F(0)‖; guesses in the lowest 6x6 sine modes; 16 training tasks{note}. Time: "
                f"SNESSolve + features/inference/search, fastest of repeats, wall and CPU (shared machine under "
                f"load). Training solves of the learned rows: the run's (pretraining included) plus its "
                f"keep-better validation solves.\n\n{markdown_table(summary)}\n\n" + "\n".join(text)
                + "\n\n![per task](newton.png)")
    return {"summary": summary, "details": details, "markdown": markdown}


def _verdict(case: str, rows: list[dict], extras: dict) -> str:
    by = {r["method"]: r for r in rows}
    run_table = ", ".join(f"{r['method']} {r['mean_iterations']:.2f}" for r in extras["run's evaluation"])
    learned = by["learned (the demo's recipe)"]
    rivals = [r for name, r in by.items() if name.startswith(("nearest", "grid"))]
    behind = [r["method"] for r in rivals if not (learned["mean Newton its"] <= r["mean Newton its"]
                                                  and learned["mean CPU ms"] < r["mean CPU ms"]
                                                  and learned["mean Mflop"] < r["mean Mflop"])]
    return (f"- {case}: learned {learned['mean Newton its']:.2f} Newton its ({100 * learned['its vs zero']:+.0f}% vs zero, "
            f"goal <= -40%), CPU time {100 * learned['CPU time vs zero']:+.0f}% (goal <= -30%; wall time "
            f"{100 * learned['time vs zero']:+.0f}% under load), flops "
            f"{100 * learned['flops vs zero']:+.0f}%, failures {learned['failures']} vs zero's "
            f"{by['zero guess']['failures']}; ahead of nearest neighbour and grid sequencing (no more Newton its, less "
            f"CPU time and flops): {'yes' if not behind else 'no, not of ' + ', '.join(behind)}. The run deployed "
            f"its {extras['kept']} weights (training {extras['train_seconds']:.0f} s); its own evaluation table "
            f"(mean Newton iterations to `[evaluate] rtol`, as `metasolve train` reports them): {run_table}.")


def _plot(details: dict, out: Path) -> None:
    figure, axes = plt.subplots(1, len(details), figsize=(6 * len(details), 4), squeeze=False)
    for axis, (case, extras) in zip(axes[0], details.items()):
        order = np.argsort(extras["lam"])
        for name, its in extras["per_task"].items():
            if len(its) == len(order) and not name.startswith("grid sequencing k=3"):
                axis.plot(np.asarray(extras["lam"])[order], np.asarray(its)[order], marker="o", ms=3, label=name)
        axis.set_xlabel("λ (unseen tasks)")
        axis.set_ylabel("Newton iterations (final grid)")
        axis.set_title(case, fontsize=9)
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(out / "newton.png", dpi=120)
    plt.close(figure)
