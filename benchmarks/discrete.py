"""[discrete] Which solver per matrix, and which GMRES restart, learned through the black box.

Family: `Mixed` — SPD anisotropic high-contrast diffusion and nonsymmetric upwind
convection–diffusion, drawn at random, features from the matrix only (`structural_features`).
Candidates: five Krylov + preconditioner pairs a PETSc user would try. Every candidate is solved
on every evaluation task to rtol 1e-8 (interleaved per task, the best of `repeats` timings), so
every method's time-to-solution is read off the same measurements (`time_to_solution`: a
failure costs its time plus the per-instance best's):

- PETSc's default (GMRES(30) + ILU(0));
- the best single configuration, found as a tuner would find it: every candidate on every
  training task, the lowest total time (that is 5 × N_train solves, the learned method's budget);
- nearest neighbour: the candidate that was fastest on the most similar training task (feature
  distance), from the same sweep (feature time included, as for the learned choice);
- the per-instance best (an oracle: needs every candidate on the task itself);
- learned: the product — `examples/solver_choice.toml` at this benchmark's sizes and budget
  (`metasolve.app.config.override`) trained by `metasolve.app.run.run`: the score-function
  estimator with a cost model on log10 of the seconds to the tolerance, the same number of
  training solves as the tuner, deploying the most probable choice (feature and inference time
  included).

A second table learns the GMRES restart per instance (`Integer(5, 60)`) on the
convection–diffusion half with GMRES + ILU (the same config with an `integer` space part),
against the default 30, the best constant and the per-instance best over a grid of restarts.
Results: benchmarks/results/discrete.md.
"""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metasolve.app.config import load_config, override
from metasolve.app.report import markdown_table
from metasolve.app.run import RunResult
from metasolve.app.run import run as run_config
from metasolve.method.meta_solver import MetaSolver
from solvers import IsolatedOracle, KSPOracle, PETSc

BASE = Path(__file__).resolve().parents[1] / "examples" / "solver_choice.toml"

CANDIDATES = {
    "gmres+ilu": {"ksp_type": "gmres", "pc_type": "ilu"},
    "cg+gamg": {"ksp_type": "cg", "pc_type": "gamg"},
    "gmres+gamg": {"ksp_type": "gmres", "pc_type": "gamg"},
    "bcgs+ilu": {"ksp_type": "bcgs", "pc_type": "ilu"},
    "cg+icc": {"ksp_type": "cg", "pc_type": "icc"},
}
DEFAULT = "gmres+ilu"
RTOL, MAX_IT = 1e-8, 400
CHOICE_SIZES, RESTART_SIZES = (160, 260), (64, 110)
"""Grid sides n (n² unknowns). The solver choice is measured where the candidates separate: on
the smaller grids every candidate solves in milliseconds, the best single configuration is close
to the per-instance best, and any per-instance analysis of the matrix costs as much as the choice
gains; on the larger ones ILU-preconditioned GMRES(30) stalls on convection–diffusion, GMRES +
GAMG wins at low Péclet and fails on some tasks, incomplete Cholesky CG beats BiCGStab + ILU on the
SPD half and GAMG wins on some of it (per-task times: benchmarks/results/discrete.json). The
restart is measured at the smaller size: on the larger grids GMRES(restart ≤ 60) + ILU(0) does
not reach the tolerance within `MAX_IT` on most convection–diffusion tasks, whatever the restart."""
FEATURES = "structural"
"""`solvers.features.structural_features`: symmetry, sign and dominance decide which solver
applies, and the features are paid on every deployed solve, so the cheap structural subset (no
Krylov run) rather than the full operator features (the `features_seconds` column of
benchmarks/results/discrete.md)."""
CHOICE_MEASURE, RESTART_MEASURE, POLICY_LR, SURROGATE_STEPS = "seconds", "flops", 0.01, 10
"""Training cost: log10 of the seconds (or flops) to the tolerance, setup + solve. For the solver
choice seconds, the user's own goal: on these grids timing noise is small against the gaps
between candidates, while PETSc's flop count misjudges GAMG (its setup is memory-bound), and a
cost model of log flops deployed slower choices than one of log seconds. For the restart flops:
on the smaller grids timing noise is as large as the gaps between restarts (trained on seconds,
runs deployed very different restarts), and GMRES + ILU has no setup whose flops mislead. The
rest of the recipe (exploration, temperature, surrogate steps, the cost model's weight decay) is
the config's defaults, measured in `metasolve.method.score_function` on a replay of this sweep
with validation tasks kept apart from the evaluated ones."""


