"""[wall_model] A wall model trained through the PETSc SNES channel solve, validated on unseen DNS.

Leave-one-DNS-case-out cross-validation: for each of the three DNS cases (Hoyas & Jiménez,
Re_τ 186/547/2004), train on the other two and test on it, on the grids of
`examples/wall_model.toml` (8, 12, 16, 24 uniform cells and a 16-cell stretched grid). Every run is
built from that config (`build_experiment`), with only the cases, the target and the estimator
changed, so the benchmark measures what the config runs.

1. Which training target: the two DNS cases alone ("dns"), DNS plus the log friction law fitted to
   it between and beyond ("friction_law"), or the wall-resolved RANS ("rans"). The learned model
   against the log law, Spalding, Reichardt and the wall-resolved RANS: Re_τ error per case and
   grid, U⁺ RMS in the log region.
2. Estimators on this problem: forward gradient and control variate (surrogate: the coarse solve
   linearised around Spalding), seeds, solves until the held-out RMS Re_τ error stays below 1% and
   0.5%, counting the surrogate's own solves.
3. The finite-difference step behind ε = 1e-6.
Writes wall_model.{json,md} and wall_model_*.png into `out`.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metasolve.config import load_config  # noqa: E402
from metasolve.experiment import build_experiment  # noqa: E402
from metasolve.parallel import SerialExecutor  # noqa: E402
from metasolve.report import markdown_table  # noqa: E402
from problems.channel import WALL_MODEL_KEY, ChannelTask, dns_case, wall_modelled_oracle  # noqa: E402
from problems.wall_model_validation import compare, laws  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "wall_model.toml"
CASES = (180, 550, 2000)
TEST_GRIDS = ("u8", "u12", "u16", "u24")
"""The grids the issue's goal is stated on; the stretched grid is reported beside them."""


def fold_config(held_out: int, target: str, estimator: str, steps: int, seed: int) -> dict:
    config = copy.deepcopy(load_config(CONFIG))
    params = config["problem"]["params"]
    params.update(train_dns=[c for c in CASES if c != held_out], eval_dns=[held_out], target=target)
    synthetic = params.get("synthetic", 8)
    conditions = {"dns": 2, "friction_law": 2 + synthetic, "rans": synthetic}[target]
    config["problem"]["train_tasks"] = conditions * len(params["grids"])
    config["estimator"]["kind"] = estimator
    config["train"].update(steps=steps, seed=seed, eval_every=0)
    return config


def rms_error(blackbox, theta: torch.Tensor, tasks: list) -> float:
    """RMS of ln Re_τ − ln Re_τ,target over `tasks` (evaluation solves, not counted in training)."""
    values = blackbox.evaluate(theta.expand(len(tasks), -1), tasks)
    return float(torch.sqrt(torch.nan_to_num(values, nan=math.log(2.0) ** 2).mean()))


def train_fold(config: dict, every: int) -> tuple[np.ndarray, list[dict], object]:
    """Train one fold; a curve point every `every` steps: training solves (plus the surrogate's
    two per training task for the control variate), RMS on the training targets and on the
    held-out DNS case's grids."""
    experiment = build_experiment(config, SerialExecutor())
    trainer, blackbox = experiment.trainer, experiment.blackbox
    trainer.progress = False
    surrogate_solves = 2 * len(experiment.train_tasks) if config["estimator"]["kind"] == "control_variate" else 0
    held_out = [t for t in experiment.eval_tasks if t.grid_name in TEST_GRIDS]

    def point() -> dict:
        theta = experiment.meta_solver.theta.detach()
        return {"step": trainer.step, "solves": blackbox.stats.solves + surrogate_solves,
                "train_rms": rms_error(blackbox, theta, experiment.train_tasks),
                "held_out_rms": rms_error(blackbox, theta, held_out)}

    curve = [point()]
    steps = config["train"]["steps"]
    while trainer.step < steps:
        trainer.fit(experiment.train_tasks, min(trainer.step + every, steps), config["train"]["batch_size"])
        curve.append(point())
    return experiment.meta_solver.theta.detach().numpy().copy(), curve, experiment.family


