"""Pretraining on solutions: ridge with leave-one-out strength, and the known map of Poisson1D."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metasolve import BlackBox, ForwardGradient, MetaSolver, Space, Vector
from metasolve.method.cost import ResidualArea
from metasolve.training.pretrain import pretrain, ridge_loo
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
    from metasolve.training.pretrain import PretrainReport, hand_over

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
    from metasolve.training.pretrain import keep_better

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


@pytest.mark.parametrize("evaluations", [2, 5, 10, 20])
@pytest.mark.parametrize("minimiser", [-3.1, 0.37, 2.9])
def test_golden_section_brackets_the_minimum_to_the_golden_ratio_power(evaluations, minimiser):
    """n evaluations leave a bracket of (hi − lo)·0.618^(n − 1) around the minimiser of a unimodal
    function, and the best point seen lies in it (a kink makes the minimum non-smooth on purpose)."""
    from metasolve.training.option_search import GOLDEN, golden_section

    calls = []

    def f(x: float) -> float:
        calls.append(x)
        return (x - minimiser) ** 2 + 0.5 * abs(x - minimiser)

    best, value, seen = golden_section(f, -4.0, 4.0, evaluations)
    assert len(calls) == len(seen) == evaluations
    assert abs(best - minimiser) <= 8.0 * GOLDEN ** (evaluations - 1)
    assert value == f(best) == min(v for _, v in seen)


def test_golden_section_and_budget_refuse_what_they_cannot_do():
    from metasolve.training.option_search import budget_split, golden_section

    with pytest.raises(ValueError, match="at least 2 evaluations"):
        golden_section(abs, -1.0, 1.0, 1)
    with pytest.raises(ValueError, match="lo < hi"):
        golden_section(abs, 1.0, 1.0, 4)
    assert budget_split(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="at least 2 solves per searched part"):
        budget_split(5, 3)


def _forward_sor_family():
    from problems import Diffusion
    from problems.family import with_features

    # Grids 8-20: the best forward-SOR ω moves from task to task (about 1.45-1.8).
    return with_features(Diffusion(n_range=(8, 20), contrast_range=(0.2, 2.5), seed=3), "operator")


def _forward_sor_box(space: Space, executor=None) -> BlackBox:
    from metasolve.method.cost import IterationProxy

    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", options={"pc_sor_forward": None})
    return BlackBox(oracle, space, IterationProxy(1e-6, max_it=400), ForwardGradient(), executor=executor)


def test_supervised_start_for_options_lowers_the_held_out_cost_on_real_forward_sor():
    """Per-task golden-section search (10 counted solves each on 12 tasks), ridge on the operator
    features: the pretrained ω beats the untrained model's mid-interval ω = 1.5 on unseen tasks,
    and every search solve is counted in the training budget."""
    from metasolve import Interval
    from metasolve.training.pretrain import supervised_start

    family = _forward_sor_family()
    train, unseen = family.train_tasks(20), family.eval_tasks(8)
    space = Space({"pc_sor_omega": Interval(1.0, 2.0)})
    torch.manual_seed(0)
    meta = MetaSolver(family.feature_dim, space, hidden=16, depth=1)
    meta.fit_normalizer(train)
    box = _forward_sor_box(space)
    features = torch.stack([t.features for t in unseen])
    with torch.no_grad():
        untrained = box.evaluate(meta(features), unseen)
    report = supervised_start(meta, box, train, tasks_used=12, search_solves=10)
    assert report is not None and report.fitted == "options" and report.tasks_fitted == 12
    assert report.solves == box.stats.solves == 12 * 10 and report.failed == 0
    with torch.no_grad():
        pretrained = box.evaluate(meta(features), unseen)
    assert float(pretrained.mean()) < float(untrained.mean()), (pretrained, untrained, report.describe())
    assert report.loo_rms < report.target_rms, report.describe()  # the features explain part of the optima


def test_supervised_start_on_an_anchored_model_fits_the_correction_to_the_formula():
    """With Young's ω* as anchor the search is centred on the formula and the regression fits only
    what the formula gets wrong: the fitted ω is the searched optimum, not the offset's double."""
    from metasolve import Interval
    from metasolve.training.pretrain import supervised_start
    from solvers.features import OPERATOR_FEATURE_NAMES

    family = _forward_sor_family()
    train = family.train_tasks(12)
    space = Space({"pc_sor_omega": Interval(1.0, 2.0)})
    star = OPERATOR_FEATURE_NAMES.index("sor_omega_star")
    meta = MetaSolver(family.feature_dim, space, depth=0, anchor={"pc_sor_omega": star})
    meta.fit_normalizer(train)
    box = _forward_sor_box(space)
    report = supervised_start(meta, box, train, tasks_used=0, search_solves=8)
    assert report.tasks_fitted == 12 and box.stats.solves == 96
    assert report.fit_rms <= report.target_rms  # the fit is at least as close to the optima as the formula


def test_supervised_start_does_guesses_and_options_and_counts_every_solve():
    from metasolve import Choice, Interval
    from metasolve.training.pretrain import supervised_start

    family = Poisson1D(31, difficult_fraction=1.0)
    space = Space({"x0": Vector(31, basis="sine", modes=4), "pc_sor_omega": Interval(1.0, 2.0)})
    meta = MetaSolver(family.feature_dim, space, depth=0)
    train = family.train_tasks(10)
    meta.fit_normalizer(train)
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", options={"pc_sor_forward": None})
    box = BlackBox(oracle, space, ResidualArea(1e-6, max_it=2000), ForwardGradient())
    report = supervised_start(meta, box, train, tasks_used=4, search_solves=6)
    assert [stage.fitted for stage in report.stages] == ["solutions", "options"]
    assert report.solves == box.stats.solves == 10 + 4 * 6
    assert report.loo_rms == min(stage.loo_rms for stage in report.stages)
    assert "options pretrained on the searched best settings of 4 tasks" in report.describe()
    only_choice = Space({"ksp_type": Choice(["cg", "gmres"])})
    assert supervised_start(MetaSolver(3, only_choice), _box(only_choice), train) is None


def supervised_start_weights(executor=None) -> tuple[torch.Tensor, int]:
    """The weights an options' supervised start fits on 6 forward-SOR tasks, and the solves counted
    (shared with tests/mpi_scripts/supervised_start.py)."""
    from metasolve import Interval
    from metasolve.training.pretrain import supervised_start

    family = _forward_sor_family()
    train = family.train_tasks(6)
    space = Space({"pc_sor_omega": Interval(1.0, 2.0)})
    torch.manual_seed(0)
    meta = MetaSolver(family.feature_dim, space, hidden=8, depth=1)
    meta.fit_normalizer(train)
    box = _forward_sor_box(space, executor)
    supervised_start(meta, box, train, tasks_used=0, search_solves=6)
    return torch.nn.utils.parameters_to_vector(meta.parameters()).detach(), box.stats.solves


def test_supervised_start_under_mpi_gives_every_rank_the_serial_weights():
    import json
    from pathlib import Path

    from tests.mpi_run import run_mpi

    serial, solves = supervised_start_weights()
    result = run_mpi(Path(__file__).parent / "mpi_scripts" / "supervised_start.py", n=2, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (ranks,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert [r["rank"] for r in ranks] == [0, 1]
    expected = [float(w).hex() for w in serial]
    for rank in ranks:
        assert rank["solves"] == solves == 36
        assert rank["weights"] == expected
