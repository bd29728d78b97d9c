"""[estimators] Gradient estimators against the true gradient, and the memory one estimate needs.

Two problems, every estimator run through `BlackBox` on real PETSc solves:
- the NI-GBMS task: `Poisson1D(31)`, Richardson + Jacobi, cost `LogResidual(50)`, x0 in all 31
  sine modes. The true gradient comes from autograd through the differentiable twin
  (`solvers.twins`), after checking that the twin's cost equals PETSc's to 1e-10;
- `Poisson2D(32)`, CG + Jacobi, cost `LogResidual(30)`, x0 in the 4 x 4 lowest sine modes. The
  reference is the full central finite difference (2d solves per sample), itself checked against
  the CG twin (Jacobi on this constant diagonal only rescales CG).
θ is evaluated at points a training run passes through: θ = t·θ*(task) + σ·z with θ* the
coefficients of the exact solution, t ~ U(0, 1) and z ~ N(0, I), on held-out tasks.
Per solves-per-sample S (beyond the centre solve): forward gradient with S tangents (mean and
projection), SPSA with S/2 tangents (central: 2 solves each), and the NI-GBMS control variate
with S tangents after a counted surrogate warm-up on training tasks. Medians over the samples
of the cosine to the true gradient and of ‖g − ∇f‖/‖∇f‖.
The memory part compares the bytes one forward-difference estimate holds (scaling with B·Q·d)
with backpropagation through the twin (scaling with the iteration count k).
"""
from __future__ import annotations

import copy
import functools
import math
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from metasolve import (SPSA, BlackBox, ControlVariate, Exact, FiniteDifference, ForwardGradient,  # noqa: E402
                       LogResidual, Space, Surrogate, Vector)
from metasolve.report import markdown_table  # noqa: E402
from problems import Family, Poisson1D, Poisson2D  # noqa: E402
from solvers import KSPOracle, twin_for  # noqa: E402

SOLVES_PER_SAMPLE = (1, 2, 4, 8, 16)
GOAL_COSINE = 0.9
SURROGATE_ALONE = "surrogate alone (its gradient, no solves)"
BACKPROP_TANGENTS = 16
TWIN_TOLERANCE = 1e-10
"""Largest |twin cost − PETSc cost| accepted: the twin repeats PETSc's operations, so only round-off differs."""


@dataclass
class Case:
    """One estimator-quality problem: a family, its PETSc solver, the cost, and where θ is drawn."""

    name: str
    family: Family
    ksp_type: str
    pc_type: str
    space: Space
    cost: LogResidual
    eps: float
    sigma: float
    reference: str
    """"twin" (autograd through the twin of the same solver) or "finite differences" (full central)."""
    twin: tuple[str, str]
    """(ksp_type, pc_type) of the twin whose residual history equals this solver's."""

    def oracle(self) -> KSPOracle:
        return KSPOracle(ksp_type=self.ksp_type, pc_type=self.pc_type)

    @property
    def dim(self) -> int:
        return self.space.dim


def nigbms_case() -> Case:
    return Case(name="Poisson1D(31), Richardson+Jacobi", family=Poisson1D(31), ksp_type="richardson",
                pc_type="jacobi", space=Space({"x0": Vector(31, basis="sine", modes=31)}), cost=LogResidual(50),
                eps=1e-4, sigma=0.3, reference="twin", twin=("richardson", "jacobi"))


def poisson2d_case() -> Case:
    return Case(name="Poisson2D(32), CG+Jacobi", family=Poisson2D(32), ksp_type="cg", pc_type="jacobi",
                space=Space({"x0": Vector((32, 32), basis="sine", modes=4, scale=10.0)}), cost=LogResidual(30),
                eps=1e-4, sigma=0.3, reference="finite differences", twin=("cg", "none"))


