"""[scale] Value at the sizes users run, with the training paid back (issue 23).

Nonlinear families (`FAMILIES`): Bratu near the fold (λ ~ U[6.0, 6.75], `problems/bratu.py`) and
the harder nonlinear diffusion (`problems/nonlinear_diffusion.py`), on n × n DMDAs from 1.6·10⁴ to
10⁶ unknowns, solved as a PETSc user solves at that size: `newtonls` + `bt` with GAMG-preconditioned
Krylov inside Newton (`-ksp_rtol 1e-8`; CG where the Jacobian is symmetric, GMRES where not), every
method stopping at ‖F‖ ≤ 1e-10·‖F(0)‖. On the same unseen tasks, interleaved per task with the
order rotated:
- zero guess;
- learned guess, trained ONCE through the run layer (`metasolve.app.run.run`) from
  the family's config (examples/scale_*.toml) on a coarse grid and deployed on every size
  (multilevel training): the guess lives in sine modes sin(jπx)·sin(kπy), whose coefficients mean
  the same function on every grid, and the features (Legendre polynomials of the parameters) do
  not depend on the grid, so
  `on_grid` only rebuilds the basis on the fine grid;
- `-snes_grid_sequence k` for k = 2, 3, 4, reported for the k that was fastest on these very
  tasks (chosen with hindsight: what a user's own choice could at best give);
- continuation: each task starts from the stored solution of the nearest parameters among the tasks this
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

The linear family (a per-instance choice at these sizes) is `benchmarks/scale_linear.py`.

Results: benchmarks/results/scale.{md,json,png}; the floor of any sine-mode guess
(`projection_bound`) is there too, and it is why the learned guess keeps two Newton steps.
"""
from __future__ import annotations

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
import torch  # noqa: E402

from benchmarks.newton import compiled  # noqa: E402
from metasolve.app.config import load_config, override  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from metasolve.app.run import run as run_config  # noqa: E402
from problems.bratu import Bratu  # noqa: E402
from problems.family import Family  # noqa: E402
from problems.family import sine_modes  # noqa: E402
from solvers._petsc import MPI  # noqa: E402
from solvers.dmda_snes import DMDASNESOracle  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RTOL = 1e-10
NEWTON_KRYLOV = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-8}
"""Bratu's Jacobian is symmetric: CG + GAMG, what a PETSc user runs inside Newton at these sizes."""


@dataclass(frozen=True)
class Nonlinear:
    """A nonlinear family of this section: the config that trains its guess on a coarse grid, the
    Krylov method inside Newton a user runs at the deployed sizes, and n → unseen tasks there."""

    name: str
    config: Path
    krylov: dict[str, Any]
    sizes: dict[int, int]
    quick_sizes: dict[int, int]


FAMILIES = (
    Nonlinear("Bratu", EXAMPLES / "scale_bratu.toml", NEWTON_KRYLOV, {129: 12, 257: 8, 513: 6, 1025: 3}, {65: 3, 129: 3}),
    Nonlinear("nonlinear diffusion", EXAMPLES / "scale_nonlinear_diffusion.toml",
              {"ksp_type": "gmres", "pc_type": "gamg", "ksp_rtol": 1e-8}, {129: 8, 257: 6, 513: 4, 1025: 2},
              {65: 2, 129: 2}),
)
GRID_SEQUENCE = (2, 3, 4)
KRYLOV_GUESSES = {"Fischer guess (ksp_guess_type fischer)": {"ksp_guess_type": "fischer",
                                                             "ksp_guess_fischer_model": "1,10"},
                  "POD guess (ksp_guess_type pod)": {"ksp_guess_type": "pod"}}
BUILT_INS = ("grid sequencing", "continuation (nearest solved)", *KRYLOV_GUESSES)
"""The PETSc built-ins and the user's own reuse the learned guess is judged against (issue 23)."""


def clock(fn: Callable[[], Any], comm: Any = None) -> tuple[Any, float, float]:
    """(result, wall s, process CPU s) of `fn()`; on a communicator of several ranks (a collective
    `fn`) the slowest rank's wall time and the CPU time summed over the ranks."""
    ranks = comm.tompi4py() if comm is not None and comm.getSize() > 1 else None
    if ranks is not None:
        ranks.Barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if ranks is not None:
        wall, cpu = ranks.allreduce(wall, op=MPI.MAX), ranks.allreduce(cpu, op=MPI.SUM)
    return result, wall, cpu


def train(spec: Nonlinear, quick: bool) -> dict[str, Any]:
    """The learned guess, trained once through the run layer at the config's coarse grid."""
    config = load_config(spec.config)
    if quick:
        config = override(config, {"train.steps": 2, "train.eval_every": 0, "train.patience": 0}, str(spec.config))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        result, wall, cpu = clock(lambda: run_config(config, Path(directory) / "run", quiet=True))
    return {"spec": spec, "meta": result.experiment.meta_solver, "family": result.experiment.family, "config": config,
            "wall": wall, "cpu": cpu, "run_train_seconds": result.train_seconds, "kept": result.kept,
            "solves": result.solves["training"] + result.solves["evaluation"],
            "solve_breakdown": dict(result.solves)}


