"""The training loop: plain torch around the BlackBox op, with checkpoints and metrics."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from metasolve.blackbox import BlackBox
from metasolve.checkpoint import load_latest, save_checkpoint
from metasolve.cost import Iterations
from metasolve.meta_solver import MetaSolver


def _features(tasks: Sequence[Any]) -> torch.Tensor:
    return torch.stack([t.features for t in tasks]).to(torch.float64)


class Trainer:
    """Train `meta_solver` (features → θ) through `blackbox` with `optimizer`.

    SPMD: every rank runs the same loop on the same seed and takes identical steps; only the
    executor's solves are split. Only the root rank prints and writes files. A run resumed from a
    checkpoint continues exactly as if it had never stopped: the checkpoint holds the model,
    optimizer, surrogate, both random generators and the solve counters.
    """

    def __init__(self, meta_solver: nn.Module, blackbox: BlackBox, optimizer: torch.optim.Optimizer,
                 loss: Callable[[torch.Tensor], torch.Tensor] | None = None, executor: Any = None,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10, seed: int = 0,
                 progress: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 reference: BlackBox | None = None, reference_every: int = 0) -> None:
        """`reference` (e.g. the same oracle with `FiniteDifference`) measures, every
        `reference_every` steps, the cosine between the training estimate of ∂L/∂θ and its own;
        its solves are counted in its own `stats`, not in the training budget."""
        self.meta_solver, self.blackbox, self.optimizer = meta_solver, blackbox, optimizer
        self.scheduler = scheduler
        self.reference, self.reference_every = reference, int(reference_every)
        self.loss = loss if loss is not None else torch.mean
        self.executor = executor if executor is not None else blackbox.executor
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = int(checkpoint_every)
        self.sampler = torch.Generator().manual_seed(seed)
        self.step = 0
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self.metadata: dict[str, Any] = {}

    @property
    def _surrogate(self) -> Any:
        return getattr(self.blackbox.estimator, "surrogate", None)

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
        }
        if self._surrogate is not None:
            state["surrogate"] = self._surrogate.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.reference is not None:
            state["reference_generator"] = self.reference.generator.get_state()
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
        if self._surrogate is not None:
            self._surrogate.load_state_dict(state["surrogate"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.reference is not None:
            self.reference.generator.set_state(state["reference_generator"])

    def _resume(self) -> None:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        found = load_latest(self.checkpoint_dir) if self.executor.is_root else None
        found = self.executor.broadcast(found)
        if found is None:
            return
        self.load_state_dict(found[1])
        if self.executor.is_root:
            tqdm.write(f"resumed from {found[0]} at step {self.step}")

    def fit(self, train_tasks: Sequence[Any], steps: int, batch_size: int, eval_tasks: Sequence[Any] | None = None,
            eval_every: int = 0, resume: bool = False, metrics_path: str | Path | None = None) -> list[dict]:
        """Run until `steps` optimizer steps are done (counting those of a resumed run)."""
        if not 1 <= batch_size <= len(train_tasks):
            raise ValueError(f"batch_size must be in 1..{len(train_tasks)} (the number of training tasks), got {batch_size}")
        if resume:
            self._resume()
        metrics = Path(metrics_path) if metrics_path is not None else None
        if metrics is not None and self.executor.is_root:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        bar = tqdm(total=steps, initial=self.step, disable=not (self.progress and self.executor.is_root),
                   desc="train", unit="step", dynamic_ncols=True)
        while self.step < steps:
            row = self._train_step(train_tasks, batch_size)
            if eval_tasks and eval_every and self.step % eval_every == 0:
                row["eval_cost"] = self.evaluate_cost(eval_tasks)
            self.history.append(row)
            if metrics is not None and self.executor.is_root:
                with metrics.open("a") as stream:
                    stream.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3g}", solves=row["solves"])
            if self.checkpoint_dir is not None and self.executor.is_root and (
                    self.step % self.checkpoint_every == 0 or self.step == steps):
                save_checkpoint(self.checkpoint_dir, self.step, self.state_dict())
        bar.close()
        return self.history

    def _train_step(self, train_tasks: Sequence[Any], batch_size: int) -> dict[str, Any]:
        begin = time.perf_counter()
        chosen = torch.randperm(len(train_tasks), generator=self.sampler)[:batch_size].tolist()
        batch = [train_tasks[i] for i in chosen]
        theta = self.meta_solver(_features(batch))
        measure = self.reference is not None and self.reference_every and (self.step + 1) % self.reference_every == 0
        estimate: list[torch.Tensor] = []
        if measure:
            theta.register_hook(estimate.append)
        loss = self.loss(self.blackbox(theta, batch))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        stats = self.blackbox.stats
        row = {"step": self.step, "loss": float(loss.detach()), "solves": stats.solves,
               "evaluation_solves": stats.evaluation_solves, "failed_queries": stats.failed_queries, "failed_centres": stats.failed_centres,
               "seconds": time.perf_counter() - begin}
        if self._surrogate is not None:
            row["surrogate_loss"] = self._surrogate.last_loss
        if measure:
            row["gradient_cosine"] = self._reference_cosine(theta.detach(), batch, estimate[0])
        return row

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
