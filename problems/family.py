"""What every problem family is: a deterministic map (family parameters, seed, index) -> task.

Determinism is what lets MPI ranks exchange task *indices* instead of matrices: any rank rebuilds
task i from `np.random.default_rng([seed, i])` alone, so task i never depends on other tasks or
on the order in which tasks are built.

Train/evaluation split convention: training uses indices `range(0, count)`
(`family.train_tasks(count)`), evaluation uses `range(EVAL_OFFSET, EVAL_OFFSET + count)`
(`family.eval_tasks(count)`). The two ranges are disjoint for any training set smaller than
`EVAL_OFFSET`, so evaluation tasks are never seen in training.

A family of your own (a config's `[problem] family = "package.module:Class"`, importable from
the working directory or the Python path) keeps this contract:
- subclass `Family`; `__init__(self, seed=0, **params)` takes the config's `[problem.params]` as
  keyword arguments (an unknown one is refused by name before anything runs) and calls
  `super().__init__(seed, **params)`;
- `_build(rng, index)` returns task `index` drawing every random number from `rng`: a `Task`
  (a `LinearSystem` `A`, `b`, its `features` as a float64 tensor, optionally `x_ref`,
  `grid_shape`, `name`) for the PETSc solvers, or a `ProgramTask` for `[solver] kind = "executable"`;
- `feature_dim` is the length of every task's features (0 for none: then only operator
  features, `[problem] features = "operator"`, which `metasolve predict` can compute from a
  user's own matrix); `describe()` says in one paragraph what the tasks are; optionally
  `feature_names` labels the features (a `[model] anchor` names one).
`problems.program` (runs of a program) and `problems.recorded` (recorded systems) are two
families built this way.

The grid tools at the bottom are shared by the 2-D families: unknowns live on the interior
vertices of a uniform n x n grid on the unit square (h = 1/(n+1), Dirichlet boundary), stored
row-major with x fastest (index j*n + i), which is also PETSc DMDA's ordering.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from solvers._petsc import PETSc
from solvers.features import FEATURE_FUNCTIONS, OPERATOR_FEATURE_NAMES, STRUCTURAL_FEATURE_NAMES
from solvers.linear_system import LinearSystem

EVAL_OFFSET = 1_000_000
"""First evaluation index; training indices stay below it."""

RANDOM_FIELD_TERMS = 64
"""Random Fourier features per random field: enough for a near-Gaussian field, cheap to evaluate."""


@dataclass
class Task(LinearSystem):
    """A `LinearSystem` that also records its grid (for grid-shaped initial-guess spaces) and the
    random parameters it was drawn with (for reports: e.g. which contrast a task had)."""

    grid_shape: tuple[int, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)


class Family(ABC):
    """Base class of the problem families: `task(index)` is a pure function of (parameters, seed, index)."""

    key: str = ""
    """The family's name in `problems.FAMILIES` (and in task names)."""

    def __init__(self, seed: int, **parameters: Any) -> None:
        self.seed = check_count("seed", seed, minimum=0)
        self.parameters = {**parameters, "seed": self.seed}

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """Length of every task's `features`, the same for every index (and grid size)."""

    @abstractmethod
    def describe(self) -> str:
        """One paragraph: the equation, the discretisation and the distributions tasks are drawn from."""

    @abstractmethod
    def _build(self, rng: np.random.Generator, index: int) -> Task:
        """Task `index`, drawing every random number from `rng`."""

    def task(self, index: int) -> Task:
        index = check_count("task index", index, minimum=0)
        return self._build(np.random.default_rng([self.seed, index]), index)

    def tasks(self, indices: Iterable[int]) -> list[Task]:
        return [self.task(i) for i in indices]

    def train_tasks(self, count: int) -> list[Task]:
        """Tasks 0 .. count-1 (the training convention)."""
        count = check_count("training task count", count, minimum=0)
        if count > EVAL_OFFSET:
            raise ValueError(f"at most {EVAL_OFFSET} training tasks keep training and evaluation disjoint, got {count}")
        return self.tasks(range(count))

    def eval_tasks(self, count: int) -> list[Task]:
        """Tasks EVAL_OFFSET .. EVAL_OFFSET+count-1 (the evaluation convention)."""
        count = check_count("evaluation task count", count, minimum=0)
        return self.tasks(range(EVAL_OFFSET, EVAL_OFFSET + count))

    @property
    def feature_names(self) -> tuple[str, ...]:
        """One name per feature, in order: what `[model] anchor` refers to. Families whose
        features have meaningful names override this."""
        return tuple(f"{self.key}_feature_{i}" for i in range(self.feature_dim))

    # Optional hooks, declared here with their defaults (the builder never probes for them):
    def oracle(self) -> Any:
        """The family's own solver (`[solver] kind = "family"`), or None: it brings none."""
        return None

    has_operator: bool = True
    """Whether its tasks hold a matrix (A, b) that operator features can be computed from; a
    program run's task is its command line, and has none."""

    parameter_count: int = 0
    """Model parameters a calibration (`[space.x] kind = "parameters"`) fits; 0 for none."""

    def initial_parameters(self) -> Any:
        """Starting values of those parameters (None: zeros)."""
        return None

    def linearised_correction(self) -> Any:
        """(correction, inputs) for `[surrogate] kind = "family"`, or None: the family has none."""
        return None

    def task_name(self, index: int, **details: Any) -> str:
        extra = "".join(f"-{k}{v}" for k, v in details.items())
        return f"{self.key}-s{self.seed}-i{index}{extra}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.parameters.items())})"


