"""What an adversarial user tried, each case kept fixed: `metasolve train` with real PETSc, real
subprocesses and real signals. Every case ends with a clear message or is survived, with
nothing lost and nothing left on disk."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metasolve.training.checkpoint import list_checkpoints, load_checkpoint
from metasolve.app.cli import main
from tests.mpi_run import REPO_ROOT, run_mpi

TINY = """
[problem]
family = "poisson1d"
params = {{ n = 15 }}
train_tasks = 8
eval_tasks = 2

[solver]
ksp_type = "{ksp_type}"
pc_type = "{pc_type}"
{solver}

[space.{part}]
{space}

[cost]
kind = "log_residual"
iterations = 5

[estimator]
kind = "forward"
tangents = 1
eps = 1e-4

[model]
depth = 0

[pretrain]
enabled = false          # these tests are about the trainer; pretraining has tests of its own

[train]
steps = {steps}
batch_size = 2
lr = 1e-2
schedule = "cosine"
checkpoint_every = {every}
"""
X0 = 'kind = "vector"\nmodes = 2\nscale = 0.3'


def tiny(tmp_path: Path, name: str = "run.toml", ksp_type: str = "richardson", pc_type: str = "jacobi",
         solver: str = "", part: str = "x0", space: str = X0, steps: int = 4, every: int = 2) -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(ksp_type=ksp_type, pc_type=pc_type, solver=solver, part=part, space=space,
                                steps=steps, every=every))
    return path


def train(config: Path, out: Path, *flags: str) -> int:
    return main(["train", str(config), "--out", str(out), "--quiet", *flags])


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model, the optimizer's moments and both random generators of a checkpoint."""
    state = load_checkpoint(path)
    moments = {f"optimizer.{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **moments,
            **{f"generator.{k}": state[k] for k in ("sampler", "blackbox_generator")}}


# --- 2. Settings under which every solve fails stop at once, with PETSc's reason -------------

@pytest.mark.parametrize("case, needle", [
    (dict(ksp_type="cgg"), "cgg"),
    (dict(pc_type="jacobii"), "jacobii"),
    (dict(pc_type="sor", solver='options = { pc_sor_omega = "abc" }'), "abc"),
    (dict(pc_type="sor", part="pc_sor_omega", space='kind = "interval"\nlo = 2.5\nhi = 3.5'), "pc_sor_omega = 3.0"),
])
def test_settings_where_every_solve_fails_stop_with_petscs_message(tmp_path, capsys, case, needle):
    status = train(tiny(tmp_path, **case), tmp_path / "out")
    error = capsys.readouterr().err
    assert status == 1, error
    assert needle in error and "PETSc" in error, error
    assert not (tmp_path / "out" / "meta_solver.pt").exists()
    assert not list_checkpoints(tmp_path / "out" / "checkpoints")


@pytest.mark.parametrize("line, message", [
    ("rtol = 2.0", "solver.rtol must be in [0, 1)"), ("rtol = nan", "solver.rtol must be a finite number"),
    ("max_it = -5", "solver.max_it must be >= 1"), ("atol = -5.0", "solver.atol must be >= 0"),
    ('options = { ksp_type = "gmres" }', "ksp_type is given twice"),
])
def test_settings_that_validation_rejects_run_nothing(tmp_path, capsys, line, message):
    assert train(tiny(tmp_path, solver=line), tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert message in error and str(tmp_path / "run.toml") in error
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_fail_fast_under_mpi_on_every_rank(tmp_path):
    """Two ranks: both stop at the same step with the same message and a non-zero exit."""
    config = tiny(tmp_path, ksp_type="cgg")
    script = tmp_path / "metasolve_cli.py"
    script.write_text("import sys\nfrom metasolve.app.cli import main\nsys.exit(main())\n")
    done = run_mpi(script, n=2, args=["train", config, "--out", tmp_path / "out", "--quiet"], timeout=120)
    assert done.returncode != 0
    assert "cgg" in done.stderr and "failed" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "meta_solver.pt").exists()


# --- 1. A run directory belongs to one run -------------------------------------------------