def sample_theta(case: Case, tasks: Sequence[Any], generator: torch.Generator) -> torch.Tensor:
    """θ = t·θ* + σ·z per task: from the zero guess (t = 0) towards the exact solution (t = 1), blurred."""
    exact = torch.stack([case.space.encode({"x0": task.x_ref}) for task in tasks])
    t = torch.rand(len(tasks), 1, generator=generator, dtype=torch.float64)
    return t * exact + case.sigma * torch.randn(exact.shape, generator=generator, dtype=torch.float64)


def twin_cost(case: Case) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """θ row, task → the cost computed by the twin, differentiable in θ."""
    history = twin_for(*case.twin)

    def cost(theta_row: torch.Tensor, task: Any) -> torch.Tensor:
        x0 = case.space.decode_tensors(theta_row)["x0"]
        b = torch.from_numpy(task.b_array())
        return torch.log10(history(task.A, b, x0, case.cost.iterations)[-1] / torch.linalg.vector_norm(b))

    return cost


def estimate(case: Case, estimator: Any, theta: torch.Tensor, tasks: Sequence[Any],
             seed: int) -> tuple[torch.Tensor, int]:
    """(∂(Σ_b y_b)/∂θ as the estimator sees it [B, d], solves spent) through one BlackBox round."""
    box = BlackBox(case.oracle(), case.space, case.cost, estimator, seed=seed)
    leaf = theta.clone().requires_grad_(True)
    box(leaf, tasks).sum().backward()
    return leaf.grad.detach(), box.stats.solves


