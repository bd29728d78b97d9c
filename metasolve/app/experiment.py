"""Build everything a run needs from a validated config: one place where names become objects."""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metasolve.method.blackbox import BlackBox
from metasolve.method.calibration import LinearisedResponse, LogError, RelativeError, SharedParameters
from metasolve.method.cost import IterationProxy, Iterations, LogResidual, LogWorkToTolerance, ResidualArea, Work
from metasolve.method.estimators import SPSA, ControlVariate, FiniteDifference, ForwardGradient
from metasolve.method.score_function import CostModel, ScoreFunction
from metasolve.method.meta_solver import MetaSolver
from metasolve.method.params import Choice, Integer, Interval, LogInterval, Space, Vector
from metasolve.method.surrogate import Surrogate
from metasolve.training.train import Trainer
from metasolve.app.config import ConfigError
from problems import family_class, make_family
from problems.family import with_features

@dataclass
class Experiment:
    config: dict
    family: Any
    train_tasks: list
    eval_tasks: list
    meta_solver: MetaSolver
    blackbox: BlackBox
    trainer: Trainer
    evaluation_cost: Iterations
    untrained_meta_solver: Any = None
    """A frozen copy of the predictor before any training: with `[model] anchor` it deploys the
    textbook formula exactly, the baseline the report compares with."""
    deploy_tasks: list | None = None
    """With `[evaluate] params` (e.g. a finer grid), the unseen tasks the final table is measured
    on; the held-out checks during training keep `eval_tasks`."""

    def save_model(self, path: Path) -> None:
        """The deployable predictor, and beside it what deployment needs to reproduce the
        training solves (`metasolve.app.delivery`): the solver's options and the evaluation
        tolerance for a KSP or a program, and for a program which arguments are the features."""
        if not isinstance(self.meta_solver, MetaSolver):
            torch.save({"shared_parameters": self.meta_solver.state_dict()}, path)
            return
        kind = self.config["solver"]["kind"]
        if kind == "family":
            self.meta_solver.save(path)
            return
        from metasolve.app.delivery import Delivery, save_for_program

        from problems.program import ProgramFamily

        # a program's runs are its arguments (their features travel with the model); a program
        # given matrix files (`solver.command` on any other family) is deployed from the files
        features = self.family.features if isinstance(self.family, ProgramFamily) else None
        save_for_program(path, self.meta_solver, Delivery.for_oracle(self.blackbox.oracle, features,
                                                                     budget=self.evaluation_cost.budget))


def check_buildable(config: dict) -> None:
    """What only the builder can check, checked before a run writes anything or builds a task:
    the problem family exists and accepts the given parameters. A `ConfigError` naming the key."""
    problem = config["problem"]
    try:
        family = family_class(problem["family"], problem["params"])
    except ValueError as error:
        raise ConfigError(f"problem.family / problem.params: {error}") from None
    kind = feature_kind(config)
    if kind != "family" and not family.has_operator:
        raise ConfigError(f"problem.features = {kind!r}: those are computed from each task's matrix, and family "
                          f"{problem['family']!r} has none (its tasks are runs of a program); use 'family'")
    anchor = config["model"]["anchor"]
    for part, feature in anchor.items():
        if part not in config["space"]:
            raise ConfigError(f"model.anchor.{part}: no space part named {part!r} (parts: {', '.join(config['space'])})")
        if config["space"][part]["kind"] not in ("interval", "log_interval"):
            raise ConfigError(f"model.anchor.{part}: an anchor applies to an interval or log_interval part, "
                              f"not {config['space'][part]['kind']!r}")
        if not isinstance(feature, str):
            raise ConfigError(f"model.anchor.{part} must name a feature (a string), got {feature!r}")


def build_space(config: dict, example_task: Any, family: Any = None) -> Space:
    parts = {}
    for name, part in config["space"].items():
        if part["kind"] == "vector":
            shape = example_task.grid_shape or example_task.size
            parts[name] = Vector(shape, basis=part["basis"], modes=part["modes"], scale=part["scale"],
                                 decay=part["decay"])
        elif part["kind"] == "parameters":
            if not family.parameter_count:
                raise ConfigError(f"space.{name}.kind = 'parameters': problem family "
                                 f"{config['problem']['family']!r} has no model parameters to calibrate")
            parts[name] = Vector(family.parameter_count, basis="identity")
        elif part["kind"] == "interval":
            parts[name] = Interval(part["lo"], part["hi"])
        elif part["kind"] == "choice":
            parts[name] = Choice(part["choices"])
        elif part["kind"] == "integer":
            parts[name] = Integer(part["lo"], part["hi"])
        else:
            parts[name] = LogInterval(part["lo"], part["hi"])
    return Space(parts)