def test_a_directory_holding_another_run_is_refused_and_left_intact(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(tiny(tmp_path, "a.toml"), out) == 0
    before = {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")}
    model = (out / "meta_solver.pt").read_bytes()
    other = tiny(tmp_path, "b.toml", space='kind = "vector"\nmodes = 3\nscale = 0.3')
    assert train(other, out) == 2
    assert "space.x0.modes: 2 -> 3" in capsys.readouterr().err
    assert train(other, out, "--resume") == 2
    error = capsys.readouterr().err
    assert "--resume" in error and "space.x0.modes" in error
    assert {p.name: p.read_bytes() for p in list_checkpoints(out / "checkpoints")} == before
    assert (out / "meta_solver.pt").read_bytes() == model
    assert train(other, out, "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["config"]["space"]["x0"]["modes"] == 3


def test_without_a_run_record_the_checkpoints_own_config_decides(tmp_path, capsys):
    out = tmp_path / "out"
    assert train(tiny(tmp_path, "a.toml"), out) == 0
    (out / "run.json").unlink()  # a run written before run records existed
    other = tiny(tmp_path, "b.toml", space='kind = "vector"\nmodes = 3\nscale = 0.3')
    assert train(other, out) == 2
    assert "no record" in capsys.readouterr().err
    assert train(other, out, "--resume") == 2
    assert "--resume: " in capsys.readouterr().err and not (out / "run.json").exists()
    assert train(tiny(tmp_path, "a.toml", steps=6), out, "--resume") == 0  # its own config: resumed


def test_resume_with_more_steps_extends_the_cosine_schedule(tmp_path):
    out = tmp_path / "out"
    assert train(tiny(tmp_path, steps=4), out) == 0
    assert train(tiny(tmp_path, steps=10), out, "--resume") == 0
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[0])
    assert state["step"] == 10
    # lr after step s of a cosine over 10 steps: 1e-2 (1 + cos(pi s/10))/2; the old 4-step
    # period would have climbed back to 1e-2 by step 8.
    lr = state["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.0, abs=1e-12)
    step8 = load_checkpoint(out / "checkpoints" / "checkpoint-00000008.pt")
    assert step8["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * (1 + math.cos(0.8 * math.pi)) / 2,
                                                                         rel=1e-9)
    assert state["scheduler"]["T_max"] == 10
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == list(range(1, 11))


def test_pruning_keeps_this_runs_newest_checkpoints_and_clears_stale_temporaries(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".checkpoint-abc.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert train(tiny(tmp_path, steps=7, every=1), out) == 0
    assert not stale.exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000007.pt",
                                                                      "checkpoint-00000006.pt"]


def test_corrupt_checkpoints_fall_back_then_refuse_rather_than_restart(tmp_path, capsys):
    out = tmp_path / "out"
    config = tiny(tmp_path, steps=4, every=1)
    assert train(config, out) == 0
    newest, previous = list_checkpoints(out / "checkpoints")
    newest.write_bytes(newest.read_bytes()[:100])
    assert train(tiny(tmp_path, steps=6, every=1), out, "--resume") == 0  # from step 3
    assert "checkpoint-00000004.pt: not a readable checkpoint" in capsys.readouterr().err
    for path in list_checkpoints(out / "checkpoints"):
        path.write_bytes(os.urandom(64))
    assert train(tiny(tmp_path, steps=8, every=1), out, "--resume") == 1
    assert "no intact checkpoint" in capsys.readouterr().err
    assert len(list_checkpoints(out / "checkpoints")) == 2  # the evidence is not deleted


# --- 4. Metrics stay valid JSON ------------------------------------------------------------

def test_metrics_are_strict_json(tmp_path):
    out = tmp_path / "out"
    assert train(tiny(tmp_path), out) == 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} in {line}"))


# --- 5. SIGTERM / SIGINT: checkpoint the last step, exit 128 + signal, resume bitwise ------

def signalled_run(config: Path, out: Path, signum: int, steps: int) -> int:
    """`metasolve train` in a process of its own, sent `signum` once 3 steps are done; the step it
    stopped after. The environment is the test's own (same BLAS threading as in-process runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "metasolve.app.cli", "train", str(config), "--out", str(out),
                                "--quiet"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while process.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signum)
    _, error = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, error
    (checkpoint,) = list_checkpoints(out / "checkpoints")
    stopped = load_checkpoint(checkpoint)["step"]
    assert 3 <= stopped < steps and f"after step {stopped}" in error
    assert not list((out / "checkpoints").glob(".checkpoint-*.tmp"))
    assert not (out / "meta_solver.pt").exists()
    return stopped


@pytest.mark.slow  # a process of its own: python + torch + PETSc start-up
def test_sigint_checkpoints_the_last_step_and_exits_130(tmp_path):
    signalled_run(tiny(tmp_path, steps=150, every=1000), tmp_path / "out", signal.SIGINT, 150)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    steps = 150
    config = tiny(tmp_path, steps=steps, every=1000)
    out = tmp_path / "killed"
    signalled_run(config, out, signal.SIGTERM, steps)
    assert train(config, out, "--resume") == 0
    assert train(config, tmp_path / "uninterrupted") == 0
    resumed = weights(list_checkpoints(out / "checkpoints")[0])
    straight = weights(list_checkpoints(tmp_path / "uninterrupted" / "checkpoints")[0])
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


# --- #9: no silent non-learning ------------------------------------------------------------

@pytest.mark.parametrize("space, lr, cause", [
    # an x0 scaled by 1e-30 is below b's round-off: no setting changes the cost
    ('kind = "vector"\nmodes = 2\nscale = 1e-30', "1e-2", "does not change with the setting"),
    # a learning rate that cannot move θ in 4 steps
    (X0, "1e-12", "θ barely moved"),
])
def test_a_run_that_learns_nothing_says_so_with_a_likely_cause(tmp_path, caplog, space, lr, cause):
    """The trainer must say that the held-out cost did not move, and why."""
    config = tiny(tmp_path, space=space, steps=4)
    config.write_text(config.read_text().replace("lr = 1e-2", f"lr = {lr}"))
    with caplog.at_level("INFO", logger="metasolve"):
        assert train(config, tmp_path / "out") == 0
    text = caplog.text
    assert "held-out cost: untrained" in text
    assert "training did not lower the held-out cost" in text and cause in text
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())["held_out_training_cost"]
    assert report["relative_improvement"] < 0.01 and report["causes"]
    assert math.isfinite(report["untrained_cost"])


# --- A solve that never ends: SIGTERM still stops the run (issue 24) -----------------------

NEVER_ENDING = """
[problem]
family = "convdiff"
params = { n_range = 32 }
train_tasks = 4
eval_tasks = 2

[solver]
ksp_type = "cg"                    # CG + ICC on a nonsymmetric operator: the residual creeps up
pc_type = "icc"                    # for ever, and divtol is out of reach
options = { ksp_divtol = 1e300 }
timeout = 600.0

[space.x0]
kind = "vector"
modes = 2
scale = 0.3

[cost]
kind = "iteration_proxy"
rtol = 1e-12
max_it = 2000000000

[estimator]
kind = "forward"
tangents = 1

[pretrain]
enabled = false

[train]
steps = 2
batch_size = 2
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's CPU time from /proc")
def test_sigterm_stops_a_run_whose_solve_never_ends_with_exit_143(tmp_path):
    """Without isolation, a hung in-process solve once ignored SIGTERM, a second SIGTERM and SIGINT
    for 14 minutes: PETSc's C loop never gave Python the chance to run its handler."""
    config = tmp_path / "hang.toml"
    config.write_text(NEVER_ENDING)
    out, errors = tmp_path / "out", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with errors.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "metasolve.app.cli", "train", str(config), "--out", str(out)],
                                   cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        for line in process.stdout:  # the last line before the held-out solves of the untrained predictor
            if line.startswith("metasolve: training"):
                break
        spent = cpu_seconds(process.pid)
        for _ in range(6000):  # inside the solve once it has burnt a further CPU second (or 10 minutes passed)
            if process.poll() is not None or cpu_seconds(process.pid) > spent + 1.0:
                break
            time.sleep(0.1)
        assert process.poll() is None, errors.read_text()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=300)  # before: still iterating here, SIGTERM unseen
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 143, errors.read_text()
    assert "stopped by SIGTERM" in errors.read_text()
    assert not (out / "meta_solver.pt").exists()


