"""The training loop: plain torch around the BlackBox op, with checkpoints and metrics.

What went wrong, when something does, is `metasolve.training.diagnosis`'s; the evaluation table
of a finished run is `metasolve.app.evaluation`'s.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from metasolve.method.blackbox import BlackBox
from metasolve.method.meta_solver import MetaSolver
from metasolve.method.protocols import Executor
from metasolve.training.checkpoint import (CheckpointError, config_differences, list_checkpoints, load_latest,
                                           remove_stale, save_checkpoint)
from metasolve.training.diagnosis import check_progress, failure_cause, features_of, held_out
from solvers._petsc import stage
from solvers.process_tree import handle_first_signal, handles_first_signal_only

log = logging.getLogger("metasolve")
KEEP_CHECKPOINTS = 2  # a damaged newest one still has an intact predecessor


class TrainingFailed(RuntimeError):
    """Training cannot make progress: (nearly) every centre solve fails. Carries PETSc's message."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the last completed step is checkpointed. `status` is 128 + signal,
    the exit status a batch scheduler (and a shell) reads as "terminated by that signal"."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f", checkpoint {checkpoint}" if checkpoint is not None else " (no checkpoint directory)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}{where}")
        self.signum, self.step, self.checkpoint, self.status = signum, step, checkpoint, 128 + signum


