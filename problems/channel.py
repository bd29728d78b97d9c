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

Also here: the wall-modelled tasks (`ChannelTask`: Re_b, a coarse grid and the Re_τ the solve
should reproduce), where their targets come from (DNS, the log friction law fitted to DNS, or the
wall-resolved solve) and `ChannelFamily`, which builds them for `metasolve train`. The cost and
the control variate's surrogate live in metasolve/calibration.py; the validation tables in
problems/wall_model_validation.py.
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

from problems.family import EVAL_OFFSET, Family, check_count
from problems.wall_laws import LearnedWallModel, Reichardt, WallModel
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

    @classmethod
    def named(cls, name: str) -> "Grid":
        """"u16": 16 uniform cells; "s16": 16 stretched cells whose first is half as high as the
        uniform grid's (1/32), the kind of wall-refined grid a wall-modelled LES uses."""
        kind, cells = name[:1], name[1:]
        if kind not in ("u", "s") or not cells.isdigit() or int(cells) < 2:
            raise ValueError(f"grid name {name!r}: use 'u<cells>' (uniform) or 's<cells>' (stretched), cells >= 2")
        n = int(cells)
        return cls.uniform(n) if kind == "u" else cls.stretched(n, 0.5 / n)

    @property
    def growth(self) -> float:
        """Δ₂/Δ₁, how the grid grows away from the wall (1 on a uniform grid)."""
        return float(self.widths[1] / self.widths[0])


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


def first_guess(grid: Grid, driving: Driving) -> np.ndarray:
    """Reichardt's profile at Dean's Re_τ, rescaled to the flow rate: Newton's starting point."""
    re_tau = driving.estimated_re_tau
    u = re_tau * Reichardt().u_plus_of_y_plus(grid.centres * re_tau) / driving.scale
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
    def nominal(self) -> int:
        """The case's nominal Re_τ (180, 550, 2000), as the files and tables name it."""
        return int(self.name.rsplit("Re", 1)[1])

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


def dns_case(nominal: int) -> DNSProfile:
    """The DNS profile with this nominal Re_τ (180, 550 or 2000)."""
    cases = {profile.nominal: profile for profile in dns_profiles()}
    if nominal not in cases:
        raise ValueError(f"no DNS case with nominal Re_tau {nominal!r}: the data has {sorted(cases)}")
    return cases[nominal]


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




@dataclass(frozen=True)
class FrictionLaw:
    """The log friction law U_b⁺ = ln(Re_τ)/κ + C, fitted to DNS cases (least squares in U_b⁺).

    It follows from the log law integrated over the channel, so its two constants carry the
    measured Reynolds-number dependence between and beyond the cases it was fitted to: from any
    two of the three DNS cases it predicts the third's Re_b at its Re_τ within 0.25–0.53%
    (measured). The wall-resolved RANS does worse as an interpolant: its error against DNS jumps
    from −0.6% at Re_τ 186 to −2.2% at 547, which no smooth correction fitted to two cases
    recovers.
    """

    kappa: float
    constant: float

    @classmethod
    def fit(cls, profiles: Sequence[DNSProfile]) -> "FrictionLaw":
        if len({round(p.re_tau) for p in profiles}) < 2:
            raise ValueError("the friction law needs DNS cases at two or more Reynolds numbers")
        log_re_tau = np.array([math.log(p.re_tau) for p in profiles])
        slope, constant = np.polyfit(log_re_tau, np.array([p.bulk_u_plus for p in profiles]), 1)
        return cls(1.0 / float(slope), float(constant))

    def re_b(self, re_tau: float) -> float:
        """Re_b = 2 Re_τ U_b⁺."""
        return 2.0 * re_tau * (math.log(re_tau) / self.kappa + self.constant)

    def re_tau(self, re_b: float) -> float:
        """The inverse: Re_b(Re_τ) increases with Re_τ, so a bracketed root is unique."""
        guess = dean_re_tau(re_b)
        return float(scipy.optimize.brentq(lambda r: self.re_b(r) - re_b, 0.2 * guess, 5.0 * guess, xtol=1e-12))


