"""Fully developed turbulent channel flow, wall-resolved and wall-modelled, as SNES problems.

Half channel η = y/h ∈ [0, 1], velocity U* = U h/ν. Momentum with a mixing-length closure:

    d/dη[(1 + ν_t*) dU*/dη] + G = 0,   ν_t* = (l/h)² [1 − exp(−η Re_τ/A⁺)]² |dU*/dη|,

Nikuradse's outer length l/h = 0.14 − 0.08(1−η)² − 0.06(1−η)⁴ with van Driest's damping
(A⁺ = 26), symmetry dU*/dη = 0 at η = 1. G = u_τ*² = Re_τ² is the pressure gradient.
Flow-rate driven (what a wall model is for: the friction at a given flow rate): ∫₀¹U* dη = Re_b/2
is given and G is an extra unknown; pressure driven: G = Re_τ² is given.

Finite volumes, cell-centred velocities. The state is scaled so every entry is O(1) or smaller:
w = [U*/V at the cell centres, G/V²] with V = Re_b/2 (the bulk velocity in units of ν/h), hence
u_τ* = Re_τ = V√g. Wall-resolved: a stretched grid whose first cell sits below y⁺ = 1 and
U*(0) = 0. Wall-modelled: a uniform coarse grid whose wall flux is the wall model's shear stress,
evaluated from the first cell centre's Re_y = U₁y₁/ν and y₁/h.

Also here: the training tasks (`ChannelTask`: Re_b and a coarse grid, with its cached
wall-resolved reference), the cost (`FrictionError`, the squared relative u_τ error) and two
differentiable surrogates of that cost for the control variate (`LinearisedLoss`, `APrioriLoss`),
plus the DNS profiles of problems/data for validation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch
from torch import nn

from problems.wall_laws import LearnedWallModel, Spalding, WallModel
from solvers.outcome import Outcome
from solvers.snes import SNESOracle

A_PLUS = 26.0
"""Van Driest's damping constant."""
FINE_CELLS = 256
"""Cells of the wall-resolved reference: u_τ changes < 1e-4 relative on doubling (tests check)."""
FIRST_CELL_Y_PLUS = 0.5
"""Height of the reference grid's first cell in wall units, for the estimated Re_τ."""
TOLERANCES = {"rtol": 1e-12, "atol": 1e-14, "stol": 1e-14, "max_it": 100}
"""Newton to round-off: the finite differences of a training step must see the wall model, not
solver tolerance. Residual entries are O(g) ≈ 1e-3, so atol 1e-14 is ~1e-11 relative; warm
starts begin near the solution, where the step test (stol) ends the solve."""
WALL_MODEL_KEY = "wall_model"
"""The setting entry holding a learned wall model's parameters θ."""
DNS_FILES = ("channel_dns_Re180.csv", "channel_dns_Re550.csv", "channel_dns_Re2000.csv")
"""Hoyas & Jiménez mean profiles shipped in problems/data (citation in its README.md)."""


def outer_mixing_length(eta: np.ndarray) -> np.ndarray:
    """Nikuradse's l/h for a pipe/channel: 0.4η at the wall, 0.14 at the centre."""
    return 0.14 - 0.08 * (1.0 - eta) ** 2 - 0.06 * (1.0 - eta) ** 4


def dean_re_tau(re_b: float) -> float:
    """Dean's correlation Re_τ ≈ 0.09 Re_b^0.88 (Re_b = 2hU_b/ν): used only for first guesses and grids."""
    return 0.09 * re_b ** 0.88


def dean_re_b(re_tau: float) -> float:
    """Inverse of `dean_re_tau`: a bulk Reynolds number giving roughly this Re_τ."""
    return (re_tau / 0.09) ** (1.0 / 0.88)