def test_after_resume_the_checkpoints_from_before_the_stop_are_pruned_too(tmp_path):
    """A run stopped after step 3 leaves checkpoints 2 and 3; resumed to step 6, only the newest
    two may remain (checkpoint 2 once stayed behind for good: the trainer remembered only the
    checkpoint it resumed from)."""
    out = tmp_path / "out"
    assert train(tiny(tmp_path, steps=3, every=1), out) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000003.pt",
                                                                      "checkpoint-00000002.pt"]
    assert train(tiny(tmp_path, steps=6, every=1), out, "--resume") == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000006.pt",
                                                                      "checkpoint-00000005.pt"]


def test_a_trained_predictor_whose_held_out_solves_fail_did_not_lower_the_cost(caplog):
    """"held-out cost: untrained 194.833 -> trained nan (+nan%)" once passed the "did not lower"
    check (NaN compares false). Here θ saturates ω towards 3, which PETSc's SOR refuses."""
    from metasolve import ForwardGradient, Interval, LogResidual, Space
    from metasolve.method.blackbox import BlackBox
    from metasolve.training.diagnosis import check_progress, held_out
    from solvers import KSPOracle
    from tests.systems import poisson_1d

    tasks = [poisson_1d(15, seed=s) for s in range(3)]
    for task in tasks:
        task.features = torch.ones(1, dtype=torch.float64)
    box = BlackBox(KSPOracle("richardson", "sor"), Space({"pc_sor_omega": Interval(0.5, 3.0)}), LogResidual(5),
                   ForwardGradient(tangents=1))
    model = torch.nn.Linear(1, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)  # θ = 0: ω = 1.75
    untrained = held_out(box, model, tasks)
    assert untrained["failed"] == 0
    torch.nn.init.constant_(model.weight, 50.0)  # ω -> 3
    with caplog.at_level("INFO", logger="metasolve"):
        report = check_progress(box, model, tasks, untrained, history=[{"loss": 1.0}, {"loss": float("nan")}])
    assert math.isnan(report["trained_cost"]) and report["trained_failed"] == 3
    assert "training did not lower the held-out cost" in caplog.text
    assert "3 of 3 held-out solves of the trained predictor failed" in caplog.text
    assert "pc_sor_omega" in " ".join(report["causes"])  # the setting PETSc refused, with its message


