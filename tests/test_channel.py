"""Channel flow, wall laws, and wall-model calibration through the SNES oracle (real PETSc)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from metasolve import Space, Surrogate, Vector
from metasolve.method.calibration import LinearisedResponse, LogError, RelativeError, SharedParameters
from metasolve.app.config import load_config
from metasolve.app.experiment import build_experiment
from metasolve.training.parallel import SerialExecutor
from problems import make_family
from problems.channel import HIDDEN, ChannelFamily
from problems.channel_dns import LAW_NOISE, FrictionLaw, dns_case, dns_profiles
from problems.channel_flow import Grid, wall_resolved, wall_resolved_reference
from problems.channel_task import RESPONSE_SOLVES, WALL_MODEL_KEY, ChannelTask, wall_modelled_oracle
from problems.wall_laws import LearnedWallModel, LogLaw, Reichardt, Spalding

RE_Y = np.logspace(-3, 9, 400)
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "wall_model.toml"


@pytest.mark.parametrize("law", [LogLaw(), Spalding()], ids=["log law", "Spalding"])
def test_wall_law_inversions_satisfy_their_laws(law):
    u_plus = law.u_plus(RE_Y)
    # the inversion is solved to round-off: u⁺·y⁺(u⁺) reproduces Re_y to 1e-10 relative
    np.testing.assert_allclose(u_plus * law.y_plus_of_u_plus(u_plus), RE_Y, rtol=1e-10)
    np.testing.assert_allclose(law.y_plus(RE_Y) * u_plus, RE_Y, rtol=1e-12)
    assert law.u_plus(RE_Y.reshape(20, 20)).shape == (20, 20)


def test_reichardt_inversion_satisfies_its_law_and_its_limits():
    reichardt = Reichardt()
    y_plus = reichardt.y_plus(RE_Y)
    np.testing.assert_allclose(reichardt.u_plus_of_y_plus(y_plus) * y_plus, RE_Y, rtol=1e-12)
    # at the wall u⁺ = y⁺ + O(y⁺²) (the bracket's slope at 0 is 1/κ·κ + 7.8(1/11 − 1/11) = 1): y⁺ = √Re_y
    assert float(reichardt.y_plus(np.array(1e-8))) == pytest.approx(1e-4, rel=1e-4)


def test_spalding_inversion_has_the_viscous_and_log_limits():
    # y⁺ = u⁺ in the viscous sublayer (Spalding's correction is O(u⁺⁴)): u⁺ = √Re_y
    np.testing.assert_allclose(Spalding().u_plus(np.array([1e-4])), 1e-2, rtol=1e-9)
    # deep in the log layer Spalding's law is the log law with its own κ = 0.4, B = 5.5; at
    # Re_y = 1e9 (u⁺ ≈ 37) its polynomial terms still shift u⁺ by ln(1 + 2.5e-4)/0.4 ≈ 6e-4
    u_plus = float(Spalding().u_plus(np.array(1e9)))
    assert u_plus == pytest.approx(math.log(1e9 / u_plus) / 0.4 + 5.5, abs=1e-3)


def test_wall_law_inputs_are_checked():
    with pytest.raises(ValueError, match="Re_y"):
        Spalding().u_plus(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="θ has"):
        LearnedWallModel(hidden=4).y_plus(np.array([100.0]), 0.05, np.zeros(3))


def test_learned_model_starts_exactly_at_spalding_and_agrees_across_numpy_and_torch():
    model = LearnedWallModel(hidden=6, seed=3)
    theta0 = model.initial_parameters()
    assert theta0.shape == (model.n_params,) == (7,) and np.all(theta0 == 0)
    np.testing.assert_array_equal(model.y_plus(RE_Y, 0.05, theta0, 1.3), Spalding().y_plus(RE_Y))
    np.testing.assert_array_equal(model.y_plus(RE_Y, 0.05, None), Spalding().y_plus(RE_Y))
    theta = theta0 + np.random.default_rng(0).normal(scale=0.3, size=theta0.shape)
    x = model.inputs(RE_Y[:5], np.full(5, 0.05), np.full(5, 1.2))
    batched = model.correction(torch.tensor(np.tile(theta, (5, 1))), torch.tensor(x))
    np.testing.assert_allclose(batched.numpy(), model.correction(theta, x), rtol=1e-13)


def test_wall_resolved_solver_matches_dns_friction_within_the_closures_accuracy():
    """Nikuradse's mixing length with van Driest damping is a 1950s closure; it gives u_τ within
    about 2.5% of DNS at Re_τ 180–2000 (measured here: −0.6%, −2.2%, −2.1%), so 3% is the
    tolerance. A sign or factor error in the discretisation would miss by far more."""
    for dns in dns_profiles():
        profile = wall_resolved(re_b=dns.re_b)
        assert profile.re_tau == pytest.approx(dns.re_tau, rel=0.03), dns.name
        assert 2 * profile.y_plus[0] < 1.0  # the first cell lies inside y⁺ < 1
        assert profile.re_b == pytest.approx(dns.re_b, rel=1e-10)  # the flow-rate constraint holds


def test_wall_resolved_solution_is_grid_converged():
    coarse, fine = wall_resolved(re_b=20121, cells=256), wall_resolved(re_b=20121, cells=512)
    # doubling the 256-cell reference grid moves u_τ by 5e-5 (measured): the reference error is
    # far below the errors the wall models are judged by
    assert fine.re_tau == pytest.approx(coarse.re_tau, rel=1e-4)


def test_pressure_and_flow_rate_driving_agree():
    flow = wall_resolved(re_b=12000, cells=128)
    pressure = wall_resolved(re_tau=flow.re_tau, cells=128)
    # the two grids differ slightly (the first cell is sized from Dean's Re_τ estimate in one case
    # and from the given Re_τ in the other), which moves Re_b by ~1e-7; a wrong constraint or
    # scaling would miss by orders of magnitude more
    assert pressure.re_b == pytest.approx(12000, rel=1e-6)


def test_wall_models_on_coarse_grids_have_the_expected_errors():
    low = ChannelTask(re_b=5855, grid_name="u24")  # first cell at y⁺ ≈ 4: the log law's worst case
    mid = ChannelTask(re_b=20121, grid_name="u12")
    log_error = low.log_error(wall_modelled_oracle(LogLaw())(low, {}))
    spalding_errors = [t.log_error(wall_modelled_oracle(Spalding())(t, {})) for t in (low, mid)]
    assert log_error < -0.15  # measured −21%: the log law applied in the viscous sublayer
    assert all(0 < e < 0.04 for e in spalding_errors)  # measured +0.4% and +2.4% against the RANS


def test_dns_target_cost_on_a_known_value():
    """A task whose target is Spalding's own Re_τ times e^0.01 costs exactly 0.01² (the coarse
    solve is deterministic to round-off), and its evaluation error is |e^−0.01 − 1|."""
    dns = dns_case(550)
    spalding = wall_modelled_oracle(Spalding())
    own = ChannelTask(dns.re_b, "u16", dns.re_tau).log_error(spalding(ChannelTask(dns.re_b, "u16", dns.re_tau), {}))
    re_tau = dns.re_tau * math.exp(own)  # Spalding's Re_τ on 16 cells at this Re_b
    shifted = ChannelTask(dns.re_b, "u16", re_tau * math.exp(0.01), "shifted")
    outcome = spalding(shifted, {})
    assert LogError()(outcome, shifted) == pytest.approx(1e-4, rel=1e-8)
    assert RelativeError()(outcome, shifted) == pytest.approx(-math.expm1(-0.01), rel=1e-8)
    assert own == pytest.approx(0.00346, abs=2e-4)  # measured +0.35% against DNS at Re_τ 547 on 16 cells


def test_friction_law_fitted_to_two_dns_cases_predicts_the_third():
    """U_b⁺ = ln(Re_τ)/κ + C through two DNS cases passes through both exactly and predicts
    the third case's Re_b within 0.6% (measured 0.25–0.53%): the law behind the training target."""
    cases = {p.nominal: p for p in dns_profiles()}
    for held_out in cases:
        law = FrictionLaw.fit([p for n, p in cases.items() if n != held_out])
        assert 0.38 < law.kappa < 0.41
        for n, p in cases.items():
            tolerance = 0.006 if n == held_out else 1e-10
            assert law.re_b(p.re_tau) == pytest.approx(p.re_b, rel=tolerance)
            assert law.re_b(law.re_tau(p.re_b)) == pytest.approx(p.re_b, rel=1e-10)
    with pytest.raises(ValueError, match="at least one"):
        FrictionLaw.fit([])


