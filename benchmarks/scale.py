"""[scale] Value at the sizes users run, with the training paid back (issue 23).

Nonlinear family: Bratu near the fold (λ ~ U[6.0, 6.75], `problems/bratu.py`) on n × n DMDAs
from 1.6·10⁴ to 10⁶ unknowns, solved as a PETSc user solves at that size: `newtonls` + `bt` with
CG + GAMG inside Newton (`-ksp_rtol 1e-8`), every method stopping at ‖F‖ ≤ 1e-10·‖F(0)‖. On the
same unseen tasks, interleaved per task with the order rotated:
- zero guess;
- learned guess, trained ONCE through the run layer (`metasolve.app.run.run`) from
  examples/scale_bratu.toml on a coarse grid and deployed on every size (multilevel training):
  the guess lives in sine modes sin(jπx)·sin(kπy), whose coefficients mean the same function on
  every grid, and the features (Legendre polynomials of λ) do not depend on the grid, so
  `on_grid` only rebuilds the basis on the fine grid;
- `-snes_grid_sequence k` for k = 2, 3, 4, reported for the k that was fastest on these very
  tasks (chosen with hindsight: what a user's own choice could at best give);
- continuation: each task starts from the stored solution of the nearest λ among the tasks this
  stream has already solved (the first from zero): the "nearest solved instance" a user keeps;
- PETSc's Krylov initial guesses `-ksp_guess_type fischer` (model 1, 10 vectors) and `pod`, from a
  zero Newton guess: each linear solve inside Newton starts from a projection on the earlier
  steps' solutions (the SNES, hence the guess space, lives for one task's solve, as in a program
  run once per task).
Time-to-solution is the wall and process-CPU time of the whole call: features and prediction (the
learned map deployed as one affine map, `benchmarks.newton.compiled`), the nearest search, DMDA
and SNES set-up, SNESSolve. On a shared machine the CPU time is what the solve computed; the
goals are judged on it, the wall time is reported beside it.
Training cost is the whole `run` call (build, preflight, supervised start, through-solver steps,
keep-better's validation solves and the run's own coarse evaluation) plus the deployment set-up
(`on_grid` and compiling the affine map) on each size, in solves and seconds. Break-even against
a baseline = training seconds / (mean baseline seconds − mean learned seconds): the deployed
solves after which the training is paid back (∞ when the learned guess is not faster).
Transfer error: ‖u0 − u*‖/‖u*‖ of the deployed guess against the converged solution on each
grid, beside the same on the training grid.

Linear family: 3-D anisotropic diffusion (`problems/anisotropic3d.py`), CG + GAMG to rtol 1e-8,
over a small grid of GAMG options (strength threshold, smoother, aggressive coarsening). The
headroom is measured before anything is trained: the best single configuration against the
per-instance best, where the per-instance best is picked on one timing repeat and charged the
time of an independent second repeat (picking and charging on the same noisy timing would
flatter it).

Results: benchmarks/results/scale.{md,json,png}; the floor of any sine-mode guess
(`projection_bound`) is there too, and it is why the learned guess keeps two Newton steps.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.newton import compiled  # noqa: E402
from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from metasolve.method.meta_solver import MetaSolver  # noqa: E402
from problems.anisotropic3d import Anisotropic3D  # noqa: E402
from problems.bratu import Bratu, BratuOracle, BratuTask  # noqa: E402
from problems.family import sine_coefficients, sine_modes  # noqa: E402
from solvers.ksp import KSPOracle  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "scale_bratu.toml"
RTOL = 1e-10
NEWTON_KRYLOV = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-8}
GRID_SEQUENCE = (2, 3, 4)
KRYLOV_GUESSES = {"Fischer guess (ksp_guess_type fischer)": {"ksp_guess_type": "fischer",
                                                             "ksp_guess_fischer_model": "1,10"},
                  "POD guess (ksp_guess_type pod)": {"ksp_guess_type": "pod"}}
BUILT_INS = ("grid sequencing", "continuation (nearest solved)", *KRYLOV_GUESSES)
"""The PETSc built-ins and the user's own reuse the learned guess is judged against (issue 23)."""
SIZES = {129: 12, 257: 8, 513: 6, 1025: 3}
"""n → unseen tasks solved at that size (fewer where each solve costs more)."""
QUICK_SIZES = {65: 3, 129: 3}
LINEAR_SIZES = {32: 6, 64: 6}
QUICK_LINEAR_SIZES = {16: 3}
GAMG_CONFIGS: dict[str, dict[str, Any]] = {
    "threshold 0": {"pc_gamg_threshold": 0.0},
    "threshold 0.01": {"pc_gamg_threshold": 0.01},
    "threshold 0.02": {"pc_gamg_threshold": 0.02},
    "threshold 0.05": {"pc_gamg_threshold": 0.05},
    "threshold 0, no aggressive coarsening": {"pc_gamg_threshold": 0.0, "pc_gamg_aggressive_coarsening": 0},
    "threshold 0, plain aggregation": {"pc_gamg_threshold": 0.0, "pc_gamg_agg_nsmooths": 0},
    "threshold 0, SOR smoother": {"pc_gamg_threshold": 0.0, "mg_levels_pc_type": "sor"},
    "threshold 0.02, SOR smoother": {"pc_gamg_threshold": 0.02, "mg_levels_pc_type": "sor"},
}


