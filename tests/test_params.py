"""Parameter spaces: decode/encode round trips and clear rejection of bad θ."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metasolve import Interval, LogInterval, Space, Vector
from metasolve.method.params import sine_basis


def test_interval_and_log_interval_round_trip_and_stay_inside():
    space = Space({"pc_sor_omega": Interval(0.05, 1.95), "pc_gamg_threshold": LogInterval(1e-4, 1e-1)})
    setting = {"pc_sor_omega": 1.37, "pc_gamg_threshold": 0.003}
    theta = space.encode(setting)
    decoded = space.decode(theta)
    assert decoded["pc_sor_omega"] == pytest.approx(1.37, rel=1e-12)
    assert decoded["pc_gamg_threshold"] == pytest.approx(0.003, rel=1e-12)
    extreme = space.decode(torch.tensor([40.0, -40.0], dtype=torch.float64))
    assert 0.05 < extreme["pc_sor_omega"] <= 1.95 and 1e-4 <= extreme["pc_gamg_threshold"] < 1e-1


def test_sine_vector_spans_the_lowest_modes_of_the_laplacian():
    n, modes = 31, 6
    vector = Vector(n, basis="sine", modes=modes)
    assert vector.dim == modes
    x = sine_basis(n, modes) @ torch.arange(1.0, modes + 1, dtype=torch.float64)
    np.testing.assert_allclose(vector.encode(x.numpy()).numpy(), np.arange(1.0, modes + 1), atol=1e-12)
    laplacian = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    column = sine_basis(n, modes)[:, 2].numpy()
    eigenvalue = 2 - 2 * math.cos(3 * math.pi / (n + 1))
    np.testing.assert_allclose(laplacian @ column, eigenvalue * column, atol=1e-12)


def test_two_dimensional_sine_vector_and_identity_vector():
    grid = Vector((8, 10), basis="sine", modes=3)
    assert grid.dim == 9 and grid.size == 80
    identity = Vector(5, basis="identity", scale=2.0)
    space = Space({"x0": identity})
    np.testing.assert_allclose(space.decode(torch.arange(5.0, dtype=torch.float64))["x0"], 2 * np.arange(5.0))


@pytest.mark.parametrize("theta, message", [
    (torch.zeros(3, dtype=torch.float64), "width"),
    (torch.tensor([math.nan, 0.0], dtype=torch.float64), "non-finite"),
    (torch.tensor([math.inf, 0.0], dtype=torch.float64), "non-finite"),
])
def test_bad_theta_is_rejected(theta, message):
    space = Space({"a": Interval(0, 1), "b": Interval(0, 1)})
    with pytest.raises(ValueError, match=message):
        space.decode(theta)


@pytest.mark.parametrize("make, message", [
    (lambda: Interval(1.0, 1.0), "lo < hi"), (lambda: LogInterval(0.0, 1.0), "lo > 0"),
    (lambda: Vector(10, basis="sine"), "modes"), (lambda: Vector(10, basis="cosine", modes=2), "basis"),
    (lambda: Space({}), "at least one"),
])
def test_bad_parts_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()
