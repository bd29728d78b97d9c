"""Nonlinear diffusion −∇·((1 + μu²)∇u) = f: discretisation order, exact Jacobian, and real PETSc
Newton solves on the DMDA."""
from __future__ import annotations

import numpy as np
import pytest

from problems import make_family
from solvers.dmda_snes import embed_interior as embed
from problems.nonlinear_diffusion import (NonlinearDiffusion, NonlinearDiffusionOracle, forcing, jacobian,
                                          residual)


def truncation_error(m: int, mu: float = 3.0, c: float = 0.8) -> float:
    """max |F(u*) − h²f*| / h² over the interior for u* = c·sin(πx)sin(πy) and its exact forcing
    f* = −∇·(κ(u*)∇u*) = 2π²κ(u*)u* − 2μu*|∇u*|²: the local error of the unscaled scheme."""
    x = np.linspace(0.0, 1.0, m)
    X, Y = np.meshgrid(x, x)
    u = c * np.sin(np.pi * X) * np.sin(np.pi * Y)
    gradient2 = (c * np.pi) ** 2 * (np.cos(np.pi * X) ** 2 * np.sin(np.pi * Y) ** 2
                                    + np.sin(np.pi * X) ** 2 * np.cos(np.pi * Y) ** 2)
    f = (1.0 + mu * u * u) * 2.0 * np.pi ** 2 * u - 2.0 * mu * u * gradient2
    h2 = 1.0 / (m - 1) ** 2
    return float(np.abs(residual(u, mu, 0.0)[1:-1, 1:-1] - h2 * f[1:-1, 1:-1]).max() / h2)


def test_the_residual_vanishes_at_a_manufactured_solution_to_second_order():
    """Centred fluxes with face-averaged κ are second order: halving h quarters the local error
    (up to the O(h⁴) next term, ~π²h² relative: under 1% at h = 1/32)."""
    coarse, fine = truncation_error(33), truncation_error(65)
    assert fine < 0.1
    assert 3.9 < coarse / fine < 4.1


def test_the_jacobian_equals_a_difference_quotient_of_the_residual():
    rng = np.random.default_rng(0)
    mu, amplitude = 7.0, 30.0
    u = embed(rng.uniform(0, 1, 7 * 7), 9)
    v = embed(rng.standard_normal(7 * 7), 9)
    step = 1e-6
    difference = (residual(u + step * v, mu, amplitude) - residual(u - step * v, mu, amplitude)).ravel() / (2 * step)
    exact = jacobian(u, mu) @ v.ravel()
    # F is a cubic in u, so the central quotient's truncation is step²/6·F'''[v,v,v] (~1e-10 here);
    # its rounding is ~ε·|terms of F|/step, the terms being at most 4·max κ·max|u| plus the forcing.
    terms = 4 * (1 + mu) * 1.0 * np.abs(u + step * v).max() + np.abs(forcing(9, amplitude)).max()
    bound = step ** 2 / 6 * 8 * 2 * mu * np.abs(v).max() ** 3 + 16 * np.finfo(float).eps * terms / step
    assert np.abs(difference - exact).max() <= bound
    J = jacobian(u, mu).toarray()
    assert J[0, 0] == 4.0 and np.count_nonzero(J[0]) == 1  # a boundary row is 4u
    assert not np.allclose(J, J.T)  # the κ′ terms: GMRES, not CG, inside Newton
    # At μ = 0 the operator is Bratu's λ = 0 Laplacian.
    np.testing.assert_array_equal(jacobian(u, 0.0).diagonal()[10], 4.0)


def test_newton_converges_from_zero_and_an_exact_guess_needs_no_step():
    task = NonlinearDiffusion(n=17, mu_range=(10.0, 10.0), amplitude_range=(100.0, 100.0)).task(0)
    assert task.reference_norm == pytest.approx(np.linalg.norm(residual(np.zeros((17, 17)), 10.0, 100.0)), rel=1e-15)
    oracle = NonlinearDiffusionOracle(rtol=1e-10)
    zero = oracle(task)
    assert zero.converged and zero.iterations >= 6  # harder than Bratu's ~5 from zero
    assert zero.residuals[0] == pytest.approx(task.reference_norm, rel=1e-12)
    u = embed(zero.solution, task.n)
    assert np.linalg.norm(residual(u, task.mu, task.amplitude)) <= 1e-10 * task.reference_norm
    assert u.min() >= 0.0 and u.max() > 0.5
    again = oracle(task, {"u0": zero.solution})
    assert again.converged and again.iterations == 0


def test_grid_sequencing_and_newton_krylov_reach_the_same_solution():
    task = NonlinearDiffusion(n=33, mu_range=(10.0, 10.0), amplitude_range=(100.0, 100.0)).task(0)
    oracle = NonlinearDiffusionOracle(rtol=1e-10)
    direct = oracle(task)
    sequenced = oracle.solve(task, {"snes_grid_sequence": 2})
    assert sequenced.outcome.converged and len(sequenced.level_iterations) == 3
    assert sequenced.level_iterations[-1] < direct.iterations
    np.testing.assert_allclose(sequenced.outcome.solution, direct.solution, atol=1e-9)
    krylov = oracle(task, {"ksp_type": "gmres", "pc_type": "gamg", "ksp_rtol": 1e-10})
    assert krylov.converged
    np.testing.assert_allclose(krylov.solution, direct.solution, atol=1e-9)


def test_features_are_legendre_products_and_tasks_are_deterministic():
    family = make_family("nonlinear_diffusion", n=9, seed=2, degree=3)
    assert family.feature_dim == 9 and len(family.feature_names) == 9
    task = family.task(4)
    assert task.features.dtype.is_floating_point and task.features.shape == (9,)
    assert np.all(np.abs(task.features.numpy()) <= 1.0)
    assert task.parameters == make_family("nonlinear_diffusion", n=9, seed=2).task(4).parameters
    lo = family.features(family.mu_range[0], family.amplitude_range[0]).numpy()
    np.testing.assert_allclose(lo, [(-1.0) ** (i + j) for i, j in family.exponents])
    assert task.grid_shape == (7, 7) and task.size == 49


@pytest.mark.parametrize("params, name", [({"mu_range": (-1.0, 2.0)}, "mu_range"),
                                          ({"amplitude_range": (-5.0, 5.0)}, "amplitude_range"),
                                          ({"mu_range": (3.0, 1.0)}, "mu_range"),
                                          ({"n": 4}, "n"), ({"degree": 0}, "degree")])
def test_bad_parameters_are_refused_by_name(params, name):
    with pytest.raises(ValueError, match=name):
        NonlinearDiffusion(**params)


def test_the_shipped_config_trains_a_guess_through_the_family_route(tmp_path):
    """examples/scale_nonlinear_diffusion.toml, shrunk, through the same `run` as `metasolve train`
    (`solver.kind = "family"`, a sine-mode `u0`): the learned guess beats the zero guess on unseen tasks."""
    from pathlib import Path

    from metasolve.app.config import load_config, override
    from metasolve.app.run import run

    config = override(load_config(Path(__file__).resolve().parents[1] / "examples" / "scale_nonlinear_diffusion.toml"),
                      {"problem.params.n": 33, "problem.train_tasks": 8, "problem.eval_tasks": 2, "train.steps": 1,
                       "train.batch_size": 2, "train.eval_every": 0, "train.patience": 0})
    result = run(config, tmp_path / "out", quiet=True)
    rows = {row["method"]: row for row in result.summary}
    assert rows["learned"]["failed"] == 0
    assert rows["learned"]["median_iterations"] < rows["zero guess"]["median_iterations"]