def agreement(gradients: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cosine similarity and relative error ‖g − ∇f‖/‖∇f‖."""
    cosine = torch.nn.functional.cosine_similarity(gradients, truth, dim=1, eps=1e-300)
    relative = torch.linalg.vector_norm(gradients - truth, dim=1) / torch.linalg.vector_norm(truth, dim=1)
    return cosine, relative


@dataclass
class Reference:
    """Held-out evaluation points, the true gradient there, the solves it took and how it was checked."""

    theta: torch.Tensor
    tasks: list
    gradient: torch.Tensor
    solves: int
    check: dict


def reference_gradients(case: Case, samples: int, seed: int) -> Reference:
    """The true gradient at held-out θ on held-out tasks, with the check that makes it trustworthy."""
    tasks = case.family.eval_tasks(samples)
    theta = sample_theta(case, tasks, torch.Generator().manual_seed(seed))
    twin = Exact(twin_cost(case))
    ones = torch.ones(samples, dtype=torch.float64)
    no_queries = theta.new_zeros((samples, 0, case.dim))
    twin_gradient = twin.gradient(theta, no_queries, theta.new_zeros((samples, 1)), ones, tasks)
    if case.reference == "twin":
        box = BlackBox(case.oracle(), case.space, case.cost, twin)
        petsc = box.evaluate(theta, tasks)
        twin_values = torch.stack([twin.fn(row, task).detach() for row, task in zip(theta, tasks)])
        mismatch = float((petsc - twin_values).abs().max())
        if not mismatch <= TWIN_TOLERANCE:
            raise RuntimeError(f"{case.name}: twin cost differs from PETSc's by {mismatch:.3g} > {TWIN_TOLERANCE}: "
                               f"the exact gradient would not be the gradient of the PETSc cost")
        return Reference(theta, tasks, twin_gradient, 0, {"max |twin - PETSc| cost": mismatch})
    gradient, solves = estimate(case, FiniteDifference("central", eps=case.eps), theta, tasks, seed)
    cosine, relative = agreement(gradient, twin_gradient)
    return Reference(theta, tasks, gradient, solves,
                     {"min cosine FD vs twin": float(cosine.min()), "max rel. error FD vs twin": float(relative.max())})


def make_surrogate(case: Case, pool: Sequence[Any], seed: int, lr: float) -> Surrogate:
    """A tanh MLP on standardised [features, θ]; statistics from the training pool and θ draws (no solves)."""
    features = Surrogate.features_of(pool)
    theta = sample_theta(case, pool, torch.Generator().manual_seed(seed))
    inputs = torch.cat([features, theta], dim=1)
    torch.manual_seed(seed)
    net = Surrogate.mlp(features.shape[1], case.dim, hidden=64, depth=2, inputs=inputs)
    return Surrogate(net, lr=lr)


def warm_up(case: Case, surrogate: Surrogate, pool: Sequence[Any], steps: int, batch: int, reference: Reference,
            seed: int) -> tuple[int, list[dict]]:
    """Train the surrogate online as a training run would: every step one ControlVariate estimate on
    fresh θ for a batch of training tasks (1 tangent: 2 solves per sample), then one optimizer step.
    Returns the solves spent and the surrogate's own gradient quality on the held-out samples."""
    generator = torch.Generator().manual_seed(seed)
    box = BlackBox(case.oracle(), case.space, case.cost,
                   ControlVariate(ForwardGradient(tangents=1, eps=case.eps), surrogate), seed=seed)
    held_out = Surrogate.features_of(reference.tasks)
    curve = []
    checkpoints = set(np.linspace(0, steps, 9).round().astype(int).tolist())
    for step in range(steps + 1):
        if step in checkpoints:
            cosine, relative = agreement(surrogate.gradient(held_out, reference.theta), reference.gradient)
            curve.append({"warm-up steps": step, "warm-up solves": box.stats.solves,
                          "surrogate cosine": float(cosine.median()), "surrogate rel. error": float(relative.median())})
        if step == steps:
            break
        tasks = [pool[i] for i in torch.randint(len(pool), (batch,), generator=generator).tolist()]
        theta = sample_theta(case, tasks, generator).requires_grad_(True)
        box(theta, tasks).sum().backward()
    return box.stats.solves, curve


def methods(solves: int, surrogate: Surrogate, eps: float) -> dict[str, Any]:
    """The estimators that spend `solves` solves per sample beyond the centre."""
    chosen = {
        "forward gradient (mean)": ForwardGradient(tangents=solves, eps=eps),
        "forward gradient (projection)": ForwardGradient(tangents=solves, eps=eps, combine="projection"),
        "control variate (mean)": ControlVariate(ForwardGradient(tangents=solves, eps=eps), copy.deepcopy(surrogate)),
        "control variate (projection)": ControlVariate(
            ForwardGradient(tangents=solves, eps=eps, combine="projection"), copy.deepcopy(surrogate)),
    }
    if solves % 2 == 0:
        chosen["SPSA (central)"] = SPSA(tangents=solves // 2, eps=eps)
    return chosen


def compare(case: Case, reference: Reference, surrogate: Surrogate, seed: int) -> list[dict]:
    """One row per (method, solves per sample); every method at a given S sees the same tangents.

    Each control-variate row gets its own copy of the warmed surrogate: the estimate is made
    before the surrogate's update, and no row learns from another's solves.
    """
    rows = []
    samples = len(reference.tasks)
    cosine, relative = agreement(surrogate.gradient(Surrogate.features_of(reference.tasks), reference.theta),
                                 reference.gradient)
    rows.append(_row(case, SURROGATE_ALONE, 0, cosine, relative))
    for solves in SOLVES_PER_SAMPLE:
        for name, estimator in methods(solves, surrogate, case.eps).items():
            gradient, spent = estimate(case, estimator, reference.theta, reference.tasks, seed + solves)
            if spent != samples * (1 + solves):
                raise RuntimeError(f"{name} spent {spent} solves, expected {samples * (1 + solves)}")
            rows.append(_row(case, name, solves, *agreement(gradient, reference.gradient)))
    return rows


def _row(case: Case, method: str, solves: int, cosine: torch.Tensor, relative: torch.Tensor) -> dict:
    return {"problem": case.name, "d": case.dim, "method": method, "solves per sample": solves,
            "median cosine": float(cosine.median()), "cosine q25": float(cosine.quantile(0.25)),
            "cosine q75": float(cosine.quantile(0.75)), "median rel. error": float(relative.median())}


def run_case(case: Case, samples: int, pool_size: int, warm_steps: int, batch: int, lr: float, seed: int) -> dict:
    """Reference, warm-up and comparison, each drawing from its own seed so no random stream is shared."""
    reference = reference_gradients(case, samples, seed)
    pool = case.family.train_tasks(pool_size)
    surrogate = make_surrogate(case, pool, seed + 1, lr)
    warm_solves, curve = warm_up(case, surrogate, pool, warm_steps, batch, reference, seed + 2)
    return {"case": case, "reference": reference, "warm_solves": warm_solves, "warm_steps": warm_steps,
            "batch": batch, "pool": pool_size, "lr": lr, "curve": curve,
            "rows": compare(case, reference, surrogate, seed + 100)}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live (strided) torch tensors created while active, counted per storage.

    tracemalloc does not see torch's CPU allocator, so torch ops are intercepted instead. A storage
    counts as freed when the first tensor seen on it dies, and scratch memory a kernel allocates
    and frees before returning is not counted: a slight under-estimate, the same for every method.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(tensor, self._release, key)
        return result


def peak_bytes(action: Callable[[], Any]) -> tuple[int, int]:
    """(peak torch tensor bytes, peak Python/NumPy bytes by tracemalloc) while `action` runs."""
    tracker = LiveTensorBytes()
    tracemalloc.start()
    try:
        with tracker:
            action()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return tracker.peak, python_peak


def one_estimate(estimator: ForwardGradient, theta: torch.Tensor) -> torch.Tensor:
    """`queries` then `gradient` on synthetic values: the estimator's whole share of a training step."""
    batch = theta.shape[0]
    points = estimator.queries(theta, torch.Generator().manual_seed(0))
    values = torch.randn(batch, 1 + points.shape[1], dtype=torch.float64)
    return estimator.gradient(theta, points, values, torch.ones(batch, dtype=torch.float64), [None] * batch)


def estimator_memory(dims: Sequence[int], tangents: Sequence[int], batch: int) -> list[dict]:
    """Peak bytes of one forward-difference estimate: no solver, no activations."""
    rows = []
    for d in dims:
        theta = torch.randn(batch, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        for k in tangents:
            for combine in ("mean", "projection"):
                estimator = ForwardGradient(tangents=k, combine=combine)
                torch_peak, python_peak = peak_bytes(functools.partial(one_estimate, estimator, theta))
                rows.append({"combine": combine, "B": batch, "d": d, "K": k, "peak torch bytes": torch_peak,
                             "peak / (8·B·K·d)": torch_peak / (8 * batch * k * d), "peak Python bytes": python_peak})
    return rows


def backprop_memory(case: Case, iterations: Sequence[int], samples: int, tangents: int) -> list[dict]:
    """Peak bytes of one gradient of the 2-D cost: autograd through the twin vs a forward estimate
    on real PETSc solves (the solver's own work vectors live in PETSc, a fixed few of size n)."""
    tasks = case.family.eval_tasks(samples)
    theta = sample_theta(case, tasks, torch.Generator().manual_seed(0))
    history = twin_for(*case.twin)
    A = tasks[0].A
    b = torch.stack([torch.from_numpy(task.b_array()) for task in tasks])
    basis = case.space.parts["x0"]
    rows = []
    for k in iterations:
        forward_case = replace(case, cost=LogResidual(k))
        estimator = ForwardGradient(tangents=tangents, eps=case.eps)
        twin_peak, _ = peak_bytes(functools.partial(twin_backprop, history, A, b, basis, theta, k))
        forward_peak, forward_python = peak_bytes(functools.partial(estimate, forward_case, estimator, theta, tasks, 0))
        rows.append({"k": k, "B": samples, "n": A.shape[0], "twin backprop peak torch bytes": twin_peak,
                     f"forward K={tangents} peak torch bytes": forward_peak,
                     f"forward K={tangents} peak Python bytes": forward_python})
    return rows


def twin_backprop(history: Callable[..., torch.Tensor], A: Any, b: torch.Tensor, basis: Vector,
                  theta: torch.Tensor, iterations: int) -> torch.Tensor:
    """∇_θ Σ_b log10 ‖r_k‖ by reverse mode through the twin: every iterate is kept for the backward pass."""
    leaf = theta.clone().requires_grad_(True)
    x0 = torch.stack([basis.decode_tensor(row) for row in leaf])
    history(A, b, x0, iterations)[:, -1].log10().sum().backward()
    return leaf.grad


def _plot_quality(results: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    for column, result in enumerate(results):
        rows, d = result["rows"], result["case"].dim
        names = [n for n in dict.fromkeys(r["method"] for r in rows) if n != SURROGATE_ALONE]
        for name in names:
            chosen = [r for r in rows if r["method"] == name]
            x = [r["solves per sample"] for r in chosen]
            line, = axes[0, column].plot(x, [r["median cosine"] for r in chosen], marker="o", label=name)
            axes[0, column].fill_between(x, [r["cosine q25"] for r in chosen], [r["cosine q75"] for r in chosen],
                                         color=line.get_color(), alpha=0.12)
            axes[1, column].plot(x, [r["median rel. error"] for r in chosen], marker="o", label=name)
        alone = next(r for r in rows if r["method"] == SURROGATE_ALONE)
        s = np.array(SOLVES_PER_SAMPLE, dtype=float)
        axes[0, column].plot(s, np.sqrt(np.minimum(s / d, 1.0)), "k--", lw=1, label="√(K/d): projection, expected")
        axes[0, column].plot(s, np.sqrt(s / (s + d - 1)), "k-.", lw=1, label="√(K/(K+d−1)): mean, expected")
        axes[0, column].axhline(alone["median cosine"], color="grey", ls=":", label="surrogate alone (0 solves)")
        axes[0, column].axhline(GOAL_COSINE, color="red", lw=0.8, alpha=0.5, label=f"goal {GOAL_COSINE}")
        axes[0, column].set_title(f"{result['case'].name}, d = {d}\n"
                                  f"(surrogate warm-up: {result['warm_solves']} solves)")
        axes[0, column].set_ylabel("median cosine to the true gradient")
        axes[1, column].set_ylabel("median ‖g − ∇f‖ / ‖∇f‖")
        axes[1, column].set_yscale("log")
        for axis in axes[:, column]:
            axis.set_xscale("log", base=2)
            axis.set_xticks(SOLVES_PER_SAMPLE, [str(s) for s in SOLVES_PER_SAMPLE])
            axis.set_xlabel("solves per sample (beyond the centre solve)")
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_memory(estimator_rows: list[dict], backprop_rows: list[dict], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k in sorted({r["K"] for r in estimator_rows}):
        chosen = [r for r in estimator_rows if r["K"] == k and r["combine"] == "mean"]
        left.loglog([r["d"] for r in chosen], [r["peak torch bytes"] for r in chosen], marker="o", label=f"K = {k}")
    left.set_xlabel("d")
    left.set_ylabel("peak bytes of one estimate")
    left.set_title(f"forward gradient (mean), B = {estimator_rows[0]['B']}")
    left.legend()
    left.grid(alpha=0.3)
    keys = [key for key in backprop_rows[0] if key.endswith("peak torch bytes")]
    for key in keys:
        right.loglog([r["k"] for r in backprop_rows], [r[key] for r in backprop_rows], marker="o",
                     label=key.replace(" peak torch bytes", ""))
    right.set_xlabel("solver iterations k")
    right.set_ylabel("peak torch bytes of one gradient")
    right.set_title(f"Poisson2D(32) CG, B = {backprop_rows[0]['B']}")
    right.legend()
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _quality_table(rows: list[dict]) -> str:
    """Methods × solves per sample, cells 'median cosine / median relative error'."""
    table = []
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != SURROGATE_ALONE):
        cells = {r["solves per sample"]: f"{r['median cosine']:.2f} / {r['median rel. error']:.2f}"
                 for r in rows if r["method"] == name}
        table.append({"method": name, **{f"S={s}": cells.get(s, "–") for s in SOLVES_PER_SAMPLE}})
    d = rows[0]["d"]
    table.append({"method": "expected cosine, forward gradient (mean): √(K/(K+d−1))",
                  **{f"S={s}": f"{math.sqrt(s / (s + d - 1)):.2f}" for s in SOLVES_PER_SAMPLE}})
    table.append({"method": "expected cosine, forward gradient (projection): √(K/d)",
                  **{f"S={s}": f"{math.sqrt(min(s / d, 1.0)):.2f}" for s in SOLVES_PER_SAMPLE}})
    return markdown_table(table)


def _describe(result: dict) -> str:
    case, reference = result["case"], result["reference"]
    checks = ", ".join(f"{k} {v:.3g}" for k, v in reference.check.items())
    source = ("autograd through the twin (`solvers.twins`, decoded with `space.decode_tensors`)"
              if case.reference == "twin" else
              f"full central finite differences, eps {case.eps:g} ({reference.solves} solves for "
              f"{len(reference.tasks)} samples), checked against the CG twin")
    curve = ", ".join(f"{c['warm-up solves']}: {c['surrogate cosine']:.2f}" for c in result["curve"])
    alone = next(r for r in result["rows"] if r["method"] == SURROGATE_ALONE)
    return (f"**{case.name}**: {case.space!r}, d = {case.dim}, cost {case.cost!r}, finite-difference eps "
            f"{case.eps:g}; {len(reference.tasks)} held-out tasks (evaluation indices), one θ each, "
            f"θ = t·θ* + {case.sigma:g}·z. True gradient: {source} ({checks}).\n"
            f"Surrogate warm-up: {result['warm_steps']} steps × {result['batch']} training tasks (a pool of "
            f"{result['pool']}), fresh θ each step, `ControlVariate(ForwardGradient(tangents=1))` estimates "
            f"with one Adam step each (lr {result['lr']:g}), MLP 64×2 tanh on standardised [features, θ]: "
            f"**{result['warm_solves']} solves**. Median surrogate-gradient cosine on the held-out samples "
            f"after (solves: cosine): {curve}. The warmed surrogate's gradient alone: median cosine "
            f"{alone['median cosine']:.2f}, relative error {alone['median rel. error']:.2f}.")


def _verdict(result: dict) -> str:
    """Goal check, with the cosine the unbiased control variate's variance predicts from the surrogate's error.

    E‖h − ∇f‖² = (d − 1)/K · ‖∇f − ∇f̂‖² for Rademacher tangents, so with ρ = ‖∇f − ∇f̂‖/‖∇f‖ the
    cosine is about 1/√(1 + (d − 1)ρ²/K); reaching 0.9 at K = 1 needs ρ ≤ √((1/0.81 − 1)/(d − 1)).
    """
    rows, d = result["rows"], result["case"].dim

    def cosine(name: str, solves: int) -> float:
        return next(r["median cosine"] for r in rows if r["method"] == name and r["solves per sample"] == solves)

    rho = next(r["median rel. error"] for r in rows if r["method"] == SURROGATE_ALONE)
    cv = {s: cosine("control variate (mean)", s) for s in (1, 2)}
    predicted = {s: 1 / math.sqrt(1 + (d - 1) * rho**2 / s) for s in (1, 2)}
    needed = math.sqrt((1 / GOAL_COSINE**2 - 1) / (d - 1))
    cvp = {s: cosine("control variate (projection)", s) for s in (1, 2)}
    fg = {s: cosine("forward gradient (mean)", s) for s in (1, 2)}
    met = "met" if max(cv.values()) >= GOAL_COSINE else "not met"
    return (f"- {result['case'].name}: control variate (mean, unbiased) at 1 / 2 solves {cv[1]:.2f} / {cv[2]:.2f} "
            f"(goal ≥ {GOAL_COSINE}: **{met}**; the surrogate's gradient error ρ = {rho:.2f} predicts "
            f"{predicted[1]:.2f} / {predicted[2]:.2f}, and K = 1 would need ρ ≤ {needed:.2f}); control variate "
            f"(projection, biased towards ∇f̂) {cvp[1]:.2f} / {cvp[2]:.2f}; plain forward gradient "
            f"{fg[1]:.2f} / {fg[2]:.2f} against √(K/d) = {math.sqrt(1 / d):.2f} / {math.sqrt(2 / d):.2f}.")


def _backprop_slope(rows: list[dict], tangents: int) -> str:
    first, last = rows[0], rows[-1]
    twin, forward = "twin backprop peak torch bytes", f"forward K={tangents} peak torch bytes"
    per_iteration = (last[twin] - first[twin]) / (last["k"] - first["k"])
    return (f"Backpropagation through the twin grows by {per_iteration:.3g} bytes per iteration, "
            f"{per_iteration / (8 * first['B'] * first['n']):.2f} vectors of B·n doubles; the forward estimate "
            f"holds {first[forward]} bytes at k = {first['k']} and {last[forward]} at k = {last['k']}.")


def run(out: Path, quick: bool = False) -> dict:
    """The section: one torch thread (small tensors on a shared machine), the global RNG left as found."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return _run(out, quick)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, quick: bool) -> dict:
    samples = 8 if quick else 32
    results = [
        run_case(nigbms_case(), samples, pool_size=100 if quick else 2000, warm_steps=60 if quick else 1000,
                 batch=16, lr=3e-3, seed=0),
        run_case(poisson2d_case(), samples, pool_size=24 if quick else 400, warm_steps=20 if quick else 800,
                 batch=16, lr=3e-3, seed=0),
    ]
    estimator_rows = estimator_memory(dims=(16, 64) if quick else (16, 64, 256, 1024),
                                      tangents=(1, 4, 16), batch=16)
    backprop_rows = backprop_memory(poisson2d_case(), iterations=(10, 30) if quick else (10, 30, 100, 300),
                                    samples=4 if quick else 16, tangents=BACKPROP_TANGENTS)
    _plot_quality(results, out / "estimators.png")
    _plot_memory(estimator_rows, backprop_rows, out / "estimators-memory.png")
    summary = [row for result in results for row in result["rows"]]
    sections = [
        "Median over held-out samples of the cosine to the true gradient / the relative error "
        "‖g − ∇f‖/‖∇f‖, against solves per sample S beyond the centre solve: forward gradient with S "
        "Rademacher tangents (forward differences), SPSA with S/2 tangents (central differences, the "
        "central forward gradient), control variate with S tangents after the warm-up below. S = 0 is "
        "the warmed surrogate's own gradient (no solves). All methods at one S share the tangents."
        + (" **Quick run: 8 samples and a warm-up far too short for the surrogate to learn anything: "
           "a smoke test, not a result.**" if quick else ""),
    ]
    for result in results:
        sections += [_describe(result), _quality_table(result["rows"])]
    sections += ["Goal (control variate ≥ 0.9 at 1–2 solves per sample after warm-up):\n"
                 + "\n".join(_verdict(r) for r in results), "![estimator quality](estimators.png)",
                 "**Memory of one estimate** (peak bytes of live torch tensors, counted per op; tracemalloc "
                 "sees no torch memory, so it only reports the Python/NumPy side). Forward-difference "
                 "estimators with synthetic values hold the query points and the tangents, a few B·K·d "
                 "arrays, and nothing that grows with the solver's iterations:",
                 markdown_table(estimator_rows),
                 "One gradient of the Poisson2D(32) CG cost at k iterations: autograd through the twin keeps "
                 "every iterate for the backward pass, a forward estimate keeps θ, its query points and the "
                 "costs (PETSc's CG holds a fixed handful of length-n work vectors and the k + 1 residual "
                 "norms, whatever k is):",
                 markdown_table(backprop_rows), _backprop_slope(backprop_rows, BACKPROP_TANGENTS),
                 "![memory](estimators-memory.png)"]
    return {"summary": summary, "markdown": "\n\n".join(sections),
            "warm_up": {r["case"].name: {"solves": r["warm_solves"], "curve": r["curve"]} for r in results},
            "reference_checks": {r["case"].name: r["reference"].check for r in results},
            "estimator_memory": estimator_rows, "backprop_memory": backprop_rows}