def test_keep_better_counts_failed_validation_solves_before_costs():
    """A Choice whose trained pick (LU, natural ordering: one iteration) fails with a zero pivot on
    one validation task of three once looked cheapest, because the mean skipped the failure."""
    import numpy as np
    import scipy.sparse as sp

    from metasolve import Choice, IterationProxy, Space
    from metasolve.method.blackbox import BlackBox
    from metasolve.method.score_function import ScoreFunction
    from metasolve.training.pretrain import keep_better
    from solvers import KSPOracle, LinearSystem
    from tests.systems import poisson_1d

    swap = LinearSystem(sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 0.0]])), np.array([1.0, 2.0]), name="zero-pivot")
    validation = [poisson_1d(15, seed=0), swap, poisson_1d(15, seed=1)]
    for task in validation:
        task.features = torch.ones(1, dtype=torch.float64)
    space = Space({"solver": Choice([{"pc_type": "none"}, {"pc_type": "lu", "pc_factor_mat_ordering_type": "natural"}])})
    box = BlackBox(KSPOracle("gmres", "none", rtol=1e-8), space, IterationProxy(1e-8, max_it=100), ScoreFunction(space))
    model = torch.nn.Linear(1, 2, bias=False).double()
    torch.nn.init.zeros_(model.weight)  # untrained: equal logits, the first candidate
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [5.0]], dtype=torch.float64))  # "trained": LU everywhere
    choice = keep_better(model, box, {"untrained": untrained}, validation)
    assert choice["failed"] == {"trained": 1, "untrained": 0}
    assert choice["costs"]["trained"] < choice["costs"]["untrained"]  # cheaper where it works ...
    assert choice["kept"] == "untrained" and torch.equal(model.weight, untrained["weight"])  # ... yet not kept