def clock(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def train(quick: bool) -> dict[str, Any]:
    """The learned guess, trained once through the run layer at the config's coarse grid."""
    config = load_config(CONFIG)
    if quick:
        config = override(config, {"train.steps": 2, "train.eval_every": 0, "train.patience": 0}, str(CONFIG))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        result, wall, cpu = clock(lambda: run_config(config, Path(directory) / "run", quiet=True))
    return {"meta": result.experiment.meta_solver, "family": result.experiment.family, "config": config,
            "wall": wall, "cpu": cpu, "run_train_seconds": result.train_seconds, "kept": result.kept,
            "solves": result.solves["training"] + result.solves["evaluation"],
            "solve_breakdown": dict(result.solves)}


def relative_error(guess: np.ndarray, solution: np.ndarray) -> float:
    return float(np.linalg.norm(guess - solution) / np.linalg.norm(solution))


def training_grid_error(trained: dict, tasks: int) -> float:
    """Mean ‖u0 − u*‖/‖u*‖ of the guess on unseen tasks of the grid it was trained on."""
    family = trained["family"]
    oracle, guess = BratuOracle(rtol=RTOL), compiled(trained["meta"], family)
    return float(np.mean([relative_error(guess(t)["u0"], oracle(t).solution) for t in family.eval_tasks(tasks)]))


def measure_size(n: int, count: int, trained: dict) -> dict[str, Any]:
    """Every method on `count` unseen tasks of the n × n grid."""
    lo, hi = trained["family"].lam_range
    family = Bratu(n=n, lam_range=(lo, hi), degree=trained["family"].degree, seed=trained["family"].seed)
    tasks = family.eval_tasks(count)
    oracle = BratuOracle(rtol=RTOL, options=NEWTON_KRYLOV)
    clock(lambda: oracle.solve(tasks[0], {"snes_max_it": 1}))  # one-time caches (Jacobian pattern), untimed
    (guess, deploy_wall, deploy_cpu) = clock(lambda: compiled(trained["meta"].on_grid(tasks[0].grid_shape), family))
    solved: list[tuple[float, np.ndarray]] = []

    def continuation(task: BratuTask) -> dict:
        return {"u0": min(solved, key=lambda s: abs(s[0] - task.lam))[1]} if solved else {}

    methods: dict[str, Callable[[BratuTask], dict]] = {
        "zero guess": lambda t: {}, "learned (multilevel)": guess, "continuation (nearest solved)": continuation,
        **{name: (lambda t, o=options: dict(o)) for name, options in KRYLOV_GUESSES.items()},
        **{f"grid sequencing k={k}": (lambda t, k=k: {"snes_grid_sequence": k}) for k in GRID_SEQUENCE}}
    names = list(methods)
    record = {name: {"its": [], "coarse": [], "wall": [], "cpu": [], "failures": 0} for name in names}
    errors = []
    for index, task in enumerate(tasks):
        for name in names[index % len(names):] + names[:index % len(names)]:
            result, wall, cpu = clock(lambda: oracle.solve(task, methods[name](task)))
            entry = record[name]
            if not result.outcome.converged:
                entry["failures"] += 1
                continue
            entry["its"].append(result.outcome.iterations)
            entry["coarse"].append(sum(result.level_iterations[:-1]))
            entry["wall"].append(wall)
            entry["cpu"].append(cpu)
            if name == "zero guess":
                errors.append(relative_error(guess(task)["u0"], result.outcome.solution))
            if name == "continuation (nearest solved)":
                solved.append((task.lam, result.outcome.solution))
    return {"n": n, "unknowns": n * n, "tasks": count, "record": record, "transfer_error": float(np.mean(errors)),
            "deploy_wall": deploy_wall, "deploy_cpu": deploy_cpu}


def projection_bound(n: int, modes: Sequence[int] = (6, 12, 24, 48)) -> list[dict[str, Any]]:
    """What any guess in K × K sine modes could at best do on one unseen task of the n × n grid:
    the converged solution itself projected on the modes, and the Newton steps from there."""
    task = Bratu(n=n, lam_range=(6.0, 6.75)).eval_tasks(1)[0]
    oracle = BratuOracle(rtol=RTOL, options=NEWTON_KRYLOV)
    solution = oracle(task).solution
    rows = []
    for k in modes:
        basis = sine_modes(n - 2, k)
        projected = (basis @ sine_coefficients(solution.reshape(n - 2, n - 2), k) @ basis.T).ravel()
        outcome, _, cpu = clock(lambda: oracle(task, {"u0": projected}))
        rows.append({"n": n, "modes per axis": k, "relative error": relative_error(projected, solution),
                     "F(u0) / F(0) norm ratio": float(outcome.residuals[0] / task.reference_norm),
                     "Newton its": outcome.iterations, "CPU s": cpu})
    return rows


def summarize_size(size: dict, trained: dict) -> list[dict[str, Any]]:
    record = size["record"]
    gs = min((name for name in record if name.startswith("grid sequencing") and record[name]["cpu"]),
             key=lambda name: np.mean(record[name]["cpu"]))
    shown = ["zero guess", gs, "continuation (nearest solved)", *KRYLOV_GUESSES, "learned (multilevel)"]
    learned = record["learned (multilevel)"]
    training_cpu, training_wall = trained["cpu"] + size["deploy_cpu"], trained["wall"] + size["deploy_wall"]
    rows = []
    for name in shown:
        entry = record[name]
        mean_cpu = float(np.mean(entry["cpu"])) if entry["cpu"] else math.nan
        row = {"n": size["n"], "unknowns": size["unknowns"], "method": name, "tasks": size["tasks"],
               "failures": entry["failures"], "Newton its": float(np.mean(entry["its"])) if entry["its"] else math.nan,
               "coarse its": float(np.mean(entry["coarse"])) if entry["coarse"] else math.nan,
               "mean CPU s": mean_cpu, "mean wall s": float(np.mean(entry["wall"])) if entry["wall"] else math.nan}
        if name != "learned (multilevel)" and learned["cpu"]:
            saved_cpu = mean_cpu - float(np.mean(learned["cpu"]))
            saved_wall = row["mean wall s"] - float(np.mean(learned["wall"]))
            row["learned vs this (CPU)"] = -saved_cpu / mean_cpu
            row["break-even solves (CPU)"] = math.ceil(training_cpu / saved_cpu) if saved_cpu > 0 else math.inf
            row["break-even solves (wall)"] = math.ceil(training_wall / saved_wall) if saved_wall > 0 else math.inf
        else:
            row.update({"learned vs this (CPU)": "", "break-even solves (CPU)": "", "break-even solves (wall)": ""})
        rows.append(row)
    return rows


def verdict(rows: list[dict], smallest: int = 250_000) -> str:
    """Issue 23's goals at the sizes that judge them: ≥ 35% less CPU time than the best built-in,
    0 failures, break-even within 50 deployed solves."""
    lines = []
    for unknowns in sorted({r["unknowns"] for r in rows if r["unknowns"] >= smallest}):
        here = [r for r in rows if r["unknowns"] == unknowns]
        learned = next(r for r in here if r["method"] == "learned (multilevel)")
        built_ins = [r for r in here if r["method"].startswith(BUILT_INS) and math.isfinite(r["mean CPU s"])]
        best = min(built_ins, key=lambda r: r["mean CPU s"])
        gain = 1.0 - learned["mean CPU s"] / best["mean CPU s"]
        failures = sum(r["failures"] for r in here)
        lines.append(f"- {unknowns} unknowns: best built-in {best['method']} {best['mean CPU s']:.3g} s, learned "
                     f"{learned['mean CPU s']:.3g} s: saves **{gain:.0%}** (goal >= 35%: "
                     f"{'met' if gain >= 0.35 else 'missed'}); failures {failures}; break-even against it "
                     f"{best['break-even solves (CPU)']} solves (goal <= 50: "
                     f"{'met' if best['break-even solves (CPU)'] <= 50 else 'missed'}).")
    return "Goals at >= 2.6e5 unknowns (CPU time):\n" + "\n".join(lines) if lines else ""


def exponent(unknowns: Sequence[float], values: Sequence[float]) -> float:
    """p in value ∝ unknowns^p, least squares in log-log (NaN with fewer than two finite points)."""
    points = [(math.log(u), math.log(v)) for u, v in zip(unknowns, values) if math.isfinite(v) and v > 0]
    if len(points) < 2:
        return math.nan
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def rows_of(rows: list[dict], method: str) -> list[dict]:
    """The rows of one method across sizes (any k for "grid sequencing": each size's best)."""
    grid = method.startswith("grid")
    return [r for r in rows if (r["method"].startswith("grid") if grid else r["method"] == method)]


def plot(rows: list[dict], trained: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys("grid sequencing (best k)" if r["method"].startswith("grid") else r["method"]
                                 for r in rows))
    for method in methods:
        chosen = rows_of(rows, method)
        x = [r["unknowns"] for r in chosen]
        y = [r["mean CPU s"] for r in chosen]
        axes[0].loglog(x, y, "o-", label=f"{method} (p={exponent(x, y):.2f})")
    x = sorted({r["unknowns"] for r in rows})
    axes[0].loglog(x, [trained["cpu"]] * len(x), "k--", label=f"training, once at n={trained['family'].n} "
                                                            f"({trained['cpu']:.0f} s CPU)")
    axes[0].set_xlabel("unknowns")
    axes[0].set_ylabel("CPU seconds per solve / training")
    axes[0].legend(fontsize=7)
    for method in methods:
        if method.startswith("learned"):
            continue
        chosen = rows_of(rows, method)
        x = [r["unknowns"] for r in chosen if math.isfinite(r["break-even solves (CPU)"])]
        y = [r["break-even solves (CPU)"] for r in chosen if math.isfinite(r["break-even solves (CPU)"])]
        if x:
            axes[1].loglog(x, y, "o-", label=f"vs {method} (p={exponent(x, y):.2f})")
    axes[1].axhline(50, color="gray", lw=0.8, ls=":")
    axes[1].set_xlabel("unknowns")
    axes[1].set_ylabel("deployed solves to pay back training (CPU)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Bratu near the fold, Newton-Krylov (CG + GAMG): learned guess trained at "
                 f"n = {trained['family'].n}, deployed on every size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def linear_headroom(n: int, count: int, repeats: int = 2) -> dict[str, Any]:
    """CPU seconds (set-up + solve) of every GAMG configuration on `count` tasks, `repeats` times."""
    family = Anisotropic3D(n=n)
    oracle = KSPOracle(ksp_type="cg", pc_type="gamg", rtol=1e-8, max_it=500)
    times = {name: np.full((count, repeats), math.nan) for name in GAMG_CONFIGS}
    its = {name: np.full(count, math.nan) for name in GAMG_CONFIGS}
    names = list(GAMG_CONFIGS)
    for index, task in enumerate(family.eval_tasks(count)):
        oracle(task, {})  # the task's PETSc matrix, built once and kept on the task: untimed
        for repeat in range(repeats):
            for name in names[index % len(names):] + names[:index % len(names)]:
                outcome, _, cpu = clock(lambda: oracle(task, GAMG_CONFIGS[name]))
                if outcome.converged:
                    times[name][index, repeat] = cpu
                    its[name][index] = outcome.iterations
    pick, charge = (0, 1) if repeats > 1 else (0, 0)
    single = {name: float(np.mean(t[:, charge])) for name, t in times.items()}
    best_single = min(single, key=lambda name: single[name] if math.isfinite(single[name]) else math.inf)
    table = np.stack([times[name][:, pick] for name in names], axis=1)
    per_task = [names[int(np.nanargmin(row))] for row in table]
    per_instance = float(np.mean([times[name][i, charge] for i, name in enumerate(per_task)]))
    return {"n": n, "unknowns": n ** 3, "tasks": count, "single": single, "iterations":
            {k: float(np.nanmean(v)) for k, v in its.items()}, "best single": best_single,
            "per-instance best": per_instance, "per-task choice": per_task,
            "headroom": 1.0 - per_instance / single[best_single]}


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    trained = train(quick)
    training_error = training_grid_error(trained, 4 if quick else 8)
    sizes = [measure_size(n, count, trained) for n, count in (QUICK_SIZES if quick else SIZES).items()]
    rows = [row for size in sizes for row in summarize_size(size, trained)]
    plot(rows, trained, out / "scale.png")
    transfer = [{"n": s["n"], "unknowns": s["unknowns"], "relative error of the deployed guess": s["transfer_error"],
                 "deploy set-up CPU s": s["deploy_cpu"]} for s in sizes]
    bound = projection_bound(129 if quick else 513)
    headroom = [linear_headroom(n, count) for n, count in (QUICK_LINEAR_SIZES if quick else LINEAR_SIZES).items()]
    headroom_rows = [{"n": h["n"], "unknowns": h["unknowns"], "tasks": h["tasks"], "best single": h["best single"],
                      "best single CPU s": h["single"][h["best single"]],
                      "per-instance best CPU s": h["per-instance best"], "headroom": h["headroom"],
                      "per-task choices": ", ".join(sorted(set(h["per-task choice"])))} for h in headroom]
    config_rows = [{"n": h["n"], "configuration": name, "mean CPU s": h["single"][name],
                    "mean CG its": h["iterations"][name]} for h in headroom for name in GAMG_CONFIGS]
    exponents = {}
    for method in ("zero guess", *BUILT_INS, "learned (multilevel)"):
        chosen = [r for r in rows if r["method"].startswith(method)]
        exponents[method] = exponent([r["unknowns"] for r in chosen], [r["mean CPU s"] for r in chosen])
    markdown = "\n\n".join([
        f"Learned guess trained once through the run layer from `examples/scale_bratu.toml` at n = "
        f"{trained['family'].n} ({trained['family'].n ** 2} unknowns, LU inside Newton): {trained['cpu']:.1f} s CPU "
        f"({trained['wall']:.1f} s wall) and {trained['solves']} solves in all ({trained['solve_breakdown']}); "
        f"kept the {trained['kept']} weights. Deployed with Newton-Krylov (CG + GAMG, ksp_rtol 1e-8) to "
        f"||F|| <= 1e-10 ||F(0)||. Break-even counts include the training and the deployment set-up on that size.",
        markdown_table(rows), verdict(rows),
        f"Fitted exponents of mean CPU seconds per solve in unknowns: "
        + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()) + ". Training is paid once, at the coarse grid "
        f"(exponent 0 in the deployed size).",
        f"Transfer error (multilevel training): relative error of the guess on its training grid n = "
        f"{trained['family'].n}: {training_error:.3g}; on the deployed grids:",
        markdown_table(transfer),
        "The floor of any sine-mode guess: the converged solution of one unseen task projected on K x K modes "
        "(no learning error at all), and the Newton steps from it:",
        markdown_table(bound),
        "Linear family, 3-D anisotropic diffusion, CG + GAMG to rtol 1e-8: headroom of a per-instance GAMG "
        "configuration (per-instance best picked on one repeat, charged an independent repeat):",
        markdown_table(headroom_rows), markdown_table(config_rows)])
    return {"summary": rows, "markdown": markdown, "transfer": transfer, "training_grid_error": training_error,
            "exponents": exponents, "projection_bound": bound, "headroom": headroom_rows, "gamg_configs": config_rows,
            "training": {k: v for k, v in trained.items() if k not in ("meta", "family", "config")}}
