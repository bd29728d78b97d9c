"""The wall-modelled channel family for `metasolve train`: tasks, their targets, the calibrated model.

The physics is problems/channel_flow.py, the DNS data and friction law problems/channel_dns.py,
one task and its SNES oracle problems/channel_task.py, the cross-validated calibration
problems/channel_calibration.py. This file puts them together as the family a config names
(`[problem] family = "channel"`), and counts the solves building it takes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from problems.channel_calibration import TARGETS, Calibration, cross_validate, training_set
from problems.channel_dns import dns_case
from problems.channel_flow import Grid, dean_re_b
from problems.channel_task import RESPONSE_SOLVES, ChannelTask, measure_response, wall_modelled_oracle
from problems.family import EVAL_OFFSET, Family, check_count
from problems.wall_laws import LearnedWallModel
from solvers.snes import SNESOracle

HIDDEN = (4, 8, 16, 32, 64)
"""Candidate capacities (random tanh features) the cross-validation chooses from. Up to 64
because 16 features cannot follow the friction-law targets at the low end of the range: on the
training tasks alone their residual there reaches 0.3–0.5% on the grids whose first cell sits
in the buffer layer (u24, s16), where Spalding's error changes sign between neighbouring flow
rates (benchmarks/results/wall_model.md, `runs.*.cv_scores`)."""
RIDGE = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
"""Candidate ridges, in units of the mean squared ln Re_τ error (Spalding's is ~1e-4 on the
training grids): from barely regularised to holding θ near Spalding."""
SYNTHETIC = 12
"""Friction-law flow rates: 12 log-spaced over the Re_τ range are ~1.3x apart in Re_b, close
enough that the model interpolates the law between them at the low end, where the grids'
errors change fastest with Re (with 8, leave-one-flow-rate-out chose the largest ridge there)."""


def _candidates(name: str, value: Any, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"channel {name} must be a number or a list of numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() and v >= 1 for v in values):
        raise ValueError(f"channel {name} must be whole numbers >= 1, got {value!r}")
    if kind is float and not all(np.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"channel {name} must be finite and >= 0, got {value!r}")
    return [kind(v) for v in values]


class ChannelFamily(Family):
    """Wall-modelled channel tasks for `metasolve train`: (Re_b, coarse grid) pairs and a target Re_τ.

    Training targets (`target`):
    - "dns": the `train_dns` cases themselves (Hoyas & Jiménez, nominal Re_τ 180/550/2000) on
      every grid: the data, and nothing between its Reynolds numbers;
    - "friction_law": those cases plus `synthetic` flow rates (log-spaced over Dean's Re_b for
      the `re_tau` range), whose targets come from the log friction law fitted to the training
      cases (`FrictionLaw`), weighted by how well the law knows them;
    - "rans": the wall-resolved mixing-length solve at those flow rates (dense, but the
      closure's own error against DNS comes with it).
    Evaluation tasks are the `eval_dns` cases on `eval_grids` (default: the training grids),
    always against DNS.

    The wall model (`LearnedWallModel`) has `hidden` random features and a `ridge`; given lists,
    leave-one-DNS-case-out inside `train_dns` chooses them (leave-one-flow-rate-out with a single
    case: `channel_calibration.folds`), and the chosen fit is where training through the solver
    starts (`initial_parameters`); `calibration.predict` gives each prediction's band. Building measures
    every task's response to the model (`RESPONSE_SOLVES` each, `response_solves` in all).
    """

    key = "channel"

    def __init__(self, seed: int = 0, target: str = "friction_law", train_dns: Sequence[int] = (550, 2000),
                 eval_dns: Sequence[int] = (180,), grids: Sequence[str] = ("u8", "u12", "u16", "u24", "s16"),
                 eval_grids: Sequence[str] | None = None, re_tau: Sequence[float] = (150.0, 2500.0),
                 synthetic: int = SYNTHETIC, hidden: int | Sequence[int] = HIDDEN,
                 ridge: float | Sequence[float] = RIDGE) -> None:
        if target not in TARGETS:
            raise ValueError(f"channel target must be one of {TARGETS}, got {target!r}")
        hidden, ridge = _candidates("hidden", hidden, int), _candidates("ridge", ridge, float)
        eval_grids = list(grids) if eval_grids is None else list(eval_grids)
        super().__init__(seed, target=target, train_dns=list(train_dns), eval_dns=list(eval_dns), grids=list(grids),
                         eval_grids=eval_grids, re_tau=list(re_tau), synthetic=synthetic, hidden=hidden, ridge=ridge)
        for name in [*grids, *eval_grids]:
            Grid.named(name)  # a bad grid name fails here, naming itself
        if not grids or not eval_grids:
            raise ValueError("the channel family needs at least one training and one evaluation grid")
        if len(re_tau) != 2 or not 0 < re_tau[0] < re_tau[1]:
            raise ValueError(f"re_tau must be a range [lo, hi] with 0 < lo < hi, got {list(re_tau)!r}")
        synthetic = check_count("synthetic", synthetic, minimum=0 if target == "dns" else 2)
        self.target = target
        self.train_cases, self.eval_cases = [dns_case(n) for n in train_dns], [dns_case(n) for n in eval_dns]
        if target != "rans" and not self.train_cases:
            raise ValueError(f"target {target!r} needs at least one DNS case in train_dns")
        self.response_solves = 0
        dns_tasks = {p.nominal: self._measured([ChannelTask(p.re_b, g, p.re_tau, f"DNS Re{p.nominal}") for g in grids])
                     for p in self.train_cases}
        flow_rates = [float(round(dean_re_b(r))) for r in np.geomspace(re_tau[0], re_tau[1], synthetic)] \
            if target != "dns" else []
        synthetic_tasks = self._measured([ChannelTask(re_b, g, None, "synthetic") for re_b in flow_rates for g in grids])
        self.calibration: Calibration = cross_validate(target, self.train_cases, dns_tasks, synthetic_tasks,
                                                       hidden, ridge, self.seed)
        self.wall_model = self.calibration.model
        self._train, self.law = training_set(target, self.train_cases, dns_tasks, synthetic_tasks)
        self._eval = self._measured([ChannelTask(p.re_b, g, p.re_tau, f"DNS Re{p.nominal}")
                                     for p in self.eval_cases for g in eval_grids])

    def _measured(self, tasks: list[ChannelTask]) -> list[ChannelTask]:
        """`tasks` with their responses measured: the solves counted in `response_solves`."""
        for task in tasks:
            task.response = measure_response(task)
            self.response_solves += RESPONSE_SOLVES
        return tasks

    @property
    def feature_dim(self) -> int:
        return LearnedWallModel.n_inputs + 2

    def describe(self) -> str:
        p, chosen = self.parameters, self.calibration
        held_out = "DNS case" if len(self.train_cases) >= 2 else "flow rate"
        cv = (f"chosen by leave-one-{held_out}-out from hidden {p['hidden']} x ridge {p['ridge']}"
              if chosen.held_out_thetas else "no fold to hold out: the most regularised candidate")
        return (f"turbulent channel, mixing-length RANS on coarse grids {', '.join(p['grids'])} with a learned wall "
                f"model (Spalding x e^c(Re_y, y1/h, growth), {chosen.model.hidden} features, ridge {chosen.ridge:g}, "
                f"{cv}); target {self.target} from DNS cases {p['train_dns']}; evaluated against DNS {p['eval_dns']}; "
                f"{len(self._train)} training tasks; {self.response_solves} solves to measure the tasks' responses. "
                f"Features (training only, {self.feature_dim} numbers): the model's three inputs at Spalding's "
                f"solution, Spalding's log Re_tau error and its sensitivity to the model")

    def _build(self, rng: np.random.Generator, index: int) -> ChannelTask:
        tasks, i = (self._train, index) if index < EVAL_OFFSET else (self._eval, index - EVAL_OFFSET)
        if i >= len(tasks):
            which = "training" if index < EVAL_OFFSET else "evaluation"
            raise ValueError(f"the channel family has {len(tasks)} {which} tasks (task {i} asked for): set "
                             f"problem.{'train' if which == 'training' else 'eval'}_tasks = {len(tasks)}")
        return tasks[i]

    def train_tasks(self, count: int) -> list[ChannelTask]:
        """Every training task: a fixed set of conditions, so `count` must name exactly how many."""
        if count != len(self._train):
            raise ValueError(f"the channel family has {len(self._train)} training tasks: set problem.train_tasks = "
                             f"{len(self._train)} (got {count})")
        return list(self._train)

    def eval_tasks(self, count: int) -> list[ChannelTask]:
        if count != len(self._eval):
            raise ValueError(f"the channel family has {len(self._eval)} evaluation tasks: set problem.eval_tasks = "
                             f"{len(self._eval)} (got {count})")
        return list(self._eval)

    # The hooks `metasolve train` calls on a family that brings its own solver, parameters and surrogate.
    def oracle(self) -> SNESOracle:
        return wall_modelled_oracle(self.wall_model)

    @property
    def parameter_count(self) -> int:
        return self.wall_model.n_params

    def initial_parameters(self) -> np.ndarray:
        """The cross-validated fit: training through the solver refines what the linearisation missed."""
        return self.calibration.theta.copy()

    def linearised_correction(self) -> tuple[Any, int]:
        """The wall model's correction and its input count, for the control variate's surrogate
        (`metasolve.method.calibration.LinearisedResponse`, built by the method, not by the physics)."""
        return self.wall_model.correction, LearnedWallModel.n_inputs


__all__ = ["ChannelFamily", "HIDDEN", "RIDGE", "SYNTHETIC"]
