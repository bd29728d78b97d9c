"""[end_to_end] Solves to a target held-out cost: the shipped recipe against the NI-GBMS configuration.

Issue 23's last goal: end-to-end solves to a target cost at most half of what the NI-GBMS
estimator configuration spends, on a family where training must go through the solver. The
family is `examples/sor_omega.toml`'s: a per-instance SOR ω for Richardson + forward SOR on
variable-coefficient diffusion. No solution tells the best ω, so it cannot be regressed from
solutions: every answer, the supervised start's included, is bought with solves of the solver.

Two arms, one config each, trained by `metasolve.app.run.run` (the recipe of `metasolve train`);
they differ only by config overrides (`metasolve.app.config.override`):
- A, the product as shipped: `examples/sor_omega.toml` (a correction learned around Young's ω*
  read from the operator features, a supervised start from a golden-section search per task
  regressed on the features, training through the solver, keep-better on validation tasks);
- B, the NI-GBMS estimator configuration as the paper runs it: no supervised start
  (`pretrain.enabled = false`), no anchor (`model.anchor = {}`), the control variate with
  coefficient 1 (β = 1) and a surrogate that takes one step per estimate on the current batch
  (`surrogate.steps = 1`, `surrogate.buffer = 0`; the named baseline of
  `benchmarks/estimator_training.py`), 1 tangent.
Both get the same tasks, features, learning rate, batch size and number of steps; each runs with
the same three training seeds (`train.seed`; the tasks are fixed by `problem.seed`).

Held-out cost: the run's own measurement every `train.eval_every` steps (`metrics.jsonl`,
`eval_cost`): the mean training cost, `IterationProxy(1e-6)` (the smoothed iteration count), on
the unseen evaluation tasks. The target is that cost within `WITHIN` of the per-instance
optimum's, the optimum found per task by the grid search of `benchmarks/options.py`.

Solves counted (the recipe's, every one a decision needs): the preflight of the untrained
predictor, the supervised start's searches, two per sample per step, and for A the keep-better
check on the validation tasks, charged to every point of A's curve because the recipe pays it
before it deploys anything. Not counted: the curve's own held-out measurements (with
`train.patience = 0`, as shipped, they decide nothing) and the operator features (the same for
both arms, about one solve's flops per task: benchmarks/results/options.md).
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.options import EXAMPLE, make_oracle, per_instance_optimum  # noqa: E402
from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import VALIDATION_TASKS  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.method.measure import measure  # noqa: E402

WITHIN = 0.05
"""The target: held-out cost at most (1 + WITHIN) x the per-instance optimum's."""
OTHER_TARGETS = (0.10, 0.02)
"""The same count for a looser and a tighter target: how much the verdict hangs on the 5%."""
GOAL = 0.5
"""Issue 23: A's solves to the target at most half of B's."""


@dataclass(frozen=True)
class Scale:
    """How much each run does (what the shipped config does not fix)."""

    train_tasks: int
    eval_tasks: int
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    pretrain_tasks: int
    search_solves: int
    coarse_step: float
    fine_step: float
    seeds: tuple[int, ...]
    """`train.seed` of each run (the tasks stay those of `problem.seed`)."""


FULL = Scale(train_tasks=256, eval_tasks=16, steps=200, batch_size=8, lr=2e-2, eval_every=10, pretrain_tasks=16,
             search_solves=16, coarse_step=0.01, fine_step=0.002, seeds=(0, 1, 2))
"""`benchmarks/options.py`'s MEDIUM scale, 200 steps, 3 seeds: a few CPU minutes for both arms."""
QUICK = Scale(train_tasks=64, eval_tasks=6, steps=20, batch_size=8, lr=3e-2, eval_every=5, pretrain_tasks=8,
              search_solves=6, coarse_step=0.05, fine_step=0.01, seeds=(0,))
"""A smoke test of the harness: too small a budget for the numbers to mean much."""

