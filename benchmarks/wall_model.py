"""[wall_model] A neural wall model trained through the PETSc SNES channel solver.

Runs examples/wall_model.py at benchmark size: the forward gradient and the control variate
(surrogate: the coarse solve linearised around Spalding), several seeds each, learning curves
against the number of SNES solves; the quality of single gradient estimates against a
central-difference reference gradient (also for the a-priori surrogate the issue suggested);
the finite-difference step scan behind ε = 1e-6; u_τ errors on unseen Reynolds numbers and grids;
and the comparison with DNS. Writes wall_model.{json,md} and wall_model_*.png into `out`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metasolve import BlackBox, ControlVariate, FiniteDifference, ForwardGradient, Space, Surrogate, Vector  # noqa: E402
from metasolve.report import markdown_table  # noqa: E402
from problems.channel import (  # noqa: E402
    WALL_MODEL_KEY, APrioriLoss, ChannelTask, FrictionError, LinearisedLoss, channel_tasks, wall_modelled_oracle,
)
from problems.wall_laws import LearnedWallModel, LogLaw, Spalding  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wall_model.py"


def load_example() -> ModuleType:
    """The example module (examples/ is not a package): its training and reporting functions."""
    spec = importlib.util.spec_from_file_location("wall_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def epsilon_scan(task: ChannelTask, model: LearnedWallModel) -> list[dict]:
    """Directional derivative of the friction cost along one Rademacher tangent vs the step ε."""
    rng = np.random.default_rng(0)
    theta = model.initial_parameters()
    theta[-model.hidden - 1:] = 0.05 * rng.standard_normal(model.hidden + 1)  # away from θ₀, all slopes nonzero
    tangent = rng.choice([-1.0, 1.0], size=theta.size)
    steps = 10.0 ** -np.arange(1, 10)
    settings = [{WALL_MODEL_KEY: theta}] + [{WALL_MODEL_KEY: theta + e * tangent} for e in steps] \
        + [{WALL_MODEL_KEY: theta - e * tangent} for e in steps]
    cost = FrictionError()
    values = [cost(o, task) for o in wall_modelled_oracle(model).solve_many(task, settings)]
    forward = [(values[1 + i] - values[0]) / e for i, e in enumerate(steps)]
    central = [(values[1 + i] - values[1 + len(steps) + i]) / (2 * e) for i, e in enumerate(steps)]
    best = central[4]  # ε = 1e-5 central: truncation O(ε²) ≈ 1e-10, noise ≈ 1e-8 relative
    return [{"eps": f"{e:.0e}", "forward difference": f"{f:.8e}", "forward rel. error": f"{abs(f / best - 1):.1e}",
             "central difference": f"{c:.8e}", "central rel. error": f"{abs(c / best - 1):.1e}"}
            for e, f, c in zip(steps, forward, central)]


def gradient_quality(tasks: list[ChannelTask], model: LearnedWallModel, theta: np.ndarray, where: str,
                     draws: int, tangents: int) -> list[dict]:
    """Cosine between single estimates of the batch gradient at θ and a central-difference reference.

    Each estimator is drawn `draws` times with fresh tangents. The surrogates are used as built,
    without online training: at θ₀ (Spalding) the linearised one is exact to first order by
    construction, away from θ₀ its linearisation error shows.
    """
    oracle = wall_modelled_oracle(model)
    space = Space({WALL_MODEL_KEY: Vector(model.n_params, basis="identity")})
    theta0 = torch.tensor(theta)

    def estimate(estimator, seed: int) -> torch.Tensor:
        blackbox = BlackBox(oracle, space, FrictionError(), estimator, seed=seed)
        theta = theta0.clone().requires_grad_(True)
        blackbox(theta.expand(len(tasks), -1), tasks).mean().backward()
        return theta.grad.clone()

    reference = estimate(FiniteDifference(difference="central", eps=1e-5), 0)
    rows = []
    makers = {
        "forward gradient": lambda: ForwardGradient(tangents=tangents, eps=1e-6),
        "control variate, linearised solve": lambda: ControlVariate(
            ForwardGradient(tangents=tangents, eps=1e-6), Surrogate(LinearisedLoss(model), steps=0)),
        "control variate, a-priori fit": lambda: ControlVariate(
            ForwardGradient(tangents=tangents, eps=1e-6), Surrogate(APrioriLoss(model), steps=0)),
    }
    for name, make in makers.items():
        cosines, errors = [], []
        for seed in range(draws):
            g = estimate(make(), seed + 1)
            cosines.append(float(torch.nn.functional.cosine_similarity(g, reference, dim=0)))
            errors.append(float((g - reference).norm() / reference.norm()))
        rows.append({"at": where, "estimator": name, "solves per estimate": len(tasks) * (1 + tangents),
                     "cosine to reference (median)": f"{np.median(cosines):.3f}",
                     "cosine (min-max)": f"{min(cosines):.2f} to {max(cosines):.2f}",
                     "relative error (median)": f"{np.median(errors):.2f}"})
    surrogate_solves = 2 * len(tasks)
    rows[1]["solves per estimate"] = f"{rows[1]['solves per estimate']} (+{surrogate_solves} once)"
    return rows


def stays_below(curve: list[dict], level: float) -> float:
    """Solves spent when the unseen-task error fell below `level` for good (NaN if it never did)."""
    above = [i for i, p in enumerate(curve) if p["eval_rms"] > level]
    last_above = above[-1] if above else -1
    return float(curve[last_above + 1]["solves"]) if last_above + 1 < len(curve) else math.nan


def plot_seeds(curves: dict[str, list[list[dict]]], path: Path, spalding_rms: float) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for (name, runs), colour in zip(curves.items(), ("tab:blue", "tab:orange")):
        solves = np.array([p["solves"] for p in runs[0]])
        values = np.array([[p["eval_rms"] for p in run] for run in runs])
        axis.plot(solves, np.median(values, axis=0), color=colour, label=f"{name} (unseen, median of {len(runs)})")
        axis.fill_between(solves, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2)
    axis.axhline(spalding_rms, color="grey", linestyle=":", label="Spalding (the start)")
    axis.axhline(0.01, color="red", linewidth=0.8, alpha=0.5, label="goal 1%")
    axis.set_yscale("log")
    axis.set_xlabel("SNES solves")
    axis.set_ylabel("RMS error of u_τ vs wall-resolved")
    axis.set_title("unseen tasks: Re_τ 220, 600, 1500, 5200 on 10, 14, 20 cells", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(out: Path, quick: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = load_example()
    seeds = (0,) if quick else (0, 1, 2)
    config = example.Config(steps=60 if quick else 200)
    model = LearnedWallModel(hidden=config.hidden, seed=0)
    train_tasks = channel_tasks(config.train_re_tau, config.train_cells)
    eval_tasks = channel_tasks(config.eval_re_tau, config.eval_cells)

    scan = epsilon_scan(ChannelTask(re_b=26389, cells=12), model)
    batch = [train_tasks[i] for i in np.random.default_rng(0).choice(len(train_tasks), config.batch, replace=False)]
    draws = 5 if quick else 20
    quality = gradient_quality(batch, model, model.initial_parameters(), "Spalding (θ₀)", draws, config.tangents)

    curves: dict[str, list[list[dict]]] = {kind: [] for kind in example.ESTIMATORS}
    thetas: dict[str, list[np.ndarray]] = {kind: [] for kind in example.ESTIMATORS}
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        seed_model = LearnedWallModel(hidden=config.hidden, seed=seed)
        for kind in example.ESTIMATORS:
            theta, curve = example.train(kind, seeded, seed_model, train_tasks, eval_tasks)
            curves[kind].append(curve)
            thetas[kind].append(theta)

    quality += gradient_quality(batch, model, thetas["forward gradient"][0], "trained θ (forward gradient, seed 0)",
                                draws, config.tangents)
    laws = {"log law": (wall_modelled_oracle(LogLaw()), {}), "Spalding": (wall_modelled_oracle(Spalding()), {})}
    for kind in example.ESTIMATORS:
        for seed, theta in zip(seeds, thetas[kind]):
            laws[f"learned, {kind}, seed {seed}"] = (wall_modelled_oracle(LearnedWallModel(config.hidden, seed)),
                                                    {WALL_MODEL_KEY: theta})
    accuracy, errors = example.law_table(laws, eval_tasks)
    spalding_rms = example.rms(np.array(errors["Spalding"]["interpolation"] + errors["Spalding"]["extrapolation"]))
    plot_seeds(curves, out / "wall_model_learning_curves.png", spalding_rms)

    training_rows = []
    for kind, runs in curves.items():
        final = [r[-1]["eval_rms"] for r in runs]
        reach = [stays_below(r, 0.01) for r in runs]
        training_rows.append({"estimator": kind, "SNES solves": runs[0][-1]["solves"],
                              "unseen RMS at the end (median)": f"{np.median(final):.2%}",
                              "(min-max over seeds)": f"{min(final):.2%} to {max(final):.2%}",
                              "solves until it stays below 1% (median)": f"{np.nanmedian(reach):.0f}"})

    chosen = {"learned": (wall_modelled_oracle(model), {WALL_MODEL_KEY: thetas["control variate"][0]}),
              "Spalding": laws["Spalding"], "log law": laws["log law"]}
    dns_rows, profiles = example.dns_comparison(chosen, config.dns_cells)
    example.plot_profiles(profiles, out / "wall_model_profiles.png", cells=max(config.dns_cells))

    markdown = "\n".join([
        f"Training on Re_tau {config.train_re_tau[0]:.0f}-{config.train_re_tau[-1]:.0f} x grids {config.train_cells}; "
        f"unseen: Re_tau {', '.join(f'{r:.0f}' for r in config.eval_re_tau)} x grids {config.eval_cells}. "
        f"{config.steps} Adam steps, batch {config.batch}, {config.tangents} tangent(s), eps {config.eps:g}, "
        f"seeds {list(seeds)}.\n",
        "### u_tau error against the wall-resolved solve\n", markdown_table(accuracy),
        "\n### Estimators: learning curves (wall_model_learning_curves.png)\n", markdown_table(training_rows),
        "\n### Single gradient estimates vs a central-difference reference (batch of 8 training tasks)\n", markdown_table(quality),
        "\n### Finite-difference step (one task, one Rademacher tangent)\n", markdown_table(scan),
        "\n### Against DNS (learned: control variate, seed 0)\n", markdown_table(dns_rows),
    ])
    summary = training_rows + accuracy
    result = {"summary": summary, "markdown": markdown, "accuracy": accuracy, "training": training_rows,
              "gradient_quality": quality, "epsilon_scan": scan, "dns": dns_rows, "errors": errors,
              "curves": curves}
    (out / "wall_model.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "wall_model.md").write_text(f"# [wall_model]\n\n{markdown}\n")
    return result


if __name__ == "__main__":
    print(run(Path("benchmarks/results"), quick=False)["markdown"])
