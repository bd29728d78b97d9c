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

Estimator science: it assembles the library's internals (`BlackBox` around each estimator) because
the estimators themselves are what it measures, not what a config achieves
(`tests/test_benchmarks_measure_product.py` keeps the list of such sections).
"""
from __future__ import annotations

import copy
import functools
import math
import time
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
from metasolve.method.allocation import VarianceAllocation  # noqa: E402
from metasolve.app.report import markdown_table  # noqa: E402
from problems import Family, Poisson1D, Poisson2D  # noqa: E402
from solvers import KSPOracle, twin_for  # noqa: E402

SOLVES_PER_SAMPLE = (1, 2, 4, 8)
GOAL_COSINE = 0.8
BASELINE = "NI-GBMS: β = 1, surrogate 1 step/estimate"
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


@dataclass(frozen=True)
class SurrogateRecipe:
    """How the surrogate learns: NI-GBMS takes one Adam step per estimate on the current batch;
    the replay recipes take `steps` steps on minibatches of the last `buffer` samples."""

    name: str
    model: str
    """"mlp" (64×2 tanh on standardised [features, θ]) or "log_affine" (`Surrogate.log_affine`)."""
    steps: int
    buffer: int
    batch_size: int
    coefficient: float | str


NIGBMS = SurrogateRecipe("NI-GBMS (MLP, 1 step on the batch)", "mlp", steps=1, buffer=0, batch_size=16,
                         coefficient=1.0)
REPLAY = SurrogateRecipe("replay MLP (8 steps, buffer 4096)", "mlp", steps=8, buffer=4096, batch_size=128,
                         coefficient="scalar")
AFFINE = SurrogateRecipe("replay log-affine (8 steps, buffer 4096)", "log_affine", steps=8, buffer=4096,
                         batch_size=128, coefficient="scalar")
RECIPES = (NIGBMS, REPLAY, AFFINE)


def make_surrogate(case: Case, pool: Sequence[Any], seed: int, lr: float, recipe: SurrogateRecipe) -> Surrogate:
    """The recipe's network; MLP standardisation statistics from the training pool and θ draws (no
    solves). Every recipe of one kind starts from the same weights (same seed)."""
    features = Surrogate.features_of(pool)
    theta = sample_theta(case, pool, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    if recipe.model == "log_affine":
        net = Surrogate.log_affine(features.shape[1], case.dim, seed=seed)
    else:
        net = Surrogate.mlp(features.shape[1], case.dim, hidden=64, depth=2, inputs=torch.cat([features, theta], 1))
    return Surrogate(net, lr=lr, steps=recipe.steps, buffer=recipe.buffer, batch_size=recipe.batch_size, seed=seed)


def warm_up(case: Case, estimator: ControlVariate, pool: Sequence[Any], steps: int, batch: int, reference: Reference,
            seed: int) -> tuple[int, list[dict]]:
    """Train the surrogate online as a training run would: every step one estimate on fresh θ for a
    batch of training tasks (1 tangent: 2 solves per sample), then the recipe's surrogate update.
    Returns the solves spent and, at checkpoints, the surrogate's true gradient quality on the
    held-out samples next to the estimator's own online measure (from the batch's tangents)."""
    generator = torch.Generator().manual_seed(seed)
    box = BlackBox(case.oracle(), case.space, case.cost, estimator, seed=seed)
    surrogate = estimator.surrogate
    held_out = Surrogate.features_of(reference.tasks)
    curve: list[dict] = []
    online: list[dict] = []
    checkpoints = set(np.linspace(0, steps, 9).round().astype(int).tolist())
    begin = time.process_time()
    for step in range(steps + 1):
        if step in checkpoints:
            cosine, relative = agreement(surrogate.gradient(held_out, reference.theta), reference.gradient)
            recent = online[-20:]
            curve.append({"warm-up steps": step, "warm-up solves": box.stats.solves,
                          "surrogate cosine": float(cosine.median()), "surrogate rel. error": float(relative.median()),
                          "online cosine": _mean(recent, "surrogate_cosine"),
                          "online rho": math.sqrt(_mean(recent, "surrogate_rho2")),
                          "coefficient": _mean(recent, "cv_coefficient"), "cpu seconds": time.process_time() - begin})
        if step == steps:
            break
        tasks = [pool[i] for i in torch.randint(len(pool), (batch,), generator=generator).tolist()]
        theta = sample_theta(case, tasks, generator).requires_grad_(True)
        box(theta, tasks).sum().backward()
        online.append(estimator.metrics())
    return box.stats.solves, curve


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return float(np.mean(values)) if values else math.nan


def _variant(warmed: ControlVariate, base: ForwardGradient, coefficient: float | str) -> ControlVariate:
    """A copy of a warmed control variate (surrogate, replay buffer, moments) on another base/coefficient."""
    warmed.settle()  # learn from the last warm-up estimate with the base that made it
    copied = copy.deepcopy(warmed)
    copied.base, copied.coefficient.kind = base, coefficient
    return copied


def methods(solves: int, warmed: dict[str, ControlVariate], eps: float) -> dict[str, Any]:
    """The estimators that spend `solves` solves per sample beyond the centre."""
    nigbms, replay, affine = (warmed[r.name] for r in RECIPES)
    plain = ForwardGradient(tangents=solves, eps=eps)
    guided = ForwardGradient(tangents=solves, eps=eps, distribution="guided", alpha=0.5, memory=0)
    chosen = {
        "forward gradient (mean)": plain,
        "forward gradient (orthogonal)": ForwardGradient(tangents=solves, eps=eps, distribution="orthogonal"),
        "forward gradient (projection)": ForwardGradient(tangents=solves, eps=eps, combine="projection"),
        BASELINE: _variant(nigbms, plain, 1.0),
        "optimal β (scalar), NI-GBMS surrogate": _variant(nigbms, plain, "scalar"),
        "β = 1, replay MLP": _variant(replay, plain, 1.0),
        "optimal β (scalar), replay MLP": _variant(replay, plain, "scalar"),
        "optimal β (diagonal), replay MLP": _variant(replay, plain, "diagonal"),
        "optimal β (scalar), replay log-affine": _variant(affine, plain, "scalar"),
        "guided + optimal β (scalar), replay log-affine": _variant(affine, guided, "scalar"),
    }
    if solves % 2 == 0:
        chosen["SPSA (central)"] = SPSA(tangents=solves // 2, eps=eps)
    return chosen


def compare(case: Case, reference: Reference, warmed: dict[str, ControlVariate], seed: int) -> list[dict]:
    """One row per (method, solves per sample); every method at a given S sees the same tangents.

    Each control-variate row gets its own copy of the warmed estimator: the estimate is made
    before the surrogate's update, and no row learns from another's solves.
    """
    rows = []
    samples = len(reference.tasks)
    for recipe in RECIPES:
        surrogate = warmed[recipe.name].surrogate
        cosine, relative = agreement(surrogate.gradient(Surrogate.features_of(reference.tasks), reference.theta),
                                     reference.gradient)
        rows.append(_row(case, f"{SURROGATE_ALONE}: {recipe.name}", 0, cosine, relative))
    for solves in SOLVES_PER_SAMPLE:
        for name, estimator in methods(solves, warmed, case.eps).items():
            gradient, spent = estimate(case, estimator, reference.theta, reference.tasks, seed + solves)
            if spent != samples * (1 + solves):
                raise RuntimeError(f"{name} spent {spent} solves, expected {samples * (1 + solves)}")
            rows.append(_row(case, name, solves, *agreement(gradient, reference.gradient)))
    return rows


def allocation(case: Case, reference: Reference, warmed: ControlVariate, rounds: int, seed: int) -> list[dict]:
    """Equal vs variance-proportional tangents at the same total (2 per sample on average).

    The held-out tasks are revisited for `rounds` rounds, fresh θ each round (as a training run
    revisits its tasks); the allocation predicts each task's residual from its earlier rounds.
    Reported: Σ_b‖h_b − ∇f_b‖²/Σ_b‖∇f_b‖² per round, on the twin's exact gradients."""
    twin = Exact(twin_cost(case))
    estimators = {kind: _variant(warmed, ForwardGradient(tangents=2, eps=case.eps), "scalar") for kind in
                  ("equal", "variance")}
    estimators["variance"].allocation = VarianceAllocation(tangents=2)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(rounds):
        theta = sample_theta(case, reference.tasks, generator)
        ones = torch.ones(len(reference.tasks), dtype=torch.float64)
        truth = twin.gradient(theta, theta.new_zeros((len(ones), 0, case.dim)), theta.new_zeros((len(ones), 1)),
                              ones, reference.tasks)
        row = {"round": r + 1}
        for kind, estimator in estimators.items():
            gradient, spent = estimate(case, estimator, theta, reference.tasks, seed + 1000 + r)
            row[f"{kind}: total rel. sq. error"] = float(((gradient - truth) ** 2).sum() / (truth**2).sum())
            row[f"{kind}: solves"] = spent
        rows.append(row)
    return rows


