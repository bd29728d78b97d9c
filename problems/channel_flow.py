"""Fully developed turbulent channel flow, wall-resolved and wall-modelled, as SNES problems: the physics.

Half channel η = y/h ∈ [0, 1], velocity U* = U h/ν. Momentum with a mixing-length closure:

    d/dη[(1 + ν_t*) dU*/dη] + G = 0,   ν_t* = (l/h)² [1 − exp(−η Re_τ/A⁺)]² |dU*/dη|,

Nikuradse's outer length l/h = 0.14 − 0.08(1−η)² − 0.06(1−η)⁴ with van Driest's damping
(A⁺ = 26), symmetry dU*/dη = 0 at η = 1. G = u_τ*² = Re_τ² is the pressure gradient.
Flow-rate driven (what a wall model is for: the friction at a given flow rate): ∫₀¹U* dη = Re_b/2
is given and G is an extra unknown; pressure driven: G = Re_τ² is given.

Finite volumes, cell-centred velocities. The state is scaled so every entry is O(1) or smaller:
w = [U*/V at the cell centres, G/V²] with V = Re_b/2 (the bulk velocity in units of ν/h), hence
u_τ* = Re_τ = V√g. Wall-resolved: a stretched grid whose first cell sits below y⁺ = 1 and
U*(0) = 0 (here). Wall-modelled: a uniform coarse grid whose wall flux is the wall model's shear
stress (problems/channel_task.py). DNS data and the friction law: problems/channel_dns.py; the
family `metasolve train` builds: problems/channel.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.optimize

from problems.wall_laws import Reichardt
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


__all__ = [
    "A_PLUS", "Driving", "FINE_CELLS", "FIRST_CELL_Y_PLUS", "Grid", "Profile", "TOLERANCES", "WallResolvedProblem",
    "dean_re_b", "dean_re_tau", "first_guess", "momentum_residual", "outer_mixing_length", "wall_resolved",
    "wall_resolved_reference",
]