def test_friction_law_uncertainty_is_the_noise_at_its_cases_and_grows_beyond_them():
    """Least squares through two points: the predictive variance of U_b⁺ at either point is
    noise²·(1/2 + (Δ/2)²/(Δ²/2)) = noise², so ln Re_τ there is known to noise/(U_b⁺ + 1/κ);
    away from the points the variance grows quadratically in ln Re_τ. One case: κ is the prior's
    and the law passes through the case."""
    low, high = dns_case(550), dns_case(2000)
    law = FrictionLaw.fit([low, high])
    for case in (low, high):
        expected = LAW_NOISE / (law.bulk_u_plus(case.re_tau) + 1 / law.kappa)
        assert law.re_tau_sd(case.re_b) == pytest.approx(expected, rel=1e-6)
    between, below = law.re_tau_sd(math.sqrt(low.re_b * high.re_b)), law.re_tau_sd(dns_case(180).re_b)
    assert between < law.re_tau_sd(low.re_b) < below
    single = FrictionLaw.fit([low], kappa_prior=(0.4, 0.01))
    assert single.kappa == 0.4 and single.re_b(low.re_tau) == pytest.approx(low.re_b, rel=1e-12)
    assert single.re_tau_sd(high.re_b) > single.re_tau_sd(low.re_b)


