"""Discrete settings: Choice/Integer parts and the score-function estimator.

Pure math on analytic costs (exact expected-cost gradients by enumeration), then one real PETSc
run where the policy must learn which preconditioner is cheaper.
"""
import math

import numpy as np
import pytest
import torch

from metasolve import BlackBox, Choice, Integer, Interval, Space
from metasolve.method.score_function import CostModel, ScoreFunction


def test_choice_decodes_to_options_and_round_trips():
    configs = [{"ksp_type": "cg", "pc_type": "jacobi"}, {"ksp_type": "gmres", "pc_type": "ilu"}]
    space = Space({"solver": Choice(configs), "ksp_gmres_restart": Integer(5, 60)})
    theta = torch.tensor([0.2, 1.5, 0.0], dtype=torch.float64)
    setting = space.decode(theta)
    assert setting == {"ksp_type": "gmres", "pc_type": "ilu", "ksp_gmres_restart": 33}
    again = space.decode(space.encode(setting))
    assert again == setting


def test_choice_of_option_values_and_clash():
    space = Space({"ksp_type": Choice(["cg", "gmres", "bcgs"])})
    assert space.decode(torch.tensor([0.0, 0.0, 1.0]))["ksp_type"] == "bcgs"
    clash = Space({"a": Choice([{"pc_type": "ilu"}, {"pc_type": "sor"}]), "pc_type": Choice(["jacobi", "none"])})
    with pytest.raises(ValueError, match="already set"):
        clash.decode(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least two"):
        Choice(["cg"])
    with pytest.raises(ValueError, match="not a mix"):
        Choice(["cg", {"ksp_type": "gmres"}])


@pytest.mark.parametrize("lo,hi", [(5, 60), (0, 3)])
def test_integer_policy_is_a_distribution_and_force_hits_every_value(lo, hi):
    part = Integer(lo, hi)
    for raw in (-3.0, 0.0, 0.7, 4.0):
        p = torch.exp(part.log_probs(torch.tensor([raw], dtype=torch.float64)))
        assert p.shape == (hi - lo + 1,)
        assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    for k in range(hi - lo + 1):
        assert part.to_setting(part.decode_tensor(part.force(k))) == lo + k


def _analytic_estimator_check(estimator, space, cost_of_joint, theta, draws):
    """Mean of `draws` estimates vs the exact ∇ Σ_k p_θ(k) f(k), per coordinate, within 4 standard errors
    (the estimates are independent draws, so their mean is within 4σ/√draws with probability > 0.9999)."""
    leaf = theta.clone().requires_grad_(True)
    exact = torch.autograd.grad((torch.exp(estimator.log_policy(leaf)) * cost_of_joint).sum(), leaf)[0]
    generator = torch.Generator().manual_seed(0)
    thetas = theta.expand(draws, -1).clone()
    tasks = [_Task()] * draws
    points = estimator.queries(thetas, generator, tasks)
    centre = float(cost_of_joint[estimator._joint_index(theta)])
    values = torch.tensor([[centre] + [float(cost_of_joint[estimator._joint_index(p)]) for p in row] for row in points],
                          dtype=torch.float64)
    estimates = estimator.gradient(thetas, points, values, torch.ones(draws, dtype=torch.float64), tasks)
    mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(draws)
    assert torch.all((mean - exact).abs() <= 4 * error + 1e-12), (mean, exact, error)
    return exact, estimates


class _Task:
    name = "analytic"
    features = torch.tensor([1.0, -0.5], dtype=torch.float64)


def test_leave_one_out_score_function_is_unbiased_on_an_analytic_cost():
    space = Space({"pc": Choice(["a", "b", "c"]), "restart": Integer(1, 4)})
    estimator = ScoreFunction(space, samples=3)
    cost = torch.tensor([float((k // 4 - 1) ** 2 + 0.3 * (k % 4)) for k in range(12)], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.5, 0.4], dtype=torch.float64)
    _analytic_estimator_check(estimator, space, cost, theta, draws=1500)


def test_cost_model_baseline_stays_unbiased_and_cuts_variance():
    space = Space({"pc": Choice(["a", "b", "c", "d"])})
    cost = torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    theta = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64)
    plain = ScoreFunction(space, samples=2)
    _, plain_draws = _analytic_estimator_check(plain, space, cost, theta, draws=1500)
    # A frozen (never fitted) cost model that is close to, not equal to, the truth.
    model = CostModel(feature_dim=2, n_values=4, steps=0)
    with torch.no_grad():
        model.net[-1].weight.zero_()
        model.net[-1].bias.copy_(cost + torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64))
    guided = ScoreFunction(space, samples=1, cost_model=model)
    _, guided_draws = _analytic_estimator_check(guided, space, cost, theta, draws=1500)
    assert guided_draws.var(0).sum() < 0.2 * plain_draws.var(0).sum()


def test_centre_baseline_cancels_a_cost_model_offset_and_stays_unbiased():
    """The correction uses r(k_j) − r(k*), r = f − ĉ, and the exact term Σ_k p_k ĉ_k moves only with
    differences of ĉ: a cost model off by a constant (an untrained one predicts ~0 for log costs ~7)
    must give draw for draw the same estimate as one without the offset, and an unbiased one."""
    space = Space({"pc": Choice(["a", "b", "c", "d"])})
    cost = torch.tensor([7.0, 6.2, 6.5, 8.0], dtype=torch.float64)
    theta = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64)
    draws = []
    for offset in (0.0, -7.0):
        model = CostModel(feature_dim=2, n_values=4, steps=0)
        with torch.no_grad():
            model.net[-1].weight.zero_()
            model.net[-1].bias.copy_(cost + offset + torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64))
        estimator = ScoreFunction(space, samples=1, cost_model=model, exploration=0.3)
        draws.append(_analytic_estimator_check(estimator, space, cost, theta, draws=1500)[1])
    assert torch.allclose(draws[0], draws[1], rtol=0.0, atol=1e-12)


def test_exploration_keeps_the_estimate_unbiased():
    """Sampling from (1 − ε)p + ε/n with p/q weights has the same expectation as on-policy sampling."""
    space = Space({"pc": Choice(["a", "b", "c"])})
    cost = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    theta = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)  # a confident policy: p(b) ≈ 0.04
    _analytic_estimator_check(ScoreFunction(space, samples=2, exploration=0.3), space, cost, theta, draws=1500)
    with pytest.raises(ValueError, match="exploration"):
        ScoreFunction(space, exploration=1.0)


