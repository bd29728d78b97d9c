"""A neural wall model trained through a PETSc SNES channel-flow solver, with forward gradients only.

The coarse wall-modelled solve (problems/channel.py) is a black box: no adjoint, no
differentiable CFD. The wall model is Spalding's law times e^{c_θ(Re_y, y₁/h)} with a small MLP
c_θ that starts at zero; θ is trained so the coarse solve's friction velocity matches the
wall-resolved solve of the same closure, with (a) the plain forward gradient and (b) the NI-GBMS
control variate whose surrogate is the coarse solve linearised around Spalding. Then everything
is checked against DNS (Hoyas & Jiménez).

    python examples/wall_model.py [--out runs/wall_model] [--steps 100] [--seed 0]

Writes `wall_model.md` (tables), `wall_model.json`, `learning_curves.png`, `profiles.png`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from metasolve import BlackBox, ControlVariate, ForwardGradient, Space, Surrogate, Vector  # noqa: E402
from metasolve.report import markdown_table  # noqa: E402
from problems.channel import (  # noqa: E402
    WALL_MODEL_KEY, ChannelTask, FrictionError, LinearisedLoss, channel_tasks, dns_profiles, log_friction_error,
    wall_modelled_oracle, wall_modelled_profile, wall_resolved_reference,
)
from problems.wall_laws import LearnedWallModel, LogLaw, Spalding  # noqa: E402

ESTIMATORS = ("forward gradient", "control variate")


@dataclass
class Config:
    """One run. Training on Re_τ ≈ 180–2000 and four grids; evaluation on other Re_τ (5200 is an
    extrapolation) and other grids. ε = 1e-6: forward differences of the friction error are
    accurate to ~2e-4 relative there, while Newton-to-round-off solves keep noise below 1e-7
    relative down to ε = 1e-8 (see the README)."""

    train_re_tau: tuple[float, ...] = (180, 250, 350, 500, 700, 1000, 1400, 2000)
    train_cells: tuple[int, ...] = (8, 12, 16, 24)
    eval_re_tau: tuple[float, ...] = (220, 600, 1500, 5200)
    eval_cells: tuple[int, ...] = (10, 14, 20)
    dns_cells: tuple[int, ...] = (8, 16)
    steps: int = 100
    batch: int = 8
    tangents: int = 1
    eps: float = 1e-6
    lr: float = 1e-2
    surrogate_lr: float = 1e-2
    hidden: int = 8
    eval_every: int = 10
    seed: int = 0
    estimators: tuple[str, ...] = ESTIMATORS


def rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def friction_errors(oracle: Any, tasks: list[ChannelTask], setting: dict) -> np.ndarray:
    """ln u_τ − ln u_τ,ref per task (a failed solve counts as a 100% error)."""
    errors = [log_friction_error(oracle(task, setting), task) for task in tasks]
    return np.array([e if math.isfinite(e) else math.log(2.0) for e in errors])


def make_estimator(kind: str, model: LearnedWallModel, config: Config) -> Any:
    base = ForwardGradient(tangents=config.tangents, eps=config.eps)
    if kind == "forward gradient":
        return base
    if kind == "control variate":
        return ControlVariate(base, Surrogate(LinearisedLoss(model), lr=config.surrogate_lr))
    raise ValueError(f"unknown estimator {kind!r}: use one of {ESTIMATORS}")


def train(kind: str, config: Config, model: LearnedWallModel, train_tasks: list[ChannelTask],
          eval_tasks: list[ChannelTask], progress: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Adam on the shared θ (cosine-decayed learning rate); returns θ and the learning curve.

    The curve's solve count includes the surrogate's own solves (two per training task for the
    control variate); the evaluations that draw the curve are not counted.
    """
    oracle = wall_modelled_oracle(model)
    space = Space({WALL_MODEL_KEY: Vector(model.n_params, basis="identity")})
    blackbox = BlackBox(oracle, space, FrictionError(), make_estimator(kind, model, config), seed=config.seed)
    surrogate_solves = 2 * len(train_tasks) if kind == "control variate" else 0
    if surrogate_solves:
        for task in train_tasks:
            task.features  # noqa: B018  (the two linearisation solves, cached per task)
    theta = torch.nn.Parameter(torch.tensor(model.initial_parameters()))
    optimizer = torch.optim.Adam([theta], lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr / 30)
    sampler = torch.Generator().manual_seed(config.seed)

    def point(step: int) -> dict:
        current = {WALL_MODEL_KEY: theta.detach().numpy().copy()}
        return {"step": step, "solves": blackbox.stats.solves + surrogate_solves,
                "train_rms": rms(friction_errors(oracle, train_tasks, current)),
                "eval_rms": rms(friction_errors(oracle, eval_tasks, current))}

    curve = [point(0)]
    bar = tqdm(range(1, config.steps + 1), desc=f"train ({kind})", disable=not progress, dynamic_ncols=True)
    for step in bar:
        chosen = torch.randperm(len(train_tasks), generator=sampler)[:config.batch].tolist()
        batch = [train_tasks[i] for i in chosen]
        loss = blackbox(theta.expand(len(batch), -1), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            curve.append(point(step))
            bar.set_postfix(train=f"{curve[-1]['train_rms']:.2%}", eval=f"{curve[-1]['eval_rms']:.2%}")
    return theta.detach().numpy().copy(), curve


def law_table(laws: dict[str, tuple[Any, dict]], eval_tasks: list[ChannelTask]) -> tuple[list[dict], dict]:
    """RMS / max |error| of u_τ against the wall-resolved solve, on the evaluation tasks."""
    rows, errors = [], {}
    interpolation = [t for t in eval_tasks if t.u_tau_ref < 3000]
    extrapolation = [t for t in eval_tasks if t.u_tau_ref >= 3000]
    for name, (oracle, setting) in laws.items():
        inside = friction_errors(oracle, interpolation, setting)
        outside = friction_errors(oracle, extrapolation, setting)
        errors[name] = {"interpolation": inside.tolist(), "extrapolation": outside.tolist()}
        rows.append({"wall model": name, "RMS error (Re_tau 220-1500)": f"{rms(inside):.2%}",
                     "max error (Re_tau 220-1500)": f"{np.max(np.abs(inside)):.2%}",
                     "RMS error (Re_tau 5200)": f"{rms(outside):.2%}" if outside.size else "-"})
    return rows, errors


def dns_comparison(laws: dict[str, tuple[Any, dict]], cells: tuple[int, ...]) -> tuple[list[dict], dict]:
    """Re_τ and C_f at each DNS case's bulk Reynolds number: wall-resolved RANS and every wall model."""
    rows, profiles = [], {}
    for dns in dns_profiles():
        re_b = round(dns.re_b)
        reference = wall_resolved_reference(float(re_b))
        entries = [("DNS", dns.re_tau, dns.skin_friction), ("RANS wall-resolved", reference.re_tau,
                                                            reference.skin_friction)]
        profiles[dns.name] = {"dns": dns, "rans": reference, "coarse": {}}
        for name, (oracle, setting) in laws.items():
            for n in cells:
                task = ChannelTask(re_b=re_b, cells=n)
                outcome = oracle(task, setting)
                if outcome.failed:
                    entries.append((f"{name}, {n} cells", math.nan, math.nan))
                    continue
                profile = wall_modelled_profile(outcome, task)
                profiles[dns.name]["coarse"][(name, n)] = profile
                entries.append((f"{name}, {n} cells", profile.re_tau, profile.skin_friction))
        for method, re_tau, cf in entries:
            rows.append({"case": f"Re_b {re_b}", "method": method, "Re_tau": f"{re_tau:.1f}",
                         "Re_tau vs DNS": f"{re_tau / dns.re_tau - 1:+.2%}", "C_f": f"{cf:.5f}",
                         "C_f vs DNS": f"{cf / dns.skin_friction - 1:+.2%}"})
    return rows, profiles


def plot_curves(curves: dict[str, list[dict]], path: Path, baselines: dict[str, float]) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for (name, curve), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        solves = [p["solves"] for p in curve]
        axis.plot(solves, [p["train_rms"] for p in curve], color=colour, label=f"{name} (train)")
        axis.plot(solves, [p["eval_rms"] for p in curve], color=colour, linestyle="--", label=f"{name} (unseen)")
    for name, value in baselines.items():
        axis.axhline(value, color="grey", linestyle=":", linewidth=1)
        axis.annotate(name, (0, value), textcoords="offset points", xytext=(4, 2), fontsize=8, color="grey")
    axis.axhline(0.01, color="red", linewidth=0.8, alpha=0.5)
    axis.set_yscale("log")
    axis.set_xlabel("SNES solves")
    axis.set_ylabel("RMS error of u_τ vs wall-resolved")
    axis.set_title("train: training tasks; unseen: other Re_τ (incl. 5200) and grids", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_profiles(profiles: dict, path: Path, cells: int) -> None:
    """U⁺(y⁺) on log axes: DNS points, wall-resolved RANS, the analytic laws, coarse solutions."""
    figure, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4.2), sharey=True)
    y_plus = np.logspace(-1, math.log10(2500), 200)
    spalding, log_law = Spalding(), LogLaw()
    spalding_u = np.linspace(0.05, 30.0, 400)
    markers = {"log law": "v", "Spalding": "s", "learned": "o"}
    for axis, (name, entry) in zip(np.atleast_1d(axes), profiles.items()):
        dns, rans = entry["dns"], entry["rans"]
        axis.plot(dns.y_plus[1:], dns.u_plus[1:], "k.", markersize=3, label=f"DNS Re_τ={dns.re_tau:.0f}")
        axis.plot(rans.y_plus, rans.u_plus, "k-", linewidth=1, label="RANS wall-resolved")
        axis.plot(y_plus[y_plus > 5], np.log(y_plus[y_plus > 5]) / log_law.kappa + log_law.b, ":",
                  color="tab:green", label="log law")
        axis.plot(spalding.y_plus_of_u_plus(spalding_u), spalding_u, "--", color="tab:purple", label="Spalding")
        for (law, n), profile in entry["coarse"].items():
            if n == cells:
                axis.plot(profile.y_plus, profile.u_plus, markers.get(law, "x"), fillstyle="none",
                          label=f"{law}, {n} cells")
        axis.set_xscale("log")
        axis.set_xlim(0.1, dns.re_tau * 1.2)
        axis.set_xlabel("y⁺")
        axis.set_title(name.replace("channel_dns_", ""))
        axis.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("U⁺")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(config: Config, out: Path, progress: bool = True) -> dict:
    """The whole example: references, training with each estimator, tables, plots."""
    begin = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model = LearnedWallModel(hidden=config.hidden, seed=config.seed)
    train_tasks = channel_tasks(config.train_re_tau, config.train_cells)
    eval_tasks = channel_tasks(config.eval_re_tau, config.eval_cells)
    distinct = sorted({t.re_b for t in train_tasks + eval_tasks} | {round(d.re_b) for d in dns_profiles()})
    for re_b in tqdm(distinct, desc="wall-resolved references", disable=not progress, dynamic_ncols=True):
        wall_resolved_reference(float(re_b))

    thetas, curves = {}, {}
    for kind in config.estimators:
        thetas[kind], curves[kind] = train(kind, config, model, train_tasks, eval_tasks, progress)
    learned = config.estimators[-1]
    laws = {"log law": (wall_modelled_oracle(LogLaw()), {}), "Spalding": (wall_modelled_oracle(Spalding()), {}),
            "learned": (wall_modelled_oracle(model), {WALL_MODEL_KEY: thetas[learned]})}
    accuracy_rows, errors = law_table(laws, eval_tasks)
    for kind in config.estimators:
        if kind != learned:
            name = f"learned ({kind})"
            rows, extra = law_table({name: (laws["learned"][0], {WALL_MODEL_KEY: thetas[kind]})}, eval_tasks)
            accuracy_rows += rows
            errors.update(extra)
    dns_rows, profiles = dns_comparison(laws, config.dns_cells)

    spalding = errors["Spalding"]
    plot_curves(curves, out / "learning_curves.png",
                {"Spalding": rms(np.array(spalding["interpolation"] + spalding["extrapolation"]))})
    plot_profiles(profiles, out / "profiles.png", cells=max(config.dns_cells))
    seconds = time.perf_counter() - begin
    curve_rows = [{"estimator": kind, "SNES solves": c[-1]["solves"], "train RMS": f"{c[-1]['train_rms']:.2%}",
                   "unseen RMS": f"{c[-1]['eval_rms']:.2%}"} for kind, c in curves.items()]
    markdown = "\n".join([
        "## Friction velocity against the wall-resolved solve (unseen Re_tau and grids)\n",
        f"Learned model: trained with the {learned}. Unseen grids: {', '.join(map(str, config.eval_cells))} cells.\n",
        markdown_table(accuracy_rows),
        "\n## Training (same steps, batch and tangents for both estimators)\n",
        markdown_table(curve_rows),
        "\n## Against DNS (Hoyas & Jiménez) at the DNS bulk Reynolds numbers\n",
        markdown_table(dns_rows),
        f"\n{seconds:.0f} s in all.\n",
    ])
    (out / "wall_model.md").write_text(markdown)
    result = {"config": asdict(config), "curves": curves, "errors": errors, "accuracy": accuracy_rows,
              "dns": dns_rows, "theta": {k: v.tolist() for k, v in thetas.items()}, "seconds": seconds,
              "markdown": markdown}
    (out / "wall_model.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/wall_model"))
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--seed", type=int, default=Config.seed)
    arguments = parser.parse_args()
    result = run(Config(steps=arguments.steps, seed=arguments.seed), arguments.out)
    print(result["markdown"])
    print(f"written to {arguments.out}/")


if __name__ == "__main__":
    main()