@dataclass(eq=False)
class ChannelTask:
    """One wall-modelled problem: the flow rate Re_b on a named coarse grid ("u8", "s16"), and
    the Re_τ the solve should reproduce (`target_re_tau`; None means the wall-resolved RANS at
    the same Re_b, computed on first use and cached). `source` says where the target came from.
    """

    re_b: float
    grid_name: str = "u8"
    target_re_tau: float | None = None
    source: str = "RANS"
    name: str = ""

    def __post_init__(self) -> None:
        self.driving = Driving(re_b=float(self.re_b))
        self.grid = Grid.named(self.grid_name)
        if self.target_re_tau is not None and not (math.isfinite(self.target_re_tau) and self.target_re_tau > 0):
            raise ValueError(f"target Re_tau must be positive and finite, got {self.target_re_tau}")
        if not self.name:
            self.name = f"channel-Reb{self.re_b:.0f}-{self.grid_name}-{self.source.replace(' ', '')}"

    @property
    def reference(self) -> Profile:
        """The wall-resolved solution at this Re_b (cached)."""
        return wall_resolved_reference(float(self.re_b))

    @property
    def target(self) -> float:
        return self.target_re_tau if self.target_re_tau is not None else self.reference.re_tau

    @property
    def first_centre(self) -> float:
        return float(self.grid.centres[0])

    def log_error(self, outcome: Outcome) -> float:
        """ln Re_τ − ln Re_τ,target of a wall-modelled solve (NaN if it failed)."""
        if outcome.failed:
            return math.nan
        g = float(outcome.solution[-1])
        if not g > 0:
            return math.nan
        return math.log(self.driving.scale) + 0.5 * math.log(g) - math.log(self.target)

    @property
    def features(self) -> torch.Tensor:
        """[x (the learned model's three inputs at Spalding's solution), e₀, s] for
        `LinearisedResponse`: Spalding's log error against the target and its sensitivity to a
        factor e^c on y₁⁺ (`linear_response`). They describe the task for training only; a
        deployed wall model sees Re_y, y₁/h and the grid's growth at run time, nothing else."""
        re_y, error, slope = linear_response(float(self.re_b), self.grid_name, float(self.target))
        x = LearnedWallModel.inputs(np.array(re_y), np.array(self.first_centre), np.array(self.grid.growth))
        return torch.tensor([*np.asarray(x).tolist(), error, slope], dtype=torch.float64)