def test_failures_are_charged_above_the_worst_observed_cost_of_the_task_or_else_the_batch():
    estimator = ScoreFunction(Space({"pc": Choice(["a", "b"])}), samples=2, failure_margin=1.0)
    values = torch.tensor([[2.0, math.nan, 3.0], [math.nan, math.nan, math.nan]], dtype=torch.float64)
    charged = estimator._charged(values)
    assert charged[0].tolist() == [2.0, 4.0, 3.0]
    assert charged[1].tolist() == [4.0, 4.0, 4.0]   # every solve of the task failed: the batch's worst + margin
    assert torch.isnan(estimator._charged(torch.full((2, 3), math.nan, dtype=torch.float64))).all()


def test_score_function_needs_a_discrete_part_and_a_baseline():
    with pytest.raises(ValueError, match="Choice or Integer"):
        ScoreFunction(Space({"w": Interval(1.0, 2.0)}))
    with pytest.raises(ValueError, match="samples >= 2"):
        ScoreFunction(Space({"pc": Choice(["a", "b"])}), samples=1)


def test_policy_learns_the_cheaper_preconditioner_through_petsc():
    """Real KSP solves of a 1-D Poisson problem: ICC(0) is an exact factorisation of a tridiagonal
    matrix (one iteration), Jacobi needs ~n; the expected work must fall and the deployed
    choice must become ICC."""
    import scipy.sparse as sp

    from metasolve.method.cost import LogWorkToTolerance
    from solvers import KSPOracle, LinearSystem

    n = 200
    A = sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    tasks = [LinearSystem(A, np.sin(np.arange(n) * (k + 1)) + 1.0, features=torch.tensor([1.0], dtype=torch.float64))
             for k in range(4)]
    space = Space({"pc_type": Choice(["jacobi", "icc"])})
    box = BlackBox(KSPOracle(ksp_type="cg"), space, LogWorkToTolerance(1e-8), ScoreFunction(space, samples=2), seed=1)
    theta = torch.zeros(1, space.dim, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.3)
    for step in range(6):
        optimizer.zero_grad()
        box(theta.expand(len(tasks), -1), tasks).mean().backward()
        optimizer.step()
    assert space.decode(theta.detach()[0]) == {"pc_type": "icc"}
    assert box.stats.solves == 6 * len(tasks) * 3