class FrontBackSplit:
    """Training takes a finite list's first items, evaluation its last (index EVAL_OFFSET + k is
    item count − 1 − k), and the two must never meet: a table of runs, a directory of recorded
    systems. `position(index)` is the item of task `index`, or a ValueError saying what to do."""

    def __init__(self, count: int, name: str, item: str, holder: str, remedy: str) -> None:
        self.count, self.name, self.item, self.holder, self.remedy = count, name, item, holder, remedy
        self.highest_train, self.lowest_eval = -1, None

    def position(self, index: int) -> int:
        evaluation = index >= EVAL_OFFSET
        position = self.count - 1 - (index - EVAL_OFFSET) if evaluation else index
        if not 0 <= position < self.count:
            raise ValueError(f"{self.name}: task {index} asks for {self.item} {position} of {self.holder}; {self.remedy}")
        if evaluation:
            self.lowest_eval = position if self.lowest_eval is None else min(self.lowest_eval, position)
        else:
            self.highest_train = max(self.highest_train, position)
        if self.lowest_eval is not None and self.highest_train >= self.lowest_eval:
            raise ValueError(f"{self.name}: {self.holder}; training takes the first and evaluation the last, and they "
                             f"overlap (training {self.item} {self.highest_train}, evaluation {self.item} "
                             f"{self.lowest_eval}): {self.remedy}")
        return position


FEATURE_KINDS = ("operator", "structural", "family", "both")
"""What a task's `features` hold: operator features of (A, b) (`solvers.features.operator_features`),
their cheap structural subset (`structural_features`, no Krylov run), the family's own hand-made
features, or operator features followed by the family's own."""