def _row(case: Case, method: str, solves: int, cosine: torch.Tensor, relative: torch.Tensor) -> dict:
    return {"problem": case.name, "d": case.dim, "method": method, "solves per sample": solves,
            "median cosine": float(cosine.median()), "cosine q25": float(cosine.quantile(0.25)),
            "cosine q75": float(cosine.quantile(0.75)), "median rel. error": float(relative.median())}


def run_case(case: Case, samples: int, pool_size: int, warm_steps: int, batch: int, lr: float, seed: int) -> dict:
    """Reference, warm-up of both surrogate recipes on the same tasks and θ, comparison; each part
    draws from its own seed so no random stream is shared."""
    reference = reference_gradients(case, samples, seed)
    pool = case.family.train_tasks(pool_size)
    warmed, warm = {}, {}
    for recipe in RECIPES:
        estimator = ControlVariate(ForwardGradient(tangents=1, eps=case.eps),
                                   make_surrogate(case, pool, seed + 1, lr, recipe), coefficient=recipe.coefficient)
        solves, curve = warm_up(case, estimator, pool, warm_steps, batch, reference, seed + 2)
        warmed[recipe.name], warm[recipe.name] = estimator, {"solves": solves, "curve": curve}
    result = {"case": case, "reference": reference, "warm": warm, "warm_steps": warm_steps,
              "batch": batch, "pool": pool_size, "lr": lr, "rows": compare(case, reference, warmed, seed + 100)}
    if case.reference == "twin":
        result["allocation"] = allocation(case, reference, warmed[AFFINE.name], rounds=4, seed=seed + 200)
    return result


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
    figure, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 10), squeeze=False)
    for column, result in enumerate(results):
        rows, d = result["rows"], result["case"].dim
        names = [n for n in dict.fromkeys(r["method"] for r in rows) if not n.startswith(SURROGATE_ALONE)]
        for name in names:
            chosen = [r for r in rows if r["method"] == name]
            x = [r["solves per sample"] for r in chosen]
            style = dict(lw=2.5, color="black") if name == BASELINE else {}
            line, = axes[0, column].plot(x, [r["median cosine"] for r in chosen], marker="o", label=name, **style)
            axes[0, column].fill_between(x, [r["cosine q25"] for r in chosen], [r["cosine q75"] for r in chosen],
                                         color=line.get_color(), alpha=0.12)
            axes[1, column].plot(x, [r["median rel. error"] for r in chosen], marker="o", label=name)
        alone = next(r for r in rows if r["method"] == f"{SURROGATE_ALONE}: {AFFINE.name}")
        s = np.array(SOLVES_PER_SAMPLE, dtype=float)
        axes[0, column].plot(s, np.sqrt(np.minimum(s / d, 1.0)), "k--", lw=1, label="√(K/d): projection, expected")
        axes[0, column].plot(s, np.sqrt(s / (s + d - 1)), "k-.", lw=1, label="√(K/(K+d−1)): mean, expected")
        axes[0, column].axhline(alone["median cosine"], color="grey", ls=":", label="log-affine surrogate alone (0 solves)")
        axes[0, column].axhline(GOAL_COSINE, color="red", lw=0.8, alpha=0.5, label=f"goal {GOAL_COSINE}")
        axes[0, column].set_title(f"{result['case'].name}, d = {d}\n"
                                  f"(surrogate warm-up: {result['warm'][AFFINE.name]['solves']} solves per recipe)")
        axes[0, column].set_ylabel("median cosine to the true gradient")
        axes[1, column].set_ylabel("median ‖g − ∇f‖ / ‖∇f‖")
        axes[1, column].set_yscale("log")
        for axis in axes[:, column]:
            axis.set_xscale("log", base=2)
            axis.set_xticks(SOLVES_PER_SAMPLE, [str(s) for s in SOLVES_PER_SAMPLE])
            axis.set_xlabel("solves per sample (beyond the centre solve)")
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
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
    for name in dict.fromkeys(r["method"] for r in rows if not r["method"].startswith(SURROGATE_ALONE)):
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
    text = (f"**{case.name}**: {case.space!r}, d = {case.dim}, cost {case.cost!r}, finite-difference eps "
            f"{case.eps:g}; {len(reference.tasks)} held-out tasks (evaluation indices), one θ each, "
            f"θ = t·θ* + {case.sigma:g}·z. True gradient: {source} ({checks}).\n"
            f"Surrogate warm-up, both recipes on the same tasks and θ: {result['warm_steps']} steps × "
            f"{result['batch']} training tasks (a pool of {result['pool']}), fresh θ each step, one "
            f"`ControlVariate(ForwardGradient(tangents=1))` estimate per step (2 solves per sample), Adam lr "
            f"{result['lr']:g}. Per recipe, at checkpoints: "
            f"solves: median held-out surrogate-gradient cosine (true) / the online cosine the estimator "
            f"reports from its batch's tangents / online ρ / coefficient β / CPU seconds so far:")
    for name, warm in result["warm"].items():
        curve = ", ".join(f"{c['warm-up solves']}: {c['surrogate cosine']:.2f}/{c['online cosine']:.2f}/"
                          f"{c['online rho']:.2f}/{c['coefficient']:.2f}/{c['cpu seconds']:.0f}s"
                          for c in warm["curve"][1:])
        alone = next(r for r in result["rows"] if r["method"] == f"{SURROGATE_ALONE}: {name}")
        text += (f"\n- {name}: {curve}. Warmed surrogate's gradient alone: median cosine "
                 f"{alone['median cosine']:.2f}, relative error ρ {alone['median rel. error']:.2f}.")
    return text


