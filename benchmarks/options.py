"""[options] A learned per-instance SOR ω vs the default, tuned constants, the textbook ω* and the optimum.

Family: `Diffusion` (lognormal coefficients, contrast 0.2-2.5, grids 12-40), solver Richardson +
*forward* SOR (`-pc_sor_forward`): there the iteration-optimal ω moves from about 1.55 to 1.93 from
task to task, so a per-instance value has a case. All methods are compared on the same unseen
evaluation tasks, iterations and time to rtol 1e-6:
- the default, ω = 1 (Gauss-Seidel);
- the best *constant* ω found on the training tasks with the same number of solves as one
  training run of the learned predictor, by Optuna's TPE (a real tuner) and by golden section
  (optimal for a unimodal function of one variable);
- the textbook per-instance ω* = 2/(1 + sqrt(1 - ρ_J²)) (Young: optimal for consistently ordered
  matrices) with ρ_J the Jacobi spectral radius estimated by the operator features
  (`solvers.features`, a 30-step Jacobi-preconditioned Lanczos run): what a user computes on the
  same path; and the same formula with ρ_J from an exact eigenvalue solve (ARPACK) for reference;
- nearest neighbour: the per-instance optimal ω of the training task nearest in (standardised)
  operator features, with the per-training-task optima bought by the same solve budget;
- learned per-instance ω, trained the way a user trains it: `examples/sor_omega.toml` overridden
  with `metasolve.app.config.override` and run through `metasolve.app.run.run` (the recipe of
  `metasolve train`: supervised start, training through the solver, keep-better). The main learner
  asks for the textbook anchor from the config (`[model] anchor = {pc_sor_omega =
  "sor_omega_star"}`: the network's output is added in θ to Young's ω* read from the operator
  features, and starts at zero) and for the options' supervised start (`[pretrain] tasks`,
  `search_solves`: a golden-section search per task, regressed on the features); the ablations drop
  the anchor, and use the family's own hand-made features; the supervised start alone (the
  `pretrained.pt` weights each run keeps) shows what the search and regression give before any
  training through the solver;
- the per-instance optimum by grid search on each evaluation task (the limit), and the best
  constant in hindsight on the evaluation tasks (the limit of any constant).
Time to solution of the feature-based methods includes computing the features and the prediction.

Training cost: `IterationProxy(1e-6, max_it=300)`, the smoothed count of iterations above the
tolerance. Its argmin in ω equals the argmin of the true iteration count (checked on 24 tasks with
a 0.01 grid: identical on all), whereas `LogResidual(k)` is biased: with k below the iteration
count its argmin lies too low (the transient growth of forward SOR above the optimum is penalised,
k = 40: ω 1.83 instead of 1.92, 680 instead of 204 iterations) and with k above it small grids
reach the round-off floor (k = 100, n = 12: ω 1.64 instead of 1.60).
"""
from __future__ import annotations

import json
import math
import tempfile
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

from metasolve import Interval, Iterations  # noqa: E402
from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.report import markdown_table, plot_learning_curves  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.training.option_search import golden_section  # noqa: E402
from problems import Diffusion  # noqa: E402
from problems.family import with_features  # noqa: E402
from solvers import KSPOracle, PETSc  # noqa: E402
from solvers.features import OPERATOR_FEATURE_NAMES, operator_features  # noqa: E402

RTOL = 1e-6
OMEGA = Interval(1.0, 2.0)
FAMILY = dict(n_range=(12, 40), contrast_range=(0.2, 2.5), seed=0)
SOLVER = dict(ksp_type="richardson", pc_type="sor", options={"pc_sor_forward": None})
OPERATOR = list(range(len(OPERATOR_FEATURE_NAMES)))
"""Tasks carry operator features then the family's own ("both"); each learner picks its columns."""
OMEGA_STAR = OPERATOR_FEATURE_NAMES.index("sor_omega_star")


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sor_omega.toml"
"""The shipped config the learned rows train from (family, solver, space, cost, estimator, model)."""


@dataclass(frozen=True)
class Scale:
    """How much of everything one run does (what the shipped config does not fix)."""

    train_tasks: int
    eval_tasks: int
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    golden_evaluations: int
    optuna_trials: int
    coarse_step: float
    fine_step: float
    lr: float = 1e-2
    pretrain_tasks: int = 16
    search_solves: int = 16
    """16 solves pin each task's θ to ±0.003 (`supervised_start`): forward SOR's optimum is sharp."""
    timing_repeats: int = 3