def with_features(family: Family, kind: str) -> Family:
    """`family` whose tasks carry the `kind` of features (see `FEATURE_KINDS`)."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if kind in ("family", "both") and family.feature_dim == 0:
        raise ValueError(f"family {family.key!r} has no features of its own; use features = 'operator' "
                         "or 'structural' (computed from each task's matrix)")
    if kind != "family" and not family.has_operator:
        raise ValueError(f"features = {kind!r} are computed from each task's matrix, and family {family.key!r} has "
                         f"none (its tasks are runs of a program): use features = 'family'")
    return family if kind == "family" else OperatorFeatures(family, kind)


class OperatorFeatures(Family):
    """A family whose tasks' features are computed from their operator (`solvers.features`):
    `operator_features(A, b)` alone (`kind = "operator"`), its structural subset alone
    (`"structural"`), or operator features followed by the family's own (`"both"`).

    The same function serves deployment, where a user has only (A, b): a meta-solver trained on
    these features needs nothing the family knew. Task `index` is still a pure function of
    (parameters, seed, index); the features are computed on the task's `PETSc.COMM_SELF` copy of
    A, which the oracle reuses.
    """

    def __init__(self, family: Family, kind: str = "operator") -> None:
        if kind not in ("operator", "structural", "both"):
            raise ValueError(f"OperatorFeatures kind must be 'operator', 'structural' or 'both', got {kind!r}")
        self.family, self.kind, self.key = family, kind, family.key
        super().__init__(family.seed, **{k: v for k, v in family.parameters.items() if k != "seed"}, features=kind)

    @property
    def feature_dim(self) -> int:
        return len(self._names) + (self.family.feature_dim if self.kind == "both" else 0)

    @property
    def _names(self) -> tuple[str, ...]:
        return STRUCTURAL_FEATURE_NAMES if self.kind == "structural" else OPERATOR_FEATURE_NAMES

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names + (self.family.feature_names if self.kind == "both" else ())

    def oracle(self) -> Any:
        return self.family.oracle()

    def describe(self) -> str:
        what = {"operator": "operator features", "structural": "structural operator features",
                "both": "operator features, then the family's own"}[self.kind]
        return (f"{self.family.describe()} Features used: {what} ({self.feature_dim} numbers: "
                f"{', '.join(self._names)}).")

    def _build(self, rng: np.random.Generator, index: int) -> Task:
        task = self.family._build(rng, index)
        A, b = task.petsc(PETSc.COMM_SELF)
        operator = torch.from_numpy(FEATURE_FUNCTIONS["operator" if self.kind == "both" else self.kind](A, b))
        if self.kind != "both" or task.features is None:
            task.features = operator
        else:
            task.features = torch.cat([operator, task.features.to(torch.float64)])
        return task

    def __getattr__(self, name: str) -> Any:
        """Family-specific attributes (grid ranges, ...) read through to the wrapped family."""
        if name == "family":
            raise AttributeError(name)
        return getattr(self.family, name)


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= minimum, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_range(name: str, value: Any, minimum: float = 0.0) -> tuple[float, float]:
    """A (lo, hi) pair of finite floats with minimum < lo <= hi, or a ValueError naming `name`."""
    if isinstance(value, Real) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2 or \
            not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a number or a pair (lo, hi), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and minimum < lo <= hi):
        raise ValueError(f"{name} must satisfy {minimum} < lo <= hi, got {value!r}")
    return lo, hi


def check_size_range(name: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """A grid size n or an inclusive range (lo, hi) of sizes, as (lo, hi)."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be an integer or a pair (lo, hi), got {value!r}")
    lo, hi = (check_count(name, v, minimum) for v in value)
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi, got {value!r}")
    return lo, hi


def format_distribution(lo: float, hi: float, kind: str = "U") -> str:
    """'= 32' for a fixed value, '~ U[16, 32]' for a range (kind 'logU' for log-uniform draws)."""
    return f"= {lo:g}" if lo == hi else f"~ {kind}[{lo:g}, {hi:g}]"


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def reference_solution(A: sp.spmatrix, b: np.ndarray) -> np.ndarray:
    """A direct solve: at these sizes exact to ~1e-14 and cheap enough to redo on any rank."""
    return np.asarray(spla.spsolve(sp.csc_matrix(A), b), dtype=np.float64)