@dataclass(eq=False)
class Grid:
    """Finite-volume cells on [0, 1]: `faces` from the wall (0) to the centreline (1)."""

    faces: np.ndarray

    def __post_init__(self) -> None:
        self.faces = np.asarray(self.faces, dtype=np.float64)
        if self.faces.ndim != 1 or self.faces.size < 3 or self.faces[0] != 0.0 or self.faces[-1] != 1.0 \
                or np.any(np.diff(self.faces) <= 0):
            raise ValueError("Grid faces must increase strictly from 0 to 1 with at least two cells")
        self.centres = 0.5 * (self.faces[1:] + self.faces[:-1])
        self.widths = np.diff(self.faces)
        self.spacing = np.diff(self.centres)

    @property
    def cells(self) -> int:
        return self.widths.size

    @classmethod
    def uniform(cls, cells: int) -> "Grid":
        if cells < 2:
            raise ValueError(f"a grid needs at least 2 cells, got {cells}")
        return cls(np.linspace(0.0, 1.0, cells + 1))

    @classmethod
    def stretched(cls, cells: int, first_width: float) -> "Grid":
        """η(ξ) = 1 − tanh(γ(1−ξ))/tanh γ, γ chosen so the first cell is `first_width` high.

        Cells grow geometrically (by ≈ 2γ/cells per cell) through the wall and log layers and are
        nearly uniform at the centre.
        """
        if cells < 2 or not 0 < first_width < 1.0 / cells:
            raise ValueError(f"stretched grid needs cells >= 2 and 0 < first_width < 1/cells, got {cells}, {first_width}")

        def first(gamma: float) -> float:
            return 1.0 - math.tanh(gamma * (1.0 - 1.0 / cells)) / math.tanh(gamma) - first_width

        gamma = scipy.optimize.brentq(first, 1e-6, 50.0, xtol=1e-14)
        xi = np.linspace(0.0, 1.0, cells + 1)
        faces = 1.0 - np.tanh(gamma * (1.0 - xi)) / math.tanh(gamma)
        faces[0], faces[-1] = 0.0, 1.0
        return cls(faces)


def momentum_residual(grid: Grid, w: np.ndarray, scale: float, wall_flux: np.ndarray) -> np.ndarray:
    """Cell balances (flux_top − flux_bottom)/Δη + g, for states `w` of shape [..., cells + 1].

    Interior faces carry (1/V + l²D²|s|)s with s the centre-difference gradient of u = U*/V;
    the centreline face carries zero (symmetry); the wall face carries `wall_flux` [...].
    """
    u, g = w[..., :-1], w[..., -1]
    eta = grid.faces[1:-1]
    re_tau = scale * np.sqrt(np.abs(g))[..., None]
    length = outer_mixing_length(eta) * (1.0 - np.exp(-eta * re_tau / A_PLUS))
    slope = np.diff(u, axis=-1) / grid.spacing
    interior = (1.0 / scale + length**2 * np.abs(slope)) * slope
    flux = np.concatenate([wall_flux[..., None], interior, np.zeros_like(wall_flux)[..., None]], axis=-1)
    return np.diff(flux, axis=-1) / grid.widths + g[..., None]


@dataclass(frozen=True)
class Driving:
    """What drives the flow: a bulk Reynolds number (flow rate) or a friction Reynolds number (pressure)."""

    re_b: float | None = None
    re_tau: float | None = None

    def __post_init__(self) -> None:
        if (self.re_b is None) == (self.re_tau is None):
            raise ValueError("give exactly one of re_b (flow-rate driven) or re_tau (pressure driven)")
        value = self.re_b if self.re_b is not None else self.re_tau
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"the Reynolds number must be positive and finite, got {value}")

    @property
    def scale(self) -> float:
        """V = Re_b/2, or Dean's estimate of it when pressure driven (any O(U_b) scale works)."""
        return 0.5 * (self.re_b if self.re_b is not None else dean_re_b(self.re_tau))

    @property
    def estimated_re_tau(self) -> float:
        return self.re_tau if self.re_tau is not None else dean_re_tau(self.re_b)

    def constraint(self, grid: Grid, w: np.ndarray) -> np.ndarray:
        """∫u dη − 1 (the flow rate, in units of V) or g − (Re_τ/V)² (the pressure gradient)."""
        if self.re_b is not None:
            return w[..., :-1] @ grid.widths - 1.0
        return w[..., -1] - (self.re_tau / self.scale) ** 2