def build_cost(config: dict) -> Any:
    cost = config["cost"]
    if cost["kind"] == "log_residual":
        return LogResidual(cost["iterations"])
    if cost["kind"] == "iteration_proxy":
        return IterationProxy(cost["rtol"], max_it=cost["max_it"], sharpness=cost["sharpness"])
    if cost["kind"] == "run_iteration_proxy":  # every linear solve of a program run, each against its own ‖b‖
        from metasolve.method.run_cost import RunIterationProxy

        return RunIterationProxy(cost["rtol"], max_it=cost["max_it"], sharpness=cost["sharpness"])
    if cost["kind"] == "residual_area":
        return ResidualArea(cost["rtol"], max_it=cost["max_it"], decades=cost["decades"])
    if cost["kind"] == "work":
        return Work(cost["rtol"], max_it=cost["max_it"], sharpness=cost["sharpness"])
    if cost["kind"] == "log_work":
        return LogWorkToTolerance(cost["rtol"], max_it=cost["max_it"], measure=cost["measure"])
    if cost["kind"] == "log_error":
        return LogError()
    raise ConfigError(f"cost.kind must be 'residual_area', 'log_residual', 'iteration_proxy', 'work', 'log_work' "
                     f"or 'log_error', "
                     f"got {cost['kind']!r}")


def build_oracle(config: dict, executor: Any, family: Any = None) -> Any:
    solver = config["solver"]
    if solver["prefix"] and solver["kind"] != "executable":
        raise ConfigError(f"solver.prefix = {solver['prefix']!r} is the options prefix of a program's solver: it "
                         f"applies to kind = 'executable', not {solver['kind']!r}")
    if solver["kind"] == "family":
        oracle = family.oracle()
        if oracle is None:
            raise ConfigError(f"solver.kind = 'family': problem family {config['problem']['family']!r} brings no solver")
        return oracle
    if solver["kind"] == "ksp":
        from solvers import KSPOracle

        recipe = dict(ksp_type=solver["ksp_type"], pc_type=solver["pc_type"], rtol=solver["rtol"],
                      atol=solver["atol"], max_it=solver["max_it"], options=solver["options"])
        if solver["isolate"]:
            from solvers import IsolatedOracle

            if executor.solve_comm.getSize() != 1:
                raise ConfigError("solver.isolate = true solves each task in a process of its own: "
                                 "it cannot be combined with parallel.group_size > 1")
            return IsolatedOracle(functools.partial(KSPOracle, **recipe), timeout=solver["timeout"])
        return KSPOracle(**recipe, comm=executor.solve_comm, timeout=solver["timeout"])  # also lets signals in
    if solver["isolate"]:
        raise ConfigError(f"solver.isolate = true applies to in-process solvers (kind = 'ksp'); "
                         f"kind = {solver['kind']!r} already runs outside the training process")
    if solver["kind"] == "executable":
        from solvers import ExecutableOracle

        if not solver["command"]:
            raise ConfigError("solver.kind = 'executable' needs solver.command")
        return ExecutableOracle(command=solver["command"], timeout=solver["timeout"], options=solver["options"],
                                prefix=solver["prefix"])
    raise ConfigError(f"solver.kind must be 'ksp', 'executable' or 'family', got {solver['kind']!r}")