SHIPPED = "A: as shipped (supervised start around Young's ω*, keep-better)"
NI_GBMS = "B: NI-GBMS (no start, no anchor, β = 1, surrogate 1 step/estimate)"
ARMS: dict[str, dict[str, Any]] = {
    SHIPPED: {},
    NI_GBMS: {"pretrain.enabled": False, "model.anchor": {}, "estimator.kind": "control_variate",
              "estimator.coefficient": 1.0, "estimator.tangents": 1, "surrogate.steps": 1, "surrogate.buffer": 0,
              "surrogate.batch_size": 16},
}
"""Config overrides of each arm; both also get the scale's."""


def arm_config(scale: Scale, seed: int, changes: dict[str, Any]) -> dict:
    """The shipped config at this scale with an arm's changes. The run's own best-constant
    baseline is off (its solves would decide nothing here)."""
    return override(load_config(EXAMPLE), {
        "problem.train_tasks": scale.train_tasks, "problem.eval_tasks": scale.eval_tasks,
        "train.steps": scale.steps, "train.batch_size": scale.batch_size, "train.lr": scale.lr,
        "train.seed": seed, "train.eval_every": scale.eval_every,
        "pretrain.tasks": scale.pretrain_tasks, "pretrain.search_solves": scale.search_solves,
        "evaluate.constant_evaluations": 0, **changes}, str(EXAMPLE))


def held_out_cost(result: Any, weights: dict[str, torch.Tensor] | None = None) -> float:
    """Mean training cost on the run's evaluation tasks with `weights` (default: the deployed
    ones), measured the way the run measures `eval_cost` (one evaluation solve per task)."""
    experiment = result.experiment
    meta = experiment.meta_solver
    if weights is not None:
        meta = copy.deepcopy(meta)
        meta.load_state_dict(weights)
    features = torch.stack([t.features for t in experiment.eval_tasks]).to(torch.float64)
    with torch.no_grad():
        values = experiment.blackbox.evaluate(meta(features), experiment.eval_tasks)
    return float(values.mean())


def train_arm(name: str, scale: Scale, seed: int, directory: Path) -> tuple[dict, Any]:
    """One run of the recipe: its held-out curve against the solves the recipe spent, and its result."""
    config = arm_config(scale, seed, ARMS[name])
    begin = time.perf_counter()
    result = run_config(config, directory, overwrite=True, quiet=True)
    seconds = time.perf_counter() - begin
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report = json.loads((directory / "evaluation.json").read_text())
    measured = [(i, row) for i, row in enumerate(rows) if "eval_cost" in row]
    # Evaluation solves before the first step: the preflight (a row's counts precede its own `eval_cost`).
    preflight = rows[0]["evaluation_solves"]
    step_solves = rows[1]["solves"] - rows[0]["solves"]
    start_solves = rows[0]["solves"] - step_solves  # the supervised start's searches (0 without one)
    kept_path = directory / "pretrained.pt"
    candidates = torch.load(kept_path, weights_only=True) if kept_path.exists() else None
    # keep-better solves its validation tasks once per candidate and once for the trained weights
    validation = 0 if candidates is None else VALIDATION_TASKS * (len(candidates) + 1)
    untrained_cost = report["held_out_training_cost"]["untrained_cost"]
    curve = [{"step": 0, "stage": "untrained", "solves": preflight + validation, "cost": untrained_cost}]
    if candidates is not None and "pretrained" in candidates:
        curve.append({"step": 0, "stage": "supervised start", "solves": preflight + start_solves + validation,
                      "cost": held_out_cost(result, candidates["pretrained"])})
    curve += [{"step": row["step"], "stage": "through the solver", "solves": preflight + row["solves"] + validation,
               "cost": row["eval_cost"]} for _, row in measured]
    deployed = {"solves": preflight + rows[-1]["solves"] + validation, "cost": held_out_cost(result),
                "kept": result.kept}
    learned_iterations = float(np.mean(result.evaluation["learned"]["iterations"]))
    record = {"name": name, "seed": seed, "changes": ARMS[name], "curve": curve, "deployed": deployed, "preflight": preflight,
              "start_solves": start_solves, "step_solves": step_solves, "validation_solves": validation,
              "steps": rows[-1]["step"], "deployed_iterations": learned_iterations, "seconds": seconds,
              "failed": rows[-1]["failed_centres"] + rows[-1]["failed_queries"]}
    return record, result


