"""Trainer: learning, exact resume, corrupt checkpoints, deployment on a user's KSP."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metasolve import BlackBox, ControlVariate, FiniteDifference, ForwardGradient, LogResidual, Space, Surrogate, Vector
from metasolve.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from metasolve.method.meta_solver import MetaSolver
from metasolve.training.train import Trainer, TrainingFailed
from solvers import KSPOracle, LinearSystem, PETSc
from solvers.oracle import Oracle
from solvers.outcome import Outcome
from tests.systems import laplacian_1d

N, MODES = 31, 4


def smooth_tasks(count: int, offset: int = 0) -> list[LinearSystem]:
    """1-D Poisson with smooth random right-hand sides: Jacobi is slow exactly where x0 can help."""
    A = laplacian_1d(N)
    grid = np.arange(1, N + 1) / (N + 1)
    tasks = []
    for i in range(offset, offset + count):
        amplitudes = np.random.default_rng(i).standard_normal(3)
        b = sum(a * np.sin((k + 1) * np.pi * grid) for k, a in enumerate(amplitudes))
        tasks.append(LinearSystem(A, b, features=torch.as_tensor(amplitudes), name=f"smooth{i}"))
    return tasks


def make_trainer(tmp_path=None, control_variate=True, seed=0, depth=1, lr=2e-2):
    torch.manual_seed(seed)  # the networks' initial weights
    # Lowest eigenvalue of tridiag(-1, 2, -1) is 4 sin²(π/64) ≈ 0.0096: scale θ so solution
    # coefficients (≈ b's divided by that) are O(1) in raw θ.
    space = Space({"x0": Vector(N, basis="sine", modes=MODES, scale=100.0)})
    meta = MetaSolver(3, space, hidden=16, depth=depth)
    base = ForwardGradient(tangents=2, difference="forward", eps=1e-4)
    estimator = ControlVariate(base, Surrogate(Surrogate.mlp(3, MODES, hidden=16), lr=1e-2)) if control_variate else base
    box = BlackBox(KSPOracle(ksp_type="richardson", pc_type="jacobi"), space, LogResidual(20), estimator, seed=seed)
    optimizer = torch.optim.Adam(meta.parameters(), lr=lr)
    return Trainer(meta, box, optimizer, checkpoint_dir=tmp_path, checkpoint_every=3, seed=seed, progress=False)


def test_trainer_lowers_the_evaluation_cost():
    train, unseen = smooth_tasks(16), smooth_tasks(8, offset=100)
    trainer = make_trainer(control_variate=False, depth=0, lr=1e-2)  # the ideal map is linear
    before = trainer.evaluate_cost(unseen)
    trainer.fit(train, steps=200, batch_size=4)
    after = trainer.evaluate_cost(unseen)
    # Zero guess: 20 Jacobi sweeps leave the smooth error almost untouched (log10 ratio ≈ −0.16);
    # a learned x0 in the 4 lowest sine modes removes much of it. Ask for a 3x lower residual
    # after 2400 solves (measured: about 10x).
    assert after < before - 0.5, (before, after)


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    train = smooth_tasks(12)
    uninterrupted = make_trainer(tmp_path / "a")
    uninterrupted.fit(train, steps=7, batch_size=3)

    killed = make_trainer(tmp_path / "b")
    killed.fit(train, steps=4, batch_size=3)  # "killed" after step 4; newest checkpoint is step 3
    resumed = make_trainer(tmp_path / "b")
    resumed.fit(train, steps=7, batch_size=3, resume=True)
    assert resumed.step == 7
    for a, b in zip(uninterrupted.meta_solver.state_dict().values(), resumed.meta_solver.state_dict().values()):
        assert torch.equal(a, b)
    assert uninterrupted.blackbox.stats.solves == resumed.blackbox.stats.solves


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    train = smooth_tasks(8)
    make_trainer(tmp_path).fit(train, steps=6, batch_size=2)
    newest, previous = list_checkpoints(tmp_path)[:2]
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = make_trainer(tmp_path)
    with caplog.at_level("WARNING", logger="metasolve"):
        resumed.fit(train, steps=6, batch_size=2, resume=True)
    assert f"{newest}: not a readable checkpoint" in caplog.text
    assert resumed.step == 6 and "checkpoint-00000003" in previous.name


def test_meta_solver_round_trip_and_apply_on_a_users_ksp(tmp_path):
    trainer = make_trainer()
    trainer.fit(smooth_tasks(8), steps=5, batch_size=4)
    path = tmp_path / "meta.pt"
    trainer.meta_solver.save(path)
    meta = MetaSolver.load(path)
    task = smooth_tasks(1, offset=50)[0]
    setting = meta.predict(task)
    np.testing.assert_array_equal(setting["x0"], trainer.meta_solver.predict(task)["x0"])

    A, b = task.petsc(PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setType("richardson")
    ksp.getPC().setType("jacobi")
    ksp.setTolerances(rtol=1e-6, max_it=20000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    x = A.createVecRight()
    with MetaSolver.apply(setting, ksp, x):
        assert ksp.getInitialGuessNonzero()
        np.testing.assert_array_equal(x.getArray(), setting["x0"])
        ksp.solve(b, x)
    learned = ksp.getIterationNumber()
    expected = KSPOracle(ksp_type="richardson", pc_type="jacobi", rtol=1e-6, max_it=20000)(task, setting)
    assert learned == expected.iterations


def test_apply_sets_options_under_the_users_prefix():
    task = smooth_tasks(1)[0]
    A, b = task.petsc(PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOptionsPrefix("legacy_")
    ksp.setOperators(A)
    ksp.setType("richardson")
    ksp.getPC().setType("sor")
    ksp.setTolerances(rtol=1e-6, max_it=20000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setMonitor(lambda *_: None)  # without a monitor Richardson+SOR skips its convergence test (rich.c)
    with MetaSolver.apply({"pc_sor_omega": 1.7}, ksp):
        ksp.solve(b, A.createVecRight())
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", rtol=1e-6, max_it=20000)
    assert ksp.getIterationNumber() == oracle(task, {"pc_sor_omega": 1.7}).iterations
    assert ksp.getIterationNumber() != oracle(task).iterations


def test_gradient_cosine_to_a_finite_difference_reference_is_recorded():
    trainer = make_trainer(control_variate=False)
    box = trainer.blackbox
    trainer.reference = BlackBox(box.oracle, box.space, box.cost, FiniteDifference(eps=1e-4))
    trainer.reference_every = 2
    history = trainer.fit(smooth_tasks(8), steps=4, batch_size=4)
    cosines = [row["gradient_cosine"] for row in history if "gradient_cosine" in row]
    # Two tangents in d = 4: a forward gradient is a noisy but positively aligned estimate.
    assert len(cosines) == 2 and all(-1.0 <= c <= 1.0 for c in cosines) and max(cosines) > 0
    assert trainer.reference.stats.solves == 2 * 4 * (1 + MODES)
    assert box.stats.solves == 4 * 4 * 3


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"step": 1, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "ran").exists()
    path.write_bytes(b"\x80")  # truncated
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


class FailsFor(Oracle):
    """A real KSPOracle whose solves of the named tasks come back failed (a broken program's
    output would look the same to the trainer)."""

    def __init__(self, names: set[str]) -> None:
        self.inner, self.names = KSPOracle(ksp_type="richardson", pc_type="jacobi"), names

    def budget_options(self, budget, task):
        return self.inner.budget_options(budget, task)

    def solve_many(self, task, settings):
        if task.name in self.names:
            return [Outcome.failure(f"synthetic failure of {task.name}") for _ in settings]
        return self.inner.solve_many(task, settings)


def test_every_centre_failing_in_the_first_step_stops_with_petscs_message():
    trainer = make_trainer(control_variate=False)
    trainer.blackbox.oracle = KSPOracle(ksp_type="richardson", pc_type="sor", options={"pc_sor_omega": "abc"})
    with pytest.raises(TrainingFailed, match="step 1: 4 of 4 centre solves failed") as error:
        trainer.fit(smooth_tasks(8), steps=5, batch_size=4)
    # PETSc's own words for the bad value, the task and the setting that produced it.
    assert "abc" in str(error.value) and "x0 = <vector of 31>" in str(error.value)
    assert trainer.step == 1


def test_a_failed_fraction_over_a_window_stops_only_when_reached():
    tasks = smooth_tasks(8)
    half = {t.name for t in tasks[:4]}
    survived = make_trainer(control_variate=False)
    survived.blackbox.oracle, survived.max_failed_fraction = FailsFor(half), 0.9
    survived.fit(tasks, steps=6, batch_size=8)  # half of every batch fails: survived and counted
    assert survived.blackbox.stats.failed_centres == 6 * 4
    stopped = make_trainer(control_variate=False)
    stopped.blackbox.oracle, stopped.max_failed_fraction = FailsFor(half), 0.5
    with pytest.raises(TrainingFailed, match="synthetic failure of smooth"):
        stopped.fit(tasks, steps=6, batch_size=8)
    assert stopped.step == 1


def _weights(trainer):
    return [t.clone() for t in trainer.meta_solver.state_dict().values()]


def test_patience_stops_after_steps_without_a_better_held_out_cost_and_keeps_the_best_weights(tmp_path):
    """Held-out cost measured every step; `patience = 3` stops three steps after the best one and
    restores its weights — the very weights a run of exactly that many steps ends with. A run cut
    before the stop resumes into the same stop, and resuming a stopped run trains no further."""
    train, held_out = smooth_tasks(8), smooth_tasks(4, offset=100)

    def run(steps, patience=3, directory=None, resume=False):
        trainer = make_trainer(directory, control_variate=False, lr=PATIENCE_LR)
        trainer.patience = patience
        trainer.fit(train, steps=steps, batch_size=4, eval_tasks=held_out if patience else None,
                    eval_every=1 if patience else 0, resume=resume)
        return trainer

    stopped = run(30)
    costs = {row["step"]: row["eval_cost"] for row in stopped.history}
    best = min(costs, key=lambda step: (costs[step], step))
    assert stopped.stopped_early and stopped.step == best + 3 < 30
    assert stopped.best["step"] == best and stopped.best["cost"] == costs[best]
    reference = run(best, patience=0)
    assert all(torch.equal(a, b) for a, b in zip(_weights(stopped), _weights(reference)))

    run(best + 1, directory=tmp_path)  # cut before the stop: its checkpoint holds the last weights
    resumed = run(30, directory=tmp_path, resume=True)
    assert resumed.stopped_early and resumed.step == stopped.step
    assert all(torch.equal(a, b) for a, b in zip(_weights(resumed), _weights(stopped)))
    again = run(30, directory=tmp_path, resume=True)
    assert again.step == stopped.step and len(again.history) == len(stopped.history)
    assert all(torch.equal(a, b) for a, b in zip(_weights(again), _weights(stopped)))


PATIENCE_LR = 0.5  # far too large for this problem: the held-out cost stops improving within a few steps


def test_patience_needs_held_out_measurements():
    trainer = make_trainer(control_variate=False)
    trainer.patience = 2
    with pytest.raises(ValueError, match="patience = 2 needs held-out tasks"):
        trainer.fit(smooth_tasks(4), steps=2, batch_size=2)


def test_the_diagnosis_solves_through_the_blackbox_and_counts_its_solves():
    """No progress (the same weights before and after) gets its likely causes from two diagnosis
    solves per held-out task; a failure with no report from the latest round is solved again,
    counted as diagnosis too, to quote the solver."""
    from metasolve.training.diagnosis import check_progress, failure_cause, held_out

    trainer = make_trainer(control_variate=False)
    box, tasks = trainer.blackbox, smooth_tasks(3, offset=200)
    untrained = held_out(box, trainer.meta_solver, tasks)
    report = check_progress(box, trainer.meta_solver, tasks, untrained, history=[{"loss": 1.0}])
    assert report["relative_improvement"] == 0.0 and any("barely moved" in cause for cause in report["causes"])
    assert (box.stats.solves, box.stats.evaluation_solves, box.stats.diagnosis_solves) == (0, 2 * 3, 2 * 3)

    box.oracle = FailsFor({tasks[1].name})
    theta = untrained["theta"]
    assert box.last_failures == []
    cause = failure_cause(box, tasks, theta)
    assert f"Task {tasks[1].name!r}" in cause and "synthetic failure" in cause and "x0 = <vector of 31>" in cause
    assert box.stats.diagnosis_solves == 2 * 3 + 3
