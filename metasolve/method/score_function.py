"""Gradients for discrete settings (which solver, which restart) through the black box.

A discrete part is decoded by argmax or rounding, so θ ↦ cost is piecewise constant and no
finite difference sees a slope. Instead the meta-solver's θ parametrises a *policy* p_θ(k) over
the discrete values k (softmax for `Choice`, a discretised logistic for `Integer`, independent
across parts), training minimises the expected cost J(θ) = E_{k~p_θ}[f(k)], and deployment takes
the most probable value. The score-function (REINFORCE) identity

    ∇J = Σ_k f(k) ∇p_θ(k) = E_{k~p_θ}[f(k) ∇ log p_θ(k)]

needs only solves at sampled k. Its variance is large unless a baseline is subtracted. For any
function c(k) that does not depend on the sample used,

    ∇J = ∇ Σ_k p_θ(k) c(k) + E_{k~p_θ}[(f(k) − c(k)) ∇ log p_θ(k)],

because E[c(k) ∇ log p(k)] = Σ_k c(k) ∇p(k) = ∇ Σ_k p(k) c(k) when c is held fixed. Two choices of c:

* leave-one-out: with S samples, c for sample j is the mean cost of the other S − 1 samples of the
  same task. It is independent of sample j, constant over k, so the first term vanishes
  (Σ_k ∇p(k) = 0): unbiased, no model, S ≥ 2 solves per task.
* a cost model ĉ(features, k), trained online on every (task, k, cost) the solver produced — the
  surrogate of NI-GBMS for discrete settings. The first term is then an exact sum over all
  values (cheap: ĉ predicts every k at once), and the sampled correction only carries the
  model's error f − ĉ, so one solve per task suffices once the model is good. The model is
  updated *after* the estimate, so c does not depend on the current samples and the estimate
  stays unbiased for any ĉ.

The cost model is poor exactly when the policy moves most, in the first steps: it has seen
little, and its error r(k) = f(k) − ĉ(k) is then mostly a shift common to every k of a task (a
log cost of ~7 against an untrained prediction of ~0, or a task's size). The sampled correction
carries that shift as a large random push on whichever value was drawn. The centre solve —
the deployed value k* = argmax p_θ, solved at every step anyway — removes it: a second
baseline b = r(k*) enters the correction as

    w_j (r(k_j) − r(k*)) ∇ log p_θ(k_j),    w_j = p_θ(k_j)/q(k_j),

and stays unbiased, because k* and f(k*) are fixed by θ and the task, not by the sample k_j:
E_{k~q}[w b ∇ log p_θ(k)] = b Σ_k ∇p_θ(k) = 0. The correction then only carries the model's error
in *differences* between values, which is what the policy needs (the exact term too depends only
on differences of ĉ). A centre that failed has no cost of its own (its charge below is drawn from
the sample's), so that task's baseline is 0; whether the centre fails does not depend on the
sample either.

The softmax saturates: once p_θ(k) ≈ 1 its gradient Σ_k p(k)(f(k) − f̄)∇ log p(k) vanishes, and a
policy that followed an early, wrong cost model has no way back. `temperature` τ trains the
entropy-regularised objective instead (H of the `Choice` parts' softmaxes; an `Integer`'s
fixed-width logistic only moves and never saturates),

    J_τ(θ) = E_{k~p_θ}[f(k)] − τ H(p_θ),    ∇(−τH) = τ ∇ Σ_k p_θ(k) log p_θ(k)   (exact, no solve),

whose minimiser per task is the Boltzmann policy p ∝ exp(−f/τ): its most probable value is still
argmin f — the deployed choice is unchanged at the optimum — but no probability reaches 1, so
the gradient never vanishes. With log10 costs, τ = 0.2 leaves a value 2× slower (0.3 decades)
e^-1.5 ≈ 22% of the best one's weight. Measured in the replay described at
`surrogate_objective`: with τ = 0, one seed of five deployed a choice that fails on a whole class
of tasks (34.9 s against 26.3–27.4 s for the other four); with τ = 0.2, none did (26.6–29.8 s).

Continuous parts of the same space (e.g. a Choice of solver plus an ω) get the forward gradient
at the deployed (most probable) discrete value: f(k*, θ_c + εv) − f(k*, θ_c) along Rademacher
tangents v on the continuous coordinates only.

A failed solve (CG on a nonsymmetric matrix, a stalled GMRES) is data here, not a gap: it is
charged the worst cost seen for the same task in the same step plus `failure_margin` (one decade
for a log10 cost), so the policy learns to avoid it. When every solve of a task failed (the
deployed choice and the sample both), the batch's worst cost stands in for the task's: dropping
that task would leave a failing deployed choice without any push away from it, and keep the cost
model from ever seeing the failure. Dropping it, as the continuous estimators
do, would make a broken configuration look free. The charge depends on the step's other samples,
a small bias that only ever pushes away from configurations that fail.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metasolve.method.estimator import Deferred, Estimator
from metasolve.method.params import Choice, Space
from metasolve.method.surrogate import Standardize


def _features(tasks: Sequence[Any]) -> torch.Tensor:
    """[B, F] task features (a score function's cost model needs them on every task)."""
    return torch.stack([t.features for t in tasks]).to(torch.float64)


def _offset(costs: torch.Tensor) -> torch.Tensor | float:
    """The mean observed cost, added to the net's output (see `CostModel`)."""
    return costs.mean() if costs.numel() else 0.0


class CostModel:
    """ĉ(features) → predicted cost of every joint discrete value, fitted on a replay buffer.

    An MLP with one output per joint value plus the mean cost in the buffer, trained by least
    squares on the observed (features, k, cost) triples only (the other outputs of a row get no
    loss). The offset is there because the net's output starts near 0 and Adam moves a bias by
    about `lr` per step: reaching a mean log10 work of ~7 would take ~700 steps, most of a short
    run, during which the loss is spent on the offset rather than on the differences between
    values that the policy follows. The offset is a function of the buffer, so it resumes
    exactly, and it changes only when data are added, before the next fit. The buffer keeps
    the most recent `capacity` observations; each estimate adds its solves and takes `steps`
    AdamW steps on minibatches drawn from the buffer with the model's own generator, so a
    resumed run draws the same minibatches. `weight_decay` (decoupled, AdamW) because a family
    of a few dozen training tasks is little data for an MLP: without it the model interpolates
    the timing noise of each task. Measured in the replay of `ScoreFunction.surrogate_objective`:
    0.1 deployed 26.6–29.8 s over five seeds, 0 26.5–84.6 s (one seed's model, fitted to noise,
    sent a whole class of tasks to a configuration that fails on them).
    """

    def __init__(self, feature_dim: int, n_values: int, hidden: int = 32, lr: float = 1e-2, steps: int = 20,
                 batch: int = 64, capacity: int = 4096, seed: int = 0, inputs: torch.Tensor | None = None,
                 weight_decay: float = 0.1) -> None:
        layers: list[nn.Module] = [] if inputs is None else [Standardize(inputs)]
        with torch.random.fork_rng():  # the model's initial weights must not move the caller's RNG
            torch.manual_seed(seed)
            layers += [nn.Linear(feature_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_values)]
        self.net = nn.Sequential(*layers).double()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        self.steps, self.batch, self.capacity = int(steps), int(batch), int(capacity)
        self.generator = torch.Generator().manual_seed(seed)
        self.features = torch.zeros(0, feature_dim, dtype=torch.float64)
        self.indices = torch.zeros(0, dtype=torch.long)
        self.costs = torch.zeros(0, dtype=torch.float64)
        self.last_loss = math.nan

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """[B, n_values] predicted costs."""
        return self.net(features.to(torch.float64)) + _offset(self.costs)

    def _with(self, features: torch.Tensor, indices: torch.Tensor,
              costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffer with these observations added (the newest `capacity`)."""
        return (torch.cat([self.features, features])[-self.capacity:],
                torch.cat([self.indices, indices])[-self.capacity:], torch.cat([self.costs, costs])[-self.capacity:])

    def trained(self, features: torch.Tensor, indices: torch.Tensor, costs: torch.Tensor) -> dict[str, Any]:
        """`steps` AdamW steps on the buffer with these observations added; returns what they changed
        (weights, optimizer, sampler, loss) for `adopt`. The buffer itself is left alone, so that one
        rank can train while every rank adds the observations in `adopt`."""
        features, indices, costs = self._with(features, indices, costs)
        n, offset, loss = costs.shape[0], _offset(costs), self.last_loss
        for _ in range(self.steps if n else 0):
            rows = torch.randint(0, n, (min(self.batch, n),), generator=self.generator)
            with torch.enable_grad():
                predicted = (self.net(features[rows]) + offset).gather(1, indices[rows, None])[:, 0]
                error = torch.mean((predicted - costs[rows]) ** 2)
                self.optimizer.zero_grad()
                error.backward()
                self.optimizer.step()
            loss = float(error.detach())
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "loss": loss}

    def adopt(self, features: torch.Tensor, indices: torch.Tensor, costs: torch.Tensor,
              trained: dict[str, Any]) -> None:
        """Add the observations to the buffer and take `trained(...)`'s result, from any rank."""
        self.features, self.indices, self.costs = self._with(features, indices, costs)
        self.net.load_state_dict(trained["net"])
        self.optimizer.load_state_dict(trained["optimizer"])
        self.generator.set_state(trained["generator"])
        self.last_loss = trained["loss"]

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "features": self.features, "indices": self.indices,
                "costs": self.costs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.features, self.indices, self.costs = state["features"], state["indices"], state["costs"]


class ScoreFunction(Estimator):
    """∇_θ E_{k~p_θ}[f(k)] for the discrete parts of `space` (see the module docstring).

    `samples` policy samples per task (S); `cost_model` turns the baseline into a learned control
    variate (then S = 1 is enough), otherwise S ≥ 2 and the leave-one-out baseline is used;
    `tangents`/`eps` are the forward gradient for the space's continuous parts, if any;
    a failed solve costs the task's worst observed cost plus `failure_margin`. `exploration` = ε
    samples from q = (1 − ε)p + ε/n instead of p and weights each sample by p/q (importance
    sampling, still unbiased): a policy that has grown confident keeps showing the cost model
    every value, where on-policy samples would stop visiting what it dismissed early.
    Measured in the replay of `surrogate_objective` (τ = 0.2, 10 surrogate steps): exploration
    0.3 deployed 26.6–45.7 s over five seeds (one choosing a configuration that fails on a whole
    class of tasks), 0.9 26.6–29.8 s — the cost model is what the policy follows, and it is only
    as good as the values it has seen.
    `temperature` τ adds the entropy term −τH(p_θ) to the objective (module docstring).
    The recipe measured on `benchmarks/discrete.py` (and the config defaults): a cost model,
    exploration 0.9, τ = 0.2, and 10 `Trainer(surrogate_steps=...)` after each step.
    """

    def __init__(self, space: Space, samples: int = 2, cost_model: CostModel | None = None,
                 failure_margin: float = 1.0, exploration: float = 0.0, temperature: float = 0.0, tangents: int = 1,
                 eps: float = 1e-3) -> None:
        self.discrete = space.discrete_parts()
        if not self.discrete:
            raise ValueError(f"ScoreFunction needs a space with a Choice or Integer part, got {space!r}")
        if samples < 1 or (cost_model is None and samples < 2):
            raise ValueError(f"ScoreFunction needs samples >= 2 without a cost model (leave-one-out baseline), "
                             f">= 1 with one; got {samples}")
        if not (math.isfinite(eps) and eps > 0) or tangents < 1:
            raise ValueError(f"ScoreFunction needs tangents >= 1 and a positive finite eps, got {tangents}, {eps}")
        self.space, self.samples, self.cost_model = space, int(samples), cost_model
        if not (math.isfinite(failure_margin) and failure_margin >= 0):
            raise ValueError(f"failure_margin must be finite and >= 0, got {failure_margin}")
        if not 0.0 <= exploration < 1.0:
            raise ValueError(f"exploration must be in [0, 1), got {exploration}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        self.failure_margin, self.tangents, self.eps = float(failure_margin), int(tangents), float(eps)
        self.exploration = float(exploration)
        self.temperature = float(temperature)
        self.sizes = [part.n_values for part in self.discrete.values()]
        self.n_joint = math.prod(self.sizes)
        if cost_model is not None and cost_model.net[-1].out_features != self.n_joint:
            raise ValueError(f"the cost model predicts {cost_model.net[-1].out_features} values, "
                             f"the space has {self.n_joint} joint discrete values")
        mask = torch.ones(space.dim, dtype=torch.bool)
        for name in self.discrete:
            mask[space.slices[name]] = False
        self.continuous = mask
        # Only the continuous parts' differences need the centre's value. A discrete estimate uses
        # it as a baseline only when it solved, so a failed centre — the deployed choice failing —
        # must still move the policy away from it.
        self.uses_centre = bool(mask.any())
        self.pending: dict[str, torch.Tensor] | None = None  # the last estimate's data, not yet in the cost model

    # -- the policy ---------------------------------------------------------------------------
    def log_policy(self, theta: torch.Tensor) -> torch.Tensor:
        """log p_θ(k) over all joint values (mixed radix, first part slowest): [..., n_joint] for θ
        of shape [..., d], differentiable."""
        total = theta.new_zeros(theta.shape[:-1] + (1,))
        for name, part in self.discrete.items():
            log_p = part.log_probs(theta[..., self.space.slices[name]])
            total = (total[..., :, None] + log_p[..., None, :]).flatten(-2)
        return total

    def _joint_index(self, point: torch.Tensor) -> int:
        index = 0
        for (name, part), size in zip(self.discrete.items(), self.sizes):
            raw = point[self.space.slices[name]]
            index = index * size + part.index(part.decode_tensor(raw))
        return index

    def _force(self, theta_row: torch.Tensor, joint: int) -> torch.Tensor:
        point = theta_row.clone()
        digits = []
        for size in reversed(self.sizes):
            joint, digit = divmod(joint, size)
            digits.append(digit)
        for (name, part), digit in zip(self.discrete.items(), reversed(digits)):
            point[self.space.slices[name]] = part.force(digit)
        return point

    # -- the estimate ---------------------------------------------------------------
    def queries(self, theta: torch.Tensor, generator: torch.Generator, tasks: Sequence[Any] | None = None) -> torch.Tensor:
        """S policy samples per task, then (if the space has continuous parts) K forward-difference
        points at the deployed discrete value."""
        rows = []
        drawn = torch.multinomial(self._sampling(self.log_policy(theta.detach())), self.samples, replacement=True,
                                  generator=generator)
        for row, draws in zip(theta, drawn):
            points = [self._force(row, int(k)) for k in draws]
            if self.continuous.any():
                signs = torch.randint(0, 2, (self.tangents, row.shape[0]), generator=generator).to(torch.float64) * 2 - 1
                points += [row + self.eps * torch.where(self.continuous, v, torch.zeros_like(v)) for v in signs]
            rows.append(torch.stack(points))
        return torch.stack(rows)

    def _sampling(self, log_p: torch.Tensor) -> torch.Tensor:
        """q = (1 − ε)p + ε/n: the sampling distribution, never zero on any value."""
        return (1.0 - self.exploration) * torch.exp(log_p) + self.exploration / self.n_joint

    def _charged(self, values: torch.Tensor) -> torch.Tensor:
        """Failed solves charged the row's worst finite cost plus the margin; a row with no finite
        cost (every solve of that task failed) the batch's worst; NaN only if nothing solved."""
        finite = torch.isfinite(values)
        masked = torch.where(finite, values, torch.full_like(values, -math.inf))
        worst = masked.amax(dim=1, keepdim=True)
        worst = torch.where(torch.isfinite(worst), worst, masked.max())
        charge = torch.where(torch.isfinite(worst), worst + self.failure_margin, torch.full_like(worst, math.nan))
        return torch.where(finite, values, charge.expand_as(values))

    def gradient(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                 upstream: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor:
        centre_solved = torch.isfinite(values[:, 0])
        values = self._charged(values)
        sampled = values[:, 1:1 + self.samples]
        joints = torch.tensor([[self._joint_index(p) for p in task_points[:self.samples]] for task_points in points])
        centre_joints = torch.tensor([self._joint_index(row) for row in theta])
        features = _features(tasks) if self.cost_model is not None else None
        predicted = self.cost_model.predict(features).detach() if self.cost_model is not None else None
        usable = torch.isfinite(sampled).all(1)  # NaN even after charging: nothing in the batch solved
        sampled = torch.where(usable[:, None], sampled, torch.zeros_like(sampled))
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            log_p = self.log_policy(leaf)
            sampled_log_p = log_p.gather(1, joints)
            weights = (torch.exp(log_p) / self._sampling(log_p)).gather(1, joints).detach()  # p/q
            if predicted is None:
                others = (sampled.sum(1, keepdim=True) - sampled) / (self.samples - 1)
                per_task = usable * (weights * (sampled - others) * sampled_log_p).mean(1)
            else:
                exact = (torch.exp(log_p) * predicted).sum(1)   # needs no solve: kept for every task
                centre_error = values[:, 0] - predicted.gather(1, centre_joints[:, None])[:, 0]
                baseline = torch.where(centre_solved, centre_error, torch.zeros_like(centre_error))
                residual = sampled - predicted.gather(1, joints) - baseline[:, None]
                per_task = exact + usable * (weights * residual * sampled_log_p).mean(1)
            per_task = per_task - self.temperature * self._choice_entropy(leaf)
            (grad,) = torch.autograd.grad(per_task.sum(), leaf)
        if self.continuous.any():
            grad = grad + torch.stack([self._continuous_gradient(row, points[b, self.samples:], values[b])
                                       for b, row in enumerate(theta)])
        return upstream[:, None] * grad

    # -- what an estimate teaches the cost model (deferred) -------------------------------------
    def observe(self, theta: torch.Tensor, points: torch.Tensor, values: torch.Tensor,
                upstream: torch.Tensor, tasks: Sequence[Any]) -> None:
        if self.cost_model is not None:
            self.pending = {"theta": theta.detach().clone(), "points": points.detach().clone(),
                            "values": values.detach().clone(), "features": _features(tasks)}

    def _observations(self, pending: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, joint value, cost) of every sampled and deployed value the estimate solved; a
        failure enters at its charge, so the cost model learns to avoid it."""
        values = self._charged(pending["values"])
        joints = torch.tensor([[self._joint_index(p) for p in task_points[:self.samples]]
                               for task_points in pending["points"]], dtype=torch.long).reshape(-1)
        centre_joints = torch.tensor([self._joint_index(row) for row in pending["theta"]], dtype=torch.long)
        seen = torch.cat([values[:, 1:1 + self.samples].reshape(-1), values[:, 0]])
        known = torch.isfinite(seen)
        features = pending["features"]
        return (torch.cat([features.repeat_interleave(self.samples, 0), features])[known],
                torch.cat([joints, centre_joints])[known], seen[known])

    def deferred(self) -> Deferred | None:
        """The cost model's fit on the last estimate's solves (any one rank; nothing in the next
        queries depends on it)."""
        if self.cost_model is None or self.pending is None:
            return None
        model, observations = self.cost_model, self._observations(self.pending)
        return Deferred(lambda: model.trained(*observations))

    def adopt(self, result: dict[str, Any]) -> None:
        if self.cost_model is None or self.pending is None:
            raise RuntimeError("ScoreFunction.adopt without an observed estimate to learn from")
        self.cost_model.adopt(*self._observations(self.pending), result)
        self.pending = None

    def surrogate_objective(self, theta: torch.Tensor, tasks: Sequence[Any]) -> torch.Tensor | None:
        """Σ_k p_θ(k) ĉ(task, k) − τH per task, [B]: the objective with the cost model in place of
        the solver, differentiable in θ with ĉ held fixed; None without a cost model.

        It needs no solve, so `metasolve.training.train.Trainer` takes `surrogate_steps` optimizer steps on
        it over every training task after each step through the solver (a model-based step, as
        in Dyna): the policy then follows the cost model on every task, not only on the few
        solved in a step, and the next step's sampled correction measures the model's error
        where the policy moved. Its minimiser per task is p ∝ exp(−ĉ/τ), deployed as argmin ĉ.
        Measured in a replay of `benchmarks/discrete.py`'s sweep as the solver (its 40 training
        tasks, timings with 10% noise, five seeds; deployed on 80 validation tasks kept apart from
        the benchmark's evaluation tasks; best single configuration 37.3 s, per-instance best
        21.5 s): 25 steps through the solver alone deployed 28.7–55.3 s, two seeds of five a
        choice that fails on a whole class of tasks; with 10 surrogate steps after each,
        26.6–29.8 s."""
        if self.cost_model is None:
            return None
        features = _features(tasks)
        expected = (torch.exp(self.log_policy(theta)) * self.cost_model.predict(features).detach()).sum(-1)
        return expected - self.temperature * self._choice_entropy(theta)

    def _choice_entropy(self, theta: torch.Tensor) -> torch.Tensor:
        """H of the `Choice` parts' softmaxes, [B] (the parts are independent, so it is a sum).
        `Integer` parts are left out: their logistic has a fixed width and only moves, so it never
        saturates, and its entropy, cut off at lo and hi, would push the policy away from them."""
        total = theta.new_zeros(theta.shape[:-1])
        for name, part in self.discrete.items():
            if isinstance(part, Choice):
                log_p = part.log_probs(theta[..., self.space.slices[name]])
                total = total - (torch.exp(log_p) * log_p).sum(-1)
        return total

    def _continuous_gradient(self, row: torch.Tensor, points: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(1/K) Σ_j (f(θ + εv_j) − f(θ))/ε · v_j on the continuous coordinates."""
        tangents = (points - row[None, :]) / self.eps
        tangents = torch.where(self.continuous, torch.sign(tangents), torch.zeros_like(tangents))
        derivatives = (values[1 + self.samples:] - values[0]) / self.eps
        return (derivatives[:, None] * tangents).mean(0)

    def metrics(self) -> dict[str, float]:
        return {} if self.cost_model is None else {"cost_model_loss": self.cost_model.last_loss}

    def state_dict(self) -> dict[str, Any]:
        if self.cost_model is None:
            return {}
        return {"cost_model": self.cost_model.state_dict(),
                "pending": None if self.pending is None else {k: v.clone() for k, v in self.pending.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.cost_model is None:
            super().load_state_dict(state)
            return
        self.cost_model.load_state_dict(state["cost_model"])
        self.pending = None if state["pending"] is None else {k: v.clone() for k, v in state["pending"].items()}

    def __repr__(self) -> str:
        model = "cost model" if self.cost_model is not None else "leave-one-out baseline"
        return f"ScoreFunction(samples={self.samples}, {model}, discrete={list(self.discrete)})"


__all__ = ["CostModel", "ScoreFunction"]