def optimum(tasks: list, scale: Scale, cost: Any) -> dict:
    """Per-instance optimal ω by grid search (iterations to rtol, `benchmarks/options.py`), the
    training cost there, and the best constant in hindsight on the same tasks (same cost)."""
    oracle = make_oracle()
    coarse = np.round(np.arange(1.40, 2.0 - 1e-9, scale.coarse_step), 6)
    found = [per_instance_optimum(oracle, task, coarse, scale.fine_step) for task in tasks]
    omegas = np.array([omega for omega, _ in found])
    hindsight = float(coarse[int(np.argmin(np.sum([its for _, its in found], axis=0)))])

    def cost_at(task: Any, omega: float) -> float:
        value = measure(oracle, cost, task, [{"pc_sor_omega": float(omega)}])[0].value
        return cost.failure_value(task) if math.isnan(value) else value

    return {"omegas": omegas, "cost": float(np.mean([cost_at(t, w) for t, w in zip(tasks, omegas)])),
            "constant": hindsight, "constant_cost": float(np.mean([cost_at(t, hindsight) for t in tasks]))}


def solves_to_target(curve: list[dict], target: float) -> float:
    """Solves at the first point of the curve at or below `target` (inf if none)."""
    return next((float(p["solves"]) for p in curve if math.isfinite(p["cost"]) and p["cost"] <= target), math.inf)


def solves_to_stay(curve: list[dict], target: float) -> float:
    """Solves at the point from which every later point is at or below `target` (inf if the last is not):
    a noisy curve that dips below the target once has not reached it in this sense."""
    settled = math.inf
    for point in reversed(curve):
        if not (math.isfinite(point["cost"]) and point["cost"] <= target):
            break
        settled = float(point["solves"])
    return settled


def ratio_of(a: float, b: float, budget_b: float) -> tuple[float, str]:
    """A/B, or its upper bound A/budget when B did not get there within its budget."""
    if math.isfinite(a) and math.isfinite(b):
        return a / b, f"{a / b:.3f}"
    if math.isfinite(a):
        return a / budget_b, f"< {a / budget_b:.3f} (B not within {budget_b:.0f})"
    return math.nan, "- (A did not reach it)"


