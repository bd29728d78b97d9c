"""The run layer as a user meets it: the recipe's guards, exercised with real PETSc and real
processes. Each case was a defect once (a traceback, a silent success, a lost run)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metasolve.app.cli import main
from metasolve.app.config import ConfigError, load_config
from metasolve.app.run import run
from metasolve.app.run_dir import lock, release
from metasolve.method.params import Interval, LogInterval
from metasolve.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from tests.mpi_run import REPO_ROOT
from tests.test_reliability import tiny, train

SOR = 'kind = "interval"\nlo = 0.5\nhi = 2.0'


@pytest.mark.parametrize("line, needle", [
    ('[problem]\nfamily = "poisson1dd"', "poisson1dd"),
    ('[problem]\nfamily = "poisson1d"\nparams = { nn = 15 }', "nn"),
    ('[problem]\nfamily = "poisson1d"\nseed = -1', "problem.seed"),
    ('[problem]\nfamily = "poisson1d"\n[cost]\nkind = "residual"', "cost.kind"),
    ('[problem]\nfamily = "poisson1d"\n[estimator]\ndistribution = "uniform"', "estimator.distribution"),
    ('[problem]\nfamily = "poisson1d"\n[train]\nschedule = "linear"', "train.schedule"),
    ('[problem]\nfamily = "poisson1d"\nfeatures = "fancy"', "problem.features"),
    ('[problem]\nfamily = "poisson1d"\n[solver]\nkind = "lu"', "solver.kind"),
    ('[problem]\nfamily = "poisson1d"\n[parallel]\nschedule = "dynamic"', "parallel.schedule"),
    ('[problem]\nfamily = "poisson1d"\n[model]\nkind = "tree"', "model.kind"),
    ('[problem]\nfamily = "poisson1d"\n[solver]\nmax_it = 3000000000', "solver.max_it"),
])
def test_config_mistakes_are_named_before_anything_is_written(tmp_path, capsys, line, needle):
    """Exit 2 with the key named, and no run.json: nothing ran."""
    config = tmp_path / "bad.toml"
    config.write_text(line + '\n[space.x0]\nkind = "vector"\nmodes = 2\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out" / "run.json").exists()


def test_metasolve_config_lists_every_key_with_its_default(capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    for key in ("family = (required)", "search_solves = 10", "anchor = {}", "patience = 0", "ksp_type = 'cg'"):
        assert key in text
    assert main(["config", "nosuchsection"]) == 2


def test_an_interval_never_decodes_onto_its_closed_end():
    """`hi = 2.0` for SOR's ω: a saturated sigmoid must not hand PETSc ω = 2 exactly."""
    for part in (Interval(0.0, 2.0), LogInterval(1e-3, 2.0)):
        for raw in (1e3, -1e3, 40.0, -40.0):
            value = float(part.decode_tensor(torch.tensor([raw], dtype=torch.float64)))
            assert part.lo < value < part.hi


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"step": 3})
    assert load_checkpoint(path)["format_version"] == 2
    torch.save({"step": 3, "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_two_jobs_in_one_run_directory_the_second_is_refused(tmp_path):
    """A Slurm resubmission overlapping its predecessor: while one process runs in `out` (here:
    this test process holds the run's lock, as a running job does), a second job stops at once
    with exit 2 and touches nothing; once the first lets go, the directory is usable again."""
    config = tiny(tmp_path, steps=2)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "metasolve", "train", str(config), "--out", str(out), "--quiet"]
    lock(out)
    try:
        second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        release(out)
    assert second.returncode == 2 and "in use by another running job" in second.stderr, second.stderr
    assert str(os.getpid()) in second.stderr and not (out / "run.json").exists()
    third = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr


def test_evaluate_names_what_is_wrong_with_its_arguments(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(tiny(tmp_path, steps=2), out) == 0
    assert main(["evaluate", str(out / "meta_solver.pt")]) == 1
    assert "checkpoints" in capsys.readouterr().err
    checkpoint = list_checkpoints(out / "checkpoints")[0]
    assert main(["evaluate", str(checkpoint), "--tasks", "0"]) == 2
    assert "--tasks" in capsys.readouterr().err


def test_an_unwritable_output_directory_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert train(tiny(tmp_path), blocker / "out") == 2
    assert "a-file" in capsys.readouterr().err


def test_a_missing_petsc_options_file_is_an_error_not_a_traceback(tmp_path, capsys):
    status = main(["train", str(tiny(tmp_path)), "--out", str(tmp_path / "out"), "--quiet", "--",
                   "-options_file", str(tmp_path / "nonexistent.opts")])
    assert status == 1 and "nonexistent.opts" in capsys.readouterr().err


def test_run_reports_baselines_settings_and_failures(tmp_path):
    """The evaluation table a PETSc user asks for: per-task settings, the best constant (and
    what finding it cost), failures counted — through the same `run` the CLI calls."""
    config = load_config(tiny(tmp_path, ksp_type="richardson", pc_type="sor", part="pc_sor_omega", space=SOR,
                              solver='options = "-pc_sor_forward"'))
    result = run(config, tmp_path / "out", quiet=True)
    evaluation = result.evaluation
    assert set(evaluation) == {"learned", "configured defaults", "best constant"}
    for method in evaluation.values():
        assert len(method["settings"]) == len(method["iterations"]) == 2
        assert method["failed"] == [False, False]
    assert all(0.5 < s["pc_sor_omega"] < 2.0 for s in evaluation["learned"]["settings"])
    written = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert written["baselines"]["best constant"]["solves"] > 0
    assert "Per task" in (tmp_path / "out" / "report.md").read_text()
    assert all(math.isfinite(row["median_iterations"]) for row in result.summary)


def test_petsc_options_nobody_read_are_named_with_the_way_to_monitor(tmp_path, caplog):
    """`-- -ksp_monitor` reaches no training solve (they read a private prefix): say so and say
    where monitoring options go."""
    from solvers._petsc import PETSc

    try:
        status = main(["train", str(tiny(tmp_path, steps=1)), "--out", str(tmp_path / "out"), "--quiet", "--",
                       "-ksp_monitor", "-ksp_converged_reason"])
    finally:
        for name in ("-ksp_monitor", "-ksp_converged_reason"):
            PETSc.Options().delValue(name)
    assert status == 0
    assert "-ksp_converged_reason -ksp_monitor" in caplog.text and "[solver] options" in caplog.text


def test_the_config_reference_page_is_the_schema():
    """docs/config.md is generated (`metasolve config`): it cannot drift from the schema."""
    from metasolve.app.config import config_reference

    page = (REPO_ROOT / "docs" / "config.md").read_text()
    assert config_reference() in page, "regenerate docs/config.md with `metasolve config`"


def test_operator_features_on_a_program_family_is_a_named_config_error(tmp_path, capsys):
    config = tmp_path / "program.toml"
    config.write_text('[problem]\nfamily = "program"\nfeatures = "operator"\n'
                      '[problem.params.arguments]\nn = { integers = [8, 16] }\n'
                      '[solver]\nkind = "executable"\ncommand = ["true"]\n'
                      '[space.pc_sor_omega]\nkind = "interval"\nlo = 1.0\nhi = 1.9\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "problem.features" in capsys.readouterr().err and not (tmp_path / "out" / "run.json").exists()


def test_the_storeys_import_only_downwards():
    """app → training → method, never back: the method stands without the machinery, and the
    machinery without the application (imports inside functions included)."""
    import ast

    below = {"method": ("metasolve.training", "metasolve.app"), "training": ("metasolve.app",)}
    found = []
    for storey, forbidden in below.items():
        for path in sorted((REPO_ROOT / "metasolve" / storey).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                found += [f"{path.name}: {name}" for name in names if name.startswith(forbidden)]
    assert not found, found


def test_train_on_a_coarse_grid_evaluate_on_a_fine_one(tmp_path):
    """`[evaluate] params`: the guess's sine modes mean the same function on any grid, so a run
    trained where solves are cheap is measured where they are not — through the same recipe."""
    config = tmp_path / "multilevel.toml"
    config.write_text('[problem]\nfamily = "poisson2d"\nparams = { n = 8 }\ntrain_tasks = 8\neval_tasks = 3\n'
                      '[solver]\nksp_type = "richardson"\npc_type = "jacobi"\n'
                      '[space.x0]\nkind = "vector"\nmodes = 3\n'
                      '[estimator]\nkind = "forward"\n[train]\nsteps = 2\nbatch_size = 2\n'
                      '[evaluate]\nparams = { n = 16 }\n')
    result = run(load_config(config), tmp_path / "out", quiet=True)
    learned = result.evaluation["learned"]
    assert learned["settings"][0]["x0"] == "<vector of 256>"
    assert learned["failed"] == [False] * 3
    zero = result.evaluation["zero guess"]["iterations"]
    assert sum(learned["iterations"]) < sum(zero)  # the pretrained guess transfers to the finer grid


def test_a_vector_guess_on_a_family_of_varying_grids_is_a_named_config_error(tmp_path, capsys):
    config = tmp_path / "varying.toml"
    config.write_text('[problem]\nfamily = "diffusion"\nparams = { n_range = [8, 12] }\ntrain_tasks = 8\n'
                      '[space.x0]\nkind = "vector"\nmodes = 2\n[train]\nbatch_size = 2\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "space.x0" in capsys.readouterr().err


def test_an_option_no_solve_reads_is_a_config_error_naming_it(tmp_path, capsys):
    """A PC-specific base option under a Choice over PCs: the candidates without that PC never
    read it. Exit 2 naming the option, not a traceback."""
    config = tmp_path / "choice.toml"
    config.write_text('[problem]\nfamily = "poisson1d"\nparams = { n = 15 }\ntrain_tasks = 8\neval_tasks = 2\n'
                      '[solver]\nksp_type = "gmres"\npc_type = "jacobi"\noptions = "-pc_sor_omega 1.5"\n'
                      '[space.pc_type]\nkind = "choice"\nchoices = ["jacobi", "sor"]\n'
                      '[cost]\nkind = "log_work"\n[estimator]\nkind = "score_function"\n'
                      '[train]\nsteps = 1\nbatch_size = 2\n')
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "pc_sor_omega" in capsys.readouterr().err