def stays_below(curve: list[dict], level: float, key: str = "held_out_rms") -> float:
    """Solves spent when `key` fell below `level` for good (NaN if it never did)."""
    above = [i for i, p in enumerate(curve) if p[key] > level]
    first = above[-1] + 1 if above else 0
    return float(curve[first]["solves"]) if first < len(curve) else math.nan


def epsilon_scan(family) -> list[dict]:
    """Directional derivative of the cost along one Rademacher tangent vs the step ε."""
    model = family.wall_model
    task = ChannelTask(dns_case(550).re_b, "u12", dns_case(550).re_tau, "DNS Re550")
    rng = np.random.default_rng(0)
    theta = model.initial_parameters()
    theta[-model.hidden - 1:] = 0.05 * rng.standard_normal(model.hidden + 1)  # away from θ₀, all slopes nonzero
    tangent = rng.choice([-1.0, 1.0], size=theta.size)
    steps = 10.0 ** -np.arange(1, 10)
    settings = [{WALL_MODEL_KEY: theta}] + [{WALL_MODEL_KEY: theta + e * tangent} for e in steps] \
        + [{WALL_MODEL_KEY: theta - e * tangent} for e in steps]
    values = [task.log_error(o) ** 2 for o in wall_modelled_oracle(model).solve_many(task, settings)]
    forward = [(values[1 + i] - values[0]) / e for i, e in enumerate(steps)]
    central = [(values[1 + i] - values[1 + len(steps) + i]) / (2 * e) for i, e in enumerate(steps)]
    best = central[4]  # ε = 1e-5 central: truncation O(ε²) ≈ 1e-10, noise ≈ 1e-8 relative
    return [{"eps": f"{e:.0e}", "forward rel. error": f"{abs(f / best - 1):.1e}",
             "central rel. error": f"{abs(c / best - 1):.1e}"} for e, f, c in zip(steps, forward, central)]