def build_estimator(config: dict, features: torch.Tensor, theta_dim: int, family: Any = None,
                    executor: Any = None) -> Any:
    spec = config["estimator"]
    kind = spec["kind"]
    if kind == "finite_difference":
        return FiniteDifference(difference=spec["difference"], eps=spec["eps"])
    if kind == "spsa":
        return SPSA(tangents=spec["tangents"], eps=spec["eps"])
    base = ForwardGradient(tangents=spec["tangents"], difference=spec["difference"], eps=spec["eps"],
                           distribution=spec["distribution"], combine=spec["combine"], alpha=spec["alpha"],
                           memory=spec["memory"])
    if kind == "forward":
        return base
    if kind == "control_variate":
        s = config["surrogate"]
        if s["kind"] == "family":  # the problem's own differentiable model of the cost
            linearised = family.linearised_correction()
            if linearised is None:
                raise ConfigError(f"surrogate.kind = 'family': problem family {config['problem']['family']!r} has none")
            correction, inputs = linearised
            net = LinearisedResponse(correction, inputs=inputs)
        elif s["kind"] == "log_affine":  # log-residual of an initial guess under a linear iteration
            net = Surrogate.log_affine(features.shape[1], theta_dim, seed=config["train"]["seed"])
        elif s["kind"] != "mlp":
            raise ConfigError(f"surrogate.kind must be 'mlp', 'log_affine' or 'family', got {s['kind']!r}")
        else:
            sample = torch.cat([features, torch.zeros(features.shape[0], theta_dim, dtype=torch.float64)], dim=1)
            net = Surrogate.mlp(features.shape[1], theta_dim, hidden=s["hidden"], depth=s["depth"], inputs=sample)
        surrogate = Surrogate(net, lr=s["lr"], value_weight=s["value_weight"], jvp_weight=s["jvp_weight"],
                              steps=s["steps"], buffer=s["buffer"], batch_size=s["batch_size"],
                              seed=config["train"]["seed"], chunk_rows=s["chunk_rows"], executor=executor)
        return ControlVariate(base, surrogate, coefficient=spec["coefficient"], decay=spec["decay"],
                              allocation=spec["allocation"])
    raise ConfigError(f"estimator.kind must be forward, control_variate, spsa, finite_difference or "
                     f"score_function, got {kind!r}")


def build_score_function(config: dict, features: torch.Tensor, space: Space) -> ScoreFunction:
    """The estimator for discrete parts (Choice, Integer): sampled choices, a cost model as baseline."""
    spec = config["estimator"]
    model = None
    if spec["cost_model"]:
        n_joint = math.prod(part.n_values for part in space.discrete_parts().values())
        model = CostModel(features.shape[1], n_joint, hidden=config["surrogate"]["hidden"],
                          lr=config["surrogate"]["lr"], steps=config["surrogate"]["steps"],
                          seed=config["train"]["seed"], inputs=features)
    return ScoreFunction(space, samples=spec["samples"], cost_model=model, failure_margin=spec["failure_margin"],
                         exploration=spec["exploration"], temperature=spec["temperature"],
                         tangents=spec["tangents"], eps=spec["eps"])


LOSSES = {"mean": torch.mean, "log_mean": lambda values: torch.log(values).mean()}
"""`[train] loss`: how a batch's costs become one number. `log_mean` weighs every task's relative
improvement the same, where the mean is dominated by the costliest tasks (runs of a program whose
lengths differ tenfold: benchmarks/heat_stepper.py); it needs a cost that stays positive."""
POSITIVE_COSTS = ("iteration_proxy", "work", "run_iteration_proxy")