def reichardt_u_plus(y_plus: np.ndarray, kappa: float = 0.41) -> np.ndarray:
    """Reichardt's wall law, smooth from the wall to the log layer: a first guess only."""
    return (np.log1p(kappa * y_plus) / kappa
            + 7.8 * (1.0 - np.exp(-y_plus / 11.0) - y_plus / 11.0 * np.exp(-y_plus / 3.0)))


def first_guess(grid: Grid, driving: Driving) -> np.ndarray:
    """Reichardt's profile at Dean's Re_τ, rescaled to the flow rate: Newton's starting point."""
    re_tau = driving.estimated_re_tau
    u = re_tau * reichardt_u_plus(grid.centres * re_tau) / driving.scale
    if driving.re_b is not None:
        u = u / (u @ grid.widths)
    return np.append(u, (re_tau / driving.scale) ** 2)


@dataclass(eq=False)
class Profile:
    """A converged channel solution in wall units."""

    eta: np.ndarray
    u_plus: np.ndarray
    re_tau: float
    re_b: float
    outcome: Outcome | None = field(default=None, repr=False)

    @property
    def y_plus(self) -> np.ndarray:
        return self.eta * self.re_tau

    @property
    def bulk_u_plus(self) -> float:
        """U_b⁺ = U_b/u_τ = (Re_b/2)/Re_τ."""
        return 0.5 * self.re_b / self.re_tau

    @property
    def skin_friction(self) -> float:
        """C_f = τ_w/(½ρU_b²) = 2/U_b⁺²."""
        return 2.0 / self.bulk_u_plus**2

    @classmethod
    def from_state(cls, grid: Grid, driving: Driving, w: np.ndarray, outcome: Outcome | None = None) -> "Profile":
        re_tau = driving.scale * math.sqrt(max(float(w[-1]), 0.0))
        re_b = 2.0 * driving.scale * float(w[:-1] @ grid.widths)
        return cls(grid.centres.copy(), driving.scale * w[:-1] / re_tau, re_tau, re_b, outcome)


@dataclass(eq=False)
class DNSProfile:
    """A DNS mean-velocity profile, wall to centreline, in wall units."""

    name: str
    y_over_h: np.ndarray
    y_plus: np.ndarray
    u_plus: np.ndarray

    @property
    def re_tau(self) -> float:
        """y⁺ at the centreline (y/h = 1)."""
        return float(self.y_plus[-1] / self.y_over_h[-1])

    @property
    def bulk_u_plus(self) -> float:
        """U_b⁺ = ∫₀¹ U⁺ d(y/h), trapezoidal over the file's points."""
        return float(np.sum(0.5 * (self.u_plus[1:] + self.u_plus[:-1]) * np.diff(self.y_over_h)))

    @property
    def re_b(self) -> float:
        return 2.0 * self.re_tau * self.bulk_u_plus

    @property
    def skin_friction(self) -> float:
        return 2.0 / self.bulk_u_plus**2


def dns_profiles(directory: Path | None = None) -> list[DNSProfile]:
    """The Hoyas & Jiménez channel profiles (Re_τ ≈ 186, 547, 2004) from problems/data."""
    directory = directory if directory is not None else Path(__file__).resolve().parent / "data"
    profiles = []
    for filename in DNS_FILES:
        table = np.loadtxt(directory / filename, delimiter=",", comments="#", skiprows=3)
        profiles.append(DNSProfile(Path(filename).stem, table[:, 0], table[:, 1], table[:, 2]))
    return profiles


@dataclass(frozen=True)
class WallResolvedProblem:
    """The fine, wall-resolved solve: the task of the SNES oracle behind `wall_resolved`."""

    grid: Grid
    driving: Driving


def wall_resolved_residual(problem: WallResolvedProblem, setting: dict, w: np.ndarray) -> np.ndarray:
    """No slip: the wall flux is the viscous stress (1/V)·u₀/η₀ (ν_t vanishes at the wall)."""
    grid, driving = problem.grid, problem.driving
    wall_flux = w[..., 0] / (driving.scale * grid.centres[0])
    balances = momentum_residual(grid, w, driving.scale, wall_flux)
    return np.concatenate([balances, driving.constraint(grid, w)[..., None]], axis=-1)