def isolated_oracle() -> IsolatedOracle:
    """The candidates run in a worker process: some crash PETSc 3.26.1 outright on nonsymmetric
    matrices (CG + ICC on convection–diffusion at Péclet ~200 aborts the process, elsewhere its
    setup never returns), and a configuration that crashes or hangs (5 s; every working candidate
    takes well under a second here) is data with a high cost, never the end of the benchmark."""
    return IsolatedOracle(functools.partial(KSPOracle, ksp_type="gmres", pc_type="ilu"), timeout=5.0)


def sweep(oracle: IsolatedOracle, tasks: list, settings: dict[str, dict], repeats: int) -> dict[str, np.ndarray]:
    """Per task and setting: seconds to solution (best of `repeats`), flops, iterations, and whether
    it failed (diverged, not converged in `MAX_IT`, crashed, hung: seconds is then the wall time it
    took to fail, not repeated)."""
    seconds = np.full((len(tasks), len(settings)), np.inf)
    flops = np.zeros_like(seconds)
    iterations = np.zeros_like(seconds)
    failed = np.zeros(seconds.shape, dtype=bool)
    budget = {"ksp_rtol": RTOL, "ksp_atol": 0.0, "ksp_max_it": MAX_IT}
    for t, task in enumerate(tasks):
        for _ in range(repeats):
            for c, setting in enumerate(settings.values()):
                if failed[t, c]:
                    continue
                begin = time.perf_counter()
                outcome = oracle(task, {**setting, **budget})
                if outcome.failed or not outcome.converged:
                    failed[t, c], seconds[t, c] = True, time.perf_counter() - begin
                    flops[t, c] = outcome.setup_flops + outcome.flops
                    continue
                seconds[t, c] = min(seconds[t, c], outcome.setup_seconds + outcome.seconds)
                flops[t, c], iterations[t, c] = outcome.setup_flops + outcome.flops, outcome.iterations
    return {"seconds": seconds, "flops": flops, "iterations": iterations, "failed": failed}