def run(out: Path, quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: more intra-op threads only contend for the shared cores
    try:
        return _run(out, QUICK if quick else FULL, quick)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, scale: Scale, quick: bool) -> dict:
    begin = time.perf_counter()
    arms: dict[str, list[dict]] = {name: [] for name in ARMS}
    names, experiment = None, None
    with tempfile.TemporaryDirectory(prefix="end-to-end-") as runs:
        for i, name in enumerate(ARMS):
            for seed in scale.seeds:
                record, result = train_arm(name, scale, seed, Path(runs) / f"arm{i}-seed{seed}")
                arms[name].append(record)
                run_tasks = [t.name for t in result.experiment.eval_tasks]
                if names is not None and run_tasks != names:
                    raise RuntimeError(f"{name}, seed {seed}: evaluated on other tasks ({run_tasks[:2]}...)")
                names, experiment = run_tasks, experiment or result.experiment
    tasks, cost = experiment.eval_tasks, experiment.blackbox.cost
    best = optimum(tasks, scale, cost)
    budget_b = float(np.median([r["deployed"]["solves"] for r in arms[NI_GBMS]]))

    def medians(within: float) -> dict[str, dict[str, float]]:
        level = (1 + within) * best["cost"]
        return {name: {"first": float(np.median([solves_to_target(r["curve"], level) for r in records])),
                       "stay": float(np.median([solves_to_stay(r["curve"], level) for r in records]))}
                for name, records in arms.items()}

    target = (1 + WITHIN) * best["cost"]
    main = medians(WITHIN)
    a, b = main[SHIPPED]["first"], main[NI_GBMS]["first"]
    ratio, ratio_text = ratio_of(a, b, budget_b)
    stay_ratio, stay_text = ratio_of(main[SHIPPED]["stay"], main[NI_GBMS]["stay"], budget_b)
    verdict = "met" if ratio <= GOAL else ("not met" if not math.isfinite(ratio) or math.isfinite(b)
                                           else "not decided (B's budget too short to tell)")
    rows = []
    for name, records in arms.items():
        for r in records:
            start = next((p for p in r["curve"] if p["stage"] == "supervised start"), None)
            rows.append({"arm": name[:1], "seed": r["seed"], "untrained cost": r["curve"][0]["cost"],
                         "after supervised start": start["cost"] if start else math.nan,
                         "final cost (trained)": r["curve"][-1]["cost"], "deployed cost": r["deployed"]["cost"],
                         "kept": r["deployed"]["kept"], "deployed mean its": r["deployed_iterations"],
                         "recipe solves": r["deployed"]["solves"],
                         f"first ≤ {target:.1f} at solves": solves_to_target(r["curve"], target),
                         "stays ≤ from solves": solves_to_stay(r["curve"], target), "wall s": r["seconds"]})
    sensitivity = []
    for within in sorted((WITHIN, *OTHER_TARGETS)):
        counts = medians(within)
        sensitivity.append({"target (x optimum)": 1 + within, "target cost": (1 + within) * best["cost"],
                            "A first (median)": counts[SHIPPED]["first"], "B first (median)": counts[NI_GBMS]["first"],
                            "A/B first": ratio_of(counts[SHIPPED]["first"], counts[NI_GBMS]["first"], budget_b)[1],
                            "A stays (median)": counts[SHIPPED]["stay"], "B stays (median)": counts[NI_GBMS]["stay"],
                            "A/B stays": ratio_of(counts[SHIPPED]["stay"], counts[NI_GBMS]["stay"], budget_b)[1]})
    _plot(arms, target, best, out / "end_to_end.png")
    shipped = arms[SHIPPED][0]
    stages = [next((p["stage"] for p in r["curve"] if math.isfinite(p["cost"]) and p["cost"] <= target), "-")
              for r in arms[SHIPPED]]
    markdown = "\n".join([
        "**Quick mode: a smoke test; the budget is too small for the numbers to mean much.**\n" if quick else "",
        f"{experiment.family.describe()}",
        "",
        f"Solver: Richardson + forward SOR, per-instance ω learned from operator features. Both arms: "
        f"`{EXAMPLE.relative_to(EXAMPLE.parent.parent)}` through `metasolve.app.run.run` with "
        f"`problem.train_tasks = {scale.train_tasks}`, `problem.eval_tasks = {scale.eval_tasks}`, "
        f"`train.steps = {scale.steps}`, `train.batch_size = {scale.batch_size}`, `train.lr = {scale.lr:g}`, "
        f"`train.eval_every = {scale.eval_every}`, `pretrain.tasks = {scale.pretrain_tasks}`, "
        f"`pretrain.search_solves = {scale.search_solves}`, `train.seed` in {list(scale.seeds)} (tasks fixed by "
        f"`problem.seed = 0`). Arm B adds "
        + ", ".join(f"`{k} = {v!r}`" for k, v in ARMS[NI_GBMS].items()) + ".",
        "",
        f"Held-out cost: mean `{cost!r}` (the training cost, ≈ iterations to rtol 1e-6) on "
        f"{scale.eval_tasks} unseen tasks, the run's own `eval_cost` every {scale.eval_every} steps. Per-instance "
        f"optimum (grid search, step {scale.coarse_step:g} refined to {scale.fine_step:g}): {best['cost']:.2f}; best "
        f"constant in hindsight (ω = {best['constant']:.3f}): {best['constant_cost']:.2f}. **Target: ≤ "
        f"{1 + WITHIN:.2f} x the per-instance optimum = {target:.2f}.** Reached: at the first curve point at or "
        f"below it (\"first\"; kind to a noisy curve), and from the point after which the curve stays at or below "
        f"it to the end of the run (\"stays\").",
        "",
        f"Solves counted: the preflight ({shipped['preflight']}), the supervised start's searches "
        f"({shipped['start_solves']} in A), {shipped['step_solves']} per step, and A's keep-better on "
        f"validation tasks ({shipped['validation_solves']}, charged to every point of A's curve); not the curve's "
        f"own held-out measurements (they decide nothing with `train.patience = 0`, as shipped) nor the "
        f"operator features (the same for both arms). Failed solves: "
        + ", ".join(f"{name[:1]} {sum(r['failed'] for r in records)}" for name, records in arms.items()) + ".",
        "",
        markdown_table(rows),
        "",
        "Medians over seeds, for this target and a looser and a tighter one (the same curves):",
        "",
        markdown_table(sensitivity),
        "",
        f"Solves to the target (median over {len(scale.seeds)} seeds, first reached): A {a:.0f}, B {b:.0f}; ratio "
        f"A/B = {ratio_text} (goal ≤ {GOAL}: **{verdict}**). Reached to stay: A {main[SHIPPED]['stay']:.0f}, B "
        f"{main[NI_GBMS]['stay']:.0f}, ratio {stay_text}. A first reaches the target at its "
        f"{', '.join(repr(s) for s in stages)} point (per seed)"
        + (" — its untrained predictor is Young's ω* from the features: there the anchor, not training, does it"
           if "untrained" in stages else "")
        + f". A's whole run as shipped (all {scale.steps} steps and keep-better) spends "
        f"{shipped['deployed']['solves']:.0f} solves, {shipped['deployed']['solves'] / budget_b:.2f} x B's whole "
        f"run: stopping where A reaches the target needs a rule that notices, which this config does not set "
        f"(`train.patience = 0`).",
        "",
        "![held-out cost vs solves](end_to_end.png)",
    ])
    return {"summary": rows, "markdown": markdown, "target": target, "within": WITHIN, "optimum": best["cost"],
            "optimum_omegas": best["omegas"].tolist(), "hindsight_constant": best["constant"],
            "hindsight_constant_cost": best["constant_cost"],
            "solves_to_target": main, "ratio": ratio, "ratio_to_stay": stay_ratio, "goal": verdict,
            "sensitivity": sensitivity, "arms": arms, "scale": scale.__dict__,
            "total_seconds": time.perf_counter() - begin}


