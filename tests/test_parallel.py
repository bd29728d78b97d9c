"""Executors: serial and MPI `map` agree bit for bit; errors and crashes end every rank.

The MPI tests run the scripts in tests/mpi_scripts under a real `mpiexec`; each script checks
its own results on every rank and exits non-zero on a mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from metasolve.training.parallel import (MPIExecutor, RemoteError, SerialExecutor, abort_on_uncaught_exception, block,
                                dumps, longest_first)
from solvers._petsc import MPI, PETSc
from tests.mpi_run import run_mpi

SCRIPTS = Path(__file__).parent / "mpi_scripts"
# A launch takes 5-15 s here (python + torch + PETSc start-up on 2 shared cores), longer under
# load; a hang takes forever. A job that does not end within TIMEOUT raises TimeoutExpired (and
# is killed), which is how the error tests tell "ended the job" from "hung".
TIMEOUT = 180


def run(script: str, n: int = 2, *args: object):
    result = run_mpi(SCRIPTS / script, n=n, args=args, timeout=TIMEOUT)
    return result, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("n_items", range(13))
@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 5])
def test_blocks_cover_items_in_order_and_balance(n_items: int, n_workers: int) -> None:
    blocks = [block(n_items, n_workers, w) for w in range(n_workers)]
    assert [i for b in blocks for i in b] == list(range(n_items))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("n_workers", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", range(5))
def test_longest_first_covers_every_item_once_within_the_list_scheduling_bound(n_workers: int, seed: int) -> None:
    costs = np.random.default_rng(seed).lognormal(0.0, 1.5, size=23).tolist()
    owned = longest_first(costs, n_workers)
    assert sorted(i for worker in owned for i in worker) == list(range(23))
    assert all(worker == sorted(worker) for worker in owned)
    loads = [sum(costs[i] for i in worker) for worker in owned]
    # Graham: any greedy list schedule ends within one item of the mean load (makespan <= sum/P + max).
    assert max(loads) <= sum(costs) / n_workers + max(costs) + 1e-12
    assert owned == longest_first(costs, n_workers)  # a pure function: every rank gets the same


def test_longest_first_isolates_one_slow_item_that_contiguous_blocks_pile_up() -> None:
    costs = [1.0, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    owned = longest_first(costs, 2)
    assert owned == [[1], [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # loads 10 and 10: the optimum
    static = [sum(costs[i] for i in block(len(costs), 2, w)) for w in range(2)]
    assert static == [15.0, 5.0]


def test_equal_costs_spread_items_like_blocks_do() -> None:
    owned = longest_first([1.0] * 7, 3)
    assert sorted(map(len, owned)) == [2, 2, 3]


def test_all_gather_pickling_keeps_tensors_bit_for_bit() -> None:
    """What a surrogate update sends (weights, Adam moments, a generator's state) arrives equal in
    bits, dtype, shape and requires_grad; what numpy cannot hold falls back to torch's pickling."""
    import pickle

    import torch

    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    sent = {"net": {"w": weights, "b": torch.tensor(1e-300, dtype=torch.float64)},
            "moments": [torch.randn(4, generator=generator), torch.arange(6, dtype=torch.int64).reshape(2, 3)],
            "generator": generator.get_state(), "same twice": (weights, weights),
            "grad": torch.ones(2, requires_grad=True), "bf16": torch.ones(3, dtype=torch.bfloat16),
            "parameter": torch.nn.Parameter(torch.full((2,), 0.1, dtype=torch.float64)), "plain": [1, "a", None]}
    got = pickle.loads(dumps(sent))

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                    and a.requires_grad == b.requires_grad and torch.equal(a.detach(), b.detach()))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(sent, got)
    assert got["same twice"][0] is got["same twice"][1]  # one object sent once, as pickle does
    assert torch.Generator().set_state(got["generator"]).initial_seed() == 3


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
    sys.excepthook = sys.__excepthook__  # an in-process CLI test earlier in the session may have installed it
    try:
        abort_on_uncaught_exception()
        installed = sys.excepthook
        abort_on_uncaught_exception()
        assert sys.excepthook is installed is not sys.__excepthook__
    finally:
        sys.excepthook = original


@pytest.mark.mpi
@pytest.mark.parametrize("group_size, schedule", [(1, "static"), (1, "balanced"), (2, "balanced")])
def test_mpi_map_equals_serial_map(group_size: int, schedule: str) -> None:
    result, output = run("map_matches_serial.py", 2, group_size, schedule)
    assert result.returncode == 0, output
    assert "OK map matches serial" in result.stdout, output


@pytest.mark.mpi
def test_each_rank_solves_its_ksp_tasks_on_comm_self() -> None:
    result, output = run("ksp_per_rank.py", 2)
    assert result.returncode == 0, output
    assert "OK per-rank KSP solves match serial" in result.stdout, output


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_group_of_two_solves_distributed_like_serial(n: int) -> None:
    """n=4 oversubscribes the 2 cores: two groups of two, gathered over the group leaders."""
    result, output = run("group_solve.py", n)
    assert result.returncode == 0, output
    assert "OK group solves" in result.stdout, output


@pytest.mark.mpi
@pytest.mark.parametrize("group_size, schedule", [(1, "static"), (1, "balanced"), (2, "balanced")])
def test_error_on_one_rank_is_raised_on_every_rank(group_size: int, schedule: str, tmp_path: Path) -> None:
    result, output = run("error_on_one_rank.py", 2, group_size, schedule, tmp_path)
    assert result.returncode != 0, output
    records = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]  # whatever the launcher did to stderr
    # Handed out as ranks free up (one rank per worker, balanced), item 3 fails on whichever rank took it.
    handed_out = group_size == 1 and schedule == "balanced"
    failing = records[0][len("RemoteError: item 3 failed on rank "):][:1] if handed_out else "1"
    raised = f"RemoteError: item 3 failed on rank {failing}: ValueError: boom on item 3\n"
    assert failing in ("0", "1") and records == [raised, raised], output
    assert "boom on item 3" in result.stderr, output  # and the job's log names the error


@pytest.mark.mpi
def test_uncaught_exception_outside_map_aborts_the_job() -> None:
    result, output = run("uncaught_outside_map.py", 2)
    assert result.returncode != 0, output
    assert "rank 1 fails outside map" in result.stderr, output