def time_to_solution(result: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Seconds a user who picked each setting waits for the solution, and the per-instance best.

    A failed solve costs the time it took to fail plus the per-instance best's time: the least a
    user pays to still get the solution after the failure (a lower bound, so it never overstates
    a failing method's loss). A task on which every setting failed has no solution to wait for;
    its failures cost only the time they took."""
    seconds, failed = result["seconds"], result["failed"]
    best = np.where(failed, np.inf, seconds).min(1)
    best = np.where(np.isfinite(best), best, 0.0)
    return seconds + failed * best[:, None], best


def nearest_choice(train_features: np.ndarray, train_best: np.ndarray, features: np.ndarray) -> np.ndarray:
    scale = train_features.std(0) + 1e-12
    distance = (((features[:, None, :] - train_features[None, :, :]) / scale) ** 2).sum(-1)
    return train_best[np.argmin(distance, axis=1)]


def train_policy(changes: dict, budget_solves: int, measure: str, batch_size: int = 4) -> RunResult:
    """`examples/solver_choice.toml` with `changes`, trained by `run` with `budget_solves`
    training solves: score function + cost model, one sample per task (2 solves per task and
    step with the centre), then `SURROGATE_STEPS` policy steps on the cost model."""
    config = override(load_config(BASE), {
        "problem.features": FEATURES, "cost.measure": measure, "cost.rtol": RTOL, "cost.max_it": MAX_IT,
        "estimator.samples": 1, "estimator.cost_model": True, "estimator.exploration": 0.9,
        "estimator.temperature": 0.2, "surrogate.hidden": 32, "surrogate.steps": 50, "model.hidden": 32,
        "model.depth": 1, "pretrain.enabled": False, "train.lr": POLICY_LR, "train.batch_size": batch_size,
        "train.steps": max(1, budget_solves // (2 * batch_size)), "train.surrogate_steps": SURROGATE_STEPS,
        "train.seed": 0, "evaluate.rtol": RTOL, "evaluate.max_it": MAX_IT, **changes}, str(BASE))
    with tempfile.TemporaryDirectory(prefix="bench-discrete-") as directory:
        return run_config(config, Path(directory) / "run", quiet=True)


def deployed(meta: MetaSolver, tasks: list) -> tuple[list[dict], np.ndarray]:
    """The deployed (most probable) value of every part per task, and the seconds spent on the
    task's features and the network — paid on every deployed solve, so counted in its total."""
    decoded, overhead = [], []
    for task in tasks:
        begin = time.perf_counter()
        features = meta.features_of(*task.petsc(PETSc.COMM_SELF))
        with torch.no_grad():
            theta = meta(features[None, :])[0]
        overhead.append(time.perf_counter() - begin)
        decoded.append(meta.space.decode_tensors(theta))
    return decoded, np.asarray(overhead)


def _picked(charged: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    return charged[np.arange(len(chosen)), chosen]


def solver_choice(quick: bool) -> dict:
    n_train, n_eval = (12, 8) if quick else (40, 30)
    changes = {"problem.params": {"n_range": list((32, 48) if quick else CHOICE_SIZES)}, "problem.seed": 0,
               "problem.train_tasks": n_train, "problem.eval_tasks": n_eval,
               "space.solver": {"kind": "choice", "choices": list(CANDIDATES.values())}}
    budget = n_train * len(CANDIDATES)  # the tuner's sweep: every candidate on every training task
    result = train_policy(changes, budget, CHOICE_MEASURE)
    experiment = result.experiment
    family, train_tasks, eval_tasks = experiment.family, experiment.train_tasks, experiment.eval_tasks
    names = list(CANDIDATES)
    oracle = isolated_oracle()
    train_sweep = sweep(oracle, train_tasks, CANDIDATES, repeats=1)
    eval_sweep = sweep(oracle, eval_tasks, CANDIDATES, repeats=1 if quick else 3)
    space = experiment.blackbox.space
    decoded, overhead = deployed(experiment.meta_solver, eval_tasks)
    learned = np.array([space.parts["solver"].index(setting["solver"]) for setting in decoded])

    train_charged, _ = time_to_solution(train_sweep)
    charged, _ = time_to_solution(eval_sweep)
    best_single = int(np.argmin(train_charged.sum(0)))
    nearest = nearest_choice(torch.stack([t.features for t in train_tasks]).numpy(), train_charged.argmin(1),
                             torch.stack([t.features for t in eval_tasks]).numpy())
    per_instance = charged.argmin(1)
    methods = {
        f"PETSc default ({DEFAULT})": np.full(n_eval, names.index(DEFAULT)),
        f"best single, tuned on training tasks ({names[best_single]})": np.full(n_eval, best_single),
        "nearest training task": nearest,
        "learned (score function + cost model)": learned,
        "per-instance best (oracle)": per_instance,
    }
    best_total = float(_picked(charged, per_instance).sum())
    rows = []
    for name, chosen in methods.items():
        extra = overhead if name.startswith(("learned", "nearest")) else 0.0  # both need the task's features
        total = float(np.sum(_picked(charged, chosen) + extra))
        rows.append({"method": name, "total_seconds": total, "features_seconds": float(np.sum(extra)),
                     "vs_per_instance_best": total / best_total,
                     "total_mflops": float(_picked(eval_sweep["flops"], chosen).sum()) / 1e6,
                     "failures": int(_picked(eval_sweep["failed"], chosen).sum()),
                     "matches_best": int(np.sum(chosen == per_instance))})
    single = rows[1]["total_seconds"]
    learned_row = rows[3]
    headroom = 1 - best_total / single
    captured = (single - learned_row["total_seconds"]) / (single - best_total) if single > best_total else float("nan")
    kinds = [t.parameters["kind"] for t in eval_tasks]
    return {"rows": rows, "candidates": names, "per_task_seconds": eval_sweep["seconds"].tolist(),
            "per_task_failed": eval_sweep["failed"].tolist(), "learned": learned.tolist(),
            "per_instance": per_instance.tolist(), "kinds": kinds, "training_solves": result.solves["training"],
            "tuner_solves": budget, "headroom": headroom, "captured": captured,
            "learned_vs_single": learned_row["total_seconds"] / single,
            "loss_curve": [r["loss"] for r in experiment.trainer.history], "describe": family.describe()}


def gmres_restart(quick: bool) -> dict:
    n_train, n_eval = (8, 6) if quick else (32, 24)
    grid = [5, 10, 20, 30, 45, 60]
    changes = {"problem.params": {"n_range": list((32, 48) if quick else RESTART_SIZES), "nonsymmetric_fraction": 1.0,
                                  "peclet_range": [1.0, 1000.0]},
               "problem.seed": 1, "problem.train_tasks": n_train, "problem.eval_tasks": n_eval,
               "solver.ksp_type": "gmres", "solver.pc_type": "ilu",
               "space": {"ksp_gmres_restart": {"kind": "integer", "lo": 5, "hi": 60}}}
    result = train_policy(changes, n_train * len(grid), RESTART_MEASURE)
    experiment = result.experiment
    train_tasks, eval_tasks = experiment.train_tasks, experiment.eval_tasks
    base = {"ksp_type": "gmres", "pc_type": "ilu"}
    settings = {f"restart {r}": {**base, "ksp_gmres_restart": r} for r in grid}
    oracle = isolated_oracle()
    repeats = 1 if quick else 3
    train_sweep = sweep(oracle, train_tasks, settings, repeats=1)
    eval_sweep = sweep(oracle, eval_tasks, settings, repeats=repeats)
    space = experiment.blackbox.space
    decoded, overhead = deployed(experiment.meta_solver, eval_tasks)
    restarts = [space.parts["ksp_gmres_restart"].to_setting(setting["ksp_gmres_restart"]) for setting in decoded]
    learned = [sweep(oracle, [task], {"learned": {**base, "ksp_gmres_restart": r}}, repeats)
               for task, r in zip(eval_tasks, restarts)]
    train_charged, _ = time_to_solution(train_sweep)
    charged, best = time_to_solution(eval_sweep)
    learned_failed = np.array([result["failed"][0, 0] for result in learned])
    learned_seconds = np.array([result["seconds"][0, 0] for result in learned]) + learned_failed * best + overhead
    best_constant = int(np.argmin(train_charged.sum(0)))
    default = grid.index(30)
    rows = [{"method": "PETSc default (restart 30)", "total_seconds": float(charged[:, default].sum()),
             "failures": int(eval_sweep["failed"][:, default].sum())},
            {"method": f"best constant on training tasks (restart {grid[best_constant]})",
             "total_seconds": float(charged[:, best_constant].sum()),
             "failures": int(eval_sweep["failed"][:, best_constant].sum())},
            {"method": "learned (Integer, score function; features included)", "total_seconds": float(learned_seconds.sum()),
             "failures": int(learned_failed.sum())},
            {"method": "per-instance best over the grid", "total_seconds": float(charged.min(1).sum()),
             "failures": int(eval_sweep["failed"].all(1).sum())}]
    return {"rows": rows, "restarts": restarts, "grid": grid, "training_solves": result.solves["training"]}


def run(out: Path, quick: bool = False) -> dict:
    choice = solver_choice(quick)
    restart = gmres_restart(quick)
    markdown = (f"{choice['describe']}\n\nCandidates: {', '.join(choice['candidates'])}; rtol {RTOL}. "
                f"Training solves: learned {choice['training_solves']}, tuner sweep {choice['tuner_solves']}. "
                f"Wall-clock times on this machine; every method reads the same measurements. "
                f"A failed solve (diverged, not converged in {MAX_IT} iterations, crashed, hung 5 s) costs the "
                f"wall time it took to fail plus the per-instance best's time (the least a user pays to still "
                f"get the solution), and is counted under failures.\n\n"
                f"{markdown_table(choice['rows'])}\n\n"
                f"Headroom (best single → per-instance best): {choice['headroom']:.0%} of the best single "
                f"configuration's time; learned captures {choice['captured']:.0%} of it "
                f"(learned / best single = {choice['learned_vs_single']:.2f}).\n\n"
                f"GMRES restart per instance (convection–diffusion, GMRES + ILU):\n\n{markdown_table(restart['rows'])}\n")
    return {"summary": choice["rows"], "choice": choice, "restart": restart, "markdown": markdown}
