"""The `metasolve` command: train, evaluate, demo, bench.

Works unchanged under `mpiexec -n N metasolve train CONFIG.toml`: every rank runs the same
command, solves are split across ranks, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from metasolve.config import ConfigError, load_config, parse_config, validate
from metasolve.experiment import Experiment, build_experiment
from metasolve.parallel import SCHEDULES, MPIExecutor, SerialExecutor, abort_on_uncaught_exception
from metasolve.report import markdown_table, write_report
from metasolve.train import summarize
from solvers._petsc import MPI


def make_executor(group_size: int = 1, schedule: str = "balanced"):
    """MPI when launched under mpiexec with more than one rank, serial otherwise (`[parallel]` keys)."""
    if MPI.COMM_WORLD.Get_size() > 1:
        return MPIExecutor(MPI.COMM_WORLD, group_size=group_size, schedule=schedule)
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if group_size != 1:
        raise ValueError(f"parallel.group_size = {group_size} needs mpiexec with a multiple of {group_size} ranks")
    return SerialExecutor()


def _say(executor, text: str) -> None:
    if executor.is_root:
        print(text, flush=True)


def _baseline(config: dict) -> dict:
    """The setting the learned one is compared with: the solver as configured, with no options
    changed and a zero initial guess — named for what the config learns."""
    learned = config["space"]
    name = "zero guess" if list(learned) == ["x0"] else "configured defaults"
    return {name: {}}


def train(config: dict, out: Path, resume: bool = False, quiet: bool = False) -> tuple[Experiment, dict]:
    """Train, evaluate against the default setting, write report + deployable meta-solver to `out`."""
    executor = make_executor(**config["parallel"])
    experiment = build_experiment(config, executor)
    trainer = experiment.trainer
    trainer.checkpoint_dir = out / "checkpoints"
    trainer.metadata = {"config": config}
    trainer.progress = not quiet
    settings = config["train"]
    _say(executor, f"metasolve: {experiment.family.describe()}")
    _say(executor, f"metasolve: training {settings['steps']} steps x {settings['batch_size']} tasks, "
                   f"estimator {experiment.blackbox.estimator!r}, {executor.size} rank(s)")
    begin = time.perf_counter()
    history = trainer.fit(experiment.train_tasks, settings["steps"], settings["batch_size"],
                          eval_tasks=experiment.eval_tasks, eval_every=settings["eval_every"],
                          resume=resume, metrics_path=out / "metrics.jsonl")
    seconds = time.perf_counter() - begin
    evaluation = trainer.evaluate(experiment.eval_tasks, baselines=_baseline(config), cost=experiment.evaluation_cost)
    if executor.is_root:
        experiment.meta_solver.save(out / "meta_solver.pt")
        (out / "evaluation.json").write_text(json.dumps({"train_seconds": seconds, "evaluation": evaluation}, indent=1))
        report = write_report(out, f"metasolve run: {config['problem']['family']}", history, evaluation,
                              notes=f"{experiment.family.describe()}\n\nTraining took {seconds:.1f} s.")
        print(markdown_table(summarize(evaluation)))
        print(f"metasolve: report {report}, meta-solver {out / 'meta_solver.pt'}")
    return experiment, evaluation


def evaluate(checkpoint: Path, tasks: int | None) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "config" not in state.get("metadata", {}):
        raise ValueError(f"{checkpoint} is not a training checkpoint written by 'metasolve train'")
    config = validate(state["metadata"]["config"], str(checkpoint))
    if tasks is not None:
        config["problem"]["eval_tasks"] = tasks
    executor = make_executor(**config["parallel"])
    experiment = build_experiment(config, executor)
    experiment.trainer.load_state_dict(state)
    evaluation = experiment.trainer.evaluate(experiment.eval_tasks, baselines=_baseline(config),
                                             cost=experiment.evaluation_cost)
    _say(executor, markdown_table(summarize(evaluation)))
    return evaluation


def demo(out: Path) -> None:
    """Solve each built-in family with PETSc, then train the default predictor and compare."""
    from metasolve.showcase import family_table

    executor = make_executor()
    _say(executor, "metasolve demo 1/2: the built-in problem families solved by PETSc (default settings)")
    _say(executor, markdown_table(family_table()))
    config_text = resources.files("metasolve").joinpath("demo.toml").read_text()
    config = parse_config(config_text, "metasolve/demo.toml")
    _say(executor, "\nmetasolve demo 2/2: learn an initial guess for PETSc Richardson + SSOR on Poisson2D "
                   "(control-variate estimator; config: metasolve/demo.toml)")
    train(config, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metasolve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_train = commands.add_parser("train", help="train a meta-solver from a TOML config")
    p_train.add_argument("config", type=Path, help="TOML config (see examples/*.toml)")
    p_train.add_argument("--out", type=Path, help="output directory (default: train.out of the config)")
    p_train.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar")
    p_eval = commands.add_parser("evaluate", help="evaluate a training checkpoint on unseen tasks")
    p_eval.add_argument("checkpoint", type=Path)
    p_eval.add_argument("--tasks", type=int, help="number of evaluation tasks (default: the config's)")
    p_demo = commands.add_parser("demo", help="solve the built-in families, then train the default predictor")
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    p_bench = commands.add_parser("bench", help="run the benchmarks into benchmarks/results/")
    p_bench.add_argument("--only", nargs="*", help="benchmark sections to run (default: all)")
    p_bench.add_argument("--quick", action="store_true", help="tiny budgets, for smoke-testing the harness")
    args = parser.parse_args(argv)

    abort_on_uncaught_exception()
    # The meta-solver and surrogate are small; the solves are the work. One torch thread per
    # process keeps torch from contending with PETSc and with the other ranks for the cores.
    torch.set_num_threads(1)
    try:
        if args.command == "train":
            config = load_config(args.config)
            train(config, args.out or Path(config["train"]["out"]), resume=args.resume, quiet=args.quiet)
        elif args.command == "evaluate":
            evaluate(args.checkpoint, args.tasks)
        elif args.command == "demo":
            demo(args.out)
        else:
            from benchmarks.run import run_benchmarks

            run_benchmarks(only=args.only, quick=args.quick)
    except ConfigError as error:
        print(f"metasolve: config error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
