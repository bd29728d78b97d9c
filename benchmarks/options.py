"""[options] A learned per-instance SOR ω vs the default, the best constant and the per-instance optimum.

Family: `Diffusion` (lognormal coefficients, contrast 0.2-2.5, grids 12-40), solver Richardson +
*forward* SOR (`-pc_sor_forward`): there the iteration-optimal ω moves from about 1.55 to 1.93 from
task to task (DESIGN.md), so a per-instance value has a case. All methods are compared on the same
unseen evaluation tasks, iterations and time to rtol 1e-6:
- the default, ω = 1 (Gauss-Seidel);
- the best *constant* ω from a golden-section search on the training tasks that spends the same
  number of solves as one training run of the learned predictor;
- the learned per-instance ω: a MetaSolver (features -> θ -> Interval(1, 2)) trained through the
  BlackBox with ControlVariate(ForwardGradient, Surrogate), median and spread over seeds;
- the textbook per-instance ω* = 2/(1 + sqrt(1 - μ²)) from the Jacobi spectral radius μ (Young's
  theory for consistently ordered matrices; needs an eigenvalue solve per task);
- the per-instance optimum by grid search on each evaluation task (the limit), and the best
  constant in hindsight on the evaluation tasks (the limit of any constant).

Training cost: `IterationProxy(1e-6, max_it=300)`, the smoothed count of iterations above the
tolerance. Its argmin in ω equals the argmin of the true iteration count (checked on 24 tasks with
a 0.01 grid: identical on all), whereas `LogResidual(k)` is biased: with k below the iteration
count its argmin lies too low (the transient growth of forward SOR above the optimum is penalised,
k = 40: ω 1.83 instead of 1.92, 680 instead of 204 iterations) and with k above it small grids
reach the round-off floor (k = 100, n = 12: ω 1.64 instead of 1.60).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
import torch  # noqa: E402

from metasolve import (BlackBox, ControlVariate, ForwardGradient, Interval, IterationProxy, Iterations,  # noqa: E402
                       MetaSolver, Space, Surrogate, Trainer)
from metasolve.report import markdown_table, plot_learning_curves  # noqa: E402
from problems import Diffusion  # noqa: E402
from solvers import KSPOracle  # noqa: E402

RTOL = 1e-6
OMEGA = Interval(1.0, 2.0)
FAMILY = dict(n_range=(12, 40), contrast_range=(0.2, 2.5), seed=0)
SOLVER = dict(ksp_type="richardson", pc_type="sor", options={"pc_sor_forward": None})


@dataclass(frozen=True)
class Scale:
    """How much of everything one run does."""

    train_tasks: int
    eval_tasks: int
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    golden_evaluations: int
    coarse_step: float
    fine_step: float
    lr: float = 1e-2
    hidden: int = 32
    depth: int = 1
    proxy_max_it: int = 300
    eps: float = 1e-2
    timing_repeats: int = 3


FULL = Scale(train_tasks=1024, eval_tasks=30, steps=400, batch_size=16, seeds=(0, 1, 2), golden_evaluations=24,
             coarse_step=0.01, fine_step=0.001)
QUICK = Scale(train_tasks=256, eval_tasks=8, steps=150, batch_size=8, seeds=(0,), golden_evaluations=12,
              coarse_step=0.02, fine_step=0.004, lr=3e-2)
"""A smoke test: too small a budget for the learned ω to beat the best constant."""


def make_oracle() -> KSPOracle:
    return KSPOracle(**SOLVER)


def iterations(oracle: KSPOracle, task: Any, omega: float, cost: Iterations) -> float:
    """Iterations to rtol at ω (the cost's max_it when the solve does not converge)."""
    value = cost(oracle(task, {"pc_sor_omega": float(omega), **cost.overrides}), task)
    return cost.failure_value(task) if math.isnan(value) else value


def iterations_many(oracle: KSPOracle, task: Any, omegas: Sequence[float], cost: Iterations) -> np.ndarray:
    outcomes = oracle.solve_many(task, [{"pc_sor_omega": float(w), **cost.overrides} for w in omegas])
    values = [cost(outcome, task) for outcome in outcomes]
    return np.array([cost.failure_value(task) if math.isnan(v) else v for v in values])


def train_learned(train_tasks: list, scale: Scale, seed: int) -> tuple[Trainer, dict]:
    """One meta-solver trained through the black box; returns the trainer and its run record."""
    torch.manual_seed(seed)
    space = Space({"pc_sor_omega": OMEGA})
    feature_dim = train_tasks[0].features.shape[0]
    meta_solver = MetaSolver(feature_dim, space, hidden=scale.hidden, depth=scale.depth)
    meta_solver.fit_normalizer(train_tasks)
    surrogate = Surrogate(Surrogate.mlp(feature_dim, space.dim))
    estimator = ControlVariate(ForwardGradient(tangents=1, eps=scale.eps), surrogate)
    blackbox = BlackBox(make_oracle(), space, IterationProxy(RTOL, max_it=scale.proxy_max_it), estimator, seed=seed)
    optimizer = torch.optim.Adam(meta_solver.parameters(), lr=scale.lr)
    # Cosine decay to lr/30: the last steps fine-tune ω to the ~0.005 the iteration count is sensitive to.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, scale.steps, eta_min=scale.lr / 30)
    trainer = Trainer(meta_solver, blackbox, optimizer, seed=seed, progress=False, scheduler=scheduler)
    begin, cpu = time.perf_counter(), time.process_time()
    history = trainer.fit(train_tasks, scale.steps, scale.batch_size)
    record = {"seed": seed, "solves": blackbox.stats.solves, "sweeps": blackbox.stats.solves * scale.proxy_max_it,
              "failed_solves": blackbox.stats.failed_centres + blackbox.stats.failed_queries,
              "seconds": time.perf_counter() - begin, "cpu_seconds": time.process_time() - cpu, "history": history}
    return trainer, record


def predict_timed(meta_solver: MetaSolver, tasks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ω per task and the seconds each prediction took (part of the learned time to solution)."""
    omegas, seconds = [], []
    for task in tasks:
        start = time.perf_counter()
        omegas.append(meta_solver.predict(task)["pc_sor_omega"])
        seconds.append(time.perf_counter() - start)
    return np.array(omegas), np.array(seconds)


def measure(oracle: KSPOracle, tasks: Sequence[Any], omegas: dict[str, np.ndarray],
            repeats: int) -> dict[str, dict[str, list[float]]]:
    """Iterations and time to solution (setup + solve, median of `repeats`) per task and method.

    Timed fairly: the first solve of a task runs ~0.3 ms slower than the next ones (measured), so
    each task gets an untimed warm-up solve and the methods take turns in rotated order.
    """
    cost = Iterations(RTOL)
    names = list(omegas)
    result: dict[str, dict[str, list[float]]] = {name: {"iterations": [], "seconds": []} for name in names}
    for i, task in enumerate(tasks):
        oracle(task, {"pc_sor_omega": float(omegas[names[0]][i]), **cost.overrides})
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                outcome = oracle(task, {"pc_sor_omega": float(omegas[name][i]), **cost.overrides})
                times[name].append(outcome.setup_seconds + outcome.seconds)
                if repeat == 0:
                    value = cost(outcome, task)
                    result[name]["iterations"].append(cost.failure_value(task) if math.isnan(value) else value)
        for name in names:
            result[name]["seconds"].append(float(np.median(times[name])))
    return result


def golden_section(objective: Callable[[float], float], lo: float, hi: float, evaluations: int) -> tuple[float, list]:
    """Minimise a unimodal function of one variable with exactly `evaluations` calls (>= 2)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = objective(c), objective(d)
    seen = [(c, fc), (d, fd)]
    for _ in range(evaluations - 2):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = objective(c)
            seen.append((c, fc))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = objective(d)
            seen.append((d, fd))
    return min(seen, key=lambda point: point[1])[0], seen


def best_constant(train_tasks: list, budget: int, evaluations: int) -> dict:
    """Golden-section search of the total iterations to rtol over a subset of the training tasks,
    spending at most `budget` solves: as many tasks per evaluation as `evaluations` allow."""
    oracle, cost = make_oracle(), Iterations(RTOL)
    count = min(len(train_tasks), budget // evaluations)
    evaluations = budget // count
    subset = train_tasks[:count]
    sweeps = []

    def total_iterations(omega: float) -> float:
        values = [iterations(oracle, task, omega, cost) for task in subset]
        sweeps.append(sum(values))
        return float(sum(values))

    begin = time.perf_counter()
    omega, seen = golden_section(total_iterations, OMEGA.lo, OMEGA.hi, evaluations)
    return {"omega": omega, "tasks": count, "evaluations": len(seen), "solves": count * len(seen),
            "sweeps": float(sum(sweeps)), "seconds": time.perf_counter() - begin}


def per_instance_optimum(oracle: KSPOracle, task: Any, coarse: np.ndarray, fine_step: float) -> tuple[float, np.ndarray]:
    """The ω with the fewest iterations: a coarse grid, then a fine one around its best point.
    Also returns the coarse-grid iterations (for the best constant in hindsight)."""
    cost = Iterations(RTOL)
    coarse_iterations = iterations_many(oracle, task, coarse, cost)
    centre = coarse[int(np.argmin(coarse_iterations))]
    step = coarse[1] - coarse[0]
    fine = np.arange(centre - step, centre + step + fine_step / 2, fine_step)
    fine = fine[(fine > OMEGA.lo) & (fine < OMEGA.hi)]
    fine_iterations = iterations_many(oracle, task, fine, cost)
    return float(fine[int(np.argmin(fine_iterations))]), coarse_iterations


def young_omega(task: Any) -> float:
    """ω* = 2/(1 + sqrt(1 - μ²)), μ the spectral radius of the Jacobi iteration D⁻¹(D - A): optimal
    for SOR on consistently ordered matrices (5-point stencil, natural ordering) asymptotically."""
    A = sp.csr_matrix(task.A)
    scaling = sp.diags(1.0 / np.sqrt(A.diagonal()))
    jacobi = sp.identity(A.shape[0], format="csr") - scaling @ A @ scaling
    mu = float(spla.eigsh(jacobi, k=1, which="LA", return_eigenvectors=False)[0])
    return 2.0 / (1.0 + math.sqrt(1.0 - mu * mu))


def _summary_rows(methods: dict[str, dict], constant: float, optimum: float) -> list[dict]:
    rows = []
    gap = constant - optimum
    for name, m in methods.items():
        totals = np.asarray(m["totals"], dtype=float)
        total = float(np.median(totals))
        rows.append({"method": name, "ω": m["omega"],
                     "total iterations (median)": total,
                     "spread over seeds": f"{totals.min():.0f}-{totals.max():.0f}" if totals.min() < totals.max() else "-",
                     "vs best constant": total / constant, "vs per-instance optimum": total / optimum,
                     "gap closed": (constant - total) / gap if gap > 0 else math.nan,
                     "median ms to solution": 1e3 * float(np.median(m["seconds"])),
                     "total s to solution": float(np.median(m["total_seconds"]))})
    return rows


def _plot(eval_tasks: list, optimum: np.ndarray, learned: dict[int, np.ndarray], constant: float,
          young: np.ndarray, ratios: dict[str, np.ndarray], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sizes = np.array([t.parameters["n"] for t in eval_tasks])
    markers = "os^vD"
    for i, (seed, omegas) in enumerate(learned.items()):
        points = left.scatter(optimum, omegas, c=sizes, cmap="viridis", marker=markers[i % len(markers)],
                              label=f"learned, seed {seed}", edgecolors="k", linewidths=0.3)
    left.scatter(optimum, young, marker="x", color="tab:red", label="textbook ω* (Jacobi μ)")
    low, high = float(optimum.min()) - 0.03, float(optimum.max()) + 0.03
    left.plot([low, high], [low, high], color="gray", lw=1, label="learned = optimal")
    left.axhline(constant, color="tab:orange", ls="--", label=f"best constant {constant:.3f}")
    left.set_xlabel("per-instance optimal ω (grid search)")
    left.set_ylabel("ω used")
    left.set_title("unseen tasks: ω learned vs optimal")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.colorbar(points, ax=left, label="grid size n")
    for name, ratio in ratios.items():
        right.scatter(sizes, ratio, label=name, s=18)
    right.axhline(1.0, color="gray", lw=1)
    right.set_yscale("log")
    right.set_xlabel("grid size n")
    right.set_ylabel("iterations / per-instance optimum")
    right.set_title("cost of a non-optimal ω per task")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(out: Path, quick: bool = False) -> dict:
    # The networks are tiny (132 x 32): extra intra-op threads only contend for the shared cores
    # (measured: a 40-step training run took 7.6 s with 2 threads, 1.6 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, QUICK if quick else FULL, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, scale: Scale, quick: bool) -> dict:
    begin = time.perf_counter()
    family = Diffusion(**FAMILY)
    train_tasks, eval_tasks = family.train_tasks(scale.train_tasks), family.eval_tasks(scale.eval_tasks)
    oracle = make_oracle()

    trainers, records = {}, []
    for seed in scale.seeds:
        trainers[seed], record = train_learned(train_tasks, scale, seed)
        records.append(record)
    budget = records[0]["solves"]
    search = best_constant(train_tasks, budget, scale.golden_evaluations)

    grid_begin = time.perf_counter()
    coarse = np.round(np.arange(1.40, OMEGA.hi - 1e-9, scale.coarse_step), 6)
    optimum, coarse_iterations = zip(*(per_instance_optimum(oracle, task, coarse, scale.fine_step) for task in eval_tasks))
    optimum = np.array(optimum)
    hindsight = float(coarse[int(np.argmin(np.sum(coarse_iterations, axis=0)))])
    young = np.array([young_omega(task) for task in eval_tasks])
    grid_seconds = time.perf_counter() - grid_begin

    learned_omegas, inference = {}, {}
    for seed, trainer in trainers.items():
        learned_omegas[seed], inference[seed] = predict_timed(trainer.meta_solver, eval_tasks)
    baselines = {
        "default ω = 1": np.ones(len(eval_tasks)),
        "best constant (golden section, equal solves)": np.full(len(eval_tasks), search["omega"]),
        "best constant in hindsight (eval tasks)": np.full(len(eval_tasks), hindsight),
        "textbook ω* (Jacobi spectral radius)": young,
        "per-instance optimum (grid)": optimum,
    }
    measured = measure(oracle, eval_tasks, {**baselines, **{f"learned seed {s}": w for s, w in learned_omegas.items()}},
                       scale.timing_repeats)
    for seed in scale.seeds:
        measured[f"learned seed {seed}"]["seconds"] = list(np.add(measured[f"learned seed {seed}"]["seconds"],
                                                                   inference[seed]))

    def collect(names: list[str]) -> dict:
        runs = [measured[name] for name in names]
        return {"totals": [sum(r["iterations"]) for r in runs],
                "seconds": [s for r in runs for s in r["seconds"]],
                "total_seconds": [sum(r["seconds"]) for r in runs]}

    omega_text = {"default ω = 1": "1", "best constant (golden section, equal solves)": f"{search['omega']:.4f}",
                  "best constant in hindsight (eval tasks)": f"{hindsight:.3f}",
                  "textbook ω* (Jacobi spectral radius)": f"{young.min():.3f}-{young.max():.3f}",
                  "per-instance optimum (grid)": f"{optimum.min():.3f}-{optimum.max():.3f}"}
    all_learned = np.concatenate(list(learned_omegas.values()))
    learned_names = [f"learned seed {s}" for s in scale.seeds]
    methods = {name: {"omega": omega_text[name], **collect([name])} for name in baselines}
    methods["learned per-instance ω"] = {"omega": f"{all_learned.min():.3f}-{all_learned.max():.3f}",
                                         **collect(learned_names)}
    constant_total = float(np.median(methods["best constant (golden section, equal solves)"]["totals"]))
    optimum_total = float(np.median(methods["per-instance optimum (grid)"]["totals"]))
    order = ["default ω = 1", "best constant (golden section, equal solves)", "best constant in hindsight (eval tasks)",
             "learned per-instance ω", "textbook ω* (Jacobi spectral radius)", "per-instance optimum (grid)"]
    rows = _summary_rows({name: methods[name] for name in order}, constant_total, optimum_total)

    median_seed = scale.seeds[int(np.argsort(methods["learned per-instance ω"]["totals"])[len(scale.seeds) // 2])]
    optimal_its = np.array(measured["per-instance optimum (grid)"]["iterations"])
    ratios = {f"learned (seed {median_seed})": np.array(measured[f"learned seed {median_seed}"]["iterations"]) / optimal_its,
              "best constant (golden)": np.array(measured["best constant (golden section, equal solves)"]["iterations"]) / optimal_its,
              "textbook ω*": np.array(measured["textbook ω* (Jacobi spectral radius)"]["iterations"]) / optimal_its}
    _plot(eval_tasks, optimum, learned_omegas, search["omega"], young, ratios, out / "options.png")
    plot_learning_curves({f"seed {r['seed']}": r["history"] for r in records}, out / "options-learning.png",
                         title="IterationProxy(1e-6) on training batches")

    by_method = {r["method"]: r for r in rows}
    learned_row = by_method["learned per-instance ω"]
    errors = np.abs(all_learned - np.tile(optimum, len(scale.seeds)))
    bias = float(np.mean(all_learned - np.tile(optimum, len(scale.seeds))))
    fewer = 1.0 - learned_row["vs best constant"]
    goal_constant = "met" if fewer >= 0.20 else "missed"
    goal_optimum = "met" if learned_row["vs per-instance optimum"] <= 1.05 else "missed"
    train_cpu = float(np.median([r["cpu_seconds"] for r in records]))
    train_wall = float(np.median([r["seconds"] for r in records]))
    markdown = "\n".join([
        "**Quick mode: a smoke test; the budget is too small for the learned ω to mean anything.**\n" if quick else "",
        f"{family.describe()}",
        "",
        f"Solver: Richardson + forward SOR (`-pc_sor_forward`), iterations to rtol {RTOL:g} from a zero guess on "
        f"{len(eval_tasks)} unseen tasks (`eval_tasks`). Learned: MetaSolver({scale.hidden}x{scale.depth}) on the "
        f"{train_tasks[0].features.shape[0]} family features -> Interval(1, 2), {len(train_tasks)} training tasks, "
        f"{scale.steps} steps x batch {scale.batch_size}, Adam lr {scale.lr:g} with cosine decay, cost "
        f"IterationProxy({RTOL:g}, max_it={scale.proxy_max_it}), ControlVariate(ForwardGradient(1 tangent, eps "
        f"{scale.eps:g}), Surrogate MLP); seeds {list(scale.seeds)}. One training run: {budget} solves "
        f"({records[0]['sweeps']:.3g} SOR sweeps), {train_wall:.0f} s wall / {train_cpu:.0f} s CPU "
        f"(median over seeds), {sum(r['failed_solves'] for r in records)} failed solves.",
        f"Best constant: golden section on (1, 2) of the total iterations over {search['tasks']} training tasks, "
        f"{search['evaluations']} evaluations = {search['solves']} solves (budget {budget}; {search['sweeps']:.3g} "
        f"sweeps), {search['seconds']:.0f} s -> ω = {search['omega']:.4f}. Per-instance optimum: grid of step "
        f"{scale.coarse_step:g} on [1.40, 2), refined with step {scale.fine_step:g} ({grid_seconds:.0f} s, with the "
        f"eigenvalue solves).",
        "",
        markdown_table(rows),
        "",
        f"Gap between the best constant and the per-instance optimum: {constant_total:.0f} vs {optimum_total:.0f} "
        f"iterations ({1 - optimum_total / constant_total:.0%} fewer at the optimum). The learned ω closes "
        f"{learned_row['gap closed']:.0%} of it (median over seeds): {fewer:.0%} fewer iterations than the best "
        f"constant (goal >= 20%: **{goal_constant}**), {learned_row['vs per-instance optimum'] - 1:+.0%} vs the "
        f"per-instance optimum (goal within 5%: **{goal_optimum}**). Learned ω vs optimal: mean |error| "
        f"{errors.mean():.4f}, mean bias {bias:+.4f} (a positive bias is the right hedge: iterations grow far faster "
        f"below the optimum than above it).",
        "",
        f"Time to solution (setup + solve, median of {scale.timing_repeats} runs in rotated order after an untimed "
        f"warm-up solve per task; the learned time includes the predictor's inference, "
        f"{1e3 * float(np.median(np.concatenate(list(inference.values())))):.2f} ms per task), summed over the "
        f"evaluation tasks: learned {learned_row['total s to solution']:.3g} s, best constant "
        f"{by_method['best constant (golden section, equal solves)']['total s to solution']:.3g} s, per-instance optimum "
        f"{by_method['per-instance optimum (grid)']['total s to solution']:.3g} s. With "
        f"at most 1600 unknowns one solve takes about a millisecond, of which KSP creation and setup are a fixed "
        f"part, so times differ less than iterations.",
        "",
        "Why the last 5% is out of reach: near the optimum one iteration count costs ~8% per +0.01 in ω and more "
        "below it, so within 5% needs ω to about ±0.005; even the textbook ω* computed from each task's exact Jacobi "
        "spectral radius lands where the table shows, and the family's features (8 x 8 averages of log k and f, "
        "contrast, correlation length, h) do not resolve the fine-scale coefficient structure that sets ω* "
        "(offline check: ridge regression of ω* on the same features from 300-400 tasks errs by 0.026-0.03). "
        "With d = 1 a single Rademacher tangent gives the exact forward-difference derivative, so the control "
        "variate does not change the estimate here; the surrogate only costs its updates.",
        "",
        "![ω learned vs optimal](options.png)",
        "",
        "![learning curves](options-learning.png)",
    ])
    per_task = [{"task": t.name, "n": t.parameters["n"], "contrast": t.parameters["contrast"],
                 "optimal_omega": float(optimum[i]), "young_omega": float(young[i]),
                 "learned_omega": {str(s): float(learned_omegas[s][i]) for s in scale.seeds},
                 "iterations": {name: measured[name]["iterations"][i] for name in measured}}
                for i, t in enumerate(eval_tasks)]
    return {"summary": rows, "markdown": markdown, "best_constant": dict(search),
            "training": [{k: v for k, v in r.items() if k != "history"} for r in records],
            "hindsight_constant": hindsight, "per_task": per_task, "learned_omega_mae": float(errors.mean()),
            "learned_omega_bias": bias, "inference_seconds_median": float(np.median(np.concatenate(list(inference.values())))),
            "grid_seconds": grid_seconds, "total_seconds": time.perf_counter() - begin}