def wall_stress(model: WallModel, task: ChannelTask, u_first: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    """τ_w/V² from the wall model at the first cell centre: (y₁⁺/(y₁V))², odd in U₁."""
    scale, y_first = task.driving.scale, task.first_centre
    re_y = np.maximum(scale * np.abs(u_first) * y_first, 1e-12)
    y_plus = model.y_plus(re_y, y_first, theta, task.grid.growth)
    return np.sign(u_first) * (y_plus / (y_first * scale)) ** 2


def wall_modelled_residual(model: WallModel, task: ChannelTask, setting: dict, w: np.ndarray) -> np.ndarray:
    theta = setting.get(WALL_MODEL_KEY)
    wall_flux = wall_stress(model, task, w[..., 0], theta)
    balances = momentum_residual(task.grid, w, task.driving.scale, wall_flux)
    return np.concatenate([balances, task.driving.constraint(task.grid, w)[..., None]], axis=-1)


def _checked_first_guess(model: WallModel, task: ChannelTask, setting: dict) -> np.ndarray:
    """The first guess, after checking the setting fits the model (bad input → ValueError).

    A learned model without θ is its base law (θ₀ is exactly that too): the "configured
    defaults" a trained model is compared with.
    """
    theta = setting.get(WALL_MODEL_KEY)
    if model.takes_parameters:
        if theta is not None and np.shape(theta) != (model.n_params,):
            raise ValueError(f"{model!r} needs setting {WALL_MODEL_KEY!r} with {model.n_params} parameters, "
                             f"got shape {np.shape(theta)}")
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


SENSITIVITY_STEP = 1e-4
"""Step in c for ∂ ln u_τ/∂c: c is O(0.01–0.1) in use, and the solve is exact to ~1e-13."""


@lru_cache(maxsize=4096)
def linear_response(re_b: float, grid_name: str, target_re_tau: float) -> tuple[float, float, float]:
    """(Re_y at the first cell, Spalding's log error e₀ against the target, s = ∂e/∂c) on one
    task: two coarse solves, Spalding and Spalding × e^c (c = SENSITIVITY_STEP), cached.

    The learned model is Spalding × e^{c_θ(x)}, so to first order its error is e₀ + s·c_θ(x).
    """
    task = ChannelTask(re_b=re_b, grid_name=grid_name, target_re_tau=target_re_tau)
    factor = LearnedWallModel(hidden=1)
    shifted = np.zeros(factor.n_params)
    shifted[-1] = SENSITIVITY_STEP
    centre, moved = wall_modelled_oracle(factor).solve_many(task, [{}, {WALL_MODEL_KEY: shifted}])
    error, moved_error = task.log_error(centre), task.log_error(moved)
    if not (math.isfinite(error) and math.isfinite(moved_error)):
        raise RuntimeError(f"Spalding's wall-modelled solve failed for {task.name}: {centre.error or moved.error}")
    re_y = task.driving.scale * float(centre.solution[0]) * task.first_centre
    return re_y, error, (moved_error - error) / SENSITIVITY_STEP


TARGETS = ("dns", "friction_law", "rans")


class ChannelFamily(Family):
    """Wall-modelled channel tasks for `metasolve train`: (Re_b, coarse grid) pairs and a target Re_τ.

    Training targets (`target`):
    - "dns": the `train_dns` cases themselves (Hoyas & Jiménez, nominal Re_τ 180/550/2000) on
      every grid: the data, and nothing between its Reynolds numbers;
    - "friction_law": those cases plus `synthetic` Reynolds numbers log-spaced over `re_tau`,
      whose targets come from the log friction law fitted to the training cases (`FrictionLaw`):
      DNS anchors the level, the law carries it between and beyond the cases;
    - "rans": the wall-resolved mixing-length solve at Dean's Re_b for the same Reynolds numbers
      (dense, but the closure's own ~2% error comes with it).
    Evaluation tasks are the `eval_dns` cases on `eval_grids` (default: the training grids),
    always against DNS. The wall model being calibrated is `wall_model` (`hidden` random features).
    """

    key = "channel"

    def __init__(self, seed: int = 0, target: str = "friction_law", train_dns: Sequence[int] = (550, 2000),
                 eval_dns: Sequence[int] = (180,), grids: Sequence[str] = ("u8", "u12", "u16", "u24", "s16"),
                 eval_grids: Sequence[str] | None = None, re_tau: Sequence[float] = (150.0, 2500.0),
                 synthetic: int = 8, hidden: int = 16) -> None:
        if target not in TARGETS:
            raise ValueError(f"channel target must be one of {TARGETS}, got {target!r}")
        eval_grids = list(grids) if eval_grids is None else list(eval_grids)
        super().__init__(seed, target=target, train_dns=list(train_dns), eval_dns=list(eval_dns), grids=list(grids),
                         eval_grids=eval_grids, re_tau=list(re_tau), synthetic=synthetic, hidden=hidden)
        for name in [*grids, *eval_grids]:
            Grid.named(name)  # a bad grid name fails here, naming itself
        if not grids or not eval_grids:
            raise ValueError("the channel family needs at least one training and one evaluation grid")
        if len(re_tau) != 2 or not 0 < re_tau[0] < re_tau[1]:
            raise ValueError(f"re_tau must be a range [lo, hi] with 0 < lo < hi, got {list(re_tau)!r}")
        synthetic = check_count("synthetic", synthetic, minimum=0 if target == "dns" else 2)
        self.target = target
        self.wall_model = LearnedWallModel(hidden=check_count("hidden", hidden), seed=self.seed)
        training = [dns_case(n) for n in train_dns]
        self.train_cases, self.eval_cases = training, [dns_case(n) for n in eval_dns]
        if target != "rans" and not training:
            raise ValueError(f"target {target!r} needs at least one DNS case in train_dns")
        conditions: list[tuple[float, float | None, str]] = []
        if target in ("dns", "friction_law"):
            conditions += [(p.re_b, p.re_tau, f"DNS Re{p.nominal}") for p in training]
        if target == "friction_law":
            law = self.law = FrictionLaw.fit(training)
            conditions += [(law.re_b(r), r, "friction law") for r in np.geomspace(re_tau[0], re_tau[1], synthetic)]
        if target == "rans":
            conditions += [(float(round(dean_re_b(r))), None, "RANS") for r in np.geomspace(re_tau[0], re_tau[1], synthetic)]
        self._train = [ChannelTask(re_b, g, target_re_tau, source) for re_b, target_re_tau, source in conditions
                       for g in grids]
        self._eval = [ChannelTask(p.re_b, g, p.re_tau, f"DNS Re{p.nominal}") for p in self.eval_cases
                      for g in eval_grids]

    @property
    def feature_dim(self) -> int:
        return LearnedWallModel.n_inputs + 2

    def describe(self) -> str:
        p = self.parameters
        return (f"turbulent channel, mixing-length RANS on coarse grids {', '.join(p['grids'])} with a learned wall "
                f"model (Spalding x e^c(Re_y, y1/h, growth), {self.wall_model.n_params} parameters); target "
                f"{self.target} from DNS cases {p['train_dns']}; evaluated against DNS {p['eval_dns']}; "
                f"{len(self._train)} training tasks. Features (training only, {self.feature_dim} numbers): the model's "
                f"three inputs at Spalding's solution, Spalding's log Re_tau error and its sensitivity to the model")

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

    # What `metasolve train` asks a family that brings its own solver, parameters and surrogate.
    def oracle(self) -> SNESOracle:
        return wall_modelled_oracle(self.wall_model)

    @property
    def parameter_count(self) -> int:
        return self.wall_model.n_params

    def initial_parameters(self) -> np.ndarray:
        return self.wall_model.initial_parameters()

    def linearised_correction(self) -> tuple[Any, int]:
        """The wall model's correction and its input count, for the control variate's surrogate
        (`metasolve.calibration.LinearisedResponse`, built by the method, not by the physics)."""
        return self.wall_model.correction, LearnedWallModel.n_inputs


__all__ = [
    "A_PLUS", "ChannelFamily", "ChannelTask", "DNSProfile", "Driving", "FINE_CELLS", "FrictionLaw", "Grid", "Profile",
    "TARGETS", "WALL_MODEL_KEY", "WallResolvedProblem", "dean_re_b", "dean_re_tau", "dns_case", "dns_profiles",
    "first_guess", "linear_response", "momentum_residual", "outer_mixing_length", "wall_modelled_oracle",
    "wall_modelled_profile", "wall_resolved", "wall_resolved_reference", "wall_stress",
]