def wall_resolved(re_b: float | None = None, re_tau: float | None = None, cells: int = FINE_CELLS) -> Profile:
    """The wall-resolved solution at a bulk (flow-rate driven) or friction (pressure driven) Reynolds number.

    The grid's first cell is FIRST_CELL_Y_PLUS high for Dean's estimate of Re_τ. A reference that
    fails to converge is a bug in the setup, not data: RuntimeError.
    """
    driving = Driving(re_b=re_b, re_tau=re_tau)
    grid = Grid.stretched(cells, min(FIRST_CELL_Y_PLUS / driving.estimated_re_tau, 0.5 / cells))
    problem = WallResolvedProblem(grid, driving)
    oracle = SNESOracle(wall_resolved_residual, lambda p, _s: first_guess(p.grid, p.driving),
                        vectorized=True, **TOLERANCES)
    outcome = oracle(problem, {})
    if outcome.failed:
        raise RuntimeError(f"wall-resolved channel solve failed ({driving}): {outcome.error}")
    return Profile.from_state(grid, driving, outcome.solution, outcome)


def wall_resolved_reference(re_b: float, cells: int = FINE_CELLS) -> Profile:
    """`wall_resolved(re_b)`, computed once per (Re_b, cells) in each process."""
    return _reference(float(re_b), int(cells))


@lru_cache(maxsize=256)
def _reference(re_b: float, cells: int) -> Profile:
    return wall_resolved(re_b=re_b, cells=cells)


@dataclass(eq=False)
class ChannelTask:
    """One wall-modelled problem: the flow rate Re_b on a uniform grid of `cells` cells.

    `reference` is the wall-resolved solution at the same Re_b (computed on first use and cached
    per Re_b), its Re_τ the u_τ the wall-modelled solve should reproduce. `features` are what the
    loss surrogates need: x = the learned model's inputs at the first cell centre, with U₁ read
    off the reference profile; Spalding's a-priori error there (for `APrioriLoss`); and Spalding's
    a-posteriori friction error and its sensitivity to the wall model (for `LinearisedLoss`).
    They are built from the reference solution, so they serve training only: a deployed wall
    model sees Re_y and y₁/h alone.
    """

    re_b: float
    cells: int
    fine_cells: int = FINE_CELLS
    name: str = ""

    def __post_init__(self) -> None:
        self.driving = Driving(re_b=float(self.re_b))
        self.grid = Grid.uniform(int(self.cells))
        if not self.name:
            self.name = f"channel-Reb{self.re_b:.0f}-n{self.cells}"

    @property
    def reference(self) -> Profile:
        return wall_resolved_reference(float(self.re_b), self.fine_cells)

    @property
    def u_tau_ref(self) -> float:
        """Reference friction velocity in units of ν/h, i.e. the wall-resolved Re_τ."""
        return self.reference.re_tau

    @property
    def first_centre(self) -> float:
        return float(self.grid.centres[0])

    def a_priori_first_cell(self) -> tuple[float, float]:
        """(Re_y, y₁⁺) at this grid's first cell centre, read off the wall-resolved profile."""
        reference = self.reference
        u_plus = np.interp(math.log(self.first_centre), np.log(reference.eta), reference.u_plus)
        y_plus = self.first_centre * reference.re_tau
        return float(u_plus * y_plus), float(y_plus)

    @property
    def features(self) -> torch.Tensor:
        """[x₁, x₂, Spalding's a-priori ln y₁⁺ error, Spalding's ln u_τ error, ∂ ln u_τ/∂c]."""
        re_y, y_plus = self.a_priori_first_cell()
        inputs = LearnedWallModel.inputs(np.array(re_y), np.array(self.first_centre))
        gap = math.log(float(Spalding().y_plus(re_y)) / y_plus)
        error, sensitivity = spalding_response(float(self.re_b), int(self.cells), self.fine_cells)
        return torch.tensor([*inputs.tolist(), gap, error, sensitivity], dtype=torch.float64)