def _plot(arms: dict[str, list[dict]], target: float, best: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for (name, records), colour in zip(arms.items(), ("tab:blue", "tab:red")):
        for i, r in enumerate(records):
            curve = r["curve"]
            axis.plot([p["solves"] for p in curve], [p["cost"] for p in curve], marker="o", ms=2.5, lw=1.2,
                      color=colour, alpha=0.9 if i == 0 else 0.5, label=name if i == 0 else None)
            axis.scatter([r["deployed"]["solves"]], [r["deployed"]["cost"]], marker="*", s=90, color=colour,
                         edgecolors="k", zorder=5, label=f"{name[:1]}: deployed" if i == 0 else None)
    axis.axhline(target, color="k", ls="--", lw=1, label=f"target: {1 + WITHIN:.2f} x per-instance optimum")
    axis.axhline(best["cost"], color="gray", lw=1, label="per-instance optimum (grid)")
    axis.axhline(best["constant_cost"], color="tab:orange", ls=":", lw=1, label="best constant in hindsight")
    axis.set_yscale("log")
    axis.set_xlabel("solves spent by the recipe (preflight, supervised start, steps, keep-better)")
    axis.set_ylabel("held-out mean training cost (≈ iterations)")
    axis.set_title(f"per-instance SOR ω: held-out cost vs solves ({len(next(iter(arms.values())))} seed(s) per arm)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