def plot_curves(curves: dict[str, list[list[dict]]], path: Path, spalding: float, title: str) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for (name, runs), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
        solves = np.array([p["solves"] for p in runs[0]])
        values = np.array([[p["held_out_rms"] for p in run] for run in runs])
        axis.plot(solves, np.median(values, axis=0), color=colour, label=f"{name} (median of {len(runs)})")
        axis.fill_between(solves, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2)
    axis.axhline(spalding, color="grey", linestyle=":", label="Spalding")
    for level in (0.01, 0.005):
        axis.axhline(level, color="red", linewidth=0.8, alpha=0.5)
    axis.set_yscale("log")
    axis.set_xlabel("SNES solves (training, incl. the surrogate's)")
    axis.set_ylabel("RMS Re_τ error vs unseen DNS")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(out: Path, quick: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    steps = load_config(CONFIG)["train"]["steps"]
    every = 25
    targets = ("friction_law", "dns") if quick else ("friction_law", "dns", "rans")
    seeds = (0,) if quick else (0, 1, 2)

    # 1. Targets, leave one DNS case out (control variate, seed 0).
    validation, per_fold, thetas = [], {}, {}
    summary_rows = []
    for held_out in CASES:
        dns = dns_case(held_out)
        rows = []
        for target in targets:
            theta, curve, family = train_fold(fold_config(held_out, target, "control_variate", steps, 0), every)
            thetas[(held_out, target)] = theta.tolist()
            learned = compare(dns, family.parameters["eval_grids"], {f"learned ({target})": laws(family.wall_model, theta)["learned"]})
            rows += learned[1:] if rows else learned
        rows += [r for r in compare(dns, family.parameters["eval_grids"], laws()) if r.grid != "resolved"]
        per_fold[held_out] = rows
        validation += rows
    grids = list(family.parameters["eval_grids"])
    for name in dict.fromkeys(r.model for r in validation):
        entry = {"wall model": name}
        errors = []
        for case in CASES:
            mine = {r.grid: r for r in per_fold[case] if r.model == name}
            values = [mine[g].re_tau_error for g in grids if g in mine] or [mine["resolved"].re_tau_error]
            entry[f"Re_tau {case}"] = " ".join(f"{v:+.2%}" for v in values)
            errors += [mine[g].re_tau_error for g in TEST_GRIDS if g in mine] or [mine["resolved"].re_tau_error]
        errors = np.nan_to_num(np.array(errors), nan=1.0)
        shape = [r.u_plus_rms for r in validation if r.model == name and math.isfinite(r.u_plus_rms)]
        entry["RMS (8-24 cells)"] = f"{np.sqrt(np.mean(errors**2)):.2%}"
        entry["max |err| (8-24)"] = f"{np.max(np.abs(errors)):.2%}"
        entry["U+ RMS log region"] = f"{np.mean(shape):.2f}" if shape else "-"
        summary_rows.append(entry)

    (out / "wall_model_validation.json").write_text(json.dumps(
        {"summary": summary_rows, "validation": [vars(r) for r in validation]}, indent=1, default=float))

    # 2. Estimators on the chosen target, held-out Re_τ 550 (interpolation) and 2004 (extrapolation).
    estimator_rows, curves_by_fold = [], {}
    for held_out in ((550,) if quick else (550, 2000)):
        curves: dict[str, list[list[dict]]] = {"forward gradient": [], "control variate": []}
        for name, kind in (("forward gradient", "forward"), ("control variate", "control_variate")):
            for seed in seeds:
                _, curve, _ = train_fold(fold_config(held_out, "friction_law", kind, steps, seed), every)
                curves[name].append(curve)
        spalding_rms = math.sqrt(np.mean([r.re_tau_error**2 for r in per_fold[held_out]
                                          if r.model == "Spalding" and r.grid in TEST_GRIDS]))
        plot_curves(curves, out / f"wall_model_estimators_Re{held_out}.png", spalding_rms,
                    f"held out: DNS Re_tau {held_out}, grids {', '.join(TEST_GRIDS)}; target friction law")
        for name, runs in curves.items():
            final = [r[-1]["held_out_rms"] for r in runs]
            estimator_rows.append({
                "held out": held_out, "estimator": name, "training solves": runs[0][-1]["solves"],
                "held-out RMS at the end (median)": f"{np.median(final):.2%}",
                "(min-max)": f"{min(final):.2%} to {max(final):.2%}",
                "solves to stay < 1%": f"{np.nanmedian([stays_below(r, 0.01) for r in runs]):.0f}",
                "solves to stay < 0.5%": f"{np.nanmedian([stays_below(r, 0.005) for r in runs]):.0f}",
                "train RMS at the end": f"{np.median([r[-1]['train_rms'] for r in runs]):.2%}"})
        curves_by_fold[held_out] = curves

    scan = epsilon_scan(family)
    markdown = "\n".join([
        f"Leave one DNS case out: train on the other two, test on it. Control variate, {steps} Adam steps (lr from the config), "
        f"batch 8, 1 tangent, eps 1e-6. Grids {', '.join(grids)} (s16: 16 stretched cells, first cell 1/32).\n",
        "### Re_tau error against the unseen DNS case (per case: " + " / ".join(grids) + "; RANS: its own grid)\n",
        markdown_table(summary_rows),
        "\n### Estimators (target: friction law; solves include the surrogate's two per training task)\n",
        markdown_table(estimator_rows),
        "\n### Finite-difference step (one task, one Rademacher tangent)\n", markdown_table(scan),
    ])
    result = {"summary": summary_rows, "markdown": markdown, "estimators": estimator_rows,
              "validation": [vars(r) for r in validation], "thetas": {f"{k[0]}-{k[1]}": v for k, v in thetas.items()},
              "curves": {str(k): v for k, v in curves_by_fold.items()}, "epsilon_scan": scan}
    (out / "wall_model.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "wall_model.md").write_text(f"# [wall_model]\n\n{markdown}\n")
    return result


if __name__ == "__main__":
    print(run(Path("benchmarks/results"), quick=False)["markdown"])
