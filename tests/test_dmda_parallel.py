"""The DMDA Newton driver on a communicator (`comm`): distributed solves under a real `mpiexec`
match the serial ones, and on one rank `comm` changes nothing.

The MPI script (tests/mpi_scripts/dmda_snes_distributed.py) checks its results on every rank and
exits non-zero on a mismatch; its docstring derives the solution tolerance from the stopping test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from problems.bratu import BratuOracle, BratuTask
from problems.nonlinear_diffusion import NonlinearDiffusionOracle, NonlinearDiffusionTask
from solvers._petsc import PETSc
from tests.mpi_run import run_mpi

SCRIPT = Path(__file__).parent / "mpi_scripts" / "dmda_snes_distributed.py"
TIMEOUT = 180  # a launch takes 5-15 s on the shared cores; a hang would take forever


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_newton_matches_serial_from_zero_a_guess_and_with_grid_sequencing(ranks: int) -> None:
    """2 ranks: the group size a benchmark uses (row strips); 4 ranks oversubscribe the cores but
    split the grid 2 x 2, where PETSc's ordering differs from the natural one."""
    result = run_mpi(SCRIPT, n=ranks, timeout=TIMEOUT)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    assert f"OK DMDA SNES on {ranks} ranks matches serial" in result.stdout, output


@pytest.mark.parametrize("oracle_class, task, linear", [
    (BratuOracle, BratuTask(lam=5.0, n=17, features=torch.zeros(1)), {}),
    (NonlinearDiffusionOracle, NonlinearDiffusionTask(mu=10.0, amplitude=100.0, n=17, features=torch.zeros(1)),
     {"ksp_type": "gmres", "pc_type": "gamg", "ksp_rtol": 1e-8}),
])
def test_a_one_rank_communicator_solves_bit_for_bit_like_the_default(oracle_class, task, linear) -> None:
    default, on_world = oracle_class(options=linear), oracle_class(options=linear, comm=PETSc.COMM_WORLD)
    assert default.comm == PETSc.COMM_SELF and on_world.comm == PETSc.COMM_WORLD
    for setting in ({}, {"snes_grid_sequence": 2}):
        one, other = default.solve(task, setting), on_world.solve(task, setting)
        assert one.outcome.converged, one.outcome.error
        assert np.array_equal(one.outcome.solution, other.outcome.solution)
        assert np.array_equal(one.outcome.residuals, other.outcome.residuals)
        assert one.level_iterations == other.level_iterations and one.outcome.flops == other.outcome.flops


def test_a_communicator_that_is_not_petsc_is_refused_by_name() -> None:
    from mpi4py import MPI

    with pytest.raises(TypeError, match="comm must be a PETSc.Comm"):
        BratuOracle(comm=MPI.COMM_WORLD)
