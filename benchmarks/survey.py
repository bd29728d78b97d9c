"""[survey] Headroom survey: is there anything to learn in settings PETSc users actually tune?

For solver configurations people run on hard elliptic problems, measured on the same unseen
instances of two families (rotated anisotropic diffusion, binary high-contrast diffusion, n x n
grids with n >= 100, i.e. >= 10^4 unknowns):
- CG + GAMG, strength threshold `-pc_gamg_threshold`;
- CG + GAMG, the lower Chebyshev bound of the level smoothers
  (`-mg_levels_ksp_chebyshev_esteig 0,a,0,1.1`: the smoother targets [a*emax, 1.1*emax]);
- CG + SSOR, relaxation `-pc_sor_omega`.

Each instance is solved over a grid of the setting; costs are PETSc's own flop count over KSP
setup + solve (`PETSc.Log.getFlops`, deterministic) and wall time (setup + solve; on a shared,
loaded machine: indicative only). Rows per configuration and family:
- PETSc's default (the option not given);
- the best constant in hindsight (the grid value with the least total cost on the evaluation tasks:
  the limit of any constant);
- the best constant Optuna's TPE finds on *training* tasks with the same number of solves the
  learned predictor's training data cost (a real tuner, equal budget);
- nearest neighbour: the best grid value of the training task nearest in standardised operator
  features;
- learned: a ridge regression from operator features to each grid value's log relative cost,
  fitted on the training tasks' grid solves, then the predicted argmin (a cost model of the
  solver, learned from its outputs only);
- the per-instance optimum (the grid's best value per task: the limit).
Time-to-solution of the nearest-neighbour and learned rows includes the operator features and
the prediction. The gap column is (best constant - per-instance optimum) / best constant; the
survey's question is where it reaches 15%.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metasolve.app.report import markdown_table
from problems.anisotropic import RotatedAnisotropic
from problems.contrast import HighContrast
from solvers import KSPOracle, PETSc
from solvers.features import operator_features

RTOL = 1e-8
MAX_IT = 3000
RIDGE = 10.0
"""Ridge penalty on standardised features: strong, because the training tasks are few (12)."""


@dataclass(frozen=True)
class Setting:
    """One tunable option of one solver configuration, with the grid it is surveyed on."""

    ksp_type: str
    pc_type: str
    option: str
    grid: tuple[float, ...]
    log: bool
    format: Callable[[float], str] = field(default=lambda v: f"{v:g}")

    def options(self, value: float | None) -> dict[str, str]:
        return {} if value is None else {self.option: self.format(value)}


SETTINGS = {
    "CG + GAMG threshold": Setting("cg", "gamg", "pc_gamg_threshold", (0.002, 0.01, 0.03, 0.08, 0.2), log=True),
    "CG + GAMG Chebyshev lower bound": Setting("cg", "gamg", "mg_levels_ksp_chebyshev_esteig", (0.03, 0.1, 0.2, 0.4),
                                               log=True, format=lambda a: f"0,{a:g},0,1.1"),
    "CG + SSOR omega": Setting("cg", "sor", "pc_sor_omega", (1.0, 1.3, 1.5, 1.65, 1.8, 1.9), log=False),
}


@dataclass(frozen=True)
class Scale:
    train_tasks: int
    eval_tasks: int
    n_range: tuple[int, int]
    grid_stride: int = 1


FULL = Scale(train_tasks=12, eval_tasks=30, n_range=(100, 110))
QUICK = Scale(train_tasks=8, eval_tasks=6, n_range=(40, 56), grid_stride=2)
"""FULL keeps the run to a few CPU minutes: >= 10^4 unknowns and 30 unseen tasks per family, as few
training tasks as the cost model needs (the per-instance optimum on the training tasks is its data)."""


def families(scale: Scale) -> dict[str, Any]:
    return {"rotated anisotropic": RotatedAnisotropic(n_range=scale.n_range, seed=0),
            "high contrast": HighContrast(n_range=scale.n_range, seed=0)}


def solve(task: Any, setting: Setting, value: float | None) -> dict[str, float]:
    """One setup + solve: flops (PETSc's counter), seconds, iterations, converged."""
    oracle = KSPOracle(ksp_type=setting.ksp_type, pc_type=setting.pc_type, rtol=RTOL, max_it=MAX_IT,
                       options=setting.options(value))
    outcome = oracle(task)
    return {"flops": outcome.setup_flops + outcome.flops, "seconds": outcome.setup_seconds + outcome.seconds,
            "iterations": outcome.iterations, "converged": bool(outcome.converged and not outcome.failed)}


def grid_costs(tasks: Sequence[Any], setting: Setting, grid: Sequence[float]) -> dict[str, np.ndarray]:
    """[task, grid value] flops, seconds and iterations; an unconverged solve costs inf."""
    rows = [[solve(task, setting, value) for value in grid] for task in tasks]
    converged = np.array([[r["converged"] for r in row] for row in rows])
    out = {key: np.array([[r[key] for r in row] for row in rows], dtype=float) for key in ("flops", "seconds", "iterations")}
    for key in ("flops", "seconds"):
        out[key][~converged] = np.inf
    return out


def standardise(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = train.mean(0), train.std(0)
    scale[scale < 1e-12] = 1.0
    return (train - mean) / scale, (other - mean) / scale


def ridge_argmin(train_features: np.ndarray, train_costs: np.ndarray, eval_features: np.ndarray) -> np.ndarray:
    """Index of the predicted cheapest grid value per evaluation task: ridge regression (on
    standardised features) of log(cost / the task's best cost) for every grid value at once."""
    x_train, x_eval = standardise(train_features, eval_features)
    finite = np.where(np.isfinite(train_costs), train_costs, np.nan)
    relative = np.log(finite / np.nanmin(finite, axis=1, keepdims=True))
    relative = np.where(np.isnan(relative), np.nanmax(relative) + 1.0, relative)
    design = np.hstack([x_train, np.ones((len(x_train), 1))])
    penalty = RIDGE * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0
    weights = np.linalg.solve(design.T @ design + penalty, design.T @ relative)
    predicted = np.hstack([x_eval, np.ones((len(x_eval), 1))]) @ weights
    return np.argmin(predicted, axis=1)


def nearest_argmin(train_features: np.ndarray, train_costs: np.ndarray, eval_features: np.ndarray) -> np.ndarray:
    x_train, x_eval = standardise(train_features, eval_features)
    nearest = np.argmin(((x_eval[:, None, :] - x_train[None, :, :]) ** 2).sum(-1), axis=1)
    return np.argmin(train_costs, axis=1)[nearest]


def optuna_constant(tasks: Sequence[Any], setting: Setting, budget: int, seed: int = 0) -> tuple[float, int]:
    """The constant TPE finds minimising total flops on `tasks`, spending `budget` solves (each trial
    solves a fixed subset of tasks; unconverged solves cost 10x the trial's worst converged one)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    per_trial = min(len(tasks), max(1, budget // 12))
    subset, trials = tasks[:per_trial], budget // per_trial
    lo, hi = min(setting.grid), max(setting.grid)

    def objective(trial: Any) -> float:
        value = trial.suggest_float("value", lo, hi, log=setting.log)
        flops = np.array([solve(task, setting, value)["flops"] for task in subset])
        finite = flops[np.isfinite(flops)]
        penalty = 10.0 * finite.max() if finite.size else 1e30
        return float(np.where(np.isfinite(flops), flops, penalty).sum())

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return float(study.best_params["value"]), per_trial * trials


def timed_features(tasks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Operator features per task and the seconds each took (part of the learned time to solution)."""
    values, seconds = [], []
    for task in tasks:
        A, b = task.petsc(PETSc.COMM_SELF)
        begin = time.perf_counter()
        values.append(operator_features(A, b))
        seconds.append(time.perf_counter() - begin)
    return np.array(values), np.array(seconds)


def survey_one(name: str, setting: Setting, grid: Sequence[float], train: Sequence[Any], evaluation: Sequence[Any],
               train_features: np.ndarray, eval_features: np.ndarray, feature_seconds: np.ndarray) -> dict:
    train_costs = grid_costs(train, setting, grid)
    eval_costs = grid_costs(evaluation, setting, grid)
    budget = len(train) * len(grid)
    optuna_value, optuna_solves = optuna_constant(train, setting, budget)
    tasks = range(len(evaluation))

    def pick(columns: np.ndarray, extra_seconds: np.ndarray | float = 0.0) -> dict[str, np.ndarray]:
        return {"flops": eval_costs["flops"][tasks, columns], "seconds": eval_costs["seconds"][tasks, columns] + extra_seconds,
                "iterations": eval_costs["iterations"][tasks, columns], "values": np.asarray(grid)[columns]}

    def measured(value: float | None) -> dict[str, np.ndarray]:
        runs = [solve(task, setting, value) for task in evaluation]
        return {"flops": np.array([r["flops"] if r["converged"] else np.inf for r in runs]),
                "seconds": np.array([r["seconds"] if r["converged"] else np.inf for r in runs]),
                "iterations": np.array([r["iterations"] for r in runs], dtype=float),
                "values": np.full(len(evaluation), np.nan if value is None else value)}

    per_instance_flops = np.argmin(eval_costs["flops"], axis=1)
    hindsight = int(np.argmin(eval_costs["flops"].sum(0)))
    predict_begin = time.perf_counter()
    learned = ridge_argmin(train_features, train_costs["flops"], eval_features)
    predict_seconds = (time.perf_counter() - predict_begin) / len(evaluation)
    methods = {
        "PETSc default": measured(None),
        "best constant in hindsight (eval)": pick(np.full(len(evaluation), hindsight)),
        f"Optuna TPE constant ({optuna_solves} solves)": measured(optuna_value),
        "nearest neighbour (operator features)": pick(nearest_argmin(train_features, train_costs["flops"], eval_features),
                                                     feature_seconds),
        "learned (ridge cost model, operator features)": pick(learned, feature_seconds + predict_seconds),
        "per-instance optimum (grid)": pick(per_instance_flops),
    }
    constant = methods["best constant in hindsight (eval)"]
    optimum = methods["per-instance optimum (grid)"]
    gap = 1.0 - optimum["flops"].sum() / constant["flops"].sum()
    optuna_row = methods[f"Optuna TPE constant ({optuna_solves} solves)"]
    rows = []
    for method, result in methods.items():
        values = result["values"]
        shown = "PETSc's" if np.all(np.isnan(values)) else (
            f"{np.nanmin(values):.3g}" if np.nanmin(values) == np.nanmax(values) else f"{np.nanmin(values):.3g}-{np.nanmax(values):.3g}")
        rows.append({"configuration": name, "method": method, "value": shown,
                     "failed": int(np.sum(~np.isfinite(result["flops"]))),
                     "total Gflop": float(result["flops"].sum() / 1e9),
                     "flops vs Optuna": float(result["flops"].sum() / optuna_row["flops"].sum()),
                     "total s (under load)": float(result["seconds"].sum()),
                     "time vs Optuna": float(result["seconds"].sum() / optuna_row["seconds"].sum()),
                     "mean iterations": float(np.mean(result["iterations"]))})
    return {"rows": rows, "gap_flops": float(gap),
            "gap_seconds": float(1.0 - optimum["seconds"].sum() / constant["seconds"].sum()),
            "optuna_value": optuna_value, "optuna_solves": optuna_solves, "budget": budget,
            "learned_vs_optuna_seconds": float(methods["learned (ridge cost model, operator features)"]["seconds"].sum()
                                               / optuna_row["seconds"].sum()),
            "learned_vs_optuna_flops": float(methods["learned (ridge cost model, operator features)"]["flops"].sum()
                                             / optuna_row["flops"].sum()),
            "grid": list(grid), "eval_flops": eval_costs["flops"].tolist(), "eval_seconds": eval_costs["seconds"].tolist()}


def verdict(summary: Sequence[dict]) -> str:
    """One paragraph: where per-instance settings have room (>= 15%), and what a tuned constant buys over PETSc."""
    room = [f"{r['family']} / {r['configuration']}" for r in summary if r["headroom >= 15%"] == "yes"]
    best_default = max(summary, key=lambda r: r["PETSc default vs Optuna (flops)"])
    widest = max(summary, key=lambda r: r["gap constant→optimum (flops)"])
    if room:
        where = f"Per-instance headroom of at least 15% (flops): {', '.join(room)}."
    else:
        where = (f"No configuration has 15% per-instance headroom: the widest gap between the best constant and the "
                 f"per-instance optimum is {widest['gap constant→optimum (flops)']:.1%} ({widest['family']} / "
                 f"{widest['configuration']}), so no per-instance predictor can beat a tuned constant by 20% here, "
                 f"whatever it learns; the learned rows can only match it, and pay for their features in time.")
    return (f"{where} What a user does gain is tuning a constant at all: PETSc's default costs up to "
            f"{best_default['PETSc default vs Optuna (flops)']:.2f}x the Optuna constant's flops "
            f"({best_default['family']} / {best_default['configuration']}).")


def run(out: Path, quick: bool = False) -> dict:
    return _run(out, QUICK if quick else FULL, quick)


def _run(out: Path, scale: Scale, quick: bool) -> dict:
    begin = time.perf_counter()
    PETSc.Log.begin()
    results, rows, summary = {}, [], []
    descriptions = []
    for family_name, family in families(scale).items():
        descriptions.append(f"- {family.describe()}")
        train, evaluation = family.train_tasks(scale.train_tasks), family.eval_tasks(scale.eval_tasks)
        train_features, _ = timed_features(train)
        eval_features, feature_seconds = timed_features(evaluation)
        for name, setting in SETTINGS.items():
            grid = setting.grid[::scale.grid_stride]
            result = survey_one(name, setting, grid, train, evaluation, train_features, eval_features, feature_seconds)
            for row in result["rows"]:
                rows.append({"family": family_name, **row})
            result["feature_seconds_median"] = float(np.median(feature_seconds))
            results[f"{family_name} / {name}"] = result
            by_method = {row["method"]: row for row in result["rows"]}
            summary.append({"family": family_name, "configuration": name,
                            "PETSc default vs Optuna (flops)": by_method["PETSc default"]["flops vs Optuna"],
                            "gap constant→optimum (flops)": result["gap_flops"],
                            "gap (time, under load)": result["gap_seconds"],
                            "learned vs Optuna (time)": result["learned_vs_optuna_seconds"],
                            "learned vs Optuna (flops)": result["learned_vs_optuna_flops"],
                            "headroom >= 15%": "yes" if result["gap_flops"] >= 0.15 else "no",
                            "goal: learned >= 20% below Optuna in time": "met" if result["learned_vs_optuna_seconds"] <= 0.8 else "not met"})
    markdown = "\n".join([
        "**Quick mode: small grids and few tasks; a smoke test.**\n" if quick else "",
        "Families (unseen evaluation tasks, indices from 1,000,000):",
        *descriptions,
        "",
        f"{scale.eval_tasks} evaluation and {scale.train_tasks} training tasks per family, n in {scale.n_range} "
        f"({scale.n_range[0] ** 2}-{scale.n_range[1] ** 2} unknowns), CG to rtol {RTOL:g} (unpreconditioned "
        f"residual), max {MAX_IT} iterations. Costs are PETSc flops over KSP setup + solve (deterministic) and "
        "wall seconds (setup + solve, one run each, on a machine shared with other jobs: indicative). The learned "
        "and nearest-neighbour times include computing the operator features and the prediction.",
        "",
        "### Headroom",
        markdown_table(summary),
        "",
        verdict(summary),
        "",
        "### Every method",
        markdown_table(rows),
    ])
    return {"summary": summary, "markdown": markdown, "rows": rows, "results": results,
            "total_seconds": time.perf_counter() - begin}