def channel_tasks(re_tau_targets: Sequence[float], cells: Sequence[int]) -> list[ChannelTask]:
    """Every (Re_b, grid) pair, Re_b chosen by Dean's correlation to give roughly each Re_τ."""
    return [ChannelTask(re_b=round(dean_re_b(re_tau)), cells=n) for re_tau in re_tau_targets for n in cells]


def wall_stress(model: WallModel, task: ChannelTask, u_first: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """τ_w/V² from the wall model at the first cell centre: (y₁⁺/(y₁V))², odd in U₁."""
    scale, y_first = task.driving.scale, task.first_centre
    re_y = np.maximum(scale * np.abs(u_first) * y_first, 1e-12)
    y_plus = model.y_plus(re_y, y_first, theta)
    return np.sign(u_first) * (y_plus / (y_first * scale)) ** 2


def wall_modelled_residual(model: WallModel, task: ChannelTask, setting: dict, w: np.ndarray) -> np.ndarray:
    theta = setting.get(WALL_MODEL_KEY)
    wall_flux = wall_stress(model, task, w[..., 0], theta)
    balances = momentum_residual(task.grid, w, task.driving.scale, wall_flux)
    return np.concatenate([balances, task.driving.constraint(task.grid, w)[..., None]], axis=-1)


def _checked_first_guess(model: WallModel, task: ChannelTask, setting: dict) -> np.ndarray:
    """The first guess, after checking the setting fits the model (bad input → ValueError)."""
    theta = setting.get(WALL_MODEL_KEY)
    if model.takes_parameters:
        if theta is None or np.shape(theta) != (model.n_params,):
            raise ValueError(f"{model!r} needs setting {WALL_MODEL_KEY!r} with {model.n_params} parameters")
    elif theta is not None:
        raise ValueError(f"{model!r} has no parameters, but the setting gives {WALL_MODEL_KEY!r}")
    return first_guess(task.grid, task.driving)


def wall_modelled_oracle(model: WallModel, **snes_options: Any) -> SNESOracle:
    """The coarse solve as a black box: setting {"wall_model": θ} for a learned model, {} otherwise.

    Newton with a backtracking line search, the Jacobian by vectorised forward differences, the
    tight TOLERANCES (override through `snes_options`); `solve_many` warm-starts the queries of a
    training step from the first (unperturbed) solution.
    """
    config = {**TOLERANCES, **snes_options}
    return SNESOracle(partial(wall_modelled_residual, model), partial(_checked_first_guess, model),
                      vectorized=True, problem_keys=(WALL_MODEL_KEY,), **config)


def wall_modelled_profile(outcome: Outcome, task: ChannelTask) -> Profile:
    if outcome.failed:
        raise ValueError(f"no profile from a failed solve: {outcome.error}")
    return Profile.from_state(task.grid, task.driving, outcome.solution, outcome)


def log_friction_error(outcome: Outcome, task: ChannelTask) -> float:
    """ln u_τ − ln u_τ,ref of a wall-modelled solve (NaN if it failed)."""
    if outcome.failed:
        return math.nan
    g = float(outcome.solution[-1])
    if not g > 0:
        return math.nan
    return math.log(task.driving.scale) + 0.5 * math.log(g) - math.log(task.u_tau_ref)


class FrictionError:
    """Cost of a wall-modelled solve: (ln u_τ − ln u_τ,ref)², the squared relative friction error.

    A failed solve costs NaN in training (the estimator drops it) and `failure_value` (a 100%
    error) in reports.
    """

    overrides: dict[str, Any] = {}

    def __call__(self, outcome: Outcome, task: ChannelTask) -> float:
        return log_friction_error(outcome, task) ** 2

    def failure_value(self, task: ChannelTask) -> float:
        return math.log(2.0) ** 2

    def __repr__(self) -> str:
        return "FrictionError()"


SENSITIVITY_STEP = 1e-4
"""Step in c for ∂ ln u_τ/∂c: c is O(0.01–0.1) in use, and the solve is exact to ~1e-13."""


@lru_cache(maxsize=1024)
def spalding_response(re_b: float, cells: int, fine_cells: int = FINE_CELLS) -> tuple[float, float]:
    """Spalding's friction error ln u_τ − ln u_τ,ref on this grid, and its sensitivity ∂/∂c to a
    uniform factor e^c on Spalding's y₁⁺ (two coarse solves, cached per task).

    The learned model is Spalding × e^{c_θ(x)}, so to first order its error is
    error + sensitivity·c_θ(x): the linearised solver response `LinearisedLoss` builds on.
    """
    task = ChannelTask(re_b=re_b, cells=cells, fine_cells=fine_cells)
    factor = LearnedWallModel(hidden=1)
    shifted = np.zeros(factor.n_params)
    shifted[-1] = SENSITIVITY_STEP
    centre, moved = wall_modelled_oracle(factor).solve_many(
        task, [{WALL_MODEL_KEY: np.zeros(factor.n_params)}, {WALL_MODEL_KEY: shifted}])
    error, moved_error = log_friction_error(centre, task), log_friction_error(moved, task)
    if not (math.isfinite(error) and math.isfinite(moved_error)):
        raise RuntimeError(f"Spalding's wall-modelled solve failed for {task.name}: {centre.error or moved.error}")
    return error, (moved_error - error) / SENSITIVITY_STEP


class LinearisedLoss(nn.Module):
    """The control variate's surrogate: the coarse solve linearised around Spalding's law.

    The learned model multiplies Spalding's y₁⁺ by e^{c_θ(x)}; to first order the friction error
    is then e₀ + s·c_θ(x), with e₀ and s = ∂ ln u_τ/∂c measured by two coarse solves per task
    (`spalding_response`) and c_θ evaluated exactly (torch, differentiable in θ). The surrogate
    predicts (e₀ + a·s·c_θ(x) + b)², with a = 1 and b = 0 at the start; online training of the
    scalars a and b absorbs what the linearisation misses as c grows.
    """

    def __init__(self, model: LearnedWallModel) -> None:
        super().__init__()
        self.model = model
        self.gain = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, error, sensitivity, theta = inputs[..., :2], inputs[..., 3], inputs[..., 4], inputs[..., 5:]
        return (error + self.gain * sensitivity * self.model.correction(theta, x) + self.bias) ** 2


class APrioriLoss(nn.Module):
    """A cheap differentiable model of `FrictionError` for the control variate.

    From a task's `features` (x and Spalding's a-priori error) and θ it forms the learned
    model's a-priori error at the first cell, δ = ln y₁⁺_model − ln y₁⁺_ref = gap + c_θ(x), exactly
    and differentiably — the a-priori fit of the wall model to the wall-resolved profile — and
    predicts the friction error as (a·δ + b(x))². At the start a = 1 and b = 0; trained online,
    a learns how strongly the coarse solve passes a wall-model error on to u_τ and the small
    tanh network b(x) the coarse grid's own discretisation error, which the a-priori view misses.
    """

    def __init__(self, model: LearnedWallModel, hidden: int = 8) -> None:
        super().__init__()
        self.model = model
        self.gain = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.bias = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
        nn.init.zeros_(self.bias[-1].weight)
        nn.init.zeros_(self.bias[-1].bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, gap, theta = inputs[..., :2], inputs[..., 2], inputs[..., 5:]
        error = gap + self.model.correction(theta, x)
        return (self.gain * error + self.bias(x)[..., 0]) ** 2


__all__ = [
    "A_PLUS", "APrioriLoss", "ChannelTask", "DNSProfile", "Driving", "FINE_CELLS", "FrictionError", "Grid", "LinearisedLoss",
    "Profile",
    "WALL_MODEL_KEY", "WallResolvedProblem", "channel_tasks", "dean_re_b", "dean_re_tau", "dns_profiles", "first_guess",
    "log_friction_error", "momentum_residual", "outer_mixing_length", "spalding_response", "wall_modelled_oracle",
    "wall_modelled_profile", "wall_resolved", "wall_resolved_reference", "wall_stress",
]