FULL = Scale(train_tasks=1024, eval_tasks=30, steps=400, batch_size=16, seeds=(0, 1, 2), golden_evaluations=24,
             optuna_trials=40, coarse_step=0.01, fine_step=0.001)
MEDIUM = Scale(train_tasks=256, eval_tasks=16, steps=150, batch_size=8, seeds=(0, 1, 2), golden_evaluations=12,
               optuna_trials=16, coarse_step=0.01, fine_step=0.002, lr=2e-2)
"""A quarter of the tasks and steps (about two CPU minutes): `_run(out, MEDIUM, False)`."""
QUICK = Scale(train_tasks=64, eval_tasks=6, steps=20, batch_size=8, seeds=(0,), golden_evaluations=6,
              optuna_trials=6, coarse_step=0.05, fine_step=0.01, lr=3e-2, pretrain_tasks=8, search_solves=6,
              timing_repeats=1)
"""A smoke test of the harness: too small a budget for the learned ω to mean much."""

ANCHOR = {"model.anchor": {"pc_sor_omega": "sor_omega_star"}}
"""Young's ω* from the operator features (`solvers.features`) as the start of the learned ω."""
LEARNERS = {
    "learned around textbook ω* (operator features)": ANCHOR,
    "learned (operator features, no anchor)": {"model.anchor": {}},
    "learned (family features, no anchor)": {"problem.features": "family", "model.anchor": {}},
}
"""Config overrides of each learned row; every run also gets the scale's overrides."""
SUPERVISED = "supervised start alone, around textbook ω*"
"""The main learner's pretrained weights (search + regression, before training through the solver)."""


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


def seeds_of(learner: str, scale: Scale) -> tuple[int, ...]:
    """Every seed for the main learner; the ablations (the other learners) run on the first seed only."""
    return scale.seeds if learner == next(iter(LEARNERS)) else scale.seeds[:1]


def learner_config(scale: Scale, seed: int, changes: dict[str, Any]) -> dict:
    """The shipped config at this scale, with a learner's changes: what `metasolve train` would run.
    The run's own best-constant baseline is switched off: this section searches its constants
    itself, with the training run's solve budget."""
    return override(load_config(EXAMPLE), {
        "problem.train_tasks": scale.train_tasks, "problem.eval_tasks": scale.eval_tasks,
        "train.steps": scale.steps, "train.batch_size": scale.batch_size, "train.lr": scale.lr, "train.seed": seed,
        "pretrain.tasks": scale.pretrain_tasks, "pretrain.search_solves": scale.search_solves,
        "evaluate.constant_evaluations": 0, **changes}, str(EXAMPLE))


def train_learned(scale: Scale, seed: int, changes: dict[str, Any], directory: Path) -> tuple[Any, dict, Any]:
    """One run of the recipe (`metasolve.app.run.run`) in `directory`: its result, a run record,
    and the meta-solver with the supervised start's weights (None if there was none)."""
    import copy

    config = learner_config(scale, seed, changes)
    begin, cpu = time.perf_counter(), time.process_time()
    result = run_config(config, directory, overwrite=True, quiet=True)
    seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu
    history = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stats = result.experiment.blackbox.stats
    max_it = config["cost"]["max_it"]
    record = {"seed": seed, "changes": changes, "solves": stats.solves, "sweeps": stats.solves * max_it,
              "failed_solves": stats.failed_centres + stats.failed_queries, "kept": result.kept,
              "seconds": seconds, "cpu_seconds": cpu_seconds, "history": history,
              "features": result.experiment.config["problem"]["features"]}
    pretrained = None
    if (directory / "pretrained.pt").exists():
        pretrained = copy.deepcopy(result.experiment.meta_solver)
        pretrained.load_state_dict(torch.load(directory / "pretrained.pt", weights_only=True)["pretrained"])
    return result, record, pretrained


