"""The `metasolve` command: argument parsing and exit codes around the run layer.

    metasolve train CONFIG [--out DIR] [--resume] [-- PETSc options]
    metasolve evaluate CHECKPOINT [--tasks N]
    metasolve predict MODEL --out DIR -- <the run's arguments>   (or --table runs.csv, --matrix A.bin)
    metasolve record --out DIR -- ./app ARGS                      (collect the systems a program solves)
    metasolve config [SECTION]                                    (every config key with its default)
    metasolve demo

Works unchanged under `mpiexec -n N metasolve train CONFIG.toml`. Exit status: 0 done, 1 a
run that failed (PETSc, a checkpoint, training that cannot progress, a model not fit to deploy),
2 a usage or config error (named, before anything runs), 128 + signal when stopped by a signal
(checkpointed: continue with --resume). Imports are deferred to the command that needs them,
so `metasolve predict` and `metasolve config` start without torch or PETSc.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from metasolve.app.config import ConfigError, config_reference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metasolve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p_train = commands.add_parser(
        "train", help="train a meta-solver from a TOML config", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (section.key = default), also `metasolve config`:\n\n" + config_reference(brief=True))
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
        "predict", help="write a trained setting for program runs as PETSc options files (-options_file)",
        description="metasolve predict MODEL --out DIR -- <the run's own arguments>, or --table runs.csv, "
                    "or --matrix A.bin --rhs b.bin")
    p_predict.add_argument("model", type=Path, help="meta-solver file written by `metasolve train`")
    p_predict.add_argument("--out", type=Path, default=Path("."), help="directory for metasolve.opts (and x0.bin)")
    p_predict.add_argument("--table", type=Path, help="CSV of runs (one per row): one options file per run")
    p_predict.add_argument("--matrix", type=Path, help="the task's matrix file (PETSc binary) instead of arguments")
    p_predict.add_argument("--rhs", type=Path, help="the task's right-hand side file (PETSc binary)")
    p_predict.add_argument("--prefix", help="options prefix of the program's solver (default: stored with the model)")
    p_record = commands.add_parser(
        "record", help="run a program and collect the linear systems it solves, with a starter config",
        description="metasolve record --out DIR -- ./app ARGS: the program runs unchanged; PETSc's own viewers "
                    "write each system it solves into DIR, and DIR/train.toml trains on them")
    p_record.add_argument("--out", type=Path, required=True, help="directory for the recorded systems")
    p_config = commands.add_parser("config", help="list every config key with its type and default")
    p_config.add_argument("section", nargs="?", help="only this section")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after a literal `--` is PETSc's, as on any PETSc program's command line
    # (`metasolve train run.toml -- -log_view`); for predict and record it is the program's.
    tail = argv[argv.index("--") + 1:] if "--" in argv else None
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "config":
        try:
            print(config_reference(section=args.section))
        except ConfigError as error:
            print(f"metasolve: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "predict":
        from metasolve.app.predict import run_predict

        return run_predict(args.model, args.out, arguments=tail, table=args.table, matrix=args.matrix,
                           rhs=args.rhs, prefix=args.prefix)
    if args.command == "record":
        from metasolve.app.record import run_record

        return run_record(tail or [], args.out)
    return _solve_command(args, tail or [])


def _solve_command(args: argparse.Namespace, petsc_args: list[str]) -> int:
    """train, evaluate, demo: the commands that run PETSc and torch, with their exit codes."""
    import torch

    from metasolve.app.config import load_config
    from metasolve.app.run import DeployRefused, evaluate_checkpoint, run
    from metasolve.app.run_dir import RunDirectoryError
    from metasolve.training.checkpoint import CheckpointError
    from metasolve.training.parallel import RemoteError, abort_on_uncaught_exception
    from metasolve.training.train import Interrupted, TrainingFailed
    from solvers._petsc import PETSc, insert_options
    from solvers.options import UnreadOption

    _log_to_stderr()
    _exit_on_signals()
    abort_on_uncaught_exception()
    # The meta-solver and surrogate are small; the solves are the work. One torch thread per
    # process keeps torch from contending with PETSc and with the other ranks for the cores.
    torch.set_num_threads(1)
    given: list[str] = []
    try:
        before = set(PETSc.Options().getAll())
        insert_options(petsc_args)
        given = sorted(set(PETSc.Options().getAll()) - before)  # from the command line and its -options_file
        if args.command == "train":
            config = load_config(args.config)
            run(config, args.out or Path(config["train"]["out"]), resume=args.resume, quiet=args.quiet,
                overwrite=args.overwrite)
        elif args.command == "evaluate":
            evaluate_checkpoint(args.checkpoint, args.tasks)
        else:
            from metasolve.app.showcase import demo

            demo(args.out)
        _warn_unread(given)
    except (ConfigError, RunDirectoryError, UnreadOption) as error:
        kind = "config error: " if isinstance(error, (ConfigError, UnreadOption)) else ""
        print(f"metasolve: {kind}{error}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingFailed, DeployRefused, PETSc.Error, RemoteError, OSError) as error:
        print(f"metasolve: {'PETSc ' if isinstance(error, PETSc.Error) else ''}error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"metasolve: {stop}; continue with --resume", file=sys.stderr)
        return stop.status
    return 0


# Options PETSc reads at initialisation or at exit, never through an object's setFromOptions.
_READ_OUTSIDE_SOLVES = ("options_file", "log_", "malloc", "info", "help", "options_left", "no_signal_handler")


def _warn_unread(names: list[str]) -> None:
    """PETSc ignores an option nobody read, silently: `metasolve train cfg -- -ksp_monitor` once
    printed nothing, because the training solves read options under a private prefix."""
    from solvers.options import unused_options

    unread = unused_options("", [n for n in names if not n.startswith(_READ_OUTSIDE_SOLVES)])
    if unread:
        logging.getLogger("metasolve").warning(
            "PETSc options given on the command line that no solve read: %s. Training solves read their "
            "options under a private prefix; to monitor or view them, put the options in the config's "
            "[solver] options (e.g. options = \"-ksp_monitor -ksp_converged_reason\").",
            " ".join(f"-{n}" for n in unread))


def _exit_on_signals() -> None:
    """SIGTERM/SIGINT outside training (while tasks and features are built, during evaluation)
    end the process with 128 + signal, the status a scheduler reads as "terminated by it",
    instead of PETSc's crash banner and MPI_Abort. Training installs its own handlers, which
    checkpoint the step in flight first (`metasolve.training.train`). A second signal ends the
    process at once, even inside PETSc's C code (`handle_first_signal`)."""
    import signal

    from solvers.process_tree import handle_first_signal

    def stop(signum: int, frame: object) -> None:
        print(f"metasolve: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        handle_first_signal(signum, stop)


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
    from solvers._petsc import MPI

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
