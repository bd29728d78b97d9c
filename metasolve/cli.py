"""The `metasolve` command: train, evaluate, demo, bench.

Works unchanged under `mpiexec -n N metasolve train CONFIG.toml`: every rank runs the same
command, solves are split across ranks, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from metasolve.checkpoint import CheckpointError, load_checkpoint
from metasolve.config import ConfigError, load_config, parse_config, validate
from metasolve.experiment import Experiment, build_experiment
from metasolve.parallel import SCHEDULES, MPIExecutor, RemoteError, SerialExecutor, abort_on_uncaught_exception
from metasolve.report import markdown_table, write_report
from metasolve.run_dir import RunDirectoryError, claim
from metasolve.train import Interrupted, TrainingFailed, summarize
from solvers._petsc import MPI, PETSc, insert_options


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
    name = "zero guess" if list(learned) in (["x0"], ["u0"]) else "configured defaults"
    return {name: {}}


def _on_root(executor, fn):
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


def train(config: dict, out: Path, resume: bool = False, quiet: bool = False,
          overwrite: bool = False) -> tuple[Experiment, dict]:
    """Train, evaluate against the default setting, write report + deployable meta-solver to `out`.

    `out` belongs to one run (`run_dir.claim`): a directory holding another run is refused
    unless `overwrite`, and `resume` refuses a checkpoint of a different config."""
    executor = make_executor(**config["parallel"])
    record = _on_root(executor, lambda: claim(out, config, resume=resume, overwrite=overwrite))
    experiment = build_experiment(config, executor)
    trainer = experiment.trainer
    trainer.checkpoint_dir = out / "checkpoints"
    trainer.metadata = {"config": config, "code": record["code"]}
    trainer.progress = not quiet
    settings = config["train"]
    _say(executor, f"metasolve: {experiment.family.describe()}")
    _say(executor, f"metasolve: training {settings['steps']} steps x {settings['batch_size']} tasks, "
                   f"estimator {experiment.blackbox.estimator!r}, {executor.size} rank(s)")
    begin = time.perf_counter()
    resumed = resume and any((out / "checkpoints").glob("*.pt"))
    if not resumed:  # a broken setting stops here, before pretraining or training spends solves
        trainer.preflight(experiment.eval_tasks)
    candidates = _pretrain(config, experiment, executor, resumed=resumed)
    kept_path = out / "pretrained.pt"  # a resumed run still compares with the untrained and pretrained weights
    if candidates is not None:
        _on_root(executor, lambda: torch.save(candidates, kept_path))
    elif resumed:
        candidates = _on_root(executor, lambda: torch.load(kept_path, weights_only=True) if kept_path.exists() else None)
    history = trainer.fit(experiment.train_tasks, settings["steps"], settings["batch_size"],
                          eval_tasks=experiment.eval_tasks, eval_every=settings["eval_every"],
                          resume=resume, metrics_path=out / "metrics.jsonl")
    if candidates is not None:
        from metasolve.pretrain import keep_better

        n = len(experiment.train_tasks)
        kept = keep_better(experiment.meta_solver, experiment.blackbox, candidates,
                           experiment.family.tasks(range(n, n + min(16, n))))
        costs = ", ".join(f"{name} {cost:.6g}" for name, cost in kept["costs"].items())
        _say(executor, f"metasolve: training cost on validation tasks: {costs} (untrained: the zero guess); "
                       f"keeping the {kept['kept']} weights")
    seconds = time.perf_counter() - begin
    evaluation = trainer.evaluate(experiment.eval_tasks, baselines=_baseline(config), cost=experiment.evaluation_cost)
    if executor.is_root:
        experiment.meta_solver.save(out / "meta_solver.pt")
        progress = trainer.progress_report
        (out / "evaluation.json").write_text(json.dumps({"train_seconds": seconds, "evaluation": evaluation,
                                                         "held_out_training_cost": progress}, indent=1))
        held_out = (f"\n\nHeld-out training cost: untrained {progress['untrained_cost']:.6g}, trained "
                    f"{progress['trained_cost']:.6g}." + (f" **Training did not lower it.** Likely cause: "
                                                          f"{' '.join(progress['causes'])}" if "causes" in progress else "")
                    if progress else "")
        report = write_report(out, f"metasolve run: {config['problem']['family']}", history, evaluation,
                              notes=f"{experiment.family.describe()}\n\nTraining took {seconds:.1f} s.{held_out}")
        print(markdown_table(summarize(evaluation)))
        print(f"metasolve: report {report}, meta-solver {out / 'meta_solver.pt'}")
    return experiment, evaluation


def _pretrain(config: dict, experiment: Experiment, executor, resumed: bool) -> dict | None:
    """Fit the initial guess to the solver's own solutions first (one counted solve per training
    task), unless `[pretrain] enabled = false`, the space has no guess, or a checkpoint resumes;
    the untrained and the pretrained weights, for `keep_better` after training."""
    from metasolve.pretrain import guess_parts, hand_over, pretrain

    if resumed or not config["pretrain"]["enabled"] or not guess_parts(experiment.blackbox.space):
        return None
    trainer = experiment.trainer
    untrained = {k: v.clone() for k, v in experiment.meta_solver.state_dict().items()}
    report = pretrain(experiment.meta_solver, experiment.blackbox, experiment.train_tasks)
    lr = hand_over(trainer.optimizer, trainer.scheduler, report, experiment.meta_solver)
    _say(executor, f"metasolve: {report.describe()}; training through the solver continues at learning rate {lr:.3g}")
    return {"untrained": untrained, "pretrained": {k: v.clone() for k, v in experiment.meta_solver.state_dict().items()}}


def evaluate(checkpoint: Path, tasks: int | None) -> dict:
    state = load_checkpoint(checkpoint)
    if "config" not in state.get("metadata", {}):
        raise CheckpointError(f"{checkpoint}: not a training checkpoint written by 'metasolve train' (no config)")
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
    _say(executor, "\nmetasolve demo 2/2: learn an initial guess for PETSc Newton (SNES newtonls + LU) on Bratu "
                   "near the fold (config: metasolve/demo.toml)")
    train(config, out, overwrite=True)  # a demonstration: running it again replaces the last one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metasolve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_train = commands.add_parser("train", help="train a meta-solver from a TOML config")
    p_train.add_argument("config", type=Path, help="TOML config (see examples/*.toml)")
    p_train.add_argument("--out", type=Path, help="output directory (default: train.out of the config)")
    p_train.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    p_train.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    p_train.add_argument("--overwrite", action="store_true",
                         help="replace the run already in the output directory (its checkpoints, metrics, model)")
    p_eval = commands.add_parser("evaluate", help="evaluate a training checkpoint on unseen tasks")
    p_eval.add_argument("checkpoint", type=Path)
    p_eval.add_argument("--tasks", type=int, help="number of evaluation tasks (default: the config's)")
    p_demo = commands.add_parser("demo", help="solve the built-in families, then train the default predictor")
    p_demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    p_predict = commands.add_parser(
        "predict", help="write a trained setting for one program run as a PETSc options file (-options_file)",
        description="metasolve predict MODEL --out DIR -- <the run's own arguments>, or --matrix A.bin [--rhs b.bin]")
    p_predict.add_argument("model", type=Path, help="meta-solver file (MetaSolver.save / save_for_program)")
    p_predict.add_argument("--out", type=Path, default=Path("."), help="directory for metasolve.opts (and x0.bin)")
    p_predict.add_argument("--matrix", type=Path, help="the task's matrix file (PETSc binary) instead of arguments")
    p_predict.add_argument("--rhs", type=Path, help="the task's right-hand side file (PETSc binary)")
    p_predict.add_argument("--prefix", help="options prefix of the program's solver (default: stored with the model)")
    p_bench = commands.add_parser("bench", help="run the benchmarks into benchmarks/results/ "
                                                "(a repository command: needs a clone, not a wheel)")
    p_bench.add_argument("--only", nargs="*", help="benchmark sections to run (default: all)")
    p_bench.add_argument("--quick", action="store_true", help="tiny budgets, for smoke-testing the harness")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a literal `--` is PETSc's, as on any PETSc program's command line:
    # `metasolve train run.toml -- -log_view -options_file petsc.opts`.
    petsc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "predict":  # after `--`: the run's own program arguments, not PETSc's
        args.arguments, petsc_args = (petsc_args if "--" in argv else None), []
    insert_options(petsc_args)
    _log_to_stderr()

    abort_on_uncaught_exception()
    # The meta-solver and surrogate are small; the solves are the work. One torch thread per
    # process keeps torch from contending with PETSc and with the other ranks for the cores.
    torch.set_num_threads(1)
    try:
        if args.command == "train":
            config = load_config(args.config)
            train(config, args.out or Path(config["train"]["out"]), resume=args.resume, quiet=args.quiet,
                  overwrite=args.overwrite)
        elif args.command == "evaluate":
            evaluate(args.checkpoint, args.tasks)
        elif args.command == "demo":
            demo(args.out)
        elif args.command == "predict":
            from metasolve.predict import describe, predict

            try:
                options_file, setting = predict(args.model, args.out, arguments=args.arguments, matrix=args.matrix,
                                                rhs=args.rhs, prefix=args.prefix)
            except ValueError as error:
                print(f"metasolve: predict: {error}", file=sys.stderr)
                return 2
            print(f"metasolve: {describe(setting)} -> {options_file}; add -options_file {options_file} to the run")
        else:
            try:
                from benchmarks.run import run_benchmarks
            except ModuleNotFoundError:
                print("metasolve: 'bench' is a repository command: the benchmarks are not part of the installed "
                      "package. Run `make bench` (or `metasolve bench`) in a clone of the metasolve repository.",
                      file=sys.stderr)
                return 2
            run_benchmarks(only=args.only, quick=args.quick)
    except (ConfigError, RunDirectoryError) as error:
        print(f"metasolve: {'config error: ' if isinstance(error, ConfigError) else ''}{error}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingFailed, PETSc.Error, RemoteError) as error:
        print(f"metasolve: {'PETSc ' if isinstance(error, PETSc.Error) else ''}error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"metasolve: {stop}; continue with --resume", file=sys.stderr)
        return stop.status
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (test runners swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """The stream is always the current sys.stderr."""


def _log_to_stderr() -> None:
    """Library messages (`logging.getLogger("metasolve")`) to stderr, from rank 0 only (every
    rank runs the same steps and would say the same), except errors."""
    logger = logging.getLogger("metasolve")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("metasolve: %(message)s" if MPI.COMM_WORLD.Get_size() == 1
                                           else f"metasolve[{MPI.COMM_WORLD.Get_rank()}]: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if MPI.COMM_WORLD.Get_rank() == 0 else logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
