"""Estimators on analytic functions with known gradients (fixed seeds, tolerances from the math)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metasolve import SPSA, ControlVariate, FiniteDifference, ForwardGradient, Surrogate
from metasolve.method.surrogate import ReplayBuffer
from tests.analytic import estimate, quadratic, rosenbrock, rosenbrock_grad


def _repeat(theta: torch.Tensor, samples: int) -> torch.Tensor:
    return theta[None, :].expand(samples, -1).clone()


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_forward_gradient_is_unbiased(distribution):
    dim, samples = 16, 4000
    f, grad = quadratic(dim)
    theta = torch.linspace(-1, 1, dim, dtype=torch.float64)
    estimates = estimate(ForwardGradient(tangents=1, difference="central", distribution=distribution),
                         f, _repeat(theta, samples))
    truth = grad(theta)
    error = (estimates.mean(0) - truth).norm()
    # E‖mean − ∇f‖² = MSE/N with MSE = (d−1)‖∇f‖² (Rademacher) or (d+1)‖∇f‖² (Gaussian) for K = 1;
    # allow 4 root-mean-square errors (Markov: a false alarm has probability ≤ 1/16 for any seed).
    mse = (dim + (1 if distribution == "gaussian" else -1)) * truth.norm() ** 2
    assert error <= 4 * math.sqrt(mse / samples)
    assert error > 0  # it is a random estimate, not the truth in disguise


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian", "orthogonal"])
@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("tangents", [1, 4, 8])
def test_forward_gradient_mse_matches_its_derivation(distribution, dim, tangents):
    """E‖g − ∇f‖² = κ‖∇f‖²: κ = (d − 1)/K Rademacher (vᵀv = d), (d + 1)/K Gaussian
    (E[vvᵀvvᵀ] = (d + 2)I), d/K − 1 orthogonal (Haar columns scaled by √d)."""
    samples = 2000
    f, grad = quadratic(dim, seed=dim)
    theta = torch.ones(dim, dtype=torch.float64)
    estimates = estimate(ForwardGradient(tangents=tangents, difference="central", distribution=distribution),
                         f, _repeat(theta, samples), seed=tangents)
    truth = grad(theta)
    squared_errors = ((estimates - truth) ** 2).sum(1) / truth.norm() ** 2
    expected = {"rademacher": (dim - 1) / tangents, "gaussian": (dim + 1) / tangents,
                "orthogonal": dim / tangents - 1}[distribution]
    # The sample mean of N i.i.d. squared errors is within 5 standard errors with overwhelming probability.
    tolerance = 5 * squared_errors.std() / math.sqrt(samples) + 1e-12
    assert abs(squared_errors.mean() - expected) <= tolerance


def test_projection_is_exact_when_tangents_span_the_space():
    dim = 12
    f, grad = quadratic(dim, seed=3)
    theta = torch.randn(5, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    estimator = ForwardGradient(tangents=dim, difference="central", distribution="gaussian", combine="projection")
    assert torch.allclose(estimate(estimator, f, theta), grad(theta), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("difference, order", [("central", 2), ("forward", 1)])
def test_finite_difference_error_order(difference, order):
    theta = torch.tensor([[-1.2, 1.0, 0.7, 0.3, -0.4, 0.9, 1.1, 0.2]], dtype=torch.float64)
    truth = rosenbrock_grad(theta)
    errors = [(estimate(FiniteDifference(difference=difference, eps=eps), rosenbrock, theta) - truth).norm()
              for eps in (1e-2, 5e-3)]
    # Halving ε divides an O(ε^p) error by 2^p; the next Taylor term moves the ratio by O(ε).
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.1)


class _Exactly(nn.Module):
    """A 'surrogate network' that is exactly the quadratic (features are ignored)."""

    def __init__(self, f, dim):
        super().__init__()
        self.f, self.dim = f, dim

    def forward(self, x):
        return self.f(x[:, -self.dim:])


class _Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        return (x * 0.0).sum(-1) + 0.0 * self.unused


class _Featureless:
    features = None


def test_control_variate_with_perfect_surrogate_is_exact_with_zero_variance():
    dim = 24
    f, grad = quadratic(dim, seed=5)
    theta = _repeat(torch.linspace(-0.5, 0.5, dim, dtype=torch.float64), 50)
    exact_net = _Exactly(f, dim)
    exact_net.dummy = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    estimator = ControlVariate(ForwardGradient(tangents=1, difference="central"), Surrogate(exact_net, steps=0),
                               coefficient=1.0)
    estimates = estimate(estimator, f, theta, tasks=[_Featureless()] * 50)
    assert torch.allclose(estimates, grad(theta), atol=1e-9)
    assert estimates.var(0).max() < 1e-18


def test_control_variate_with_zero_surrogate_is_the_plain_forward_gradient():
    dim = 16
    f, _ = quadratic(dim, seed=6)
    theta = torch.randn(8, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = ForwardGradient(tangents=3, difference="forward", eps=1e-4)
    plain = estimate(base, f, theta, seed=11)
    controlled = estimate(ControlVariate(base, Surrogate(_Zero(), steps=0), coefficient=1.0), f, theta, seed=11,
                          tasks=[_Featureless()] * 8)
    assert torch.equal(plain, controlled)


def test_control_variate_variance_falls_as_surrogate_learns():
    """Online training on the solver's own values and directional derivatives cuts the error."""
    dim = 8
    f, grad = quadratic(dim, seed=7)
    surrogate = Surrogate(Surrogate.mlp(0, dim, hidden=32), lr=1e-2, steps=5)
    estimator = ControlVariate(ForwardGradient(tangents=2, difference="central"), surrogate, coefficient=1.0)
    generator = torch.Generator().manual_seed(0)
    errors = []
    for step in range(300):
        theta = torch.rand(16, dim, generator=generator, dtype=torch.float64) * 2 - 1
        estimates = estimate(estimator, f, theta, seed=step, tasks=[_Featureless()] * 16)
        errors.append(float(((estimates - grad(theta)).norm(dim=1) / grad(theta).norm(dim=1)).mean()))
    # Plain forward gradient relative error here is ≈ √((d−1)/K) ≈ 1.9; a learned surrogate must beat it by 3×.
    assert sum(errors[:10]) / 10 > 1.0
    assert sum(errors[-10:]) / 10 < sum(errors[:10]) / 10 / 3


