"""Every built-in oracle, cost and executor satisfies the public Protocols (and a stranger does not)."""
from __future__ import annotations

import numpy as np
import pytest

from metasolve import Cost, Executor, IterationProxy, Iterations, LogResidual, Oracle, SerialExecutor
from solvers import KSPOracle, SNESOracle


@pytest.mark.parametrize("oracle", [
    KSPOracle(),
    SNESOracle(residual=lambda task, setting, u: u - 1.0, initial_guess=lambda task, setting: np.zeros(2)),
])
def test_built_in_oracles_are_oracles(oracle):
    assert isinstance(oracle, Oracle)


@pytest.mark.parametrize("cost", [LogResidual(5), IterationProxy(1e-6), Iterations()])
def test_built_in_costs_are_costs(cost):
    assert isinstance(cost, Cost)


def test_the_serial_executor_is_an_executor_and_a_plain_function_is_nothing():
    assert isinstance(SerialExecutor(), Executor)
    assert not isinstance(lambda task, setting: None, Oracle)
    assert not isinstance(object(), Cost)
