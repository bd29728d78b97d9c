"""The `metasolve` command the PETSc way: options after `--` (`-log_view`, `-options_file`,
`-help`) and output that suits a log file."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metasolve.app.cli import main
from solvers import PETSc
from tests.mpi_run import REPO_ROOT
from tests.test_reliability import tiny


def train(config, out, *extra: str) -> int:
    return main(["train", str(config), "--out", str(out), *extra])


@pytest.mark.slow  # a process of its own: -log_view prints when PETSc finalizes at exit
def test_log_view_after_double_dash_shows_the_trainers_stages(tmp_path):
    config = tiny(tmp_path, steps=2)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "metasolve.app.cli", "train", str(config), "--out", str(tmp_path / "out"),
                           "--quiet", "--", "-log_view"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PETSc Performance Summary" in done.stdout
    summary = done.stdout[done.stdout.index("Summary of Stages"):]
    for name in ("metasolve: network", "metasolve: gradient estimate + surrogate update"):
        assert name in summary


def test_options_file_and_help_after_double_dash_reach_petsc(tmp_path, capfd):
    options = tmp_path / "petsc.opts"
    options.write_text("-metasolve_test_marker 7\n")
    database = PETSc.Options()
    try:
        assert train(tiny(tmp_path, steps=1), tmp_path / "out", "--quiet", "--", "-options_file", str(options),
                     "-help") == 0
        assert database.getInt("metasolve_test_marker") == 7
        # -help: the oracle's KSP (under its private prefix) printed PETSc's own help for its options.
        assert "ksp_type <now richardson" in capfd.readouterr().out
    finally:
        database.delValue("-metasolve_test_marker")
        database.delValue("-help")


def test_without_a_terminal_progress_is_a_few_log_lines_not_bar_redraws(tmp_path, capsys):
    assert train(tiny(tmp_path, steps=40), tmp_path / "out") == 0
    error = capsys.readouterr().err
    progress = [line for line in error.splitlines() if line.startswith("metasolve: step ")]
    assert len(progress) == 20 and progress[-1].startswith("metasolve: step 40/40: loss")
    assert "\r" not in error and "it/s" not in error


def test_the_packaged_demo_config_builds_a_newton_guess_experiment():
    """`make demo` runs metasolve/app/demo.toml: it must validate and build (Bratu, SNES oracle, a
    vector guess pretrained on solutions) without running the training."""
    from importlib import resources

    from metasolve.app.config import parse_config
    from metasolve.app.experiment import build_experiment
    from metasolve.training.parallel import SerialExecutor

    config = parse_config(resources.files("metasolve.app").joinpath("demo.toml").read_text(), "metasolve/app/demo.toml")
    experiment = build_experiment(config, SerialExecutor())
    assert config["problem"]["family"] == "bratu" and config["pretrain"]["enabled"]
    assert list(experiment.blackbox.space.parts) == ["u0"]
    assert len(experiment.train_tasks) == 16 and len(experiment.eval_tasks) == 32
    outcome = experiment.blackbox.oracle(experiment.eval_tasks[0], {})
    assert outcome.converged and outcome.iterations >= 4  # Newton from zero near the fold: the demo's headroom
