"""The run layer: the one recipe every face uses — the CLI, the examples and the benchmarks.

    run(config, out) = check → claim the directory → build → preflight → supervised start →
                       fit through the solver → keep the better weights → evaluate → save/report

Each step is one visible call here, so what `metasolve train` does is readable top to bottom,
and a benchmark that calls `run` measures exactly what a user's config runs. Works unchanged
under `mpiexec -n N`: every rank runs the same recipe, solves are split across ranks, and only
the root rank writes (`_on_root`); an error on any rank is re-raised on every rank.

What the run refuses to hand over: a model whose deployed setting fails on most held-out tasks
is not saved (`DeployRefused`, exit 1): `lr = 1e300` once saturated an interval to its closed
end, PETSc refused ω = 2 on every solve, and a NaN improvement slipped past the "did not lower"
check.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metasolve.app.evaluation import baselines, evaluate, summarize
from metasolve.app.experiment import Experiment, build_experiment, check_buildable
from metasolve.app.report import markdown_table, write_report
from metasolve.app.run_dir import claim, release
from metasolve.training.parallel import SCHEDULES, MPIExecutor, SerialExecutor
from metasolve.training.pretrain import hand_over, keep_better, supervised_start
from solvers._petsc import MPI

log = logging.getLogger("metasolve")
MODEL_FILE = "meta_solver.pt"
VALIDATION_TASKS = 16
"""Validation tasks for keep-better: indices just after the training tasks, never evaluated on."""


class DeployRefused(RuntimeError):
    """The trained setting fails on the held-out tasks: nothing is written that a job would deploy."""


@dataclass
class RunResult:
    """What a run produced: its objects, the evaluation table and where its files are."""

    experiment: Experiment
    evaluation: dict[str, dict]
    summary: list[dict[str, Any]]
    train_seconds: float
    solves: dict[str, int]
    kept: str = "trained"
    files: dict[str, Path] = field(default_factory=dict)


def make_executor(group_size: int = 1, schedule: str = "balanced") -> Any:
    """MPI when launched under mpiexec with more than one rank, serial otherwise (`[parallel]` keys)."""
    if MPI.COMM_WORLD.Get_size() > 1:
        return MPIExecutor(MPI.COMM_WORLD, group_size=group_size, schedule=schedule)
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if group_size != 1:
        raise ValueError(f"parallel.group_size = {group_size} needs mpiexec with a multiple of {group_size} ranks")
    return SerialExecutor()


def _on_root(executor: Any, fn: Any) -> Any:
    """`fn()` on the root rank; its result, or the exception it raised, on every rank."""
    result: object = None
    if executor.is_root:
        try:
            result = fn()
        except Exception as error:  # noqa: BLE001 — re-raised below, on every rank
            result = error
    result = executor.broadcast(result)
    if isinstance(result, Exception):
        raise result
    return result


def _say(executor: Any, text: str, quiet: bool = False) -> None:
    if executor.is_root and not quiet:
        print(text, flush=True)


def run(config: dict, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        quiet: bool = False, executor: Any = None) -> RunResult:
    """Train, evaluate against the baselines, and write report + deployable meta-solver to `out`.

    `out` belongs to one run (`run_dir.claim`): a directory holding another run is refused
    unless `overwrite`, and `resume` refuses a checkpoint of a different config."""
    out = Path(out)
    check_buildable(config)  # names in the config that only the builder knows, before anything is written
    executor = executor if executor is not None else make_executor(**config["parallel"])
    record = _on_root(executor, lambda: claim(out, config, resume=resume, overwrite=overwrite))
    try:
        return _run(config, out, record, executor, resume, quiet)
    finally:
        if executor.is_root:
            release(out)


def _run(config: dict, out: Path, record: dict, executor: Any, resume: bool, quiet: bool) -> RunResult:
    experiment = build_experiment(config, executor)
    trainer, settings = experiment.trainer, config["train"]
    trainer.checkpoint_dir = out / "checkpoints"
    trainer.metadata = {"config": config, "code": record["code"]}
    trainer.progress = not quiet
    _say(executor, f"metasolve: {experiment.family.describe()}", quiet)
    _say(executor, f"metasolve: training {settings['steps']} steps x {settings['batch_size']} tasks, "
                   f"estimator {experiment.blackbox.estimator!r}, {executor.size} rank(s)", quiet)
    begin = time.perf_counter()
    resumed = resume and any((out / "checkpoints").glob("*.pt"))

    if not resumed:  # a broken setting stops here, before pretraining or training spends solves
        trainer.preflight(experiment.eval_tasks)
    candidates = _supervised_start(experiment, executor, out, resumed, quiet)
    history = trainer.fit(experiment.train_tasks, settings["steps"], settings["batch_size"],
                          eval_tasks=experiment.eval_tasks, eval_every=settings["eval_every"],
                          resume=resume, metrics_path=out / "metrics.jsonl")
    kept = "trained"
    if candidates is not None:
        choice = keep_better(experiment.meta_solver, experiment.blackbox, candidates, _validation_tasks(experiment))
        kept = choice["kept"]
        costs = ", ".join(f"{name} {cost:.6g}" + (f" ({choice['failed'][name]} failed)" if choice["failed"][name] else "")
                          for name, cost in choice["costs"].items())
        _say(executor, f"metasolve: training cost on validation tasks: {costs}; keeping the {kept} weights", quiet)
    train_seconds = time.perf_counter() - begin

    compared, spent = baselines(experiment)
    unseen = experiment.deploy_tasks if experiment.deploy_tasks is not None else experiment.eval_tasks
    evaluation = evaluate(experiment, unseen, compared)
    summary = summarize(evaluation)
    _refuse_failing(evaluation)
    stats = experiment.blackbox.stats
    solves = {"training": stats.solves, "evaluation": stats.evaluation_solves}
    result = RunResult(experiment, evaluation, summary, train_seconds, solves, kept)
    if executor.is_root:
        result.files = _write(out, experiment, result, history, spent)
        print(markdown_table(summary))
        print(f"metasolve: report {result.files['report']}, meta-solver {result.files['model']}", flush=True)
    return result


def _supervised_start(experiment: Experiment, executor: Any, out: Path, resumed: bool,
                      quiet: bool) -> dict | None:
    """Fit the predictor to per-task answers the solver gives cheaply (an initial guess to the
    solutions, an option to a short per-task search), unless `[pretrain] enabled = false` or a
    checkpoint resumes; returns the untrained and pretrained weights for `keep_better`."""
    kept_path = out / "pretrained.pt"  # a resumed run still compares with the untrained and pretrained weights
    if resumed:
        return _on_root(executor, lambda: torch.load(kept_path, weights_only=True) if kept_path.exists() else None)
    spec = experiment.config["pretrain"]
    if not spec["enabled"]:
        return None
    meta = experiment.meta_solver
    untrained = {k: v.clone() for k, v in meta.state_dict().items()}
    report = supervised_start(meta, experiment.blackbox, experiment.train_tasks,
                              tasks_used=spec["tasks"], search_solves=spec["search_solves"])
    if report is None and experiment.blackbox.space.discrete_parts():  # nothing to fit: a Choice, an Integer;
        candidates = {"untrained": untrained}                          # still weigh the untrained predictor
        _on_root(executor, lambda: torch.save(candidates, kept_path))
        return candidates
    if report is None:
        return None
    trainer = experiment.trainer
    lr = hand_over(trainer.optimizer, trainer.scheduler, report, meta)
    _say(executor, f"metasolve: {report.describe()}; training through the solver continues at learning rate "
                   f"{lr:.3g}", quiet)
    candidates = {"untrained": untrained, "pretrained": {k: v.clone() for k, v in meta.state_dict().items()}}
    _on_root(executor, lambda: torch.save(candidates, kept_path))
    return candidates


def _validation_tasks(experiment: Experiment) -> list:
    """Tasks for keep-better: the indices just after the training ones, neither trained nor
    evaluated on. A finite family (a table of runs, recorded systems) may have none to spare:
    then the last training tasks serve, and the run says so."""
    n = len(experiment.train_tasks)
    count = min(VALIDATION_TASKS, n)
    try:
        return experiment.family.tasks(range(n, n + count))
    except (ValueError, IndexError) as error:
        log.warning("keep-better compares on the last %d training tasks: the family has no tasks beyond them (%s)",
                    count, error)
        return list(experiment.train_tasks[-count:])


def _refuse_failing(evaluation: dict[str, dict]) -> None:
    """A learned setting that fails on more held-out tasks than the configured solver does, and
    on more than half of them, is not deployable."""
    learned = sum(evaluation["learned"]["failed"])
    default = min(sum(result["failed"]) for name, result in evaluation.items() if name != "learned")
    total = len(evaluation["learned"]["failed"])
    if learned > default and 2 * learned > total:
        raise DeployRefused(f"the learned setting failed on {learned} of {total} held-out tasks (the configured "
                            f"solver on {default}); no model was written. First failure: "
                            f"{evaluation['learned']['tasks'][evaluation['learned']['failed'].index(True)]} under "
                            f"{evaluation['learned']['settings'][evaluation['learned']['failed'].index(True)]}")


def _write(out: Path, experiment: Experiment, result: RunResult, history: list[dict],
           spent: dict[str, Any]) -> dict[str, Path]:
    model = out / MODEL_FILE
    experiment.save_model(model)
    progress = experiment.trainer.progress_report
    (out / "evaluation.json").write_text(json.dumps(
        {"train_seconds": result.train_seconds, "solves": result.solves, "kept": result.kept,
         "baselines": spent, "evaluation": result.evaluation, "summary": result.summary,
         "held_out_training_cost": progress}, indent=1, default=float))
    notes = [experiment.family.describe(), f"Training took {result.train_seconds:.1f} s and "
             f"{result.solves['training']} solves; the deployed weights are the {result.kept} ones."]
    for name, found in spent.items():
        notes.append(f"The {name} ({found['setting']}) took {found['solves']} solves to find.")
    if progress:
        verdict = progress["trained_cost"] < progress["untrained_cost"]
        notes.append(f"Held-out training cost: untrained {progress['untrained_cost']:.6g}, trained "
                     f"{progress['trained_cost']:.6g}." + ("" if verdict
                                                            else " **Training did not lower it.**")
                     + (f" Likely cause: {' '.join(progress['causes'])}" if "causes" in progress else ""))
    report = write_report(out, f"metasolve run: {experiment.config['problem']['family']}", history,
                          result.evaluation, notes="\n\n".join(notes))
    return {"model": model, "report": report, "evaluation": out / "evaluation.json"}


def evaluate_checkpoint(checkpoint: str | Path, tasks: int | None = None, quiet: bool = False) -> dict[str, dict]:
    """The evaluation table of a training checkpoint, rebuilt from the config it records."""
    from metasolve.app.config import ConfigError, validate
    from metasolve.training.checkpoint import CheckpointError, load_checkpoint

    checkpoint = Path(checkpoint)
    if checkpoint.is_file() and checkpoint.name == MODEL_FILE:
        raise CheckpointError(f"{checkpoint} is a deployable model, not a training checkpoint: evaluate one of "
                              f"{checkpoint.parent / 'checkpoints'}/checkpoint-*.pt")
    state = load_checkpoint(checkpoint)
    if "config" not in state.get("metadata", {}):
        raise CheckpointError(f"{checkpoint}: not a training checkpoint written by 'metasolve train' (no config)")
    config = validate(state["metadata"]["config"], str(checkpoint))
    if tasks is not None:
        if tasks < 1:
            raise ConfigError(f"--tasks must be >= 1, got {tasks}")
        config["problem"]["eval_tasks"] = tasks
    executor = make_executor(**config["parallel"])
    experiment = build_experiment(config, executor)
    experiment.trainer.load_state_dict(state)
    compared, _ = baselines(experiment)
    evaluation = evaluate(experiment, experiment.eval_tasks, compared)
    _say(executor, markdown_table(summarize(evaluation)), quiet)
    return evaluation


__all__ = ["DeployRefused", "RunResult", "evaluate_checkpoint", "make_executor", "run"]