def relative_error(guess: np.ndarray, solution: np.ndarray) -> float:
    return float(np.linalg.norm(guess - solution) / np.linalg.norm(solution))


def newton(family: Family, options: dict[str, Any] | None = None, comm: Any = None) -> DMDASNESOracle:
    """The generic DMDA Newton driver on the family's problem, to the section's tolerance (each
    solve on `comm`: one rank by default)."""
    return DMDASNESOracle(family.oracle().problem, rtol=RTOL, options=options, comm=comm)


def training_grid_error(trained: dict, tasks: int) -> float:
    """Mean ‖u0 − u*‖/‖u*‖ of the guess on unseen tasks of the grid it was trained on."""
    family = trained["family"]
    oracle, guess = newton(family), compiled(trained["meta"], family)
    return float(np.mean([relative_error(guess(t)["u0"], oracle(t).solution) for t in family.eval_tasks(tasks)]))


def on_size(family: Family, n: int) -> Family:
    """The same family (parameter ranges, features, seed) on the n × n grid."""
    return type(family)(**{**family.parameters, "n": n})


def measure_size(n: int, count: int, trained: dict, comm: Any = None) -> dict[str, Any]:
    """Every method on `count` unseen tasks of the n × n grid (each solve on `comm`'s ranks)."""
    family = on_size(trained["family"], n)
    tasks = family.eval_tasks(count)
    oracle = newton(family, trained["spec"].krylov, comm)
    clock(lambda: oracle.solve(tasks[0], {"snes_max_it": 1}), comm)  # one-time caches (Jacobian pattern), untimed
    (guess, deploy_wall, deploy_cpu) = clock(lambda: compiled(trained["meta"].on_grid(tasks[0].grid_shape), family),
                                             comm)
    solved: list[tuple[np.ndarray, np.ndarray]] = []

    def continuation(task: Any) -> dict:
        """The stored solution whose parameters are nearest (each scaled by its range in the family)."""
        if not solved:
            return {}
        here = parameter_point(family, task)
        return {"u0": min(solved, key=lambda s: float(np.linalg.norm(s[0] - here)))[1]}

    methods: dict[str, Callable[[Any], dict]] = {
        "zero guess": lambda t: {}, "learned (multilevel)": guess, "continuation (nearest solved)": continuation,
        **{name: (lambda t, o=options: dict(o)) for name, options in KRYLOV_GUESSES.items()},
        **{f"grid sequencing k={k}": (lambda t, k=k: {"snes_grid_sequence": k}) for k in GRID_SEQUENCE}}
    names = list(methods)
    record = {name: {"its": [], "coarse": [], "wall": [], "cpu": [], "failures": 0} for name in names}
    errors = []
    for index, task in enumerate(tasks):
        for name in names[index % len(names):] + names[:index % len(names)]:
            result, wall, cpu = clock(lambda: oracle.solve(task, methods[name](task)), comm)
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
                solved.append((parameter_point(family, task), result.outcome.solution))
    ranks = comm.getSize() if comm is not None else 1
    return {"family": trained["spec"].name, "n": n, "unknowns": n * n, "ranks": ranks, "tasks": count, "record": record, "transfer_error": float(np.mean(errors)),
            "deploy_wall": deploy_wall, "deploy_cpu": deploy_cpu}


def parameter_point(family: Family, task: Any) -> np.ndarray:
    """A task's parameters, each mapped to [0, 1] over its range in the family (`<name>_range`)."""
    point = []
    for name, value in task.parameters.items():
        lo, hi = family.parameters[f"{name}_range"]
        point.append((value - lo) / (hi - lo) if hi > lo else 0.0)
    return np.array(point)


def bubble_modes(n: int, modes: int) -> np.ndarray:
    """[n, modes] x(1 − x)·P_j(2x − 1) at the n interior vertices: zero on the boundary like the sine
    modes, but with a nonzero second derivative there (where Bratu's −Δu = λ), which an odd sine
    series cannot represent without Gibbs-like slow decay."""
    x = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    return (x * (1.0 - x))[:, None] * np.polynomial.legendre.legvander(2.0 * x - 1.0, modes - 1)


