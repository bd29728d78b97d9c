"""Estimators on analytic functions with known gradients (fixed seeds, tolerances from the math)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metasolve import SPSA, ControlVariate, FiniteDifference, ForwardGradient, Surrogate
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


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("tangents", [1, 4, 16])
def test_forward_gradient_mse_scales_like_d_plus_1_over_k(dim, tangents):
    samples = 2000
    f, grad = quadratic(dim, seed=dim)
    theta = torch.ones(dim, dtype=torch.float64)
    estimates = estimate(ForwardGradient(tangents=tangents, difference="central", distribution="gaussian"),
                         f, _repeat(theta, samples), seed=tangents)
    truth = grad(theta)
    squared_errors = ((estimates - truth) ** 2).sum(1) / truth.norm() ** 2
    expected = (dim + 1) / tangents  # exact for Gaussian tangents: E[(vᵀa)² vvᵀ] = ‖a‖²I + 2aaᵀ
    # The sample mean of N i.i.d. squared errors is within 5 standard errors with overwhelming probability.
    tolerance = 5 * squared_errors.std() / math.sqrt(samples)
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
    estimator = ControlVariate(ForwardGradient(tangents=1, difference="central"), Surrogate(exact_net, steps=0))
    estimates = estimate(estimator, f, theta, tasks=[_Featureless()] * 50)
    assert torch.allclose(estimates, grad(theta), atol=1e-9)
    assert estimates.var(0).max() < 1e-18


def test_control_variate_with_zero_surrogate_is_the_plain_forward_gradient():
    dim = 16
    f, _ = quadratic(dim, seed=6)
    theta = torch.randn(8, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = ForwardGradient(tangents=3, difference="forward", eps=1e-4)
    plain = estimate(base, f, theta, seed=11)
    controlled = estimate(ControlVariate(base, Surrogate(_Zero(), steps=0)), f, theta, seed=11,
                          tasks=[_Featureless()] * 8)
    assert torch.equal(plain, controlled)


def test_control_variate_variance_falls_as_surrogate_learns():
    """Online training on the solver's own values and directional derivatives cuts the error."""
    dim = 8
    f, grad = quadratic(dim, seed=7)
    surrogate = Surrogate(Surrogate.mlp(0, dim, hidden=32), lr=1e-2, steps=5)
    estimator = ControlVariate(ForwardGradient(tangents=2, difference="central"), surrogate)
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
