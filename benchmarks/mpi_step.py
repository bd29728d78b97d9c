"""Train a config as `metasolve train` does, timing each part of every step; run under mpiexec.

Usage: mpi_step.py CONFIG.toml OUT_DIR. Rank 0 writes OUT_DIR/step.json (seconds per part per
rank, each step's per-rank solve time, the training's wall time, the cost of one all-gather of a
step's results) and OUT_DIR/weights.pt.

`mpi_step.py --command CONFIG.toml OUT_DIR [OVERRIDES_JSON]` instead runs the whole command, as
`metasolve train CONFIG --out OUT_DIR --overwrite --quiet` does (the recipe `metasolve.app.run.run`,
one torch thread, `config.override` for the dotted keys in the JSON object), and rank 0 writes
OUT_DIR/executor.json: the ranks, the executor rounds and how many of them ran replicated.

Parts of a step (wall time; they add up to the step):
- `network`: the meta-solver's forward pass (its backward is in `other`),
- `solve`: this rank's own solves (`fn` calls inside `executor.map`, but for the surrogate
  update the schedule may give it),
- `gather`: the rest of `executor.map` — waiting at the all-gather for slower ranks, plus the
  all-gather itself and unpacking the results,
- `estimator`: the gradient estimate, replicated on every rank, without the surrogate's work,
- `surrogate`: the surrogate's work — its gradient at the batch's tasks, its update (run by one
  rank inside the executor round, or by every rank, split with `[surrogate] chunk_rows`), and
  adopting the update's result on every rank,
- `other`: everything else (loss, network backward, optimizer step, bookkeeping).
`instrument` wraps bound methods of one run's objects; nothing in the library is changed.

Timing of machinery: it assembles the library's internals (`build_experiment`, `Trainer.fit`)
itself, because it times the parts *inside* a step (the recipe of
`metasolve.app.run.run` around the fit — preflight, pretraining, evaluation — is not what it
measures). Sections that measure what a config achieves go through `run` instead
(`tests/test_benchmarks_measure_product.py`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

PARTS = ("network", "solve", "gather", "estimator", "surrogate", "other")


def instrument(experiment: Any, executor: Any) -> tuple[dict, list]:
    """Timers around this experiment's parts; returns (seconds per part, solve seconds per map call)."""
    parts = {name: 0.0 for name in PARTS}
    solve_per_call: list[float] = []

    def timed(name: str, method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                parts[name] += time.perf_counter() - begin
        return wrapper

    original_map = executor.map

    def timed_map(fn: Any, items: Any, keys: Any = None) -> list:
        busy = [0.0]

        def timed_fn(item: Any) -> Any:
            begin = time.perf_counter()
            surrogate_before = parts["surrogate"]
            try:
                return fn(item)
            finally:  # a surrogate update the schedule gave this rank is surrogate work, not a solve
                busy[0] += time.perf_counter() - begin - (parts["surrogate"] - surrogate_before)

        begin, surrogate_before = time.perf_counter(), parts["surrogate"]
        result = original_map(timed_fn, items, keys=keys)
        parts["solve"] += busy[0]
        parts["gather"] += time.perf_counter() - begin - busy[0] - (parts["surrogate"] - surrogate_before)
        solve_per_call.append(busy[0])
        return result

    executor.map = timed_map
    meta_solver, estimator = experiment.meta_solver, experiment.blackbox.estimator
    meta_solver.forward = timed("network", meta_solver.forward)
    estimating = [False]

    def timed_estimate(*args: Any, **kwargs: Any) -> Any:
        estimating[0] = True
        try:
            return timed("estimator", original_estimate)(*args, **kwargs)
        finally:
            estimating[0] = False

    def timed_surrogate(method: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - begin
                parts["surrogate"] += seconds
                parts["estimator"] -= seconds if estimating[0] else 0.0  # nested: counted once, here
        return wrapper

    surrogate = getattr(estimator, "surrogate", None)
    if surrogate is not None:
        for name in ("trained", "adopt", "gradient"):
            setattr(surrogate, name, timed_surrogate(getattr(surrogate, name)))
    original_estimate = estimator.gradient
    estimator.gradient = timed_estimate
    return parts, solve_per_call


def finish(parts: dict, history: list) -> dict:
    """Close the books after `fit`: `other` is the remainder."""
    parts = dict(parts)
    parts["other"] = sum(row["seconds"] for row in history) - sum(v for k, v in parts.items() if k != "other")
    return parts


def allgather_seconds(comm: Any, item: Any, items: int, repeats: int = 200) -> float:
    """Seconds of one all-gather of a step's results (`items` copies of `item`, split over ranks)."""
    from mpi4py import MPI

    share = [item] * -(-items // comm.Get_size())
    comm.Barrier()
    begin = time.perf_counter()
    for _ in range(repeats):
        comm.allgather(share)
    return comm.allreduce(time.perf_counter() - begin, op=MPI.MAX) / repeats


def main(config_path: str, out: Path) -> None:
    import torch

    from metasolve.app.config import load_config
    from metasolve.app.experiment import build_experiment
    from metasolve.app.run import make_executor
    from solvers._petsc import MPI

    torch.set_num_threads(1)
    config = load_config(config_path)
    executor = make_executor(**config["parallel"])
    experiment = build_experiment(config, executor)
    trainer = experiment.trainer
    trainer.progress = False
    parts, solve_per_call = instrument(experiment, executor)
    executor.barrier()
    begin = time.perf_counter()
    history = trainer.fit(experiment.train_tasks, config["train"]["steps"], config["train"]["batch_size"])
    seconds = time.perf_counter() - begin
    per_point = 1 + config["estimator"]["tangents"] * (2 if config["estimator"]["difference"] == "central" else 1)
    gather = allgather_seconds(MPI.COMM_WORLD, [0.1] * per_point, config["train"]["batch_size"])
    everything = MPI.COMM_WORLD.gather({"parts": finish(parts, history), "solve_per_step": solve_per_call}, root=0)
    if executor.is_root:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(experiment.meta_solver.state_dict(), out / "weights.pt")
        (out / "step.json").write_text(json.dumps({
            "ranks": executor.size, "steps": len(history), "seconds": seconds, "allgather_seconds": gather,
            "step_seconds": [row["seconds"] for row in history], "per_rank": everything,
            "failed": history[-1]["failed_queries"] + history[-1]["failed_centres"]}))


def command(config_path: str, out: Path, overrides: dict) -> None:
    """The `metasolve train` recipe on a config, then the executor's round counts (root only)."""
    import torch

    from metasolve.app.config import load_config, override
    from metasolve.app.run import make_executor, run
    from metasolve.training.parallel import abort_on_uncaught_exception

    abort_on_uncaught_exception()
    torch.set_num_threads(1)
    config = override(load_config(config_path), overrides, config_path) if overrides else load_config(config_path)
    executor = make_executor(**config["parallel"])
    run(config, out, overwrite=True, quiet=True, executor=executor)
    if executor.is_root:
        rounds, replicated = (executor.total_rounds, executor.total_replicated) if executor.size > 1 else (0, 0)
        (out / "executor.json").write_text(json.dumps({"ranks": executor.size, "rounds": rounds,
                                                       "replicated": replicated}))


if __name__ == "__main__":
    if sys.argv[1] == "--command":
        command(sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
    else:
        main(sys.argv[1], Path(sys.argv[2]))
