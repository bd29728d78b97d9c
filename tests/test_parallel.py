"""Executors: serial and MPI `map` agree bit for bit; errors and crashes end every rank.

The MPI tests run the scripts in tests/mpi_scripts under a real `mpiexec`; each script checks
its own results on every rank and exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metasolve.parallel import MPIExecutor, RemoteError, SerialExecutor, abort_on_uncaught_exception, block
from solvers._petsc import MPI, PETSc
from tests.mpi_run import run_mpi

SCRIPTS = Path(__file__).parent / "mpi_scripts"
# A launch takes 5-15 s here (python + torch + PETSc start-up on 2 shared cores); a hang takes forever.
TIMEOUT = 60
# A failure must end the job long before the timeout: well above start-up time, far below a hang.
QUICK = 40


def run(script: str, n: int = 2, *args: object):
    result = run_mpi(SCRIPTS / script, n=n, args=args, timeout=TIMEOUT)
    return result, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("n_items", range(13))
@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 5])
def test_blocks_cover_items_in_order_and_balance(n_items: int, n_workers: int) -> None:
    blocks = [block(n_items, n_workers, w) for w in range(n_workers)]
    assert [i for b in blocks for i in b] == list(range(n_items))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_serial_executor_contract() -> None:
    executor = SerialExecutor()
    assert executor.map(lambda x: x * x, [3, 1, 2]) == [9, 1, 4]
    assert executor.map(str, range(0)) == []
    assert (executor.rank, executor.size, executor.is_root) == (0, 1, True)
    assert executor.solve_comm == PETSc.COMM_SELF
    assert executor.broadcast({"a": 1}) == {"a": 1}
    with pytest.raises(KeyError):
        executor.map({}.__getitem__, ["missing"])


def test_mpi_executor_on_one_rank_is_serial() -> None:
    executor = MPIExecutor(MPI.COMM_WORLD)
    items = list(range(7))

    def value(item: int) -> np.ndarray:
        return np.random.default_rng(item).standard_normal(4)

    assert all(np.array_equal(a, b) for a, b in zip(executor.map(value, items), SerialExecutor().map(value, items)))
    assert (executor.rank, executor.size, executor.is_root) == (0, 1, True)
    assert executor.solve_comm.getSize() == 1
    assert executor.broadcast([1, 2]) == [1, 2]


@pytest.mark.parametrize("group_size", [0, 2, 1.0])
def test_group_size_must_divide_the_ranks(group_size) -> None:
    with pytest.raises(ValueError, match="group_size"):
        MPIExecutor(MPI.COMM_WORLD, group_size=group_size)


def test_remote_error_names_rank_item_and_original_message() -> None:
    def fail_on_3(item: int) -> int:
        if item == 3:
            raise ValueError("boom on item 3")
        return item

    with pytest.raises(RemoteError, match="item 3 failed on rank 0: ValueError: boom on item 3") as caught:
        MPIExecutor(MPI.COMM_WORLD).map(fail_on_3, range(6))
    assert (caught.value.rank, caught.value.index, caught.value.kind) == (0, 3, "ValueError")
    assert "fail_on_3" in str(caught.value.__cause__)  # the remote traceback travels as the cause


def test_abort_hook_installs_once() -> None:
    original = sys.excepthook
    try:
        abort_on_uncaught_exception()
        installed = sys.excepthook
        abort_on_uncaught_exception()
        assert sys.excepthook is installed is not original
    finally:
        sys.excepthook = original


@pytest.mark.parametrize("group_size", [1, 2])
def test_mpi_map_equals_serial_map(group_size: int) -> None:
    result, output = run("map_matches_serial.py", 2, group_size)
    assert result.returncode == 0, output
    assert "OK map matches serial" in result.stdout, output


def test_each_rank_solves_its_ksp_tasks_on_comm_self() -> None:
    result, output = run("ksp_per_rank.py", 2)
    assert result.returncode == 0, output
    assert "OK per-rank KSP solves match serial" in result.stdout, output


@pytest.mark.parametrize("n", [2, 4])
def test_group_of_two_solves_distributed_like_serial(n: int) -> None:
    """n=4 oversubscribes the 2 cores: two groups of two, gathered over the group leaders."""
    result, output = run("group_solve.py", n)
    assert result.returncode == 0, output
    assert "OK group solves" in result.stdout, output


@pytest.mark.parametrize("group_size", [1, 2])
def test_error_on_one_rank_is_raised_on_every_rank(group_size: int) -> None:
    begin = time.perf_counter()
    result, output = run("error_on_one_rank.py", 2, group_size)
    assert time.perf_counter() - begin < QUICK, output
    assert result.returncode != 0, output
    raised = "RemoteError: item 3 failed on rank 1: ValueError: boom on item 3"
    assert result.stderr.count(raised) == 2, output  # one uncaught RemoteError per rank
    assert "map returned" not in result.stdout, output


def test_uncaught_exception_outside_map_aborts_the_job() -> None:
    begin = time.perf_counter()
    result, output = run("uncaught_outside_map.py", 2)
    assert time.perf_counter() - begin < QUICK, output
    assert result.returncode != 0, output
    assert "rank 1 fails outside map" in result.stderr, output