def _allocation_text(rows: list[dict]) -> str:
    mean = {kind: float(np.mean([r[f"{kind}: total rel. sq. error"] for r in rows[1:]])) for kind in ("equal", "variance")}
    return ("**Query allocation** (optimal β (scalar), replay log-affine surrogate, 2 tangents per sample on average; the "
            "held-out tasks revisited with fresh θ each round; Σ_b‖h_b − ∇f_b‖²/Σ_b‖∇f_b‖² against the twin; "
            "round 1 has no history, so both allocate equally): rounds 2+: equal "
            f"{mean['equal']:.3f}, variance-proportional {mean['variance']:.3f}.\n\n" + markdown_table(rows))


def _verdict(result: dict) -> str:
    """Goal check, with the cosine the unbiased control variate's variance predicts from the surrogate's error.

    E‖h − ∇f‖² = (d − 1)/K · ‖∇f − β∇f̂‖² for Rademacher tangents, so with ρ = ‖∇f − β∇f̂‖/‖∇f‖ the
    cosine is about 1/√(1 + (d − 1)ρ²/K); reaching 0.8 at K = 1 needs ρ ≤ √((1/0.64 − 1)/(d − 1)).
    """
    rows, d = result["rows"], result["case"].dim

    def cosine(name: str, solves: int) -> float:
        return next(r["median cosine"] for r in rows if r["method"] == name and r["solves per sample"] == solves)

    unbiased = [n for n in dict.fromkeys(r["method"] for r in rows) if n.startswith(("optimal", "guided", "β = 1"))]
    best = max(unbiased, key=lambda n: cosine(n, 1))
    rho = {recipe.name: next(r["median rel. error"] for r in rows if r["method"] == f"{SURROGATE_ALONE}: {recipe.name}")
           for recipe in RECIPES}
    needed = math.sqrt((1 / GOAL_COSINE**2 - 1) / (d - 1))
    fg, base = cosine("forward gradient (mean)", 1), cosine(BASELINE, 1)
    scalar = cosine("optimal β (scalar), replay MLP", 1)
    met = "met" if cosine(best, 1) >= GOAL_COSINE else "not met"
    return (f"- {result['case'].name}, 1 solve per sample: NI-GBMS configuration {base:.2f}; best unbiased "
            f"'{best}' {cosine(best, 1):.2f} (goal ≥ {GOAL_COSINE}: **{met}**); optimal β (scalar) with the "
            f"replay MLP {scalar:.2f}; plain forward gradient {fg:.2f} (optimal β, replay MLP / forward "
            f"gradient = {scalar / fg:.2f}). Surrogate gradient error ρ: "
            + ", ".join(f"{name} {value:.2f}" for name, value in rho.items()) + f"; K = 1 at cosine "
            f"{GOAL_COSINE} needs ρ (after β) ≤ {needed:.2f}.")


