"""The online surrogate f̂(features, θ) behind the NI-GBMS control variate."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metasolve.method.exact_sum import Allreduce, fixed_point_sum, local_allreduce
from metasolve.method.protocols import Executor


class Standardize(nn.Module):
    """(z − mean)/scale with statistics fixed from a sample of inputs: raw features and θ can differ
    in scale by orders of magnitude, and an unscaled tanh MLP then barely learns (measured: held-out
    gradient cosine ≈ 0 after 4,000 estimates on Poisson1D without it, 0.96 with it). A constant
    column (e.g. θ before training) keeps scale 1."""

    def __init__(self, sample: torch.Tensor) -> None:
        super().__init__()
        sample = sample.to(torch.float64)
        spread = sample.std(0) if sample.shape[0] > 1 else torch.zeros(sample.shape[1], dtype=torch.float64)
        self.register_buffer("mean", sample.mean(0))
        self.register_buffer("scale", torch.where(spread > 0, spread, torch.ones_like(spread)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.scale


class LogAffineResidual(nn.Module):
    """f̂ = log10‖U z − L θ‖ − log10‖z‖ + c on inputs [z, θ]: the shape of `LogResidual(k)` for a
    predicted initial guess under a *linear* iteration.

    Why: k steps of a stationary method (Jacobi, SOR/SSOR, Richardson, fixed-coefficient
    Chebyshev) map the initial residual linearly, r_k = M(b − A x0), and x0 = Sθ is linear in θ.
    With features linear in b (e.g. its sine coefficients), M b = U z and M A S = L for one
    matrix A, so log10(‖r_k‖/‖b‖) is exactly of this form (with ‖b‖ ∝ ‖z‖ for orthogonal feature
    maps). An MLP has to learn the logarithm of a norm of an affine map from samples; this model
    only has to learn U and L (`latent` rows each, ≥ the rank of M for exactness). It is not
    exact for Krylov methods (CG's polynomial depends on x0), nor across tasks whose matrices
    differ; there the optimal coefficient of the control variate falls towards 0.
    """

    def __init__(self, feature_dim: int, theta_dim: int, latent: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.feature_dim = feature_dim
        self.U = nn.Parameter(torch.randn(latent, feature_dim, generator=generator, dtype=torch.float64)
                              / math.sqrt(feature_dim))
        self.L = nn.Parameter(torch.randn(latent, theta_dim, generator=generator, dtype=torch.float64)
                              / math.sqrt(theta_dim))
        self.offset = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        z, theta = inputs[..., :self.feature_dim], inputs[..., self.feature_dim:]
        residual = z @ self.U.T - theta @ self.L.T
        tiny = 1e-300
        return (0.5 * torch.log10((residual**2).sum(-1) + tiny) - 0.5 * torch.log10((z**2).sum(-1) + tiny)
                + self.offset)


class ReplayBuffer:
    """The last `capacity` samples the solver produced: features, θ, value, tangents, derivatives.

    A ring of tensors; samples with fewer tangents than the widest stored are padded with NaN
    derivatives (left out of the loss). Held in the state dict, so a resumed run replays exactly
    what an uninterrupted one would.
    """

    FIELDS = ("features", "theta", "values", "tangents", "derivatives")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.data: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else int(self.data["values"].shape[0])

    @staticmethod
    def pad(sample: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """`sample` with its tangents padded to k (zero tangents, NaN derivatives)."""
        tangents, derivatives = sample["tangents"], sample["derivatives"]
        missing = k - tangents.shape[1]
        if missing <= 0:
            return sample
        return {**sample,
                "tangents": torch.cat([tangents, tangents.new_zeros((tangents.shape[0], missing, tangents.shape[2]))], 1),
                "derivatives": torch.cat([derivatives, derivatives.new_full((derivatives.shape[0], missing),
                                                                            float("nan"))], 1)}

    @classmethod
    def concat(cls, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = max(first["tangents"].shape[1], second["tangents"].shape[1])
        first, second = cls.pad(first, k), cls.pad(second, k)
        return {key: torch.cat([first[key], second[key]], 0) for key in cls.FIELDS}

    def add(self, sample: dict[str, torch.Tensor]) -> None:
        sample = {k: sample[k].detach().to(torch.float64).clone() for k in self.FIELDS}
        merged = sample if self.data is None else self.concat(self.data, sample)
        self.data = {key: value[-self.capacity:] for key, value in merged.items()}

    def sample(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.data is None:
            raise ValueError("the replay buffer is empty")
        index = torch.randperm(len(self), generator=generator)[:size]
        return {key: value[index] for key, value in self.data.items()}

    def state_dict(self) -> dict:
        return {"capacity": self.capacity,
                "data": None if self.data is None else {k: v.clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.data = None if state["data"] is None else {k: v.clone() for k, v in state["data"].items()}


class Surrogate:
    """A differentiable model of the black-box cost, trained online on data the solver produced.

    `net` maps `cat([features, θ], -1)` of shape [B, F + d] to [B, 1] (or [B]). One reverse pass
    gives ∇_θ f̂, and every directional derivative ∂_v f̂ = ∇_θ f̂·v follows exactly from it, so
    K tangents cost one backward pass instead of K forward-mode passes.
    Loss per sample: value_weight·(f − f̂)² + jvp_weight·Σ_j (∂_{v_j} f − ∂_{v_j} f̂)², failed
    (NaN) entries left out.

    `buffer = 0` (NI-GBMS): `steps` optimizer steps on the current batch only. `buffer = N`: the
    batch joins a replay buffer of the last N samples and each of the `steps` steps uses the
    current batch plus a random draw from the buffer, `batch_size` samples in all: the solver's
    past values and directional derivatives are reused instead of seen once. Cost: `steps` small
    forward/backward passes of the surrogate per estimate and no solves; `last_metrics` reports
    the seconds they took.

    Under MPI every rank holds the same surrogate and draws the same minibatches, so by default
    every rank repeats the whole update (and the gradient at every task of the batch).
    `chunk_rows = m > 0` splits the update: a step's minibatch is cut into ⌈rows/m⌉ chunks of m
    rows, `executor` rank r computes the loss gradient of chunks r, r + P, …, and the chunk
    gradients are summed across ranks in fixed point (`metasolve.method.exact_sum`), so the step
    is the same to the bit on any number of ranks — and different from the unsplit step only in
    rounding. The split update is collective, so its estimator runs it on every rank before the
    next queries (`metasolve.method.estimator.Deferred`). Each rank then does 1/P
    of the per-row work but still pays each pass's fixed overhead (measured: on 2 ranks, a
    128-row minibatch in 64-row chunks is no faster), and one rank alone does ⌈rows/m⌉ smaller
    passes instead of one; so the split is for large jobs, with m the minibatch over the rank
    count. Without it, the update runs on one rank while the others solve (`trained`, `adopt`).
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, value_weight: float = 1.0,
                 jvp_weight: float = 1.0, steps: int = 1, buffer: int = 0, batch_size: int = 64,
                 seed: int = 0, chunk_rows: int = 0, executor: Executor | None = None) -> None:
        if steps < 0 or value_weight < 0 or jvp_weight < 0 or not lr > 0:
            raise ValueError("Surrogate needs lr > 0 and non-negative steps and weights")
        if buffer < 0 or batch_size < 1:
            raise ValueError(f"Surrogate needs buffer >= 0 and batch_size >= 1, got {buffer}, {batch_size}")
        if chunk_rows < 0:
            raise ValueError(f"Surrogate needs chunk_rows >= 0 (0: no split), got {chunk_rows}")
        self.net = net.double()
        self.value_weight, self.jvp_weight, self.steps = float(value_weight), float(jvp_weight), int(steps)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.replay = ReplayBuffer(buffer) if buffer else None
        self.batch_size, self.chunk_rows = int(batch_size), int(chunk_rows)
        self.rank, self.size = (0, 1) if executor is None else (executor.rank, executor.size)
        self.allreduce: Allreduce = local_allreduce if executor is None else executor.allreduce
        self.generator = torch.Generator().manual_seed(seed)
        self.last_loss = float("nan")
        self.last_metrics: dict[str, float] = {}

    @staticmethod
    def mlp(feature_dim: int, theta_dim: int, hidden: int = 64, depth: int = 2,
            inputs: torch.Tensor | None = None) -> nn.Module:
        """A small tanh MLP on [features, θ]: smooth, so its gradient is a useful control variate.

        `inputs`, a sample [N, feature_dim + theta_dim] of what the surrogate will see (e.g. the
        training tasks' features next to typical θ), puts a `Standardize` layer in front.
        """
        layers: list[nn.Module] = [] if inputs is None else [Standardize(inputs)]
        width = feature_dim + theta_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers).double()

    @staticmethod
    def log_affine(feature_dim: int, theta_dim: int, latent: int | None = None, seed: int = 0) -> nn.Module:
        """`LogAffineResidual`: the exact shape of `LogResidual(k)` for an initial guess under a linear
        iteration on one matrix; `latent` defaults to max(feature_dim, theta_dim)."""
        return LogAffineResidual(feature_dim, theta_dim, latent or max(feature_dim, theta_dim), seed=seed)

    @staticmethod
    def features_of(tasks: Sequence[Any]) -> torch.Tensor:
        """[B, F] task features; tasks whose `features` is None contribute an empty row."""
        rows = [t.features if t.features is not None else torch.zeros(0, dtype=torch.float64) for t in tasks]
        return torch.stack(rows).reshape(len(rows), -1).to(torch.float64)

    def value(self, features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, theta], dim=-1)).reshape(-1)

    def _value_and_gradient(self, features: torch.Tensor, theta: torch.Tensor,
                            create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = theta.detach().requires_grad_(True)
        value = self.value(features, leaf)
        (gradient,) = torch.autograd.grad(value.sum(), leaf, create_graph=create_graph)
        return value, gradient

    def gradient(self, features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Exact ∇_θ f̂ at each row, [B, d] (rows are independent, so one backward serves all).
        With `chunk_rows`, in the same fixed chunks as the split update, so its bits are the same
        whichever ranks the update is split over; local (no communication: every rank computes all
        chunks, a few µs per row)."""
        with torch.enable_grad():
            if not self.chunk_rows:
                return self._value_and_gradient(features, theta, create_graph=False)[1].detach()
            chunks = [self._value_and_gradient(features[start:start + self.chunk_rows],
                                               theta[start:start + self.chunk_rows], create_graph=False)[1].detach()
                      for start in range(0, theta.shape[0], self.chunk_rows)]
        return torch.cat(chunks) if chunks else theta.new_zeros(theta.shape, dtype=torch.float64)

    def update(self, features: torch.Tensor, theta: torch.Tensor, values: torch.Tensor,
               tangents: torch.Tensor, derivatives: torch.Tensor) -> None:
        """`steps` optimizer steps on what the solver already produced (no extra solves), here and
        now: `trained` then `adopt` on this rank (an estimator defers the two, see `ControlVariate`)."""
        current = self.batch_of(features, theta, values, tangents, derivatives)
        self.adopt(current, self.trained(current))

    @staticmethod
    def batch_of(features: torch.Tensor, theta: torch.Tensor, values: torch.Tensor, tangents: torch.Tensor,
                 derivatives: torch.Tensor) -> dict[str, torch.Tensor]:
        """One estimate's data as the update takes it (float64, detached)."""
        current = dict(zip(ReplayBuffer.FIELDS, (features, theta, values, tangents, derivatives)))
        return {k: v.detach().to(torch.float64) for k, v in current.items()}

    def trained(self, current: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run the `steps` optimizer steps on `current` (plus replay draws) and return what they
        changed — weights, optimizer moments, the replay sampler — for `adopt`. Split in two so
        that one rank can train while the others solve, and all ranks adopt its result."""
        begin = time.perf_counter()
        previous = len(self.replay) if self.replay is not None else 0
        for _ in range(self.steps):
            extra = min(self.batch_size - current["theta"].shape[0], previous)
            batch = current if extra <= 0 else ReplayBuffer.concat(current, self.replay.sample(extra, self.generator))
            loss = self._step(batch)
            if loss is None:
                break
            self.last_loss = loss
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "loss": self.last_loss, "seconds": time.perf_counter() - begin}

    def adopt(self, current: dict[str, torch.Tensor], trained: dict[str, Any]) -> None:
        """Take the result of `trained(current)`, computed here or on another rank, and add
        `current` to the replay buffer."""
        self.net.load_state_dict(trained["net"])
        self.optimizer.load_state_dict(trained["optimizer"])
        self.generator.set_state(trained["generator"])
        self.last_loss = trained["loss"]
        if self.replay is not None:
            self.replay.add(current)
        self.last_metrics = {"loss": self.last_loss, "update_seconds": trained["seconds"]}

    def _step(self, batch: dict[str, torch.Tensor]) -> float | None:
        known = int(torch.isfinite(batch["values"]).sum())
        if not known:
            return None
        with torch.enable_grad():
            if not self.chunk_rows:
                loss = self._error(batch) / known
                self.optimizer.zero_grad()
                loss.backward()
            else:
                loss = self._split_gradient(batch, known)
        self.optimizer.step()
        return float(loss.detach())

    def _split_gradient(self, batch: dict[str, torch.Tensor], known: int) -> torch.Tensor:
        """This rank's chunks' loss and gradient, summed over all ranks' chunks (fixed point), set as
        the parameters' .grad; returns the whole minibatch's loss."""
        params = list(self.net.parameters())
        rows = batch["theta"].shape[0]
        n_chunks = -(-rows // self.chunk_rows)
        pieces = []
        for chunk in range(self.rank, n_chunks, self.size):
            part = {k: v[chunk * self.chunk_rows:(chunk + 1) * self.chunk_rows] for k, v in batch.items()}
            loss = self._error(part) / known
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            pieces.append(torch.cat([loss.detach().reshape(1)] + [torch.zeros_like(p).reshape(-1) if g is None
                                                                  else g.reshape(-1) for p, g in zip(params, grads)]))
        total = fixed_point_sum(pieces, n_chunks, 1 + sum(p.numel() for p in params), self.allreduce)
        offset = 1
        for p in params:
            p.grad = total[offset:offset + p.numel()].reshape(p.shape).to(p.dtype)
            offset += p.numel()
        return total[0]

    def _error(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """value_weight·Σ(f − f̂)² + jvp_weight·Σ(∂_v f − ∂_v f̂)² over the known entries of `batch`."""
        values, derivatives = batch["values"], batch["derivatives"]
        value_known = torch.isfinite(values)
        derivative_known = torch.isfinite(derivatives) & value_known[:, None]
        target_values = torch.where(value_known, values, torch.zeros_like(values))
        target_derivatives = torch.where(derivative_known, derivatives, torch.zeros_like(derivatives))
        predicted, gradient = self._value_and_gradient(batch["features"], batch["theta"], create_graph=True)
        predicted_derivatives = torch.einsum("bd,bkd->bk", gradient, torch.nan_to_num(batch["tangents"]))
        value_error = ((predicted - target_values) ** 2)[value_known].sum()
        derivative_error = ((predicted_derivatives - target_derivatives) ** 2)[derivative_known].sum()
        return self.value_weight * value_error + self.jvp_weight * derivative_error

    def state_dict(self) -> dict:
        """Network, optimizer, replay buffer and the buffer's sampler: an exact resume point."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "replay": None if self.replay is None else self.replay.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["replay"] is None) != (self.replay is None):
            raise ValueError("surrogate state and surrogate disagree on having a replay buffer")
        if self.replay is not None:
            self.replay.load_state_dict(state["replay"])
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        buffer = self.replay.capacity if self.replay is not None else 0
        return (f"Surrogate(value_weight={self.value_weight}, jvp_weight={self.jvp_weight}, steps={self.steps}, "
                f"buffer={buffer}, batch_size={self.batch_size}, chunk_rows={self.chunk_rows})")