class _StopRequests:
    """SIGTERM/SIGINT handlers that only raise a flag, so the step in flight completes and is
    checkpointed; a second signal stops at once, as without the handler, even inside PETSc's C
    code where no Python handler runs (`handle_first_signal`)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("%s received: stopping after the current step (a second one stops at once)",
                    signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator["_StopRequests"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install here
            return
        previous = {s: (signal.getsignal(s), handles_first_signal_only(s)) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            handle_first_signal(s, self._handle)
        try:
            yield self
        finally:
            for s, (handler, first_only) in previous.items():
                if first_only:
                    handle_first_signal(s, handler)
                else:
                    signal.signal(s, handler)


def _finite(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row as strict JSON: a non-finite float (a diverged surrogate loss) becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class Trainer:
    """Train `meta_solver` (features → θ) through `blackbox` with `optimizer`.

    SPMD: every rank runs the same loop on the same seed and takes identical steps; only the
    executor's solves are split. Only the root rank prints and writes files. A run resumed from a
    checkpoint continues exactly as if it had never stopped: the checkpoint holds the model,
    optimizer, the estimator's state (surrogate, moments, the data of its last estimate), both
    random generators, the solve counters and the early-stopping record.

    Nothing fails silently: if the fraction of failed centre solves over the last
    `failure_window` steps reaches `max_failed_fraction` (by default: every centre of the first
    step), training stops with PETSc's message for one of them (`TrainingFailed`); SIGTERM or
    SIGINT checkpoints the last completed step and raises `Interrupted`; and with held-out tasks
    the trainer measures the untrained predictor first and warns, with a likely cause, if the
    trained one is no better (`metasolve.training.diagnosis`).
    """

    def __init__(self, meta_solver: nn.Module, blackbox: BlackBox, optimizer: torch.optim.Optimizer,
                 loss: Callable[[torch.Tensor], torch.Tensor] | None = None, executor: Executor | None = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10, seed: int = 0,
                 progress: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 reference: BlackBox | None = None, reference_every: int = 0,
                 max_failed_fraction: float = 1.0, failure_window: int = 10, surrogate_steps: int = 0,
                 patience: int = 0) -> None:
        """`reference` (e.g. the same oracle with `FiniteDifference`) measures, every
        `reference_every` steps, the cosine between the training estimate of ∂L/∂θ and its own;
        its solves are counted in its own `stats`, not in the training budget. `surrogate_steps`
        optimizer steps on the estimator's `surrogate_objective` (a score function's cost model)
        follow every step through the solver. `patience` > 0 stops the steps through the solver
        once the held-out training cost (measured every `eval_every` steps of `fit`) has not
        improved for that many steps, and keeps the weights of the best measurement."""
        if (checkpoint_every < 1 or reference_every < 0 or failure_window < 1 or not 0 < max_failed_fraction <= 1
                or surrogate_steps < 0 or patience < 0):
            raise ValueError(f"Trainer needs checkpoint_every >= 1, reference_every >= 0, failure_window >= 1, "
                             f"0 < max_failed_fraction <= 1, surrogate_steps >= 0 and patience >= 0; got "
                             f"{checkpoint_every}, {reference_every}, {failure_window}, {max_failed_fraction}, "
                             f"{surrogate_steps}, {patience}")
        self.meta_solver, self.blackbox, self.optimizer = meta_solver, blackbox, optimizer
        self.scheduler = scheduler
        self.reference, self.reference_every = reference, int(reference_every)
        self.loss = loss if loss is not None else torch.mean
        self.surrogate_steps = int(surrogate_steps)
        self.patience = int(patience)
        self.executor: Executor = executor if executor is not None else blackbox.executor
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.max_failed_fraction, self.failure_window = float(max_failed_fraction), int(failure_window)
        self.sampler = torch.Generator().manual_seed(seed)
        self.step = 0
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self.metadata: dict[str, Any] = {}
        self.untrained: dict[str, Any] = {}  # held-out cost and θ of the predictor before training
        self.progress_report: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None  # early stopping: step, held-out cost and weights of the best
        self.stopped_early = False
        self._checkpoints: list[Path] = []  # this run's intact checkpoints, oldest first
        self._recent: deque[tuple[int, int]] = deque(maxlen=self.failure_window)
        self._last_batch: tuple[list, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "model": self.meta_solver.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.get_state(),
            "blackbox_generator": self.blackbox.generator.get_state(),
            "stats": self.blackbox.stats.state_dict(),
            "history": self.history,
            "metadata": self.metadata,
            "untrained": self.untrained,
            "estimator": self.blackbox.estimator.state_dict(),  # the surrogate, its moments, its last estimate
            "early_stop": {"best": self.best, "stopped": self.stopped_early},
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.reference is not None:
            state["reference_generator"] = self.reference.generator.get_state()
            state["reference_estimator"] = self.reference.estimator.state_dict()
        if isinstance(self.meta_solver, MetaSolver):
            state["meta_solver"] = self.meta_solver.export()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.meta_solver.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        self.blackbox.generator.set_state(state["blackbox_generator"])
        self.blackbox.stats.load_state_dict(state["stats"])
        self.history = list(state["history"])
        self.untrained = dict(state["untrained"])
        self.blackbox.estimator.load_state_dict(state["estimator"])
        self.best, self.stopped_early = state["early_stop"]["best"], bool(state["early_stop"]["stopped"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.reference is not None:
            self.reference.generator.set_state(state["reference_generator"])
            self.reference.estimator.load_state_dict(state["reference_estimator"])

    def _resume(self, steps: int) -> None:
        """Load the newest intact checkpoint of this run (root reads, every rank loads)."""
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        found: Any = None
        if self.executor.is_root:
            try:
                found = load_latest(self.checkpoint_dir)
            except CheckpointError as error:
                found = error
            if isinstance(found, tuple):
                found = found[:2]
                mine, theirs = self.metadata.get("config"), found[1].get("metadata", {}).get("config")
                differences = config_differences(theirs, mine) if mine is not None and theirs is not None else []
                if differences:
                    found = CheckpointError(f"{found[0]} belongs to a run with a different config "
                                            f"({'; '.join(differences)}); refusing to resume from it")
        found = self.executor.broadcast(found)
        if isinstance(found, Exception):
            raise found
        if found is None:
            log.info("resume: no checkpoint in %s, starting at step 0", self.checkpoint_dir)
            return
        path, state = found
        if int(state["step"]) > steps:
            raise CheckpointError(f"{path} is at step {state['step']}, beyond the {steps} steps asked for")
        self.load_state_dict(state)
        self._checkpoints = self._older_checkpoints(path) + [path]
        self._extend_schedule(steps)
        log.info("resumed from %s at step %d", path, self.step)

    def _older_checkpoints(self, resumed: Path) -> list[Path]:
        """This run's checkpoints older than the one resumed from, oldest first, so `_save` prunes
        them too (once, only the resumed one was remembered, and a checkpoint from before a kill
        stayed behind for good). The run directory is locked by its run (`metasolve.app.run_dir`),
        so every checkpoint in it is this run's; newer ones that did not load are left as they are."""
        if not self.executor.is_root:
            return []
        found = list_checkpoints(self.checkpoint_dir)  # newest first
        return found[found.index(resumed) + 1:][::-1] if resumed in found else []

    def _extend_schedule(self, steps: int) -> None:
        """A cosine schedule resumed with more (or fewer) steps follows the cosine over the new
        length from here on: lr(s) = η_min + (lr₀ − η_min)(1 + cos(π s / steps))/2, so the learning
        rate keeps falling instead of climbing back along the old, shorter period."""
        schedule = self.scheduler
        if not isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) or schedule.T_max == steps:
            return
        log.info("cosine schedule extended from %d to %d steps", schedule.T_max, steps)
        schedule.T_max = steps
        position = 0.5 * (1 + math.cos(math.pi * self.step / steps))
        for group, base in zip(self.optimizer.param_groups, schedule.base_lrs):
            group["lr"] = schedule.eta_min + (base - schedule.eta_min) * position
        schedule._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def fit(self, train_tasks: Sequence[Any], steps: int, batch_size: int, eval_tasks: Sequence[Any] | None = None,
            eval_every: int = 0, resume: bool = False, metrics_path: str | Path | None = None) -> list[dict]:
        """Run until `steps` optimizer steps are done (counting those of a resumed run), or until
        `patience` steps pass without a better held-out cost; then keep the best weights."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 1 <= batch_size <= len(train_tasks):
            raise ValueError(f"batch_size must be in 1..{len(train_tasks)} (the number of training tasks), got {batch_size}")
        if eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {eval_every}")
        if self.patience and not (eval_tasks and eval_every):
            raise ValueError(f"patience = {self.patience} needs held-out tasks measured every eval_every > 0 steps "
                             f"(got {len(eval_tasks or [])} tasks, eval_every = {eval_every})")
        if self.checkpoint_dir is not None and self.executor.is_root:
            for path in remove_stale(self.checkpoint_dir):
                log.info("removed %s, left by an interrupted checkpoint write", path)
        if resume:
            self._resume(steps)
        if eval_tasks and not self.untrained:
            self.preflight(eval_tasks)
        interactive = sys.stderr.isatty()
        bar = tqdm(total=steps, initial=self.step, disable=not (self.progress and self.executor.is_root and interactive),
                   desc="train", unit="step", dynamic_ncols=True)
        every = max(1, steps // 20)  # without a terminal: a log line per 5% instead of bar redraws
        with _StopRequests().installed() as stop, self._metrics(metrics_path) as write_row:
            # From here on each shared executor round carries this rank's stop request; the step's
            # own all-gather is then the only collective of a step (`MPIExecutor.agree_to_stop`).
            self.executor.agree_to_stop(lambda: stop.signum)
            while self.step < steps and not self.stopped_early:
                row = self._train_step(train_tasks, batch_size)
                if eval_tasks and eval_every and self.step % eval_every == 0:
                    row["eval_cost"] = self.evaluate_cost(eval_tasks)
                    self.stopped_early = self._out_of_patience(row["eval_cost"])
                self.history.append(row)
                write_row(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3g}", solves=row["solves"])
                if self.progress and not interactive and (self.step % every == 0 or self.step == steps):
                    log.info("step %d/%d: loss %.4g, %d solves, %d failed centres", self.step, steps, row["loss"],
                             row["solves"], row["failed_centres"])
                self._check_failures(row, batch_size)
                if self.step % self.checkpoint_every == 0 or self.step == steps or self.stopped_early:
                    self._save()
                signum = self.executor.agree_to_stop(lambda: stop.signum)  # any rank's signal stops every rank together
                if signum is not None:
                    bar.close()
                    raise Interrupted(signum, self.step, self._save())
        bar.close()
        if self.patience and self.best is not None:
            self.meta_solver.load_state_dict(self.best["model"])  # checkpoints keep the last weights, to continue from
        if eval_tasks and self.untrained:
            self.progress_report = check_progress(self.blackbox, self.meta_solver, eval_tasks, self.untrained,
                                                  self.history)
        return self.history

    @contextmanager
    def _metrics(self, path: str | Path | None) -> Iterator[Callable[[Mapping[str, Any]], None]]:
        """A writer of metrics rows (root only): the history so far, then a line per step, flushed;
        the file stays open for the whole fit instead of being reopened every step."""
        if path is None or not self.executor.is_root:
            yield lambda row: None
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as stream:
            def write(row: Mapping[str, Any]) -> None:
                stream.write(json.dumps(_finite(row), allow_nan=False) + "\n")
                stream.flush()

            for row in self.history:
                write(row)
            yield write

    def _out_of_patience(self, cost: float) -> bool:
        """Early stopping: remember the step, cost and weights of the best held-out cost so far (the
        first measurement, then any finite cost below it); True once `patience` steps have passed
        since it."""
        if not self.patience:
            return False
        best = self.best
        if best is None or (math.isfinite(cost) and not (math.isfinite(best["cost"]) and best["cost"] <= cost)):
            self.best = {"step": self.step, "cost": cost,
                         "model": {k: v.detach().clone() for k, v in self.meta_solver.state_dict().items()}}
            return False
        if self.step - best["step"] < self.patience:
            return False
        log.info("early stop at step %d: no better held-out cost for %d steps (best %.6g at step %d)",
                 self.step, self.step - best["step"], best["cost"], best["step"])
        return True

    def preflight(self, eval_tasks: Sequence[Any]) -> None:
        """Solve the held-out tasks once with the untrained predictor, before anything else spends
        solves: the baseline that training must beat, and the first place where a setting under
        which every solve fails is stopped (`TrainingFailed`, with PETSc's message)."""
        self.untrained = held_out(self.blackbox, self.meta_solver, eval_tasks)
        if self.untrained["failed"] == len(eval_tasks):
            self._last_batch = (list(eval_tasks), self.untrained["theta"])
            raise TrainingFailed(f"every held-out solve of the untrained predictor failed, before training. "
                                 f"{self._failure_cause()}")
        log.info("held-out cost of the untrained predictor: %.6g (%d tasks)", self.untrained["cost"], len(eval_tasks))

    def _save(self) -> Path | None:
        """Checkpoint this step (root only), then drop this run's older checkpoints beyond the
        newest `KEEP_CHECKPOINTS`; files this run did not write are never touched."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / f"checkpoint-{self.step:08d}.pt"
        if self.executor.is_root and (not self._checkpoints or self._checkpoints[-1] != path):
            path = save_checkpoint(self.checkpoint_dir, self.step, self.state_dict())
            self._checkpoints = [p for p in self._checkpoints if p != path] + [path]
            for old in self._checkpoints[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
            self._checkpoints = self._checkpoints[-KEEP_CHECKPOINTS:]
        return path

    def _train_step(self, train_tasks: Sequence[Any], batch_size: int) -> dict[str, Any]:
        begin = time.perf_counter()
        chosen = torch.randperm(len(train_tasks), generator=self.sampler)[:batch_size].tolist()
        batch = [train_tasks[i] for i in chosen]
        with stage("metasolve: network"):
            theta = self.meta_solver(features_of(batch))
        self._last_batch = (batch, theta.detach().clone())
        measure = self.reference is not None and self.reference_every and (self.step + 1) % self.reference_every == 0
        estimate: list[torch.Tensor] = []
        theta.register_hook(estimate.append)
        loss = self.loss(self.blackbox(theta, batch))
        self.optimizer.zero_grad()
        # The stage keeps the name -log_view readers know; the update itself now runs in the next round.
        with stage("metasolve: gradient estimate + surrogate update"):
            loss.backward()
        with stage("metasolve: network"):
            self.optimizer.step()
            self._surrogate_steps(train_tasks)
            if self.scheduler is not None:
                self.scheduler.step()
        self.step += 1
        stats = self.blackbox.stats
        row = {"step": self.step, "loss": float(loss.detach()), "solves": stats.solves,
               "evaluation_solves": stats.evaluation_solves, "diagnosis_solves": stats.diagnosis_solves,
               "failed_queries": stats.failed_queries, "failed_centres": stats.failed_centres,
               "gradient_norm": float(estimate[0].norm()) if estimate else 0.0,
               "seconds": time.perf_counter() - begin}
        row.update(self.blackbox.estimator.metrics())  # the estimator's online quality
        if measure:
            row["gradient_cosine"] = self._reference_cosine(theta.detach(), batch, estimate[0])
        return row

    def _surrogate_steps(self, train_tasks: Sequence[Any]) -> None:
        """`surrogate_steps` more optimizer steps on the estimator's surrogate objective over every
        training task, after each step through the solver: no solve, and the surrogate has just
        learned from that step's solves (`settle`; `ScoreFunction.surrogate_objective` says why)."""
        if not self.surrogate_steps:
            return
        estimator, features = self.blackbox.estimator, features_of(train_tasks)
        with torch.no_grad():
            if estimator.surrogate_objective(self.meta_solver(features), train_tasks) is None:
                return
        estimator.settle()
        for _ in range(self.surrogate_steps):
            value = estimator.surrogate_objective(self.meta_solver(features), train_tasks)
            self.optimizer.zero_grad()
            value.mean().backward()
            self.optimizer.step()

    def _check_failures(self, row: Mapping[str, Any], batch_size: int) -> None:
        """Stop when the failed fraction of centre solves over the last `failure_window` steps
        reaches `max_failed_fraction`: gradients are then estimated from nothing."""
        previous = self.history[-2]["failed_centres"] if len(self.history) > 1 else 0
        self._recent.append((row["failed_centres"] - previous, batch_size))
        failed, total = sum(f for f, _ in self._recent), sum(n for _, n in self._recent)
        if failed < self.max_failed_fraction * total:
            return
        window = len(self._recent)
        raise TrainingFailed(f"training stopped at step {self.step}: {failed} of {total} centre solves failed over "
                             f"the last {window} step(s) (limit {self.max_failed_fraction:.0%}). {self._failure_cause()}")

    def _failure_cause(self) -> str:
        batch, theta = self._last_batch if self._last_batch is not None else ([], None)
        return failure_cause(self.blackbox, batch, theta)

    def _reference_cosine(self, theta: torch.Tensor, batch: list, estimate: torch.Tensor) -> float:
        leaf = theta.clone().requires_grad_(True)
        self.loss(self.reference(leaf, batch)).backward()
        return float(torch.nn.functional.cosine_similarity(estimate.reshape(-1), leaf.grad.reshape(-1), dim=0))

    def evaluate_cost(self, tasks: Sequence[Any]) -> float:
        """Mean training cost on `tasks` at the predicted θ (one evaluation solve per task, no gradient)."""
        with torch.no_grad():
            values = self.blackbox.evaluate(self.meta_solver(features_of(tasks)), tasks)
        return float(values.mean())


__all__ = ["Interrupted", "Trainer", "TrainingFailed"]