def test_spsa_is_the_central_rademacher_forward_gradient():
    f, _ = quadratic(10, seed=8)
    theta = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = ForwardGradient(tangents=2, difference="central", distribution="rademacher", eps=1e-3)
    assert torch.equal(estimate(SPSA(tangents=2, eps=1e-3), f, theta), estimate(reference, f, theta))


def test_failed_queries_are_dropped_and_failed_centres_give_zero():
    dim = 6
    f, grad = quadratic(dim, seed=9)
    theta = torch.zeros(3, dim, dtype=torch.float64)
    estimator = ForwardGradient(tangents=dim, difference="central", distribution="gaussian", combine="projection")
    generator = torch.Generator().manual_seed(0)
    points = estimator.queries(theta, generator)
    values = torch.cat([f(theta)[:, None], f(points)], dim=1)
    values[1, 2] = math.nan  # one query of sample 1 failed
    values[2, :] = math.nan  # everything of sample 2 failed
    gradient = estimator.gradient(theta, points, values, torch.ones(3, dtype=torch.float64), [None] * 3)
    assert torch.allclose(gradient[0], grad(theta[0]), atol=1e-8)
    assert torch.all(torch.isfinite(gradient[1])) and gradient[1].norm() > 0
    assert torch.equal(gradient[2], torch.zeros(dim, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tangents=0), "tangents"), (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"),
    (dict(difference="backward"), "difference"), (dict(distribution="uniform"), "distribution"),
    (dict(combine="median"), "combine"),
])
def test_bad_estimator_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForwardGradient(**kwargs)


