"""Analytic test functions with known gradients, and helpers to feed them to estimators."""
from __future__ import annotations

import torch


def quadratic(dim: int, seed: int = 0) -> tuple:
    """f(θ) = ½ θᵀHθ + gᵀθ with a random SPD H: central differences are exact on it."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    h = m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
    g = torch.randn(dim, generator=generator, dtype=torch.float64)

    def f(theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("...i,ij,...j->...", theta, h, theta) + theta @ g

    def grad(theta: torch.Tensor) -> torch.Tensor:
        return theta @ h + g

    return f, grad


def rosenbrock(theta: torch.Tensor) -> torch.Tensor:
    x, y = theta[..., :-1], theta[..., 1:]
    return (100.0 * (y - x**2) ** 2 + (1.0 - x) ** 2).sum(-1)


def rosenbrock_grad(theta: torch.Tensor) -> torch.Tensor:
    leaf = theta.detach().clone().requires_grad_(True)
    rosenbrock(leaf).sum().backward()
    return leaf.grad


def estimate(estimator, f, theta: torch.Tensor, seed: int = 0, tasks=None) -> torch.Tensor:
    """One estimator round on f, the whole lifecycle: plan queries, evaluate f everywhere, combine,
    then learn from the round (`observe`, and its deferred work run here: `settle`)."""
    generator = torch.Generator().manual_seed(seed)
    tasks = tasks if tasks is not None else [None] * theta.shape[0]
    points = estimator.queries(theta, generator, tasks)
    values = torch.cat([f(theta)[:, None], f(points)], dim=1)
    upstream = torch.ones(theta.shape[0], dtype=torch.float64)
    gradient = estimator.gradient(theta, points, values, upstream, tasks)
    estimator.observe(theta, points, values, upstream, tasks)
    estimator.settle()
    return gradient