def test_learned_model_at_zero_correction_reproduces_spalding_through_the_solver():
    task = ChannelTask(re_b=20121, grid_name="s16")
    model = LearnedWallModel()
    learned = wall_modelled_oracle(model)(task, {WALL_MODEL_KEY: model.initial_parameters()})
    spalding = wall_modelled_oracle(Spalding())(task, {})
    assert task.log_error(learned) == pytest.approx(task.log_error(spalding), abs=1e-12)


def test_wall_model_setting_is_checked():
    task = ChannelTask(re_b=20121, grid_name="u12")
    with pytest.raises(ValueError, match="no parameters"):
        wall_modelled_oracle(Spalding())(task, {WALL_MODEL_KEY: np.zeros(3)})
    with pytest.raises(ValueError, match="parameters, got shape"):
        wall_modelled_oracle(LearnedWallModel())(task, {WALL_MODEL_KEY: np.zeros(3)})


def test_failed_solve_costs_nan_in_training():
    task = ChannelTask(re_b=20121, grid_name="u12")
    outcome = wall_modelled_oracle(Spalding())(task, {"snes_max_it": 1})
    assert outcome.failed and math.isnan(LogError()(outcome, task))
    assert math.isnan(RelativeError()(outcome, task)) and RelativeError().failure_value(task) == 1.0