def predict_timed(predictor: Any, tasks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ω per task and the seconds each prediction took (part of the learned time to solution)."""
    omegas, seconds = [], []
    for task in tasks:
        start = time.perf_counter()
        omegas.append(predictor.predict(task)["pc_sor_omega"])
        seconds.append(time.perf_counter() - start)
    return np.array(omegas), np.array(seconds)


def feature_seconds(tasks: Sequence[Any]) -> np.ndarray:
    """What computing the operator features costs per task (recomputed, timed; the tasks already hold them)."""
    seconds = []
    for task in tasks:
        A, b = task.petsc(PETSc.COMM_SELF)
        begin = time.perf_counter()
        values = operator_features(A, b)
        seconds.append(time.perf_counter() - begin)
        if not np.array_equal(values, task.features[:len(OPERATOR)].numpy()):
            raise RuntimeError(f"operator features of {task.name} are not reproducible")
    return np.array(seconds)


def feature_flops(task: Any) -> float:
    A, b = task.petsc(PETSc.COMM_SELF)
    before = PETSc.Log.getFlops()
    operator_features(A, b)
    return PETSc.Log.getFlops() - before


def solve_flops(task: Any, omega: float) -> float:
    cost = Iterations(RTOL)
    before = PETSc.Log.getFlops()
    make_oracle()(task, {"pc_sor_omega": float(omega), **cost.overrides})
    return PETSc.Log.getFlops() - before


def optuna_constant(train_tasks: list, budget: int, trials: int, seed: int = 0) -> dict:
    """The constant ω Optuna's TPE finds for the total iterations over a subset of the training
    tasks, spending at most `budget` solves (as many tasks per trial as `trials` allow)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    oracle, cost = make_oracle(), Iterations(RTOL)
    count = min(len(train_tasks), budget // trials)
    subset = train_tasks[:count]

    def objective(trial: Any) -> float:
        omega = trial.suggest_float("pc_sor_omega", OMEGA.lo, OMEGA.hi - 1e-3)
        return float(sum(iterations(oracle, task, omega, cost) for task in subset))

    begin = time.perf_counter()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return {"omega": float(study.best_params["pc_sor_omega"]), "tasks": count, "trials": trials,
            "solves": count * trials, "seconds": time.perf_counter() - begin}


def nearest_neighbour(train_tasks: list, eval_tasks: list, budget: int, coarse: np.ndarray,
                      fine_step: float) -> dict:
    """ω of the nearest training task in standardised operator features, the training tasks'
    optima bought by grid searches with at most `budget` solves in all."""
    oracle = make_oracle()
    per_task = len(coarse) + int(round(2 * (coarse[1] - coarse[0]) / fine_step)) + 1
    count = min(len(train_tasks), budget // per_task)
    known = train_tasks[:count]
    optima = np.array([per_instance_optimum(oracle, task, coarse, fine_step)[0] for task in known])
    train = torch.stack([t.features[OPERATOR] for t in known]).numpy()
    mean, scale = train.mean(0), train.std(0)
    scale[scale < 1e-12] = 1.0
    omegas, seconds = [], []
    for task in eval_tasks:
        begin = time.perf_counter()
        distance = (((train - mean) / scale - (task.features[OPERATOR].numpy() - mean) / scale) ** 2).sum(1)
        omegas.append(optima[int(np.argmin(distance))])
        seconds.append(time.perf_counter() - begin)
    return {"omegas": np.array(omegas), "seconds": np.array(seconds), "tasks": count, "solves": count * per_task}


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
    omega, _, seen = golden_section(total_iterations, OMEGA.lo, OMEGA.hi, evaluations)
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
    left.scatter(optimum, young, marker="x", color="tab:red", label="textbook ω* (ρ_J from operator features)")
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
    # The networks are tiny: extra intra-op threads only contend for the shared cores
    # (measured: a 40-step training run took 7.6 s with 2 threads, 1.6 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, QUICK if quick else FULL, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, scale: Scale, quick: bool) -> dict:
    begin = time.perf_counter()
    PETSc.Log.begin()
    family = with_features(Diffusion(**FAMILY), "both")
    feature_begin = time.perf_counter()
    train_tasks, eval_tasks = family.train_tasks(scale.train_tasks), family.eval_tasks(scale.eval_tasks)
    build_seconds = time.perf_counter() - feature_begin
    oracle = make_oracle()

    results, records, pretrained = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="options-runs-") as runs:
        for name, changes in LEARNERS.items():
            for seed in seeds_of(name, scale):
                directory = Path(runs) / f"{len(results)}-seed{seed}"
                results[name, seed], records[name, seed], pretrained[name, seed] = train_learned(
                    scale, seed, changes, directory)
                run_tasks = [t.name for t in results[name, seed].experiment.eval_tasks]
                if run_tasks != [t.name for t in eval_tasks]:
                    raise RuntimeError(f"{name}: the run evaluated on other tasks than this section ({run_tasks[:2]}...)")
    budget = records[next(iter(LEARNERS)), scale.seeds[0]]["solves"]
    search = best_constant(train_tasks, budget, scale.golden_evaluations)
    tuned = optuna_constant(train_tasks, budget, scale.optuna_trials)

    grid_begin = time.perf_counter()
    coarse = np.round(np.arange(1.40, OMEGA.hi - 1e-9, scale.coarse_step), 6)
    optimum, coarse_iterations = zip(*(per_instance_optimum(oracle, task, coarse, scale.fine_step) for task in eval_tasks))
    optimum = np.array(optimum)
    hindsight = float(coarse[int(np.argmin(np.sum(coarse_iterations, axis=0)))])
    exact_young = np.array([young_omega(task) for task in eval_tasks])
    grid_seconds = time.perf_counter() - grid_begin
    neighbour = nearest_neighbour(train_tasks, eval_tasks, budget, coarse, scale.fine_step)

    features_cost = feature_seconds(eval_tasks)
    textbook = np.array([float(t.features[OMEGA_STAR]) for t in eval_tasks])
    learned_omegas, inference = {}, {}
    for (name, seed), result in results.items():
        learned_omegas[name, seed], inference[name, seed] = predict_timed(result.experiment.meta_solver,
                                                                          result.experiment.eval_tasks)
    main = next(iter(LEARNERS))
    for seed in scale.seeds:
        learned_omegas[SUPERVISED, seed], inference[SUPERVISED, seed] = predict_timed(
            pretrained[main, seed], results[main, seed].experiment.eval_tasks)
    golden_name, optuna_name = "best constant (golden section, equal solves)", "best constant (Optuna TPE, equal solves)"
    textbook_name = "textbook ω* (ρ_J from operator features)"
    baselines = {
        "default ω = 1": np.ones(len(eval_tasks)),
        golden_name: np.full(len(eval_tasks), search["omega"]),
        optuna_name: np.full(len(eval_tasks), tuned["omega"]),
        "best constant in hindsight (eval tasks)": np.full(len(eval_tasks), hindsight),
        "nearest neighbour (operator features, equal solves)": neighbour["omegas"],
        textbook_name: textbook,
        "textbook ω* (exact ρ_J, ARPACK)": exact_young,
        "per-instance optimum (grid)": optimum,
    }
    runs = {f"{name} / seed {seed}": omegas for (name, seed), omegas in learned_omegas.items()}
    measured = measure(oracle, eval_tasks, {**baselines, **runs}, scale.timing_repeats)
    extra = {"nearest neighbour (operator features, equal solves)": features_cost + neighbour["seconds"],
             textbook_name: features_cost}
    for (name, seed) in learned_omegas:
        operator = records[main if name == SUPERVISED else name, seed]["features"] == "operator"
        extra[f"{name} / seed {seed}"] = inference[name, seed] + (features_cost if operator else 0.0)
    for key, seconds in extra.items():
        measured[key]["seconds"] = list(np.add(measured[key]["seconds"], seconds))

    def collect(names: list[str]) -> dict:
        chosen = [measured[name] for name in names]
        return {"totals": [sum(r["iterations"]) for r in chosen],
                "seconds": [s for r in chosen for s in r["seconds"]],
                "total_seconds": [sum(r["seconds"]) for r in chosen]}

    def span(values: np.ndarray) -> str:
        return f"{values.min():.3f}-{values.max():.3f}"

    omega_text = {"default ω = 1": "1", golden_name: f"{search['omega']:.4f}", optuna_name: f"{tuned['omega']:.4f}",
                  "best constant in hindsight (eval tasks)": f"{hindsight:.3f}"}
    methods = {name: {"omega": omega_text.get(name, span(values)), **collect([name])} for name, values in baselines.items()}
    for name in [*LEARNERS, SUPERVISED]:
        seeds = scale.seeds if name == SUPERVISED else seeds_of(name, scale)
        all_omegas = np.concatenate([learned_omegas[name, s] for s in seeds])
        methods[name] = {"omega": span(all_omegas), **collect([f"{name} / seed {s}" for s in seeds])}
    constant_total = float(np.median(methods[optuna_name]["totals"]))
    optimum_total = float(np.median(methods["per-instance optimum (grid)"]["totals"]))
    golden_total = float(np.median(methods[golden_name]["totals"]))
    order = ["default ω = 1", golden_name, optuna_name, "best constant in hindsight (eval tasks)",
             "nearest neighbour (operator features, equal solves)", *LEARNERS, SUPERVISED, textbook_name,
             "textbook ω* (exact ρ_J, ARPACK)", "per-instance optimum (grid)"]
    rows = _summary_rows({name: methods[name] for name in order}, constant_total, optimum_total)

    main_totals = methods[main]["totals"]
    median_seed = scale.seeds[int(np.argsort(main_totals)[len(scale.seeds) // 2])]
    optimal_its = np.array(measured["per-instance optimum (grid)"]["iterations"])
    ratios = {f"learned around ω* (seed {median_seed})":
              np.array(measured[f"{main} / seed {median_seed}"]["iterations"]) / optimal_its,
              "best constant (Optuna)": np.array(measured[optuna_name]["iterations"]) / optimal_its,
              "textbook ω* (features)": np.array(measured[textbook_name]["iterations"]) / optimal_its}
    _plot(eval_tasks, optimum, {s: learned_omegas[main, s] for s in scale.seeds}, tuned["omega"], textbook, ratios,
          out / "options.png")
    plot_learning_curves({f"{name}, seed {seed}": r["history"] for (name, seed), r in records.items()},
                         out / "options-learning.png", title="IterationProxy(1e-6) on training batches")

    by_method = {r["method"]: r for r in rows}
    learned_row, textbook_row = by_method[main], by_method[textbook_name]
    main_omegas = np.concatenate([learned_omegas[main, s] for s in scale.seeds])
    errors = np.abs(main_omegas - np.tile(optimum, len(scale.seeds)))
    bias = float(np.mean(main_omegas - np.tile(optimum, len(scale.seeds))))
    textbook_errors = textbook - optimum
    goal_gap = "met" if learned_row["gap closed"] >= 0.9 else "not met"
    goal_textbook = "met" if learned_row["total iterations (median)"] < textbook_row["total iterations (median)"] else "not met"
    record = records[main, scale.seeds[0]]
    kept_text = ", ".join(f"{name} / seed {seed}: {r['kept']}" for (name, seed), r in records.items())
    one_solve_flops = float(np.median([solve_flops(t, w) for t, w in zip(eval_tasks, optimum)]))
    one_feature_flops = float(np.median([feature_flops(t) for t in eval_tasks]))
    solve_seconds = float(np.median(measured["per-instance optimum (grid)"]["seconds"]))
    markdown = "\n".join([
        "**Quick mode: a smoke test; the budget is too small for the learned ω to mean much.**\n" if quick else "",
        f"{family.family.describe()}",
        "",
        f"Solver: Richardson + forward SOR (`-pc_sor_forward`), iterations to rtol {RTOL:g} from a zero guess on "
        f"{len(eval_tasks)} unseen tasks. Learned: `{EXAMPLE.relative_to(EXAMPLE.parent.parent)}` run through "
        f"`metasolve.app.run.run` (the recipe of `metasolve train`) with `problem.train_tasks = {len(train_tasks)}`, "
        f"`train.steps = {scale.steps}`, `train.batch_size = {scale.batch_size}`, `train.lr = {scale.lr:g}`, "
        f"`pretrain.tasks = {scale.pretrain_tasks}`, `pretrain.search_solves = {scale.search_solves}`; the main "
        f"learner adds `model.anchor = {{pc_sor_omega = \"sor_omega_star\"}}`, the family-features ablation "
        f"`problem.features = \"family\"`. Seeds {list(scale.seeds)} for the main learner, seed {scale.seeds[0]} "
        f"for the ablations; weights kept by the run's keep-better: "
        f"{kept_text}. "
        f"One training run of the main learner: {budget} solves including the supervised start's "
        f"{scale.pretrain_tasks} x {scale.search_solves} ({record['sweeps']:.3g} SOR sweeps at most), "
        f"{record['seconds']:.0f} s wall (under load, evaluation included), "
        f"{sum(r['failed_solves'] for r in records.values())} failed solves over all runs.",
        f"Operator features: {len(OPERATOR_FEATURE_NAMES)} numbers from (A, b) (`solvers.features`), "
        f"{1e3 * float(np.median(features_cost)):.2f} ms per task (median; one solve at the optimal ω: "
        f"{1e3 * solve_seconds:.2f} ms), {one_feature_flops:.3g} flops vs {one_solve_flops:.3g} for that solve "
        f"({one_feature_flops / one_solve_flops:.2f} solves); building all {len(train_tasks) + len(eval_tasks)} tasks "
        f"with them took {build_seconds:.0f} s.",
        f"Constants at equal budget: Optuna TPE, {tuned['trials']} trials x {tuned['tasks']} training tasks = "
        f"{tuned['solves']} solves -> ω = {tuned['omega']:.4f}; golden section, {search['evaluations']} evaluations x "
        f"{search['tasks']} tasks = {search['solves']} solves -> ω = {search['omega']:.4f}. Nearest neighbour: grid "
        f"optima of {neighbour['tasks']} training tasks = {neighbour['solves']} solves. Per-instance optimum: grid of "
        f"step {scale.coarse_step:g} on [1.40, 2), refined with step {scale.fine_step:g} ({grid_seconds:.0f} s).",
        "",
        markdown_table(rows),
        "",
        f"Gap between the Optuna constant and the per-instance optimum: {constant_total:.0f} vs {optimum_total:.0f} "
        f"iterations. The learned ω around the textbook value closes {learned_row['gap closed']:.0%} of it (median "
        f"over seeds; goal >= 90%: **{goal_gap}**) and takes {learned_row['total iterations (median)']:.0f} "
        f"iterations against {textbook_row['total iterations (median)']:.0f} for the textbook ω* on the same "
        f"features (goal: fewer, **{goal_textbook}**). Against the golden-section constant instead it closes "
        f"{(golden_total - learned_row['total iterations (median)']) / (golden_total - optimum_total):.0%} of the gap "
        f"({golden_total:.0f} -> {optimum_total:.0f}). Learned ω vs optimal: mean |error| {errors.mean():.4f}, "
        f"mean bias {bias:+.4f}; textbook ω* (features) vs optimal: mean |error| {np.abs(textbook_errors).mean():.4f}, "
        f"mean bias {textbook_errors.mean():+.4f}; textbook on exact ρ_J: mean bias {np.mean(exact_young - optimum):+.4f}. "
        f"The supervised start alone (per-task search + regression, {scale.pretrain_tasks * scale.search_solves} "
        f"solves) closes {by_method[SUPERVISED]['gap closed']:.0%} of the gap.",
        "",
        f"Time to solution (setup + solve, median of {scale.timing_repeats} runs in rotated order after an untimed "
        f"warm-up solve per task, under load; feature-based rows include the features and the prediction, "
        f"inference {1e3 * float(np.median(np.concatenate(list(inference.values())))):.2f} ms per task), summed over "
        f"the evaluation tasks: learned {learned_row['total s to solution']:.3g} s, textbook (features) "
        f"{textbook_row['total s to solution']:.3g} s, Optuna constant "
        f"{by_method[optuna_name]['total s to solution']:.3g} s, per-instance optimum (no features) "
        f"{by_method['per-instance optimum (grid)']['total s to solution']:.3g} s. With at most 1600 unknowns a "
        f"solve takes about a millisecond and the features cost about as much as a solve (finding ρ_J to the "
        f"accuracy ω* needs takes as many matrix-vector products as a solve at the optimal ω takes sweeps), so here "
        f"a per-instance ω pays off in time only when the operator is reused for several solves (time stepping, "
        f"many right-hand sides): the features are computed once per operator.",
        "",
        "![ω learned vs optimal](options.png)",
        "",
        "![learning curves](options-learning.png)",
    ])
    per_task = [{"task": t.name, "n": t.parameters["n"], "contrast": t.parameters["contrast"],
                 "optimal_omega": float(optimum[i]), "textbook_omega": float(textbook[i]),
                 "exact_young_omega": float(exact_young[i]),
                 "learned_omega": {f"{name} / seed {s}": float(learned_omegas[name, s][i]) for name, s in learned_omegas},
                 "iterations": {name: measured[name]["iterations"][i] for name in measured}}
                for i, t in enumerate(eval_tasks)]
    return {"summary": rows, "markdown": markdown, "best_constant": dict(search), "optuna_constant": tuned,
            "nearest_neighbour": {k: v for k, v in neighbour.items() if k not in ("omegas", "seconds")},
            "training": [{"learner": name, **{k: v for k, v in r.items() if k != "history"}} for (name, _), r in records.items()],
            "hindsight_constant": hindsight, "per_task": per_task, "learned_omega_mae": float(errors.mean()),
            "learned_omega_bias": bias, "feature_seconds_median": float(np.median(features_cost)),
            "feature_flops_median": one_feature_flops, "solve_flops_median": one_solve_flops,
            "grid_seconds": grid_seconds, "total_seconds": time.perf_counter() - begin}