def test_a_failing_deployed_choice_still_moves_the_policy():
    """Richardson without a preconditioner diverges on the 1-D Laplacian (eigenvalues up to 4);
    a policy that starts on it fails at every centre solve, and must still learn to leave it."""
    import scipy.sparse as sp

    from metasolve.method.cost import LogWorkToTolerance
    from solvers import KSPOracle, LinearSystem

    n = 50
    A = sp.diags([-np.ones(n - 1), 2 * np.ones(n), -np.ones(n - 1)], [-1, 0, 1], format="csr")
    tasks = [LinearSystem(A, np.cos(np.arange(n) * (k + 1)) + 1.0, features=torch.tensor([1.0], dtype=torch.float64))
             for k in range(4)]
    space = Space({"solver": Choice([{"ksp_type": "richardson", "pc_type": "none"},
                                     {"ksp_type": "cg", "pc_type": "jacobi"}])})
    box = BlackBox(KSPOracle(), space, LogWorkToTolerance(1e-8), ScoreFunction(space, samples=2), seed=0)
    theta = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.3)
    for _ in range(6):
        optimizer.zero_grad()
        box(theta.expand(len(tasks), -1), tasks).mean().backward()
        optimizer.step()
    assert box.stats.failed_centres >= len(tasks)  # the deployed choice did fail at first
    assert space.decode(theta.detach()[0]) == {"ksp_type": "cg", "pc_type": "jacobi"}


