"""The training loop: plain torch around the BlackBox op, with checkpoints and metrics."""
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

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from metasolve.blackbox import BlackBox
from metasolve.checkpoint import CheckpointError, load_latest, remove_stale, save_checkpoint
from metasolve.cost import Iterations
from metasolve.meta_solver import MetaSolver
from metasolve.run_dir import config_differences
from solvers._petsc import stage

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
    checkpointed; a second signal of the same kind stops at once, as without the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signum:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        log.warning("%s received: stopping after the current step", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator["_StopRequests"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install here
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _finite(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row as strict JSON: a non-finite float (a diverged surrogate loss) becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _describe(setting: Mapping[str, Any]) -> str:
    parts = []
    for key, value in setting.items():
        size = np.size(value)
        parts.append(f"{key} = <vector of {size}>" if size > 1 else f"{key} = {value!r}")
    return ", ".join(parts)


def _describe_oracle(oracle: Any) -> str:
    fields = [f"{name} = {getattr(oracle, name)!r}" for name in ("ksp_type", "pc_type", "command", "options")
              if getattr(oracle, name, None)]
    return f"{type(oracle).__name__}({', '.join(fields)})"


def _features(tasks: Sequence[Any]) -> torch.Tensor:
    return torch.stack([t.features for t in tasks]).to(torch.float64)


class Trainer:
    """Train `meta_solver` (features → θ) through `blackbox` with `optimizer`.

    SPMD: every rank runs the same loop on the same seed and takes identical steps; only the
    executor's solves are split. Only the root rank prints and writes files. A run resumed from a
    checkpoint continues exactly as if it had never stopped: the checkpoint holds the model,
    optimizer, surrogate, both random generators and the solve counters.

    Nothing fails silently: if the fraction of failed centre solves over the last
    `failure_window` steps reaches `max_failed_fraction` (by default: every centre of the first
    step), training stops with PETSc's message for one of them (`TrainingFailed`); SIGTERM or
    SIGINT checkpoints the last completed step and raises `Interrupted`; and with held-out tasks
    the trainer measures the untrained predictor first and warns, with a likely cause, if the
    trained one is no better.
    """

    def __init__(self, meta_solver: nn.Module, blackbox: BlackBox, optimizer: torch.optim.Optimizer,
                 loss: Callable[[torch.Tensor], torch.Tensor] | None = None, executor: Any = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10, seed: int = 0,
                 progress: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 reference: BlackBox | None = None, reference_every: int = 0,
                 max_failed_fraction: float = 1.0, failure_window: int = 10, surrogate_steps: int = 0) -> None:
        """`reference` (e.g. the same oracle with `FiniteDifference`) measures, every
        `reference_every` steps, the cosine between the training estimate of ∂L/∂θ and its own;
        its solves are counted in its own `stats`, not in the training budget. `surrogate_steps`
        optimizer steps on the estimator's `surrogate_objective` (a score function's cost model)
        follow every step through the solver."""
        if (checkpoint_every < 1 or reference_every < 0 or failure_window < 1 or not 0 < max_failed_fraction <= 1
                or surrogate_steps < 0):
            raise ValueError(f"Trainer needs checkpoint_every >= 1, reference_every >= 0, failure_window >= 1, "
                             f"0 < max_failed_fraction <= 1 and surrogate_steps >= 0; got {checkpoint_every}, "
                             f"{reference_every}, {failure_window}, {max_failed_fraction}, {surrogate_steps}")
        self.meta_solver, self.blackbox, self.optimizer = meta_solver, blackbox, optimizer
        self.scheduler = scheduler
        self.reference, self.reference_every = reference, int(reference_every)
        self.loss = loss if loss is not None else torch.mean
        self.surrogate_steps = int(surrogate_steps)
        self.executor = executor if executor is not None else blackbox.executor
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
        self._checkpoints: list[Path] = []  # this run's intact checkpoints, oldest first
        self._recent: deque[tuple[int, int]] = deque(maxlen=self.failure_window)
        self._last_batch: tuple[list, torch.Tensor] | None = None

    @property
    def _surrogate(self) -> Any:
        return getattr(self.blackbox.estimator, "surrogate", None)

    @staticmethod
    def _estimator_state(box: BlackBox) -> dict:
        return box.estimator.state_dict() if hasattr(box.estimator, "state_dict") else {}

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
        }
        state["estimator"] = self._estimator_state(self.blackbox)  # the surrogate, its moments, guides
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.reference is not None:
            state["reference_generator"] = self.reference.generator.get_state()
            state["reference_estimator"] = self._estimator_state(self.reference)
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
        self.untrained = dict(state.get("untrained", {}))
        if state["estimator"]:
            self.blackbox.estimator.load_state_dict(state["estimator"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.reference is not None:
            self.reference.generator.set_state(state["reference_generator"])
            if state["reference_estimator"]:
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
        self._checkpoints = [path]
        self._extend_schedule(steps)
        log.info("resumed from %s at step %d", path, self.step)

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
        """Run until `steps` optimizer steps are done (counting those of a resumed run)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 1 <= batch_size <= len(train_tasks):
            raise ValueError(f"batch_size must be in 1..{len(train_tasks)} (the number of training tasks), got {batch_size}")
        if eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {eval_every}")
        if self.checkpoint_dir is not None and self.executor.is_root:
            for path in remove_stale(self.checkpoint_dir):
                log.info("removed %s, left by an interrupted checkpoint write", path)
        if resume:
            self._resume(steps)
        if eval_tasks and not self.untrained:
            self.preflight(eval_tasks)
        metrics = Path(metrics_path) if metrics_path is not None else None
        if metrics is not None and self.executor.is_root:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text("".join(json.dumps(_finite(row), allow_nan=False) + "\n" for row in self.history))
        interactive = sys.stderr.isatty()
        bar = tqdm(total=steps, initial=self.step, disable=not (self.progress and self.executor.is_root and interactive),
                   desc="train", unit="step", dynamic_ncols=True)
        every = max(1, steps // 20)  # without a terminal: a log line per 5% instead of bar redraws
        with _StopRequests().installed() as stop:
            while self.step < steps:
                row = self._train_step(train_tasks, batch_size)
                if eval_tasks and eval_every and self.step % eval_every == 0:
                    row["eval_cost"] = self.evaluate_cost(eval_tasks)
                self.history.append(row)
                if metrics is not None and self.executor.is_root:
                    with metrics.open("a") as stream:
                        stream.write(json.dumps(_finite(row), allow_nan=False) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3g}", solves=row["solves"])
                if self.progress and not interactive and (self.step % every == 0 or self.step == steps):
                    log.info("step %d/%d: loss %.4g, %d solves, %d failed centres", self.step, steps, row["loss"],
                             row["solves"], row["failed_centres"])
                self._check_failures(row, batch_size)
                if self.step % self.checkpoint_every == 0 or self.step == steps:
                    self._save()
                signum = self.executor.broadcast(stop.signum)  # the root's signal stops every rank together
                if signum is not None:
                    bar.close()
                    raise Interrupted(signum, self.step, self._save())
        bar.close()
        if eval_tasks and self.untrained:
            self.progress_report = self._check_progress(eval_tasks)
        return self.history

    def preflight(self, eval_tasks: Sequence[Any]) -> None:
        """Solve the held-out tasks once with the untrained predictor, before anything else spends
        solves: the baseline that training must beat, and the first place where a setting under
        which every solve fails is stopped (`TrainingFailed`, with PETSc's message)."""
        self.untrained = self._held_out(eval_tasks)
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
            theta = self.meta_solver(_features(batch))
        self._last_batch = (batch, theta.detach().clone())
        measure = self.reference is not None and self.reference_every and (self.step + 1) % self.reference_every == 0
        estimate: list[torch.Tensor] = []
        theta.register_hook(estimate.append)
        loss = self.loss(self.blackbox(theta, batch))
        self.optimizer.zero_grad()
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
               "evaluation_solves": stats.evaluation_solves, "failed_queries": stats.failed_queries, "failed_centres": stats.failed_centres,
               "gradient_norm": float(estimate[0].norm()) if estimate else 0.0,
               "seconds": time.perf_counter() - begin}
        if self._surrogate is not None:
            row["surrogate_loss"] = self._surrogate.last_loss
        row.update(getattr(self.blackbox.estimator, "last_metrics", {}))  # the estimator's online quality
        if measure:
            row["gradient_cosine"] = self._reference_cosine(theta.detach(), batch, estimate[0])
        return row

    def _surrogate_steps(self, train_tasks: Sequence[Any]) -> None:
        """`surrogate_steps` more optimizer steps on the estimator's surrogate objective over every
        training task, after each step through the solver: no solve, and the surrogate has just
        learned from that step's solves (`ScoreFunction.surrogate_objective` says why)."""
        objective = getattr(self.blackbox.estimator, "surrogate_objective", None)
        if objective is None or not self.surrogate_steps:
            return
        features = _features(train_tasks)
        for _ in range(self.surrogate_steps):
            value = objective(self.meta_solver(features), train_tasks)
            if value is None:
                return
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
        """PETSc's own message for one failed solve and the setting that produced it."""
        box = self.blackbox
        reported = getattr(box, "last_failures", None)
        batch, theta = self._last_batch if self._last_batch is not None else ([], None)
        if reported:
            name, text = reported[0]
            index = next((i for i, t in enumerate(batch) if getattr(t, "name", None) == name), None)
            setting = box.space.decode(theta[index]) if index is not None else None
            where = f" under setting {_describe(setting)}" if setting is not None else ""
            return f"Task {name!r}{where} with {_describe_oracle(box.oracle)}: {text}"
        for task, row in zip(batch, theta if theta is not None else []):
            setting = box.space.decode(row)
            outcome = box.oracle(task, {**setting, **box.cost.overrides})  # re-run one solve to read why
            if outcome.failed:
                why = outcome.error or (f"PETSc converged reason {outcome.reason} after {outcome.iterations} "
                                        f"iterations (final residual {outcome.residuals[-1] if outcome.residuals.size else 'none'})")
                return (f"Task {getattr(task, 'name', '?')!r} under setting {_describe(setting)} with "
                        f"{_describe_oracle(box.oracle)}: {why}")
        return f"The solves failed with {_describe_oracle(box.oracle)}."

    def _held_out(self, tasks: Sequence[Any]) -> dict[str, Any]:
        with torch.no_grad():
            theta = self.meta_solver(_features(tasks)).to(torch.float64)
            values = self.blackbox.evaluate(theta, tasks)
        return {"cost": float(values.mean()), "theta": theta.clone(), "failed": int((~torch.isfinite(values)).sum())}

    def _check_progress(self, tasks: Sequence[Any], min_improvement: float = 0.01) -> dict[str, Any]:
        """Held-out training cost, untrained vs trained; a warning with likely causes when it
        improved by less than `min_improvement` (relative) — training then achieved nothing."""
        now = self._held_out(tasks)
        before, after = self.untrained["cost"], now["cost"]
        improvement = (before - after) / max(abs(before), 1e-12)
        report = {"untrained_cost": before, "trained_cost": after, "relative_improvement": improvement}
        log.info("held-out cost: untrained %.6g -> trained %.6g (%+.1f%%)", before, after, -100 * improvement)
        if improvement < min_improvement:
            causes = self._likely_causes(tasks, now["theta"])
            report["causes"] = causes
            log.warning("training did not lower the held-out cost (untrained %.6g, trained %.6g). Likely cause: %s",
                        before, after, " ".join(causes))
        return report

    def _likely_causes(self, tasks: Sequence[Any], theta: torch.Tensor) -> list[str]:
        causes = []
        box = self.blackbox
        generator = torch.Generator().manual_seed(0)
        direction = torch.randint(0, 2, theta.shape, generator=generator).to(torch.float64) * 2 - 1
        here, there = box.evaluate(theta, tasks), box.evaluate(theta + direction, tasks)
        change = float(torch.nanmean((there - here).abs()))
        if not change > 1e-12 * (1 + float(torch.nanmean(here.abs()))):
            causes.append(f"the cost does not change with the setting (a unit step in every raw θ coordinate "
                          f"changed it by {change:.2g}): the option may not act on this solver, or the cost's "
                          f"budget ({box.cost!r}) does not see its effect.")
        moved = float((theta - self.untrained["theta"]).pow(2).mean().sqrt())
        losses = np.array([r["loss"] for r in self.history if math.isfinite(r.get("loss", math.nan))])
        tenth = max(1, len(losses) // 10)
        first, last = losses[:tenth], losses[-tenth:]
        # A rise counts only beyond batch-to-batch noise: two standard errors of a tenth's mean.
        noise = 2 * float(losses.std()) * math.sqrt(2 / tenth) if len(losses) > 1 else math.inf
        if moved < 1e-2:
            causes.append(f"θ barely moved (RMS change {moved:.2g} in raw θ): the learning rate is likely too small, "
                          f"or the space's scale makes useful settings need very large raw θ (θ scaling).")
        elif len(losses) > 1 and last.mean() - first.mean() > noise:
            causes.append(f"the training cost rose ({first.mean():.4g} -> {last.mean():.4g} over the first and last "
                          f"tenth of the steps): the learning rate is likely too large.")
        if isinstance(self.meta_solver, MetaSolver) and bool(torch.all(self.meta_solver.feature_scale == 1)):
            spread = torch.stack([t.features for t in tasks]).std(0)
            spread = spread[spread > 0]
            if spread.numel() and float(spread.max() / spread.min()) > 1e3:
                causes.append(f"the features are not standardised and their spreads differ by "
                              f"{float(spread.max() / spread.min()):.1g}x (feature scaling: model.normalize = true).")
        if not causes:
            causes.append(f"θ moved (RMS {moved:.2g}) but the cost did not follow: the gradient estimate may be too "
                          f"noisy for this learning rate (more tangents, a control variate, or more steps).")
        return causes

    def _reference_cosine(self, theta: torch.Tensor, batch: list, estimate: torch.Tensor) -> float:
        leaf = theta.clone().requires_grad_(True)
        self.loss(self.reference(leaf, batch)).backward()
        return float(torch.nn.functional.cosine_similarity(estimate.reshape(-1), leaf.grad.reshape(-1), dim=0))

    def evaluate_cost(self, tasks: Sequence[Any]) -> float:
        """Mean training cost on `tasks` at the predicted θ (one solve per task, no gradient)."""
        with torch.no_grad():
            values = self.blackbox.evaluate(self.meta_solver(_features(tasks)), tasks)
        return float(values.mean())

    def evaluate(self, tasks: Sequence[Any], baselines: Mapping[str, Any] | None = None,
                 cost: Any = None) -> dict[str, dict[str, list[float]]]:
        """Iterations and time-to-solution per task for the learned settings and each baseline.

        A baseline is a fixed setting (`{}` is the oracle's default, i.e. a zero initial guess) or
        a callable `task -> setting`. Time includes the predictor's inference for the learned one.
        """
        cost = cost if cost is not None else Iterations()
        methods: dict[str, Callable[[Any], tuple[dict, float]]] = {"learned": self._timed_prediction}
        for name, baseline in (baselines or {"zero guess": {}}).items():
            methods[name] = (lambda task, b=baseline: (b(task) if callable(b) else dict(b), 0.0))
        oracle = self.blackbox.oracle

        names = list(methods)

        def run(index: int) -> dict[str, tuple[float, float]]:
            # The first solve of a task also builds its PETSc objects: rotate which method pays that.
            shift = index % len(names)
            results = {}
            for name in names[shift:] + names[:shift]:
                setting, inference = methods[name](tasks[index])
                outcome = oracle(tasks[index], {**setting, **cost.overrides})
                value = cost(outcome, tasks[index])
                value = cost.failure_value(tasks[index]) if math.isnan(value) else value
                results[name] = (value, inference + outcome.setup_seconds + outcome.seconds)
            return results

        per_task = self.executor.map(run, range(len(tasks)))
        return {name: {"iterations": [r[name][0] for r in per_task], "seconds": [r[name][1] for r in per_task]}
                for name in methods}

    def _timed_prediction(self, task: Any) -> tuple[dict, float]:
        begin = time.perf_counter()
        with torch.no_grad():
            setting = self.blackbox.space.decode(self.meta_solver(task.features[None, :])[0])
        return setting, time.perf_counter() - begin


def summarize(evaluation: Mapping[str, Mapping[str, list[float]]]) -> list[dict[str, Any]]:
    """Median and spread of iterations and seconds per method, for tables and reports."""
    rows = []
    for name, result in evaluation.items():
        its, secs = np.asarray(result["iterations"]), np.asarray(result["seconds"])
        rows.append({"method": name, "median_iterations": float(np.median(its)),
                     "mean_iterations": float(its.mean()), "iqr_iterations": float(np.subtract(*np.percentile(its, [75, 25]))),
                     "median_seconds": float(np.median(secs)), "total_seconds": float(secs.sum())})
    return rows
