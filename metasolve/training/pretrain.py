"""Pretraining on the solver's own solutions: the supervised start that is always available.

One solve per training task returns its solution x*, non-intrusively (the user's solver, as
configured, counted in the training budget). For an initial-guess part of the space the best
guess the space can hold is the least-squares projection θ* = encode(x*) (exact in θ for a
`Vector`, whose decode is linear: x0 = scale·B·θ). A meta-solver that maps features to θ* is
then fitted by regression — L-BFGS on the squared θ error for an MLP's hidden layers, then
closed-form ridge for the last layer (the whole fit for a linear meta-solver) — and training
through the solver starts from there, at a learning rate capped by the regression's own
leave-one-out error (`hand_over`).

Why first: iterations to a tolerance are decided by the slowest error component, so a guess
must be right in every slow mode at once before the iteration count moves, and a gradient
estimated from forward solves finds that point slowly (NI-GBMS's Poisson1D with 8 modes: the
projection needs 58 iterations where 400 steps of through-the-solver training from zero ended
at 1265–1511, against 1514 for the zero guess). Regression reaches the projection in one solve
per task; what is left for the solver-aware objective is the difference between the Euclidean
projection and what the solver needs, which is small when the space holds the slow modes.

The ridge strength is chosen by leave-one-out cross-validation (closed form through one SVD,
Golub, Heath & Wahba 1979), so a map that the features determine exactly is fitted exactly and a
noisy one is shrunk, without a knob.

Options have no free target: each task's best value is searched for with a few counted solves
of the training cost (`option_search`: golden section in raw θ), on a subset of the training
tasks, and regressed on the features the same way (`pretrain_options`). `supervised_start` is the
one entry point that does whichever of the two the space needs.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import nn

from metasolve.method.params import Space, Vector
from metasolve.training.option_search import HALF_WIDTH, option_parts, search_tasks

GUESS_KEYS = ("x0", "u0")
"""Setting names that are initial guesses: `x0` for `KSPOracle`, `u0` for `SNESOracle`."""

RIDGE_GRID = np.logspace(-10, 4, 29)
"""Candidate ridge strengths relative to the mean squared singular value of the features."""


@dataclass
class PretrainReport:
    """What pretraining spent and how well the regression fits its targets (θ of the projected
    solutions, or of each task's searched best options). `stages` holds the reports of the guess
    and the option fits when a supervised start did both; its `loo_rms` is then their smallest,
    so `hand_over` caps the learning rate for every part."""

    solves: int
    failed: int
    fit_rms: float
    target_rms: float
    loo_rms: float
    ridge: float
    seconds: float
    fitted: str = "solutions"
    tasks_fitted: int = 0
    stages: tuple["PretrainReport", ...] = ()

    def describe(self) -> str:
        if self.stages:
            return "; ".join(stage.describe() for stage in self.stages)
        if self.fitted == "options":
            return (f"options pretrained on the searched best settings of {self.tasks_fitted} tasks ({self.solves} "
                    f"counted solves, {self.failed} failed): θ fit RMS {self.fit_rms:.3g} (leave-one-out "
                    f"{self.loo_rms:.3g}) vs RMS {self.target_rms:.3g} of the optima from the start, ridge "
                    f"{self.ridge:.3g}, {self.seconds:.1f} s")
        return (f"pretrained on {self.solves - self.failed} solutions ({self.failed} failed solves): "
                f"θ fit RMS {self.fit_rms:.3g} (leave-one-out {self.loo_rms:.3g}) vs target RMS {self.target_rms:.3g}, "
                f"ridge {self.ridge:.3g}, "
                f"{self.seconds:.1f} s")


def guess_parts(space: Space) -> list[str]:
    """Names of the space's initial-guess parts (a `Vector` named `x0` or `u0`)."""
    return [name for name, part in space.parts.items() if name in GUESS_KEYS and isinstance(part, Vector)]


def _solution_oracle(oracle: Any) -> Any:
    """The oracle itself, or a copy that returns solutions (`KSPOracle(return_solution=True)`)."""
    if getattr(oracle, "return_solution", True):
        return oracle
    solving = copy.copy(oracle)
    solving.return_solution = True
    return solving


def solutions(oracle: Any, tasks: Sequence[Any], executor: Any) -> list[np.ndarray | None]:
    """One solve per task with the oracle's own settings; None where the solve failed."""
    solving = _solution_oracle(oracle)

    def solve(index: int) -> np.ndarray | None:
        outcome = solving(tasks[index], {})
        if outcome.error is not None or not outcome.converged:  # (a direct solve records no residuals)
            return None
        if outcome.solution is None:
            raise ValueError(f"pretraining needs solutions, but {type(oracle).__name__} returned none "
                             "(use an oracle that returns Outcome.solution, e.g. KSPOracle or SNESOracle)")
        solution = np.asarray(outcome.solution, dtype=np.float64)
        return solution if np.all(np.isfinite(solution)) else None

    return executor.map(solve, range(len(tasks)))


def targets(space: Space, parts: Sequence[str], xs: Sequence[np.ndarray]) -> torch.Tensor:
    """[N, Σ dim] least-squares θ of each solution in each guess part (concatenated in `parts` order).

    Through the normal equations BᵀB θ = Bᵀx/scale with NumPy's own einsum loops, not a LAPACK
    least-squares driver: the sine bases have orthogonal columns, so BᵀB is diagonal and exactly as
    well conditioned as B, and the result is bitwise reproducible — `torch.linalg.lstsq` gave
    answers differing in the last bit from one process to the next, which training then amplified
    (two identical 1-rank runs ended ~1e-5 apart).
    """
    X = np.stack([np.asarray(x, dtype=np.float64) for x in xs])
    columns = []
    for name in parts:
        part = space.parts[name]
        if part.basis is None:
            columns.append(X / part.scale)
            continue
        B = part.basis.numpy()
        gram = np.einsum("ki,kj->ij", B, B, optimize=False)
        columns.append(np.linalg.solve(gram, np.einsum("ki,nk->in", B, X, optimize=False)).T / part.scale)
    return torch.from_numpy(np.concatenate(columns, axis=1))


def ridge_loo(Z: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Ridge regression T ≈ Z W + c with the strength chosen by leave-one-out error.

    With centred Z = U S Vᵀ, the ridge fit's hat matrix is U diag(s²/(s²+λ)) Uᵀ (+ 1/N for the
    unpenalised intercept), so every leave-one-out residual e_i/(1 − H_ii) costs O(N·rank) per λ.
    Returns (W, c, λ, RMS leave-one-out error at λ).
    """
    n = Z.shape[0]
    z_mean, t_mean = Z.mean(0), T.mean(0)
    Zc, Tc = Z - z_mean, T - t_mean
    U, s, Vt = np.linalg.svd(Zc, full_matrices=False)
    keep = s > s[0] * 1e-12 if s.size else s.astype(bool)
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    UtT = U.T @ Tc
    scale = float(np.mean(s ** 2)) if s.size else 1.0
    best = (math.inf, 0.0)
    for relative in RIDGE_GRID:
        shrink = s ** 2 / (s ** 2 + relative * scale)
        fitted = U @ (shrink[:, None] * UtT)
        leverage = (U ** 2) @ shrink + 1.0 / n
        loo = (Tc - fitted) / np.maximum(1.0 - leverage, 1e-12)[:, None]
        error = float(np.mean(loo ** 2))
        if error < best[0]:
            best = (error, relative * scale)
    lam = best[1]
    W = Vt.T @ ((s / (s ** 2 + lam))[:, None] * UtT)
    return W, t_mean - z_mean @ W, lam, math.sqrt(best[0])


def _fit_last_layer(layer: nn.Linear, H: torch.Tensor, T: torch.Tensor, columns: torch.Tensor) -> tuple[float, float]:
    """Closed-form ridge for the guess rows of the last (linear) layer on its inputs H; (λ, LOO RMS)."""
    W, c, lam, loo = ridge_loo(H.numpy(), T.numpy())
    with torch.no_grad():
        layer.weight[columns] = torch.from_numpy(W.T).to(layer.weight.dtype)
        layer.bias[columns] = torch.from_numpy(c).to(layer.bias.dtype)
    return lam, loo


def _fit_network(meta_solver: nn.Module, features: torch.Tensor, T: torch.Tensor, columns: torch.Tensor,
                 iterations: int) -> None:
    """L-BFGS (SciPy's, on torch gradients) on the mean squared θ error of the guess columns; the
    other outputs are held at their current values (a squared penalty), so pretraining changes
    only the guess."""
    with torch.no_grad():
        held = meta_solver(features)
    others = torch.ones(held.shape[1], dtype=torch.bool)
    others[columns] = False
    weight = 1.0 / max(float(T.pow(2).mean()), 1e-300)
    parameters = list(meta_solver.parameters())

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(flat), parameters)
        for parameter in parameters:
            parameter.grad = None
        theta = meta_solver(features)
        loss = weight * (theta[:, columns] - T).pow(2).mean()
        if others.any():
            loss = loss + weight * (theta[:, others] - held[:, others]).pow(2).mean()
        loss.backward()
        gradient = torch.nn.utils.parameters_to_vector([p.grad for p in parameters])
        return float(loss.detach()), gradient.detach().numpy().astype(np.float64)

    start = torch.nn.utils.parameters_to_vector(parameters).detach().numpy().astype(np.float64)
    result = scipy.optimize.minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                                     options={"maxiter": iterations, "gtol": 1e-12, "ftol": 1e-15})
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(result.x), parameters)
    for parameter in parameters:
        parameter.grad = None


def pretrain(meta_solver: nn.Module, blackbox: Any, tasks: Sequence[Any], iterations: int = 500) -> PretrainReport:
    """Fit `meta_solver`'s initial-guess outputs to the projected solutions of `tasks`.

    Solves go through `blackbox.oracle` on `blackbox.executor` and are counted in
    `blackbox.stats.solves` (the training budget). Failed solves are counted, warned about and
    left out of the fit. Every rank fits the same data, so the weights stay identical under MPI.
    """
    space: Space = blackbox.space
    parts = guess_parts(space)
    if not parts:
        raise ValueError(f"pretraining fits initial guesses, but the space {space!r} has no Vector part named "
                         f"{' or '.join(GUESS_KEYS)}")
    begin = time.perf_counter()
    found = solutions(blackbox.oracle, tasks, blackbox.executor)
    blackbox.stats.solves += len(tasks)
    good = [i for i, x in enumerate(found) if x is not None]
    failed = len(tasks) - len(good)
    blackbox.stats.failed_centres += failed
    if failed:
        names = [getattr(tasks[i], "name", str(i)) for i, x in enumerate(found) if x is None]
        warnings.warn(f"pretraining: {failed} solve(s) failed or did not converge ({names[:5]}...): "
                      "left out of the fit", RuntimeWarning, stacklevel=2)
    if len(good) < 2:
        raise ValueError(f"pretraining needs at least 2 solved tasks, got {len(good)} of {len(tasks)}")
    T = targets(space, parts, [found[i] for i in good])
    columns = torch.cat([torch.arange(space.slices[name].start, space.slices[name].stop) for name in parts])
    features = torch.stack([tasks[i].features for i in good]).to(torch.float64)
    layers = [m for m in meta_solver.modules() if isinstance(m, nn.Linear)]
    if len(layers) > 1:
        _fit_network(meta_solver, features, T, columns, iterations)
    last = layers[-1]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    with torch.no_grad():
        meta_solver(features)
    hook.remove()
    lam, loo = _fit_last_layer(last, captured[0], T, columns)
    with torch.no_grad():
        fit = meta_solver(features)[:, columns]
    return PretrainReport(solves=len(tasks), failed=failed, fit_rms=float((fit - T).pow(2).mean().sqrt()),
                          target_rms=float(T.pow(2).mean().sqrt()), loo_rms=loo, ridge=lam,
                          seconds=time.perf_counter() - begin)


def _last_layer_view(meta_solver: nn.Module, features: torch.Tensor) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last linear layer, its inputs H, what the model adds to its output, θ) at `features`.

    The offset θ − last(H) is zero for a plain MetaSolver and the anchors' formulas for an
    anchored one, so a closed-form fit of the last layer to `target − offset` is a fit of θ."""
    layers = [m for m in meta_solver.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"a supervised start fits the last nn.Linear layer of the model, and "
                         f"{type(meta_solver).__name__} has none")
    last, captured = layers[-1], {}

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["inputs"], captured["output"] = inputs[0].detach(), output.detach()

    hook = last.register_forward_hook(keep)
    try:
        with torch.no_grad():
            theta = meta_solver(features)
    finally:
        hook.remove()
    return last, captured["inputs"], theta - captured["output"], theta


def pretrain_options(meta_solver: nn.Module, blackbox: Any, tasks: Sequence[Any], search_solves: int = 10,
                     half_width: float = HALF_WIDTH) -> PretrainReport:
    """Fit `meta_solver`'s continuous option outputs to each task's searched best setting.

    Each task's best raw θ for every `Interval`/`LogInterval` part is found by golden-section
    search with `search_solves` solves of the training cost (`option_search`), counted in
    `blackbox.stats.solves`; then the last layer's option rows are fitted in closed form by ridge
    with leave-one-out strength. Only the last layer: the targets are few (16 tasks by default)
    and carry the search's resolution as noise, and fitting hidden layers to them (L-BFGS, as for
    solutions of every training task) would interpolate that noise, which leave-one-out on a
    fixed feature map does not allow. Guess outputs and discrete parts are left as they are.
    """
    begin = time.perf_counter()
    space: Space = blackbox.space
    parts = option_parts(space)
    if not parts:
        raise ValueError(f"options pretraining fits continuous options, but the space {space!r} has no "
                         "Interval or LogInterval part")
    features = torch.stack([t.features for t in tasks]).to(torch.float64)
    last, inputs, offset, start = _last_layer_view(meta_solver, features)
    found = search_tasks(blackbox, tasks, start, parts, search_solves, half_width)
    solves, failed = sum(r.solves for r in found), sum(r.failed for r in found)
    blackbox.stats.solves += solves
    blackbox.stats.failed_queries += failed
    good = [i for i, r in enumerate(found) if r.failed < r.solves]
    if len(good) < len(found):
        names = [getattr(tasks[i], "name", str(i)) for i, r in enumerate(found) if r.failed == r.solves]
        warnings.warn(f"options pretraining: every searched setting failed on {len(names)} task(s) "
                      f"({names[:5]}...): left out of the fit", RuntimeWarning, stacklevel=2)
    if len(good) < 2:
        raise ValueError(f"options pretraining needs at least 2 searched tasks, got {len(good)} of {len(tasks)}")
    columns = torch.tensor([space.slices[name].start for name in parts])
    rows = torch.tensor(good)
    T = torch.tensor([found[i].theta for i in good], dtype=torch.float64)[:, columns]
    lam, loo = _fit_last_layer(last, inputs[rows], T - offset[rows][:, columns], columns)
    with torch.no_grad():
        fit = meta_solver(features[rows])[:, columns]
    return PretrainReport(solves=solves, failed=failed, fit_rms=float((fit - T).pow(2).mean().sqrt()),
                          target_rms=float((T - start[rows][:, columns]).pow(2).mean().sqrt()), loo_rms=loo,
                          ridge=lam, seconds=time.perf_counter() - begin, fitted="options", tasks_fitted=len(good))


def supervised_start(meta_solver: nn.Module, blackbox: Any, tasks: Sequence[Any], *, tasks_used: int = 16,
                     search_solves: int = 10, half_width: float = HALF_WIDTH) -> PretrainReport | None:
    """The supervised start of a run, before training through the solver: initial-guess parts
    regressed on the solver's solutions of every task in `tasks` (`pretrain`), continuous option
    parts on each task's searched best setting over the first `tasks_used` of them (0: all;
    `pretrain_options`, `search_solves` counted solves per task). None when the space has
    neither, or the model has no layer to fit (one shared θ). Discrete parts are left to the
    score function. Follow with `hand_over` and, after training, `keep_better`.

    The search brackets raw θ within ±`half_width` of the model's current prediction; its
    resolution after n solves is 2·half_width·0.618^(n−1) in θ, so `search_solves` is the knob
    when the per-task optimum is sharp (forward SOR's ω: 10 solves pin θ to ±0.05, 16 to ±0.003)."""
    if tasks_used < 0 or search_solves < 1:
        raise ValueError(f"supervised_start needs tasks_used >= 0 and search_solves >= 1, got {tasks_used}, "
                         f"{search_solves}")
    space: Space = blackbox.space
    guesses, options = guess_parts(space), option_parts(space)
    if not (guesses or options) or not any(isinstance(m, nn.Linear) for m in meta_solver.modules()):
        return None
    stages = []
    if guesses:
        stages.append(pretrain(meta_solver, blackbox, tasks))
    if options:
        subset = list(tasks) if tasks_used == 0 else list(tasks)[:tasks_used]
        stages.append(pretrain_options(meta_solver, blackbox, subset, search_solves, half_width))
    if len(stages) == 1:
        return stages[0]
    return PretrainReport(solves=sum(r.solves for r in stages), failed=sum(r.failed for r in stages),
                          fit_rms=max(r.fit_rms for r in stages), target_rms=max(r.target_rms for r in stages),
                          loo_rms=min(r.loo_rms for r in stages), ridge=stages[-1].ridge,
                          seconds=sum(r.seconds for r in stages), fitted="solutions and options", stages=tuple(stages))


def hand_over(optimizer: torch.optim.Optimizer, scheduler: Any, report: PretrainReport, meta_solver: nn.Module) -> float:
    """Cap the learning rate of through-the-solver training at what the regression left open.

    Adam moves every weight by about the learning rate per step whatever the gradient's size, so
    θ = W z + c (z: the last layer's m inputs) moves by ~lr·√m per step — also near an optimum,
    where the gradient is small and noisy. Measured with exact gradients (damped-Jacobi twin,
    Poisson1D, 8 modes): from the projected solutions (58 iterations), 60 steps at Adam 1e-3 went
    back to 374–794 iterations whatever the cost, 1e-4 to 62–113. The regression's leave-one-out
    error says how far off its θ is on unseen tasks, so steps are capped at that size:
    lr ≤ loo_rms/√(m + 1). Training then refines a regression that the features
    determine only roughly and leaves an exact one alone. Returns the learning rate now in use.
    """
    inputs = [m for m in meta_solver.modules() if isinstance(m, nn.Linear)][-1].in_features
    cap = report.loo_rms / math.sqrt(inputs + 1)
    for group in optimizer.param_groups:
        group["lr"] = min(group["lr"], cap)
        group["initial_lr"] = group["lr"]
    if scheduler is not None:
        scheduler.base_lrs = [group["lr"] for group in optimizer.param_groups]
    return float(optimizer.param_groups[0]["lr"])


def keep_better(meta_solver: nn.Module, blackbox: Any, candidates: Mapping[str, dict[str, torch.Tensor]],
                validation: Sequence[Any]) -> dict[str, Any]:
    """Keep whichever weights — the current ("trained") ones or one of `candidates` (e.g. "untrained",
    "pretrained") — have the lowest training cost on `validation` tasks (neither training nor
    evaluation tasks; one solve per task and candidate, counted as evaluation solves).

    Why: training through the solver may not undo the regression (where the Euclidean projection
    is already what the solver needs, a noisy gradient estimate only moves θ away from it), and
    the regression itself may not help every solver: a guess that is close in the 2-norm can still
    cost a smoother iterations (measured: forward SSOR on high-contrast diffusion, +3% against the
    zero guess). The untrained predictor (zero last layer, so θ = 0: the zero guess, the solver's
    own default; for an anchored option, the anchor's formula) is the baseline a user already has;
    a predictor that loses to it on validation tasks is not deployed. Failed solves count first:
    a mean over the solves that worked once made weights whose setting crashed on half the tasks
    look cheapest (a Choice with crashing candidates: deployed, exit 0)."""
    features = torch.stack([t.features for t in validation]).to(torch.float64)
    states = {"trained": {k: v.clone() for k, v in meta_solver.state_dict().items()}, **candidates}
    costs, failed = {}, {}
    with torch.no_grad():
        for name, state in states.items():
            meta_solver.load_state_dict(state)
            values = blackbox.evaluate(meta_solver(features), validation).numpy()
            failed[name] = int((~np.isfinite(values)).sum())
            costs[name] = float(np.nanmean(values)) if failed[name] < len(values) else math.inf
    kept = min(costs, key=lambda name: (failed[name], costs[name], name != "trained"))  # ties keep the trained
    meta_solver.load_state_dict(states[kept])
    return {"costs": costs, "failed": failed, "kept": kept}


__all__ = ["GUESS_KEYS", "PretrainReport", "guess_parts", "hand_over", "keep_better", "option_parts", "pretrain",
           "pretrain_options", "ridge_loo", "solutions", "supervised_start", "targets"]