@pytest.mark.parametrize("part, space, solver, needle", [
    ("solver", 'kind = "choice"\nchoices = [{ pc_type = "jacobi" }, { pc_type = "sor" }]', "",
     "they need estimator.kind = 'score_function'"),
    ("p", 'kind = "parameters"', "", "space.p.kind = 'parameters'"),
    ("x0", X0, 'prefix = "foo_"', "solver.prefix"),
])
def test_mistakes_only_the_builder_sees_are_config_errors_not_tracebacks(tmp_path, capsys, part, space, solver, needle):
    """They once ended in a ValueError traceback with exit 1."""
    assert train(tiny(tmp_path, part=part, space=space, solver=solver), tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "config error" in error and needle in error


def test_a_choice_run_weighs_the_untrained_predictor_before_deploying(tmp_path, capsys):
    """Keep-better ran only after a supervised start, which a Choice never has: the trained choice
    was deployed whatever it cost on validation tasks."""
    config = tiny(tmp_path, part="solver", steps=2,
                  space='kind = "choice"\nchoices = [{ pc_type = "jacobi" }, { pc_type = "sor" }]')
    config.write_text(config.read_text().replace('[estimator]\nkind = "forward"', '[estimator]\nkind = "score_function"')
                      .replace("enabled = false", "enabled = true"))
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out)]) == 0  # not --quiet: the comparison is printed
    printed = capsys.readouterr().out
    assert "training cost on validation tasks: trained" in printed and "untrained" in printed
    kept = json.loads((out / "evaluation.json").read_text())["kept"]
    assert kept in ("trained", "untrained") and f"keeping the {kept} weights" in printed
    assert set(torch.load(out / "pretrained.pt", weights_only=True)) == {"untrained"}  # for a resumed run too


# --- A hang where no Python callback runs: the second signal ends the process (issue 24) ----

HUNG_IN_C = """
import signal, sys
from solvers._petsc import PETSc
from solvers.process_tree import handle_first_signal

flagged = []
assert handle_first_signal(signal.SIGTERM, lambda signum, frame: flagged.append(signum))
A = PETSc.Mat().createAIJ((8, 8), nnz=3, comm=PETSc.COMM_SELF)
for i in range(8):
    A[i, i] = 2.0
    if i:
        A[i, i - 1] = A[i - 1, i] = -1.0
A.assemble()
b, x = A.createVecs()
b.set(1.0)
ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
ksp.setOperators(A)
ksp.setType("richardson")
ksp.getPC().setType("none")
ksp.setTolerances(rtol=0.0, atol=0.0, divtol=1e300, max_it=2**31 - 1)
ksp.setNormType(PETSc.KSP.NormType.NONE)  # no norms, no callbacks: the loop never leaves C
print("solving", flush=True)
ksp.solve(b, x)
print("returned", flagged, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SA_RESETHAND through glibc; /proc CPU time")
def test_a_second_sigterm_ends_a_process_hung_inside_petsc_c_code(tmp_path):
    """A hang inside PETSc where no Python callback runs (once: an ICC set-up) ignored every
    SIGTERM: Python's handler only runs between bytecodes. The first signal is the handler's
    (it cannot run yet, so the process is still there); the second acts by default."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG_IN_C)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "solving\n"
        spent = cpu_seconds(process.pid)
        while process.poll() is None and cpu_seconds(process.pid) < spent + 0.3:  # inside KSPSolve's loop
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        spent = cpu_seconds(process.pid)
        while process.poll() is None and cpu_seconds(process.pid) < spent + 0.3:  # still iterating after it
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)  # without the one-shot handler: still iterating, TimeoutExpired
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGTERM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SA_RESETHAND through glibc")
def test_training_handlers_are_one_shot_and_put_back_exactly_what_they_found():
    """The trainer's SIGTERM/SIGINT handlers let a second signal act by default (a hang inside
    PETSc during training), and leave the CLI's own one-shot handlers as they were."""
    from metasolve.training.train import _StopRequests
    from solvers.process_tree import handle_first_signal, handles_first_signal_only

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        outer = lambda signum, frame: None  # noqa: E731
        handle_first_signal(signal.SIGTERM, outer)
        signal.signal(signal.SIGINT, outer)
        with _StopRequests().installed() as stop:
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            assert handles_first_signal_only(signal.SIGTERM) and handles_first_signal_only(signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is outer and handles_first_signal_only(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is outer and not handles_first_signal_only(signal.SIGINT)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