def test_grids_and_family_reject_bad_input():
    with pytest.raises(ValueError, match="increase"):
        Grid(np.array([0.0, 0.6, 0.5, 1.0]))
    with pytest.raises(ValueError, match="grid name"):
        Grid.named("x16")
    assert Grid.named("u8").growth == pytest.approx(1.0) and Grid.named("s16").widths[0] == pytest.approx(1 / 32)
    with pytest.raises(ValueError, match="no DNS case"):
        ChannelFamily(train_dns=(550, 999))
    with pytest.raises(ValueError, match="target"):
        make_family("channel", target="les")
    with pytest.raises(ValueError, match="hidden"):
        ChannelFamily(hidden=[4, 0])
    with pytest.raises(ValueError, match="ridge"):
        ChannelFamily(ridge=-1.0)
    with pytest.raises(ValueError, match="no measured response"):
        ChannelTask(re_b=20121, grid_name="u12").features
    with pytest.raises(ValueError, match="problem.train_tasks = 70"):
        ChannelFamily().train_tasks(64)


def test_shared_parameters_broadcast_one_theta_and_accumulate_its_gradient(tmp_path):
    space = Space({"k": Vector(3, basis="identity")})
    shared = SharedParameters(space, np.array([1.0, -2.0, 0.5]))
    theta = shared(torch.zeros(4, 7, dtype=torch.float64))
    assert theta.shape == (4, 3) and torch.equal(theta[2], torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    (theta * weights).sum().backward()
    # one θ used by every row: its gradient is the sum of the rows' gradients
    assert torch.equal(shared.theta.grad, weights.sum(0))
    shared.save(tmp_path / "theta.pt")
    assert torch.equal(SharedParameters.load(tmp_path / "theta.pt").theta, shared.theta)
    np.testing.assert_array_equal(shared.predict()["k"], [1.0, -2.0, 0.5])
    with pytest.raises(ValueError, match="3 finite initial values"):
        SharedParameters(space, np.zeros(2))


def test_toml_builds_the_wall_model_experiment():
    config = load_config(CONFIG)
    experiment = build_experiment(config, SerialExecutor())
    assert isinstance(experiment.family, ChannelFamily) and isinstance(experiment.meta_solver, SharedParameters)
    assert len(experiment.train_tasks) == 70 and len(experiment.eval_tasks) == 5
    assert {t.source for t in experiment.train_tasks} == {"DNS Re550", "DNS Re2000", "friction law"}
    assert {t.source for t in experiment.eval_tasks} == {"DNS Re180"}  # the held-out case never trains
    family = experiment.family
    assert experiment.blackbox.space.dim == family.wall_model.n_params == family.calibration.model.hidden + 1
    assert family.calibration.model.hidden in HIDDEN and set(family.calibration.held_out_thetas) == {"Re550", "Re2000"}
    assert isinstance(experiment.blackbox.estimator.surrogate.net, LinearisedResponse)
    # training starts from the cross-validated fit; building measured each of the 75 tasks' responses once
    np.testing.assert_array_equal(experiment.meta_solver.theta.detach().numpy(), family.calibration.theta)
    assert family.response_solves == RESPONSE_SOLVES * (70 + 5)
    # the fit follows its own targets where the unseen case lies, on every grid: at Re_tau 180 the
    # friction law's Re_tau (fitted to 550 and 2000, below its cases) is reproduced to half the fit's
    # floor; 16 features missed it by 0.3% on s16 (the misses of benchmarks/results/wall_model.md)
    from problems.channel_calibration import FIT_FLOOR, linearised_log_re_tau
    law_targets = [t.retargeted(family.law.re_tau(t.re_b), "friction law") for t in experiment.eval_tasks]
    predicted = linearised_log_re_tau(family.calibration.model, family.calibration.theta, law_targets)
    assert np.max(np.abs(predicted - np.log([t.target for t in law_targets]))) < FIT_FLOOR / 2


def test_linearised_surrogate_gradient_matches_the_solver_at_spalding():
    """At θ₀ the surrogate's gradient is the first-order response of the real solves by
    construction; against a central-difference gradient through SNES (ε = 1e-5, truncation
    ~1e-10) it agrees to within the linearisation step's own O(SENSITIVITY_STEP) error."""
    family = ChannelFamily(train_dns=(550, 2000), synthetic=2, grids=("u8", "s16"), hidden=3)
    tasks = family.train_tasks(8)[::3]
    model = family.wall_model
    theta0 = torch.tensor(model.initial_parameters())
    features = torch.stack([t.features for t in tasks])
    surrogate = Surrogate(LinearisedResponse(*family.linearised_correction()), steps=0)
    predicted = surrogate.gradient(features, theta0.expand(len(tasks), -1)).sum(0)
    oracle, eps = family.oracle(), 1e-5
    reference = torch.zeros_like(theta0)
    for task in tasks:
        points = [theta0 + eps * e for e in torch.eye(len(theta0), dtype=torch.float64)]
        points += [theta0 - eps * e for e in torch.eye(len(theta0), dtype=torch.float64)]
        values = [LogError()(o, task) for o in oracle.solve_many(task, [{WALL_MODEL_KEY: p.numpy()} for p in points])]
        half = len(theta0)
        reference += torch.tensor([(values[i] - values[half + i]) / (2 * eps) for i in range(half)])
    assert float(torch.nn.functional.cosine_similarity(predicted, reference, dim=0)) > 0.999
    assert torch.allclose(predicted, reference, rtol=1e-2, atol=1e-3 * float(reference.abs().max()))


@pytest.mark.parametrize("control_variate", [False, True], ids=["forward gradient", "control variate"])
def test_short_training_run_through_snes_lowers_the_dns_error(control_variate):
    """The TOML's experiment, shortened: 12 Trainer steps of 4 tasks through the real SNES solve
    lower the mean weighted squared log Re_τ error on the training tasks from Spalding's 1.15e-4
    to 3.7e-5 (forward gradient) and 5.5e-6 (control variate), measured; a gradient estimate with
    a wrong sign or none at all cannot get below the start, so 0.7 of it separates working from
    broken."""
    config = load_config(CONFIG)
    # a ridge far above the data's scale holds the starting fit at Spalding (|θ| ≤ |Aᵀw e₀|/(Nλ) ≈ 1e-6)
    config["problem"]["params"].update(synthetic=2, grids=["u8", "u16"], hidden=4, ridge=1e2)
    config["problem"].update(train_tasks=8, eval_tasks=2)
    config["estimator"].update(kind="control_variate" if control_variate else "forward", tangents=2)
    config["train"].update(steps=12, batch_size=4, lr=1e-2, schedule="constant")
    experiment = build_experiment(config, SerialExecutor())
    trainer, blackbox, tasks = experiment.trainer, experiment.blackbox, experiment.train_tasks
    trainer.progress = False
    start = float(blackbox.evaluate(experiment.meta_solver.theta.detach().expand(8, -1), tasks).mean())
    trainer.fit(tasks, steps=12, batch_size=4)
    end = float(blackbox.evaluate(experiment.meta_solver.theta.detach().expand(8, -1), tasks).mean())
    assert blackbox.stats.failed_centres == 0 and blackbox.stats.failed_queries == 0
    assert blackbox.stats.solves == 12 * 4 * 3
    assert end < 0.7 * start


def test_reference_is_cached_per_reynolds_number():
    assert wall_resolved_reference(9000.0) is ChannelTask(re_b=9000, grid_name="u8").reference


@pytest.fixture(scope="module")
def three_case_family():
    """Every shipped DNS case in training, two grids, small candidate lists (fixed seed)."""
    return ChannelFamily(seed=0, train_dns=(180, 550, 2000), eval_dns=(550,), grids=("u8", "u16"), synthetic=3,
                         hidden=[2, 4], ridge=[1e-6, 1e-4])


def _pieces(family):
    """The calibration's inputs, rebuilt from the family's tasks: DNS tasks per case, synthetic conditions."""
    dns = {case.nominal: [t for t in family.train_tasks(len(family._train)) if t.source == f"DNS Re{case.nominal}"]
           for case in family.train_cases}
    synthetic = [t for t in family.train_tasks(len(family._train)) if t.source == "friction law"]
    return dns, synthetic


def test_ridge_fit_is_the_stationary_point_of_the_surrogates_training_cost(three_case_family):
    """The closed-form fit and the control variate's surrogate describe the same cost: at the
    ridge solution the gradient of the surrogate's mean weighted cost is −2λθ exactly (the
    objective's stationarity), to round-off in the normal equations."""
    family = three_case_family
    calibration, tasks = family.calibration, family.train_tasks(len(family._train))
    features = torch.stack([t.features for t in tasks])
    theta = torch.tensor(calibration.theta).expand(len(tasks), -1)
    surrogate = Surrogate(LinearisedResponse(*family.linearised_correction()), steps=0)
    gradient = surrogate.gradient(features, theta).mean(0).numpy()
    np.testing.assert_allclose(gradient, -2 * calibration.ridge * calibration.theta,
                               atol=1e-9 * float(np.abs(gradient).max() + calibration.ridge))


def test_ridge_fit_recovers_a_model_that_explains_its_targets_and_shrinks_to_spalding(three_case_family):
    from problems.channel_calibration import linearised_log_re_tau, ridge_fit
    family = three_case_family
    model = family.calibration.model
    tasks = family.train_tasks(len(family._train))
    planted = np.random.default_rng(1).normal(scale=0.02, size=model.n_params)
    exact = [t.retargeted(math.exp(v), "planted") for t, v in zip(tasks, linearised_log_re_tau(model, planted, tasks))]
    # targets a θ explains exactly: an almost unregularised fit reproduces them (to the ridge's 1e-12 pull)
    fitted = ridge_fit(model, exact, 1e-12)
    np.testing.assert_allclose(linearised_log_re_tau(model, fitted, exact), np.log([t.target for t in exact]), atol=1e-8)
    # a ridge λ bounds |θ| by |Aᵀ W e₀|/(N λ): (G + λI)⁻¹ has norm ≤ 1/λ for G ⪰ 0
    big = 1e3
    from problems.channel_calibration import _design
    design, error, weight = _design(model, tasks)
    bound = np.linalg.norm(design.T @ (weight * error)) / (len(tasks) * big)
    assert np.linalg.norm(ridge_fit(model, tasks, big)) <= bound * (1 + 1e-12)


def test_cross_validation_holds_each_case_out_and_keeps_the_best_candidate(three_case_family):
    """Each leave-one-out θ is the fit without that case (its friction law refitted without
    it); each candidate's score is the RMS over the held-out cases' tasks; the chosen one has
    the lowest score; the final θ is the fit on every case."""
    from problems.channel_calibration import linearised_log_re_tau, ridge_fit, training_set
    family = three_case_family
    calibration = family.calibration
    dns, _ = _pieces(family)
    synthetic = [t for t in family.train_tasks(len(family._train)) if t.source == "friction law"]
    assert len(calibration.scores) == 4 and set(calibration.held_out_thetas) == {"Re180", "Re550", "Re2000"}
    best = min(calibration.scores, key=lambda s: s["held_out_rms"])
    assert (calibration.model.hidden, calibration.ridge) == (best["hidden"], best["ridge"])
    errors = []
    for case in family.train_cases:
        rest = [c for c in family.train_cases if c is not case]
        tasks, law = training_set("friction_law", rest, dns, synthetic)
        assert law.kappa == FrictionLaw.fit(rest).kappa and len(tasks) == 2 * 2 + 3 * 2
        theta = ridge_fit(calibration.model, tasks, calibration.ridge)
        np.testing.assert_allclose(calibration.held_out_thetas[f"Re{case.nominal}"], theta, rtol=1e-12, atol=1e-15)
        truth = dns[case.nominal]
        errors += list(linearised_log_re_tau(calibration.model, theta, truth) - np.log([t.target for t in truth]))
    assert best["held_out_rms"] == pytest.approx(float(np.sqrt(np.mean(np.square(errors)))), rel=1e-12)
    full, _ = training_set("friction_law", family.train_cases, dns, synthetic)
    np.testing.assert_allclose(calibration.theta, ridge_fit(calibration.model, full, calibration.ridge), rtol=1e-12)


def test_friction_law_targets_count_less_where_the_law_extrapolates(three_case_family):
    """A synthetic target's weight is σ²/(σ² + sd_law²) < 1, and sd_law is smallest between
    the cases: the flow rate nearest the middle weighs most, the extremes least."""
    _, synthetic = _pieces(three_case_family)
    weights = {t.re_b: t.weight for t in synthetic}
    assert all(0 < w < 1 for w in weights.values())
    low, middle, high = sorted(weights)
    assert weights[middle] > weights[low] and weights[middle] > weights[high]


def test_prediction_band_holds_every_leave_one_out_fit_and_the_calibrated_solve_matches_it(three_case_family):
    """The band contains each leave-one-case-out fit's prediction (its half-width is at least
    their largest departure). Through the real SNES solve the calibrated model reproduces its
    linearised prediction to second order in the correction: |Δ ln Re_τ| ≤ max c² (the
    response's curvature in c is O(1): ∂² ln Re_τ/∂c² ≈ s(1 − s) with 0 < s < 1)."""
    from problems.channel_calibration import linearised_log_re_tau
    family = three_case_family
    calibration, tasks = family.calibration, family.eval_tasks(2)
    bands = calibration.predict(tasks)
    for theta in calibration.held_out_thetas.values():
        for band, value in zip(bands, np.exp(linearised_log_re_tau(calibration.model, theta, tasks))):
            assert band["lo"] * (1 - 1e-12) <= value <= band["hi"] * (1 + 1e-12)
    oracle = family.oracle()
    corrections = calibration.model.correction(calibration.theta, np.stack([t.inputs for t in tasks]))
    for task, band, c in zip(tasks, bands, corrections):
        solved = task.log_error(oracle(task, {WALL_MODEL_KEY: calibration.theta})) + math.log(task.target)
        assert abs(solved - math.log(band["re_tau"])) <= max(float(np.max(corrections**2)), 1e-10)


def test_weighted_log_error_scales_the_training_cost_only():
    task = ChannelTask(re_b=20121, grid_name="u12", target_re_tau=540.0, weight=0.25)
    outcome = wall_modelled_oracle(Spalding())(task, {})
    assert LogError()(outcome, task) == pytest.approx(0.25 * task.log_error(outcome) ** 2, rel=1e-14)
    assert RelativeError()(outcome, task) == pytest.approx(abs(math.expm1(task.log_error(outcome))), rel=1e-14)
    with pytest.raises(ValueError, match="weight"):
        ChannelTask(re_b=20121, grid_name="u12", weight=0.0)


def test_one_dns_case_cross_validates_over_flow_rates():
    """With one case nothing of the data can be held out: each flow rate is, in turn, and the
    law (κ from the prior) supplies the targets; each fold's fit never saw its flow rate."""
    from problems.channel_calibration import folds
    family = ChannelFamily(train_dns=(550,), eval_dns=(180,), grids=("u8", "u16"), synthetic=3, hidden=[4],
                           ridge=[1e-6, 1e-4])
    tasks = family.train_tasks(len(family._train))
    flow_rates = sorted({t.re_b for t in tasks})
    assert len(flow_rates) == 4 and len(family.calibration.held_out_thetas) == 4
    dns = {550: [t for t in tasks if t.source == "DNS Re550"]}
    synthetic = [t for t in tasks if t.source == "friction law"]
    for training, held_out in folds("friction_law", family.train_cases, dns, synthetic).values():
        assert len({t.re_b for t in held_out}) == 1 and held_out[0].re_b not in {t.re_b for t in training}
    assert family.law.kappa == 0.39 and len(family.calibration.scores) == 2