def _backprop_slope(rows: list[dict], tangents: int) -> str:
    first, last = rows[0], rows[-1]
    twin, forward = "twin backprop peak torch bytes", f"forward K={tangents} peak torch bytes"
    per_iteration = (last[twin] - first[twin]) / (last["k"] - first["k"])
    return (f"Backpropagation through the twin grows by {per_iteration:.3g} bytes per iteration, "
            f"{per_iteration / (8 * first['B'] * first['n']):.2f} vectors of B·n doubles; the forward estimate "
            f"holds {first[forward]} bytes at k = {first['k']} and {last[forward]} at k = {last['k']}.")


def single_threaded(section: Callable[[Path, bool], dict], out: Path, quick: bool) -> dict:
    """Run a section on one torch thread (small tensors on a shared machine), the global RNG left as found."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return section(out, quick)
    finally:
        torch.set_num_threads(previous_threads)


def run(out: Path, quick: bool = False) -> dict:
    return single_threaded(_run, out, quick)


def _run(out: Path, quick: bool) -> dict:
    samples = 8 if quick else 24
    results = [
        run_case(nigbms_case(), samples, pool_size=100 if quick else 1000, warm_steps=60 if quick else 400,
                 batch=16, lr=3e-3, seed=0),
        run_case(poisson2d_case(), samples, pool_size=24 if quick else 200, warm_steps=20 if quick else 200,
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
        "central forward gradient), control variates with S tangents after the warm-up below. The named "
        f"baseline is the NI-GBMS configuration ('{BASELINE}': β = 1, forward differences, the surrogate "
        "trained by one Adam step per estimate on the current batch). 'optimal β' rows estimate the "
        "coefficient online (leave-one-out, shrunk; `ControlVariate(coefficient=...)`); 'replay MLP' "
        "is the same network trained on the same solves with a replay buffer and 8 steps per estimate; "
        "'log-affine' is `Surrogate.log_affine` (log10‖Uz − Lθ‖ − log10‖z‖, the exact form of a "
        "log-residual under a linear iteration on one matrix) with the replay recipe; 'guided' draws "
        "Gaussian tangents with half their variance along ∇f̂ and the "
        "covariance correction Σ⁻¹ (unbiased). S = 0 rows are the warmed surrogates' own gradients (no "
        "solves). All methods at one S share the random stream."
        + (" **Quick run: 8 samples and a warm-up far too short for the surrogate to learn anything: "
           "a smoke test, not a result.**" if quick else ""),
    ]
    for result in results:
        sections += [_describe(result), _quality_table(result["rows"])]
    sections += [f"Goals (an unbiased estimator ≥ {GOAL_COSINE} at 1 solve per sample on Poisson1D; on Poisson2D "
                 "CG, where the surrogate is useless, within 5% of the plain forward gradient):\n"
                 + "\n".join(_verdict(r) for r in results)]
    sections += [_allocation_text(r["allocation"]) for r in results if "allocation" in r]
    sections += ["![estimator quality](estimators.png)",
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
            "warm_up": {r["case"].name: r["warm"] for r in results},
            "allocation": {r["case"].name: r.get("allocation") for r in results},
            "reference_checks": {r["case"].name: r["reference"].check for r in results},
            "estimator_memory": estimator_rows, "backprop_memory": backprop_rows}