def build_schedule(train: dict, optimizer: torch.optim.Optimizer) -> Any:
    """`cosine` anneals the learning rate to zero over the run: late steps average the
    estimator's noise instead of random-walking on it."""
    if train["schedule"] == "constant":
        return None
    if train["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train["steps"])
    raise ConfigError(f"train.schedule must be 'constant' or 'cosine', got {train['schedule']!r}")


def feature_kind(config: dict) -> str:
    """`[problem] features`: "operator", "family", "both", or "auto" (the default): operator
    features (`solvers.features`) when the space holds only scalar options, which depend on the
    operator they describe; the family's own when it predicts a vector (an initial guess depends
    on the detail of b, which a few summary numbers cannot carry). A family whose tasks hold no
    matrix (runs of a program: `has_operator = False`) has only its own."""
    kind = config["problem"]["features"]
    if kind != "auto":
        return kind
    if not family_class(config["problem"]["family"]).has_operator:
        return "family"
    return "family" if any(part["kind"] in ("vector", "parameters") for part in config["space"].values()) else "operator"


def build_experiment(config: dict, executor: Any) -> Experiment:
    problem, train = config["problem"], config["train"]
    if train["loss"] == "log_mean" and config["cost"]["kind"] not in POSITIVE_COSTS:
        raise ConfigError(f"train.loss = 'log_mean' takes the log of every cost: cost.kind must be one of "
                         f"{', '.join(POSITIVE_COSTS)} (always positive), got {config['cost']['kind']!r}")
    torch.manual_seed(train["seed"])
    family = with_features(make_family(problem["family"], seed=problem["seed"], **problem["params"]),
                           feature_kind(config))
    train_tasks = family.train_tasks(problem["train_tasks"])
    eval_tasks = family.eval_tasks(problem["eval_tasks"])
    deploy_tasks = None  # `[evaluate] params`: train where solves are cheap, evaluate where they are not
    if config["evaluate"]["params"]:
        deployed = {**problem["params"], **config["evaluate"]["params"]}
        deploy_tasks = with_features(make_family(problem["family"], seed=problem["seed"], **deployed),
                                     feature_kind(config)).eval_tasks(problem["eval_tasks"])
    vectors = [name for name, part in config["space"].items() if part["kind"] == "vector"]
    grids = {tuple(task.grid_shape) or (task.size,) for task in train_tasks} if vectors else set()
    if len(grids) > 1:
        raise ConfigError(f"space.{vectors[0]}: a vector part has one length, and the training tasks of family "
                          f"{config['problem']['family']!r} come on {len(grids)} different grids "
                          f"({', '.join(map(str, sorted(grids)[:3]))}, ...); fix the grid size in problem.params")
    space = build_space(config, train_tasks[0], family)
    feature_dim = train_tasks[0].features.shape[0]
    if config["model"]["kind"] not in ("mlp", "shared"):
        raise ConfigError(f"model.kind must be 'mlp' (θ per task) or 'shared' (one θ), got {config['model']['kind']!r}")
    if config["model"]["kind"] == "shared":  # a calibration: one θ for every task
        meta_solver = SharedParameters(space, family.initial_parameters())
    else:
        meta_solver = MetaSolver(feature_dim, space, hidden=config["model"]["hidden"], depth=config["model"]["depth"],
                                 features=feature_kind(config), anchor=anchor_indices(config, family))
        if config["model"]["normalize"]:
            meta_solver.fit_normalizer(train_tasks)
    features = torch.stack([t.features for t in train_tasks])
    if config["estimator"]["kind"] == "score_function":
        estimator = build_score_function(config, features, space)
    elif space.discrete_parts():
        raise ConfigError(f"the space has discrete parts {sorted(space.discrete_parts())}: they need "
                         f"estimator.kind = 'score_function', got {config['estimator']['kind']!r}")
    else:
        estimator = build_estimator(config, features, space.dim, family, executor)
    blackbox = BlackBox(build_oracle(config, executor, family), space, build_cost(config), estimator,
                        executor=executor, seed=train["seed"], failures=config["estimator"]["failures"])
    optimizer = torch.optim.Adam(meta_solver.parameters(), lr=train["lr"])
    reference = None
    if train["reference_every"]:
        reference = BlackBox(blackbox.oracle, space, blackbox.cost, FiniteDifference(eps=config["estimator"]["eps"]),
                             executor=executor)
    trainer = Trainer(meta_solver, blackbox, optimizer, executor=executor, checkpoint_every=train["checkpoint_every"],
                      seed=train["seed"], scheduler=build_schedule(train, optimizer), reference=reference,
                      reference_every=train["reference_every"], max_failed_fraction=train["max_failed_fraction"],
                      failure_window=train["failure_window"], surrogate_steps=train["surrogate_steps"],
                      loss=LOSSES[train["loss"]], patience=train["patience"])
    evaluation = RelativeError() if config["cost"]["kind"] == "log_error" else \
        Iterations(config["evaluate"]["rtol"], config["evaluate"]["max_it"])
    untrained = copy.deepcopy(meta_solver) if config["model"]["anchor"] else None
    return Experiment(config, family, train_tasks, eval_tasks, meta_solver, blackbox, trainer, evaluation, untrained,
                      deploy_tasks)


def anchor_indices(config: dict, family: Any) -> dict[str, int]:
    """`[model] anchor = {part = "feature name"}` as feature indices of this family's tasks."""
    names = list(family.feature_names)
    indices = {}
    for part, feature in config["model"]["anchor"].items():
        if feature not in names:
            raise ConfigError(f"model.anchor.{part} = {feature!r}: the tasks have no such feature "
                              f"(features: {', '.join(names)})")
        indices[part] = names.index(feature)
    return indices