def sine_modes(n: int, modes: int) -> np.ndarray:
    """[n, modes] discrete sine modes sin(k pi i/(n+1)) (eigenvectors of the Dirichlet Laplacian);
    columns k > n, which do not exist on the grid, are zero."""
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    k = np.arange(1, modes + 1, dtype=np.float64)[None, :]
    return np.where(k <= n, np.sin(np.pi * i * k / (n + 1)), 0.0)


def sine_coefficients(grid: np.ndarray, modes: int) -> np.ndarray:
    """[modes, modes] amplitudes of the lowest sine modes of an interior-vertex grid (ny, nx):
    grid = sin(k pi x) sin(l pi y) gives coefficient 1 at (l, k). Zero for modes the grid lacks."""
    ny, nx = grid.shape
    sy, sx = sine_modes(ny, modes), sine_modes(nx, modes)
    return (2.0 / (ny + 1)) * (2.0 / (nx + 1)) * (sy.T @ grid @ sx)


def _averaging_matrix(n: int, cells: int) -> np.ndarray:
    """[cells, n] averages over `cells` equal intervals of [0, 1] of values at the vertices
    i/(n+1), each value held on its dual interval (the outer ones extended to the boundary)."""
    edges = np.concatenate([[0.0], (np.arange(1, n) + 0.5) / (n + 1), [1.0]])
    coarse = np.linspace(0.0, 1.0, cells + 1)
    overlap = np.minimum(edges[None, 1:], coarse[1:, None]) - np.maximum(edges[None, :-1], coarse[:-1, None])
    return np.clip(overlap, 0.0, None) * cells


def coarse_average(grid: np.ndarray, cells: int) -> np.ndarray:
    """[cells, cells] area averages of an interior-vertex grid (ny, nx): a fixed-size summary of a
    field whatever the grid size, smooth enough not to alias the fine-scale detail."""
    ny, nx = grid.shape
    return _averaging_matrix(ny, cells) @ grid @ _averaging_matrix(nx, cells).T


def vertex_coordinates(n: int, boundary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) of the interior vertices, or of all vertices with `boundary`, as (ny, nx) arrays."""
    t = np.arange(n + 2, dtype=np.float64) / (n + 1)
    if not boundary:
        t = t[1:-1]
    X, Y = np.meshgrid(t, t, indexing="xy")
    return X, Y


def random_field(rng: np.random.Generator, correlation_length: float,
                 terms: int = RANDOM_FIELD_TERMS) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A smooth random function g(x, y) with zero mean, unit variance and covariance close to
    exp(-|r|^2 / (2 l^2)) (random Fourier features: frequencies ~ N(0, I/l^2), uniform phases).

    Defined on the continuum, so the same task looks the same on every grid it is sampled on.
    """
    frequencies = rng.normal(0.0, 1.0 / correlation_length, size=(terms, 2))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)

    def g(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        angle = x[..., None] * frequencies[:, 0] + y[..., None] * frequencies[:, 1] + phases
        return np.sqrt(2.0 / terms) * np.cos(angle).sum(axis=-1)

    return g


def five_point_matrix(center: np.ndarray, west: np.ndarray, east: np.ndarray,
                      south: np.ndarray, north: np.ndarray) -> sp.csr_matrix:
    """CSR matrix of a 5-point stencil on the n x n interior grid, coefficients given per row as
    (ny, nx) arrays; couplings to boundary vertices are dropped (homogeneous Dirichlet)."""
    ny, nx = center.shape
    index = np.arange(nx * ny).reshape(ny, nx)
    rows, cols, values = [index.ravel()], [index.ravel()], [center.ravel()]
    for coefficient, offset, inside in (
        (west, -1, (slice(None), slice(1, None))),
        (east, +1, (slice(None), slice(None, -1))),
        (south, -nx, (slice(1, None), slice(None))),
        (north, +nx, (slice(None, -1), slice(None))),
    ):
        rows.append(index[inside].ravel())
        cols.append(index[inside].ravel() + offset)
        values.append(coefficient[inside].ravel())
    matrix = sp.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(nx * ny, nx * ny))
    return matrix.tocsr()