def test_temperature_adds_exactly_the_entropy_gradient():
    """−τH(p) needs no solve: with the same draws, the estimate at τ minus the estimate at 0 is
    τ ∇ Σ_k p_θ(k) log p_θ(k) of the Choice part, to rounding (the Integer part's fixed-width
    logistic gets no entropy term)."""
    space = Space({"pc": Choice(["a", "b", "c"]), "restart": Integer(1, 3)})
    cost = torch.tensor([float(k % 4) + 0.5 * (k // 3) for k in range(9)], dtype=torch.float64)
    theta = torch.tensor([[0.3, -0.2, 0.5, 0.4], [1.0, 0.0, -1.0, -0.3]], dtype=torch.float64)
    estimates = []
    for temperature in (0.0, 0.5):
        estimator = ScoreFunction(space, samples=2, temperature=temperature)
        points = estimator.queries(theta, torch.Generator().manual_seed(3), [_Task()] * 2)
        values = torch.tensor([[float(cost[estimator._joint_index(row)])]
                               + [float(cost[estimator._joint_index(p)]) for p in task_points]
                               for row, task_points in zip(theta, points)], dtype=torch.float64)
        estimates.append(estimator.gradient(theta, points, values, torch.ones(2, dtype=torch.float64), [_Task()] * 2))
    leaf = theta.clone().requires_grad_(True)
    log_p = torch.log_softmax(leaf[:, space.slices["pc"]], dim=-1)  # the Choice's softmax; an Integer has none
    (entropy_gradient,) = torch.autograd.grad(0.5 * (torch.exp(log_p) * log_p).sum(), leaf)
    assert torch.allclose(estimates[1] - estimates[0], entropy_gradient, rtol=0.0, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        ScoreFunction(space, temperature=-0.1)


def test_surrogate_objective_is_the_expected_model_cost_minus_the_choice_entropy():
    space = Space({"pc": Choice(["a", "b", "c"])})
    model = CostModel(feature_dim=2, n_values=3, steps=0)
    theta = torch.tensor([[0.2, -0.4, 1.0]], dtype=torch.float64)
    estimator = ScoreFunction(space, samples=1, cost_model=model, temperature=0.3)
    p = torch.softmax(theta, dim=-1)
    predicted = model.predict(_Task.features[None, :]).detach()
    expected = (p * (predicted + 0.3 * torch.log(p))).sum(-1)
    assert torch.allclose(estimator.surrogate_objective(theta, [_Task()]), expected, rtol=0.0, atol=1e-14)
    assert ScoreFunction(space, samples=2).surrogate_objective(theta, [_Task()]) is None


def test_surrogate_steps_move_the_policy_on_every_training_task():
    """Tasks with feature +1 are 10× cheaper under "b", with −1 under "a" (an analytic table as the
    solver). Four steps of two tasks solve each task at most a few times; ten surrogate steps
    after each carry what the cost model learned to every task, so the policy must reach its
    optimum on all eight."""
    from metasolve import MetaSolver, Trainer
    from metasolve.method.cost import LogWorkToTolerance
    from solvers.oracle import Oracle
    from solvers.outcome import Outcome

    class Task:
        def __init__(self, index: int) -> None:
            self.name, self.sign = f"analytic-{index}", 1.0 if index % 2 else -1.0
            self.features = torch.tensor([self.sign], dtype=torch.float64)
            self.reference_norm = 1.0  # the residuals below are relative already

    class Table(Oracle):
        def budget_options(self, budget, task):
            return {}  # a table of timings: every "solve" stops where it stops

        def solve_many(self, task, settings):
            cheap = "b" if task.sign > 0 else "a"
            return [Outcome(residuals=np.array([1.0, 1e-9]), iterations=1, reason=2, converged=True,
                            seconds=0.1 if setting["pc"] == cheap else 1.0) for setting in settings]

    tasks = [Task(i) for i in range(8)]
    features = torch.stack([t.features for t in tasks])
    space = Space({"pc": Choice(["a", "b"])})
    torch.manual_seed(0)
    meta = MetaSolver(1, space, hidden=8, depth=1)
    meta.fit_normalizer(tasks)
    estimator = ScoreFunction(space, samples=1, cost_model=CostModel(1, 2, hidden=8, steps=50, inputs=features),
                              exploration=0.9, temperature=0.2)
    box = BlackBox(Table(), space, LogWorkToTolerance(1e-8, 10, "seconds"), estimator, seed=0)
    trainer = Trainer(meta, box, torch.optim.Adam(meta.parameters(), lr=0.05), progress=False, seed=0,
                      surrogate_steps=10)
    trainer.fit(tasks, steps=4, batch_size=2)
    assert box.stats.solves == 4 * 2 * 2
    with torch.no_grad():
        theta = meta(features)
        p_cheaper = torch.exp(estimator.log_policy(theta))[torch.arange(8), (features[:, 0] > 0).long()]
    assert [space.decode(row)["pc"] for row in theta] == ["b" if t.sign > 0 else "a" for t in tasks]
    # The optimum of E[f] − τH for a one-decade gap at τ = 0.2 is 1/(1 + e^-5) = 0.993 on the
    # cheaper value; 0.95 leaves the cost model 0.4 decades of error. Without the surrogate steps
    # the same four steps leave it near 0.7.
    assert float(p_cheaper.min()) > 0.95
    with pytest.raises(ValueError, match="surrogate_steps"):
        Trainer(meta, box, torch.optim.Adam(meta.parameters()), surrogate_steps=-1)
