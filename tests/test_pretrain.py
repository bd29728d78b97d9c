"""Pretraining on solutions: ridge with leave-one-out strength, and the known map of Poisson1D."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metasolve import BlackBox, ForwardGradient, MetaSolver, Space, Vector
from metasolve.cost import ResidualArea
from metasolve.pretrain import pretrain, ridge_loo
from problems import Poisson1D
from solvers import KSPOracle


def test_ridge_loo_recovers_an_exact_linear_map_and_shrinks_pure_noise():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((40, 6))
    W = rng.standard_normal((6, 3))
    fitted, intercept, lam, loo = ridge_loo(Z, Z @ W + 2.5)
    assert np.allclose(fitted, W, atol=1e-8) and np.allclose(intercept, 2.5, atol=1e-8) and loo < 1e-8
    # Targets independent of the features: leave-one-out picks the strongest ridge, i.e. ~the mean.
    noise = rng.standard_normal((40, 3))
    fitted, intercept, lam, loo = ridge_loo(Z, noise)
    assert np.abs(fitted).max() < 0.05 and np.allclose(intercept, noise.mean(0), atol=0.05)


def _box(space: Space) -> BlackBox:
    exact = KSPOracle(ksp_type="preonly", pc_type="lu")
    return BlackBox(exact, space, ResidualArea(1e-6), ForwardGradient())


def test_pretrain_recovers_poisson1d_known_map():
    """Features are b's sine coefficients β_k, the solution's are β_k/λ_k, λ_k = 4 sin²(kπ/(2(n+1))):
    regression on 40 exact solutions must find θ_k = β_k/λ_k for unseen tasks."""
    family = Poisson1D(31, difficult_fraction=1.0)
    space = Space({"x0": Vector(31, basis="sine", modes=4, scale=0.5)})
    meta = MetaSolver(family.feature_dim, space, depth=0)
    train = family.train_tasks(40)
    meta.fit_normalizer(train)
    box = _box(space)
    report = pretrain(meta, box, train)
    assert report.solves == 40 and report.failed == 0 and box.stats.solves == 40
    unseen = family.eval_tasks(5)
    with torch.no_grad():
        theta = meta(torch.stack([t.features for t in unseen]))
    k = torch.arange(1, 5, dtype=torch.float64)
    eigenvalues = 4 * torch.sin(k * torch.pi / 64) ** 2
    expected = torch.stack([t.features[:4] for t in unseen]) / eigenvalues / 0.5
    assert torch.allclose(theta, expected, rtol=1e-7, atol=1e-7)


def test_pretrain_fits_an_mlp_and_leaves_other_outputs_alone():
    from metasolve import Interval

    family = Poisson1D(31, difficult_fraction=1.0)
    space = Space({"pc_sor_omega": Interval(1.0, 2.0), "x0": Vector(31, basis="sine", modes=2)})
    torch.manual_seed(0)
    meta = MetaSolver(family.feature_dim, space, hidden=8, depth=1)
    train = family.train_tasks(48)
    meta.fit_normalizer(train)
    features = torch.stack([t.features for t in train])
    report = pretrain(meta, _box(space), train, iterations=40)
    with torch.no_grad():
        theta = meta(features)
    assert report.fit_rms < 0.05 * report.target_rms, report.describe()  # a tanh layer fitting a linear map
    assert torch.all(theta[:, 0].abs() < 1e-3)  # the ω output stays at its untrained 0


def test_pretrain_refuses_a_space_without_a_guess():
    from metasolve import Interval

    space = Space({"pc_sor_omega": Interval(1.0, 2.0)})
    meta = MetaSolver(31, space, depth=0)
    with pytest.raises(ValueError, match="no Vector part named x0"):
        pretrain(meta, _box(space), Poisson1D(31).train_tasks(4))


def test_hand_over_caps_the_learning_rate_at_the_regressions_leave_one_out_error():
    from metasolve.pretrain import PretrainReport, hand_over

    space = Space({"x0": Vector(31, basis="sine", modes=4)})
    meta = MetaSolver(15, space, depth=0)
    optimizer = torch.optim.Adam(meta.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    report = PretrainReport(solves=8, failed=0, fit_rms=0.0, target_rms=1.0, loo_rms=4e-4, ridge=0.0, seconds=0.0)
    assert hand_over(optimizer, scheduler, report, meta) == pytest.approx(1e-4)  # 4e-4/√(15 + 1)
    assert scheduler.base_lrs == [pytest.approx(1e-4)]
    loose = PretrainReport(solves=8, failed=0, fit_rms=0.0, target_rms=1.0, loo_rms=1.0, ridge=0.0, seconds=0.0)
    assert hand_over(optimizer, scheduler, loose, meta) == pytest.approx(1e-4)  # never raised


def test_keep_better_restores_the_best_of_untrained_pretrained_and_trained_weights():
    """Training that moved the guess off the projection loses to the pretrained weights; a guess that
    is worse than none at all loses to the untrained predictor (θ = 0, the zero guess)."""
    from metasolve.pretrain import keep_better

    family = Poisson1D(31, difficult_fraction=1.0)
    space = Space({"x0": Vector(31, basis="sine", modes=4)})
    meta = MetaSolver(family.feature_dim, space, depth=0)
    train = family.train_tasks(24)
    meta.fit_normalizer(train)
    untrained = {k: v.clone() for k, v in meta.state_dict().items()}
    pretrain(meta, _box(space), train)
    pretrained = {k: v.clone() for k, v in meta.state_dict().items()}
    candidates = {"untrained": untrained, "pretrained": pretrained}
    jacobi = BlackBox(KSPOracle(ksp_type="richardson", pc_type="jacobi", options={"ksp_richardson_scale": 0.9}),
                      space, ResidualArea(1e-6, max_it=5000), ForwardGradient())
    with torch.no_grad():
        meta.net[0].bias.add_(0.1)  # "training" that moved the guess off the projection
    validation = family.tasks(range(24, 28))
    kept = keep_better(meta, jacobi, candidates, validation)
    costs = kept["costs"]
    assert kept["kept"] == "pretrained" and costs["trained"] > costs["pretrained"] < costs["untrained"]
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in pretrained.items())
    assert jacobi.stats.evaluation_solves == 12  # 3 candidates x 4 tasks
    with torch.no_grad():
        for parameter in meta.net.parameters():
            parameter.mul_(-1.0)  # x0 = -(the projection of x*): an error twice the zero guess's
    kept = keep_better(meta, jacobi, {"untrained": untrained}, validation)
    assert kept["kept"] == "untrained" and kept["costs"]["trained"] > kept["costs"]["untrained"]
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in untrained.items())
