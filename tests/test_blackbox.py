"""BlackBox on real PETSc solves: shapes, determinism, failure semantics."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch

from metasolve import (BlackBox, ControlVariate, FiniteDifference, ForwardGradient, Interval, LogResidual,
                       SerialExecutor, Space, Surrogate, Vector)
from metasolve.method.blackbox import DEFERRED_KEY
from solvers import KSPOracle, LinearSystem
from tests.systems import laplacian_1d, poisson_1d


def jacobi_box(estimator, n=31, iterations=20, seed=0):
    space = Space({"x0": Vector(n, basis="sine", modes=4)})
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi")
    return BlackBox(oracle, space, LogResidual(iterations), estimator, seed=seed)


def test_forward_and_backward_shapes_and_solve_count():
    tasks = [poisson_1d(31, seed=s) for s in range(3)]
    box = jacobi_box(ForwardGradient(tangents=2, difference="central"))
    theta = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    y = box(theta, tasks)
    assert y.shape == (3,) and y.dtype == torch.float64
    y.sum().backward()
    assert theta.grad.shape == (3, 4) and torch.all(torch.isfinite(theta.grad))
    assert box.stats.solves == 3 * (1 + 4)


def test_finite_difference_gradient_matches_a_hand_computed_difference():
    task = poisson_1d(31, seed=4)
    box = jacobi_box(FiniteDifference(difference="central", eps=1e-4))
    theta = torch.tensor([[0.3, -0.2, 0.1, 0.05]], dtype=torch.float64, requires_grad=True)
    box(theta, [task]).sum().backward()
    shifted = theta.detach().clone()
    shifted[0, 1] += 1e-4
    up = box.evaluate(shifted, [task])
    shifted[0, 1] -= 2e-4
    down = box.evaluate(shifted, [task])
    assert float(theta.grad[0, 1]) == pytest.approx(float((up - down) / 2e-4), rel=1e-10)


def test_same_seed_same_gradient():
    tasks = [poisson_1d(31, seed=s) for s in range(2)]
    grads = []
    for _ in range(2):
        theta = torch.full((2, 4), 0.1, dtype=torch.float64, requires_grad=True)
        jacobi_box(ForwardGradient(tangents=3), seed=7)(theta, tasks).sum().backward()
        grads.append(theta.grad)
    assert torch.equal(grads[0], grads[1])


def test_bad_theta_raises_naming_the_problem():
    box = jacobi_box(ForwardGradient())
    tasks = [poisson_1d(31)]
    with pytest.raises(ValueError, match="width"):
        box(torch.zeros(1, 5, dtype=torch.float64), tasks)
    with pytest.raises(ValueError, match="non-finite"):
        box(torch.tensor([[math.nan, 0, 0, 0]], dtype=torch.float64), tasks)
    with pytest.raises(ValueError, match="rows"):
        box(torch.zeros(2, 4, dtype=torch.float64), tasks)


def _divergence_case(failures):
    """Richardson + Jacobi diverges once the scale s exceeds 2/λ_max(D⁻¹A) ≈ 1.0 on Poisson1D.

    Task 1's centre (s = 0.9) converges while its +ε queries (s ≈ 1.4) diverge; task 2's centre
    (s ≈ 1.7) diverges, so it gets a zero gradient; task 0 stays well inside and is untouched.
    """
    tasks = [LinearSystem(laplacian_1d(31), np.ones(31), name=f"task{i}") for i in range(3)]
    space = Space({"ksp_richardson_scale": Interval(0.0, 2.0)})
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi")
    box = BlackBox(oracle, space, LogResidual(60), ForwardGradient(tangents=4, eps=1.0), seed=3, failures=failures)
    centres = [0.5, 0.9, 1.7]
    theta = torch.stack([space.encode({"ksp_richardson_scale": s}) for s in centres]).requires_grad_(True)
    return box, tasks, theta


def test_a_query_that_diverges_mid_batch_is_dropped_counted_and_logged_once(caplog):
    box, tasks, theta = _divergence_case("drop")
    with caplog.at_level(logging.DEBUG, logger="metasolve"):
        y = box(theta, tasks)
        y.sum().backward()
    assert box.stats.failed_centres == 1 and box.stats.failed_queries >= 1
    failures = box.stats.failed_centres + box.stats.failed_queries
    assert len(box.last_failures) == failures
    assert {name for name, _ in box.last_failures} == {"task1", "task2"}
    assert all("reason" in text or "DIVERGED" in text.upper() for _, text in box.last_failures)
    records = [r for r in caplog.records if r.name == "metasolve"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "task1" in records[0].getMessage() and "task2" in records[0].getMessage()
    assert torch.all(torch.isfinite(y)) and y[2] == LogResidual(60).failure_value(tasks[2])
    assert torch.all(torch.isfinite(theta.grad))
    assert theta.grad[2].abs().sum() == 0 and theta.grad[1].abs().sum() > 0
    # The same failures again: counted, but reported at DEBUG only (no warning per step).
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="metasolve"):
        box(theta.detach(), tasks)
    assert [r.levelno for r in caplog.records if r.name == "metasolve"] == [logging.DEBUG]
    assert sum(box.failure_counts.values()) == 2 * failures


def test_penalized_failures_push_away_from_the_divergence_cliff():
    """Charged failure_value (0, i.e. no residual reduction) instead of dropped, the diverging
    +ε query of task 1 adds (0 − f(θ))/ε > 0 along +s: the estimate now sees the cliff, so ∂cost/∂s
    is larger than with the query dropped (which leaves only the tangents pointing away from it)."""
    dropped, tasks, theta = _divergence_case("drop")
    dropped(theta, tasks).sum().backward()
    drop_gradient = theta.grad.clone()
    penalized, tasks, theta = _divergence_case("penalize")
    penalized(theta, tasks).sum().backward()
    assert penalized.stats.failed_queries == dropped.stats.failed_queries >= 1
    assert theta.grad[1, 0] > drop_gradient[1, 0] + 0.1 * drop_gradient[1, 0].abs()
    assert torch.equal(theta.grad[0], drop_gradient[0]) and theta.grad[2].abs().sum() == 0


def test_unasked_query_points_are_not_solved():
    box = jacobi_box(FiniteDifference())
    tasks = [poisson_1d(31, seed=s) for s in range(2)]
    theta = torch.zeros(2, 4, dtype=torch.float64)
    points = theta[:, None, :].repeat(1, 3, 1) + 0.1
    points[0, 1:] = math.nan
    values = box._solve(theta, points, tasks)
    assert box.stats.solves == 2 + 1 + 3 and box.stats.failed_queries == 0
    assert torch.isnan(values[0, 2:]).all() and torch.isfinite(values[1]).all()


def test_bad_failure_mode_is_rejected():
    with pytest.raises(ValueError, match="failures"):
        BlackBox(KSPOracle(), Space({"x": Interval(0.0, 1.0)}), LogResidual(5), ForwardGradient(), failures="ignore")


def test_solves_are_counted_by_purpose_after_their_round():
    tasks = [poisson_1d(31, seed=s) for s in range(2)]
    box = jacobi_box(ForwardGradient(tangents=1))
    theta = torch.zeros(2, 4, dtype=torch.float64)
    box(theta.clone().requires_grad_(True), tasks).sum().backward()
    box.evaluate(theta, tasks)
    box.evaluate(theta, tasks, purpose="diagnosis")
    measured = box.diagnose(theta, tasks)
    assert (box.stats.solves, box.stats.evaluation_solves, box.stats.diagnosis_solves) == (2 * 2, 2, 2 + 2)
    assert [m.failed for m in measured] == [False, False]
    assert [m.value for m in measured] == box.evaluate(theta, tasks).tolist()
    with pytest.raises(ValueError, match="purpose"):
        box.evaluate(theta, tasks, purpose="curiosity")
    assert box.stats.evaluation_solves == 2 + 2


class _Recording(SerialExecutor):
    """The serial executor, keeping each round's keys (what the balanced MPI schedule sees)."""

    def __init__(self) -> None:
        self.rounds: list[list] = []

    def map(self, fn, items, keys=None):
        self.rounds.append(list(keys))
        return super().map(fn, items, keys)