def projection_bound(n: int, modes: Sequence[int] = (6, 12, 24, 48)) -> list[dict[str, Any]]:
    """What any guess in a K × K tensor basis could at best do on one unseen task of the n × n grid:
    the converged solution itself projected (least squares) on the basis, and the Newton steps from
    there. Sine modes (the config's) and polynomial bubbles (`bubble_modes`)."""
    task = Bratu(n=n, lam_range=(6.0, 6.75)).eval_tasks(1)[0]
    oracle = newton(Bratu(n=n), NEWTON_KRYLOV)
    solution = oracle(task).solution
    grid = solution.reshape(n - 2, n - 2)
    rows = []
    for name, basis_of, sizes in (("sine", sine_modes, modes), ("polynomial bubble", bubble_modes, (6, 10, 16))):
        for k in sizes:
            q, _ = np.linalg.qr(basis_of(n - 2, k))
            projected = (q @ (q.T @ grid @ q) @ q.T).ravel()
            outcome, _, cpu = clock(lambda: oracle(task, {"u0": projected}))
            rows.append({"n": n, "basis": name, "modes per axis": k,
                         "relative error": relative_error(projected, solution),
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
        row = {"family": size["family"], "n": size["n"], "unknowns": size["unknowns"], "ranks per solve": size["ranks"],
               "method": name, "tasks": size["tasks"],
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


def plot(results: list[tuple[dict, list[dict]]], path: Path) -> None:
    """Per family (a row of panels): CPU seconds per solve against unknowns, with the training
    cost as a line, and the break-even count against each baseline."""
    fig, grid = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for (trained, rows), axes in zip(results, grid):
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
        axes[0].set_title(f"{trained['spec'].name}: Newton-Krylov ({trained['spec'].krylov['ksp_type']} + GAMG), "
                          f"guess trained at n = {trained['family'].n}", fontsize=9)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_family(spec: Nonlinear, quick: bool) -> tuple[dict, list[dict], dict[str, Any]]:
    """Train once on the coarse grid through `run`, then every method at every size."""
    trained = train(spec, quick)
    training_error = training_grid_error(trained, 4 if quick else 8)
    sizes = [measure_size(n, count, trained) for n, count in (spec.quick_sizes if quick else spec.sizes).items()]
    rows = [row for size in sizes for row in summarize_size(size, trained)]
    transfer = [{"n": s["n"], "unknowns": s["unknowns"], "relative error of the deployed guess": s["transfer_error"],
                 "deploy set-up CPU s": s["deploy_cpu"]} for s in sizes]
    exponents = {}
    for method in ("zero guess", *BUILT_INS, "learned (multilevel)"):
        chosen = [r for r in rows if r["method"].startswith(method)]
        exponents[method] = exponent([r["unknowns"] for r in chosen], [r["mean CPU s"] for r in chosen])
    markdown = "\n\n".join([
        f"## {spec.name}",
        f"{trained['family'].describe()}",
        f"Learned guess trained once through the run layer from `examples/{spec.config.name}` at n = "
        f"{trained['family'].n} ({trained['family'].n ** 2} unknowns, LU inside Newton): {trained['cpu']:.1f} s CPU "
        f"({trained['wall']:.1f} s wall) and {trained['solves']} solves in all ({trained['solve_breakdown']}); "
        f"kept the {trained['kept']} weights. Deployed with Newton-Krylov ({spec.krylov}) to "
        f"||F|| <= 1e-10 ||F(0)||. Break-even counts include the training and the deployment set-up on that size.",
        markdown_table(rows), verdict(rows),
        "Fitted exponents of mean CPU seconds per solve in unknowns: "
        + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()) + ". Training is paid once, at the coarse grid "
        "(exponent 0 in the deployed size).",
        f"Transfer error (multilevel training): relative error of the guess on its training grid n = "
        f"{trained['family'].n}: {training_error:.3g}; on the deployed grids:",
        markdown_table(transfer)])
    return trained, rows, {"family": spec.name, "summary": rows, "markdown": markdown, "transfer": transfer,
                           "training_grid_error": training_error, "exponents": exponents,
                           "training": {k: v for k, v in trained.items() if k not in ("spec", "meta", "family", "config")}}


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    measured = [measure_family(spec, quick) for spec in FAMILIES]
    plot([(trained, rows) for trained, rows, _ in measured], out / "scale.png")
    bound = projection_bound(129 if quick else 513)
    markdown = "\n\n".join([*(m["markdown"] for _, _, m in measured),
        "The floor of a guess in a smooth basis (Bratu): the converged solution of one unseen task projected on "
        "K x K modes (no learning error at all), and the Newton steps from it. Every one needs 2 fine Newton "
        "steps: after one step the residual is the linear solve's (ksp_rtol 1e-8 in CG's preconditioned norm) "
        "times F(u0), and F(u0) stays above ~1e-2 F(0) because both bases converge slowly in the residual "
        "(u's second derivatives at the boundary and the corners). Grid sequencing's fine level starts from a "
        "converged discrete solution one level down, which can take 1 step at 10^6 unknowns.",
        markdown_table(bound),
        "The linear family (a per-instance choice at these sizes, its headroom and an online bandit) is "
        "measured in `scale_linear.md`."])
    return {"families": [m for _, _, m in measured], "markdown": markdown, "projection_bound": bound,
            "summary": [row for _, rows, _ in measured for row in rows]}
