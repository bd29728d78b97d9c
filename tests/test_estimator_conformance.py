"""Every estimator honours the `Estimator` lifecycle (metasolve/method/estimator.py).

The same behavioural tests, parametrised over every estimator and its stateful variants (in the
style of Optuna's samplers_tests): queries are [B, Q, d] float64; `gradient` has no side effects;
the estimate is unbiased (or exact) on an analytic cost, within a tolerance derived from its
variance; the deferred work may run on any one rank and be adopted by all; a state_dict round
trip through a weights-only checkpoint resumes bit for bit. Pure math: no PETSc.
"""
from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from metasolve.method.control_variate import ControlVariate
from metasolve.method.estimator import Estimator
from metasolve.method.exact_gradient import Exact
from metasolve.method.forward_gradient import SPSA, FiniteDifference, ForwardGradient
from metasolve.method.params import Choice, Integer, Space
from metasolve.method.score_function import CostModel, ScoreFunction
from metasolve.method.surrogate import Surrogate
from tests.analytic import quadratic

DIM = 6
F, GRAD = quadratic(DIM, seed=21)
SPACE = Space({"pc": Choice(["a", "b", "c"]), "restart": Integer(1, 3)})
TABLE = torch.tensor([float((k // 3 - 1) ** 2 + 0.4 * (k % 3)) for k in range(9)], dtype=torch.float64)


class _Task:
    def __init__(self, index: int, features: torch.Tensor | None = None) -> None:
        self.name, self.features = f"t{index % 3}", features


def _joint(row: torch.Tensor) -> int:
    setting = SPACE.decode(row)
    return 3 * ["a", "b", "c"].index(setting["pc"]) + setting["restart"] - 1


def _table_cost(theta: torch.Tensor) -> torch.Tensor:
    """The discrete cost of every point [..., d]: a table over the 9 joint values."""
    flat = theta.reshape(-1, theta.shape[-1])
    return TABLE[[_joint(row) for row in flat]].reshape(theta.shape[:-1])


def _expected_table_gradient(estimator: ScoreFunction, theta: torch.Tensor) -> torch.Tensor:
    leaf = theta.clone().requires_grad_(True)
    return torch.autograd.grad((torch.exp(estimator.log_policy(leaf)) * TABLE).sum(), leaf)[0]


def _surrogate(steps: int = 2, chunk_rows: int = 0) -> Surrogate:
    torch.manual_seed(3)
    return Surrogate(Surrogate.mlp(0, DIM, hidden=8), lr=1e-2, steps=steps, buffer=16, batch_size=8,
                     chunk_rows=chunk_rows)


@dataclass(frozen=True)
class Case:
    """An estimator, the cost it sees, the gradient it targets and (where derived) its per-sample MSE."""

    build: Callable[[], Estimator]
    cost: Callable[[torch.Tensor], torch.Tensor] = F
    dim: int = DIM
    features: torch.Tensor | None = None
    mse: Callable[[torch.Tensor], float] | None = None  # E‖g − ∇f‖² of one sample, from its derivation
    exact: bool = False

    def tasks(self, n: int) -> list[_Task]:
        return [_Task(i, self.features) for i in range(n)]

    def truth(self, estimator: Estimator, theta: torch.Tensor) -> torch.Tensor:
        if self.cost is _table_cost:
            return _expected_table_gradient(estimator, theta)
        return GRAD(theta)


def _square(g: torch.Tensor) -> float:
    return float(g @ g)


CASES = {
    "forward gradient, Rademacher": Case(lambda: ForwardGradient(tangents=2, difference="central"),
                                         mse=lambda g: (DIM - 1) / 2 * _square(g)),
    "forward gradient, Gaussian": Case(lambda: ForwardGradient(tangents=1, difference="central", distribution="gaussian"),
                                       mse=lambda g: (DIM + 1) * _square(g)),
    "forward gradient, orthogonal": Case(lambda: ForwardGradient(tangents=3, difference="central",
                                                                 distribution="orthogonal"),
                                         mse=lambda g: (DIM / 3 - 1) * _square(g)),
    "forward gradient, guided with memory": Case(lambda: ForwardGradient(tangents=1, difference="central",
                                                                         distribution="guided", memory=2)),
    "SPSA": Case(lambda: SPSA(tangents=1), mse=lambda g: (DIM - 1) * _square(g)),
    "finite difference": Case(lambda: FiniteDifference(difference="central"), exact=True),
    "control variate, scalar β, replay": Case(lambda: ControlVariate(ForwardGradient(tangents=2, difference="central"),
                                                                     _surrogate())),
    "control variate, β = 1 (NI-GBMS)": Case(lambda: ControlVariate(ForwardGradient(tangents=1, difference="central"),
                                                                    _surrogate(), coefficient=1.0)),
    "control variate, guided, diagonal β, allocation": Case(lambda: ControlVariate(
        ForwardGradient(tangents=2, difference="central", distribution="guided"), _surrogate(),
        coefficient="diagonal", allocation="variance")),
    "control variate, split update": Case(lambda: ControlVariate(ForwardGradient(tangents=1, difference="central"),
                                                                 _surrogate(chunk_rows=3))),
    "exact": Case(lambda: Exact(lambda row, task: F(row)), exact=True),
    "score function, leave-one-out": Case(lambda: ScoreFunction(SPACE, samples=3), cost=_table_cost, dim=SPACE.dim),
    "score function, cost model": Case(lambda: ScoreFunction(SPACE, samples=1, cost_model=CostModel(2, 9, hidden=8, steps=3),
                                                             exploration=0.5, temperature=0.0),
                                       cost=_table_cost, dim=SPACE.dim, features=torch.tensor([1.0, -0.5])),
}

cases = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())


def _values(case: Case, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """f at the centre and every asked point; NaN where a point was not asked for."""
    values = torch.full((theta.shape[0], 1 + points.shape[1]), math.nan, dtype=torch.float64)
    values[:, 0] = case.cost(theta)
    asked = torch.isfinite(points).all(-1)
    values[:, 1:][asked] = case.cost(points[asked])
    return values


def _round(case: Case, estimator: Estimator, theta: torch.Tensor, seed: int, settle: bool = True):
    """One step of the lifecycle as BlackBox drives it; returns the round's data and estimate."""
    if settle:
        estimator.settle()
    tasks = case.tasks(theta.shape[0])
    points = estimator.queries(theta, torch.Generator().manual_seed(seed), tasks)
    values = _values(case, theta, points)
    upstream = torch.ones(theta.shape[0], dtype=torch.float64)
    estimate = estimator.gradient(theta, points, values, upstream, tasks)
    estimator.observe(theta, points, values, upstream, tasks)
    return (theta, points, values, upstream, tasks), estimate


def _theta(case: Case, batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, case.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def _warmed(case: Case, rounds: int = 3) -> Estimator:
    """An estimator with state: a few lifecycle rounds, the last one observed but not yet learned from."""
    estimator = case.build()
    for step in range(rounds):
        _round(case, estimator, _theta(case, 8, 100 + step), seed=step)
    return estimator


def _same(a, b) -> bool:
    """Bitwise equality of nested states (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            torch.nan_to_num(a, nan=1.2345), torch.nan_to_num(b, nan=1.2345))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _checkpointed(state: dict) -> dict:
    """The state through a weights-only checkpoint, as the Trainer writes and reads it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@cases
def test_queries_are_float64_batches_of_points(case):
    estimator = _warmed(case)
    estimator.settle()
    theta = _theta(case, 5, 7)
    points = estimator.queries(theta, torch.Generator().manual_seed(0), case.tasks(5))
    assert isinstance(estimator, Estimator)
    assert points.ndim == 3 and points.shape[0] == 5 and points.shape[2] == case.dim
    assert points.dtype == torch.float64


@cases
def test_gradient_has_no_side_effects(case):
    """Called twice on the same round, `gradient` gives the same tensor and leaves the state alone;
    so do `metrics` and `deferred` (declaring work is not doing it), and `observe` keeps the data
    without changing the estimate."""
    estimator = _warmed(case)
    estimator.settle()
    settled = copy.deepcopy(estimator.state_dict())
    (theta, points, values, upstream, tasks), estimate = _round(case, estimator, _theta(case, 8, 9), seed=11,
                                                                settle=False)
    observed = copy.deepcopy(estimator.state_dict())
    first = estimator.gradient(theta, points, values, upstream, tasks)
    estimator.metrics()
    estimator.deferred()
    second = estimator.gradient(theta, points, values, upstream, tasks)
    assert torch.equal(first, second) and torch.equal(first, estimate)
    assert _same(estimator.state_dict(), observed)
    assert first.shape == theta.shape and first.dtype == torch.float64
    if estimator.deferred() is None:  # nothing to learn: observing kept nothing either
        assert _same(settled, observed)


@cases
def test_estimate_is_unbiased_on_an_analytic_cost(case):
    """The mean of N estimates at one θ is within 4 root-mean-square errors of the true gradient
    (Chebyshev: a false alarm has probability ≤ 1/16 whatever the seed), with the RMS from the
    estimator's derived per-sample MSE where it has one, else per coordinate within 5 standard
    errors of the sample; deterministic estimators to rounding."""
    samples = 1500
    estimator = _warmed(case)
    theta_row = torch.linspace(-0.8, 0.6, case.dim, dtype=torch.float64)
    theta = theta_row.expand(samples, -1).clone()
    _, estimates = _round(case, estimator, theta, seed=5)
    truth = case.truth(estimator, theta_row[None, :])[0]
    mean = estimates.mean(0)
    if case.exact:
        assert torch.allclose(estimates, truth.expand_as(estimates), rtol=1e-7, atol=1e-7)
    elif case.mse is not None:
        assert float((mean - truth).norm()) <= 4 * math.sqrt(case.mse(truth) / samples)
        squared = ((estimates - truth) ** 2).sum(1)  # and the derivation is the estimator's actual MSE
        assert abs(float(squared.mean()) - case.mse(truth)) <= 5 * float(squared.std()) / math.sqrt(samples)
    else:
        error = estimates.std(0) / math.sqrt(samples)
        assert torch.all((mean - truth).abs() <= 5 * error + 1e-12), (mean, truth, error)
        assert float(error.max()) < 0.5 * float(truth.abs().max())  # the check has teeth


@cases
def test_deferred_work_runs_on_any_rank_and_every_rank_adopts_it(case):
    """The work one 'rank' (a copy) runs, adopted by another, leaves both in the state that running
    it in place gives; afterwards there is no work left; adopting with none declared is an error."""
    with pytest.raises(RuntimeError, match="adopt"):
        case.build().adopt({})
    runner = _warmed(case)
    other, local = copy.deepcopy(runner), copy.deepcopy(runner)
    work = runner.deferred()
    if work is None:
        assert other.deferred() is None
        return
    result = work.run()
    runner.adopt(result)
    other.adopt(result)
    local.settle()
    assert _same(other.state_dict(), local.state_dict()) and _same(runner.state_dict(), local.state_dict())
    assert runner.deferred() is None and other.deferred() is None
    theta = _theta(case, 6, 13)
    assert torch.equal(_round(case, other, theta, seed=3)[1], _round(case, local, theta, seed=3)[1])


@cases
def test_state_dict_round_trip_resumes_bit_for_bit(case):
    """Checkpoint mid-run (an estimate observed, not yet learned from), restore into a fresh
    estimator through a weights-only load: the continuation is identical."""
    first = _warmed(case)
    resumed = case.build()
    resumed.load_state_dict(_checkpointed(first.state_dict()))
    assert _same(resumed.state_dict(), first.state_dict())
    for step in range(3):
        theta = _theta(case, 8, 200 + step)
        assert torch.equal(_round(case, first, theta, seed=50 + step)[1], _round(case, resumed, theta, seed=50 + step)[1])
    assert _same(resumed.state_dict(), first.state_dict())


def test_a_stateless_estimator_refuses_foreign_state():
    with pytest.raises(ValueError, match="no state"):
        Exact(lambda row, task: F(row)).load_state_dict({"moments": None})


def test_learning_estimators_declare_work_and_stateless_ones_do_not():
    """What each estimator learns after an estimate, and whether the next queries must wait for it."""
    declared = {}
    for name, case in CASES.items():
        work = _warmed(case).deferred()
        declared[name] = None if work is None else work.before_queries
    assert declared == {
        "forward gradient, Rademacher": None, "forward gradient, Gaussian": None,
        "forward gradient, orthogonal": None, "forward gradient, guided with memory": True, "SPSA": None,
        "finite difference": None, "control variate, scalar β, replay": False,
        "control variate, β = 1 (NI-GBMS)": False, "control variate, guided, diagonal β, allocation": True,
        "control variate, split update": True, "exact": None, "score function, leave-one-out": None,
        "score function, cost model": False}