def test_the_surrogate_learns_as_one_more_item_of_the_next_round():
    """Backward only keeps the step's data; the next forward's round carries the surrogate update as
    one more work item, and its result is the surrogate that learning in place gives."""
    tasks = [poisson_1d(31, seed=s) for s in range(3)]
    torch.manual_seed(0)
    estimator = ControlVariate(ForwardGradient(tangents=2, eps=1e-4), Surrogate(Surrogate.mlp(0, 4, hidden=8), lr=1e-2))
    box = jacobi_box(estimator)
    box.executor = _Recording()
    initial = copy.deepcopy(estimator.surrogate.net.state_dict())
    theta = torch.full((3, 4), 0.1, dtype=torch.float64, requires_grad=True)
    box(theta, tasks).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(initial.values(), estimator.surrogate.net.state_dict().values()))
    assert estimator.deferred() is not None and DEFERRED_KEY not in box.executor.rounds[0]
    in_place = copy.deepcopy(estimator)
    in_place.settle()
    box(theta.detach().clone().requires_grad_(True), tasks)
    assert box.executor.rounds[1][-1] == DEFERRED_KEY and len(box.executor.rounds[1]) == len(tasks) + 1
    assert _same_weights(in_place.surrogate.net, estimator.surrogate.net)
    assert not _same_weights(estimator.surrogate.net, _loaded(initial))
    assert box.stats.solves == 2 * 3 * (1 + 2)  # the work item is not a solve


def _loaded(state):
    torch.manual_seed(0)
    net = Surrogate.mlp(0, 4, hidden=8)
    net.load_state_dict(state)
    return net


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