class _Scaled(nn.Module):
    """f̂ = a·f + uᵀθ: a surrogate whose gradient a∇f + u has a known error."""

    def __init__(self, f, dim, a, u):
        super().__init__()
        self.f, self.dim, self.a, self.u = f, dim, a, u
        self.unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, x):
        theta = x[:, -self.dim:]
        return self.a * self.f(theta) + theta @ self.u + 0.0 * self.unused


def _draw(generator, batch, dim):
    return torch.rand(batch, dim, generator=generator, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("coefficient", ["scalar", "diagonal"])
def test_coefficient_converges_to_the_optimal_control_variate(coefficient):
    """With ∇f̂ = a∇f + u, the optimal β_i = E[∂_i f ∂_i f̂]/E[∂_i f̂²] (population, over θ).

    The estimator sees only directional derivatives; its β must land within 4 of its own
    standard errors of β*, those errors must be small (the test can fail), and β* is far from
    NI-GBMS's 1, so the optimal estimate has a clearly smaller error than β = 1 and β = 0."""
    dim, batch, steps = 8, 64, 60
    f, grad = quadratic(dim, seed=12)
    u = 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    surrogate_grad = lambda theta: 0.25 * grad(theta) + u  # noqa: E731
    population = _draw(torch.Generator().manual_seed(99), 200_000, dim)
    g, gs = grad(population), surrogate_grad(population)
    if coefficient == "scalar":
        optimal = ((g * gs).sum() / (gs * gs).sum()).expand(dim)
    else:
        optimal = (g * gs).sum(0) / (gs * gs).sum(0)
    estimators = {c: ControlVariate(ForwardGradient(tangents=1, difference="central"),
                                    Surrogate(_Scaled(f, dim, 0.25, u), steps=0), coefficient=c, decay=0.9999)
                  for c in (coefficient, 1.0, 0.0)}
    errors = {c: [] for c in estimators}
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        theta = _draw(generator, batch, dim)
        for c, estimator in estimators.items():
            h = estimate(estimator, f, theta, seed=step, tasks=[_Featureless()] * batch)
            errors[c].append(float(((h - grad(theta)) ** 2).sum(1).mean()))
    sums = estimators[coefficient].coefficient.moments[coefficient]
    beta = sums["c"] / sums["s"]
    standard_error = (sums["cc"] - 2 * beta * sums["cs"] + beta**2 * sums["ss"]).sqrt() / sums["s"]
    beta = beta.expand(dim)
    assert torch.all((beta - optimal).abs() <= 4 * standard_error)
    assert torch.all(standard_error < 0.25 * optimal.abs())
    assert optimal.min() > 2.0
    late = {c: sum(e[steps // 2:]) for c, e in errors.items()}
    assert late[coefficient] < 0.8 * min(late[1.0], late[0.0])


def test_coefficient_falls_to_zero_for_a_useless_surrogate():
    """A surrogate gradient unrelated to ∇f: β* = 0, the shrinkage keeps β ≈ 0, and the estimate
    is no worse than the plain forward gradient (NI-GBMS's β = 1 is much worse)."""
    dim, batch = 8, 64
    f, grad = quadratic(dim, seed=13)
    f_other, _ = quadratic(dim, seed=14)
    useless = _Scaled(lambda t: torch.sin(3 * t).sum(-1) * 4.0, dim, 1.0, torch.zeros(dim, dtype=torch.float64))
    estimators = {c: ControlVariate(ForwardGradient(tangents=1, difference="central"), Surrogate(useless, steps=0),
                                    coefficient=c) for c in ("scalar", 1.0, 0.0)}
    errors = {c: 0.0 for c in estimators}
    generator = torch.Generator().manual_seed(2)
    for step in range(40):
        theta = _draw(generator, batch, dim) * 3
        for c, estimator in estimators.items():
            h = estimate(estimator, f, theta, seed=step, tasks=[_Featureless()] * batch)
            errors[c] += float(((h - grad(theta)) ** 2).sum())
    assert errors["scalar"] <= 1.05 * errors[0.0]
    assert errors[1.0] > 1.5 * errors[0.0]


def _guided_moments(dim, guide, recent, alpha):
    """Σ = αI + (1 − α)(d/k)UUᵀ for U spanning [guide, recent]."""
    basis = torch.linalg.qr(torch.stack([guide] + recent, dim=1)).Q
    k = basis.shape[1]
    return alpha * torch.eye(dim, dtype=torch.float64) + (1 - alpha) * dim / k * basis @ basis.T


def test_guided_tangents_are_unbiased_with_the_covariance_correction():
    """Tangents v ~ N(0, Σ) concentrated on ∇f̂ and the last estimate, dual w = Σ⁻¹v.

    Mean of N estimates within 4 root-mean-square errors of ∇f, with the RMS from the derived
    variance (eᵀΣe)·tr Σ⁻¹ + ‖e‖² (Gaussian, K = 1, e = ∇f since β = 0); the empirical MSE
    matches that formula, and without the correction (w = v) the mean is off by far more."""
    dim, samples, alpha = 10, 6000, 0.3
    f, grad = quadratic(dim, seed=15)
    guide_net = _Scaled(lambda t: t.sum(-1) * 0.0, dim, 1.0,
                        torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    base = ForwardGradient(tangents=1, difference="central", distribution="guided", alpha=alpha, memory=1)
    base.recent = [torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)]
    sigma = _guided_moments(dim, guide_net.u, base.recent, alpha)
    estimator = ControlVariate(base, Surrogate(guide_net, steps=0), coefficient=0.0)
    theta = _repeat(torch.linspace(-1, 1, dim, dtype=torch.float64), samples)
    generator = torch.Generator().manual_seed(8)
    tasks = [_Featureless()] * samples
    points = estimator.queries(theta, generator, tasks)
    tangents = (points[:, 0] - theta) / base.eps
    assert torch.allclose(tangents.T @ tangents / samples, sigma, atol=8 * sigma.diagonal().max() / math.sqrt(samples))
    values = torch.cat([f(theta)[:, None], f(points)], dim=1)
    h = estimator.gradient(theta, points, values, torch.ones(samples, dtype=torch.float64), tasks)
    truth = grad(theta[0])
    mse = float(truth @ sigma @ truth * torch.linalg.inv(sigma).trace() + truth @ truth)
    assert (h.mean(0) - truth).norm() <= 4 * math.sqrt(mse / samples)
    squared = ((h - truth) ** 2).sum(1)
    assert abs(float(squared.mean()) - mse) <= 5 * float(squared.std()) / math.sqrt(samples)
    uncorrected = (tangents * ((values[:, 1] - values[:, 2]) / (2 * base.eps))[:, None]).mean(0)
    assert (uncorrected - truth).norm() > 10 * math.sqrt(mse / samples)


def test_replay_buffer_and_estimator_state_round_trip():
    """Checkpoint mid-run, restore into fresh objects: the continuation is bitwise identical."""
    dim, batch = 6, 8
    f, _ = quadratic(dim, seed=16)

    def build():
        torch.manual_seed(0)
        surrogate = Surrogate(Surrogate.mlp(0, dim, hidden=8), lr=1e-2, steps=3, buffer=20, batch_size=12)
        return ControlVariate(ForwardGradient(tangents=2, distribution="guided", memory=2), surrogate,
                              coefficient="diagonal", allocation="variance")

    def step(estimator, i):
        theta = _draw(torch.Generator().manual_seed(100 + i), batch, dim)
        tasks = [type("T", (), {"features": None, "name": f"t{j % 3}"})() for j in range(batch)]
        return estimate(estimator, f, theta, seed=i, tasks=tasks)

    first = build()
    for i in range(5):
        step(first, i)
    state = copy.deepcopy(first.state_dict())
    assert len(first.surrogate.replay) == 20 and state["surrogate"]["replay"]["data"]["theta"].shape == (20, dim)
    resumed = build()
    resumed.load_state_dict(state)
    for i in range(5, 9):
        assert torch.equal(step(first, i), step(resumed, i))
    for a, b in zip(first.surrogate.net.parameters(), resumed.surrogate.net.parameters()):
        assert torch.equal(a, b)


def test_replay_buffer_keeps_the_newest_and_pads_tangents():
    buffer = ReplayBuffer(5)
    for k, n in ((1, 3), (3, 4)):
        buffer.add({"features": torch.zeros(n, 0), "theta": torch.arange(n, dtype=torch.float64)[:, None] + 10 * k,
                    "values": torch.zeros(n), "tangents": torch.ones(n, k, 1), "derivatives": torch.ones(n, k)})
    assert len(buffer) == 5
    assert buffer.data["theta"][:, 0].tolist() == [12.0, 30.0, 31.0, 32.0, 33.0]
    assert torch.isnan(buffer.data["derivatives"][0, 1:]).all() and torch.isfinite(buffer.data["derivatives"][1:]).all()


def test_query_allocation_follows_the_residual_and_stays_unbiased():
    """Tasks whose past residual is 16× larger get ~4× the tangents (K_b ∝ ‖e_b‖); the total is
    B·K, every task keeps at least one, unasked slots are NaN points; the mean is unbiased."""
    dim = 6
    f, grad = quadratic(dim, seed=17)
    estimator = ControlVariate(ForwardGradient(tangents=2, difference="central"), Surrogate(_Zero(), steps=0),
                               coefficient=0.0, allocation="variance")
    big, small = type("T", (), {"features": None, "name": "big"})(), type("T", (), {"features": None, "name": "small"})()
    estimator.allocation.task_residuals = {"big": 16.0, "small": 1.0}
    tasks = [big, small, small, small, small]
    counts = estimator.allocation.counts(tasks)
    assert int(counts.sum()) == 2 * len(tasks) and counts.min() >= 1
    assert counts[0] == 4 and counts[1:].tolist() == [2, 1, 2, 1] or counts[0] >= 3 * counts[1:].float().mean()
    points = estimator.queries(torch.zeros(5, dim, dtype=torch.float64), torch.Generator().manual_seed(0), tasks)
    asked = torch.isfinite(points[:, :8]).all(2).sum(1)
    assert asked.tolist() == counts.tolist()
    samples = 3000
    theta = _repeat(torch.linspace(-1, 1, dim, dtype=torch.float64), samples)
    many = [big if i % 5 == 0 else small for i in range(samples)]
    estimator.allocation.task_residuals = {"big": 16.0, "small": 1.0}
    h = estimate(estimator, f, theta, seed=3, tasks=many)
    truth = grad(theta[0])
    # Worst case per sample (1 tangent, Rademacher): (d − 1)‖∇f‖²; the mean of N is within 4 RMS.
    assert (h.mean(0) - truth).norm() <= 4 * math.sqrt((dim - 1) * truth.norm() ** 2 / samples)


def test_log_affine_surrogate_is_exact_for_a_jacobi_log_residual():
    """k Jacobi sweeps map r₀ = b − Ax₀ linearly: log10‖M(b − Ax₀)‖/‖b‖ with M = (I − D⁻¹A)^k is
    `LogAffineResidual` with U = M, L = MA (features b, θ = x₀) — the claim its docstring makes."""
    n, k = 9, 7
    A = 2 * torch.eye(n, dtype=torch.float64) - torch.diag(torch.ones(n - 1, dtype=torch.float64), 1) \
        - torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    M = torch.linalg.matrix_power(torch.eye(n, dtype=torch.float64) - A / 2, k)
    net = Surrogate.log_affine(n, n)
    with torch.no_grad():
        net.U.copy_(M)
        net.L.copy_(M @ A)
    generator = torch.Generator().manual_seed(0)
    b, x0 = (torch.randn(5, n, generator=generator, dtype=torch.float64) for _ in range(2))
    r = b - x0 @ A.T
    for _ in range(k):
        r = r - r @ A.T / 2
    truth = torch.log10(r.norm(dim=1) / b.norm(dim=1))
    assert torch.allclose(net(torch.cat([b, x0], 1)), truth, atol=1e-12)
