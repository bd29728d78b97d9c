"""Channel DNS data and the log friction law fitted to it: where a wall model's targets come from.

`DNSProfile` is one mean-velocity profile (Hoyas & Jiménez, problems/data, citation in its
README.md); `FrictionLaw` is U_b⁺ = ln(Re_τ)/κ + C fitted to such profiles, with the uncertainty
of its prediction, so that a target the law extrapolates carries how little it is known.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.optimize

from problems.channel_flow import dean_re_tau

DATA = Path(__file__).resolve().parent / "data"
"""The DNS cases shipped with the project (`channel_dns_Re<nominal>.csv`)."""


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

    @classmethod
    def read(cls, path: Path) -> "DNSProfile":
        table = np.loadtxt(path, delimiter=",", comments="#", skiprows=3)
        if table.ndim != 2 or table.shape[1] < 3:
            raise ValueError(f"{path}: expected columns y_over_h, y_plus, u_plus")
        return cls(Path(path).stem, table[:, 0], table[:, 1], table[:, 2])


def dns_profiles(directory: Path | None = None) -> list[DNSProfile]:
    """Every `channel_dns_Re*.csv` in `directory` (default: the shipped problems/data), by Re_τ."""
    directory = Path(directory) if directory is not None else DATA
    profiles = [DNSProfile.read(path) for path in directory.glob("channel_dns_Re*.csv")]
    return sorted(profiles, key=lambda p: p.nominal)


def dns_case(nominal: int, directory: Path | None = None) -> DNSProfile:
    """The DNS profile with this nominal Re_τ (the shipped data: 180, 550, 2000)."""
    cases = {profile.nominal: profile for profile in dns_profiles(directory)}
    if nominal not in cases:
        raise ValueError(f"no DNS case with nominal Re_tau {nominal!r}: the data has {sorted(cases)}")
    return cases[nominal]


KAPPA_PRIOR = (0.39, 0.015)
"""κ of the friction law when one DNS case cannot fix it (mean, standard deviation): values
fitted to channel flows fall between about 0.37 and 0.41."""
LAW_NOISE = 0.05
"""How far a DNS case's U_b⁺ may sit from one log friction law (standard deviation, U_b⁺ units):
above the shipped cases' residual from a single law, because the law's neglect of low-Re
curvature is structural, not random (benchmarks/results/wall_model.md: the law's own error on
each held-out case)."""


@dataclass(frozen=True)
class FrictionLaw:
    """The log friction law U_b⁺ = ln(Re_τ)/κ + C, fitted to DNS cases (least squares in U_b⁺).

    It follows from the log law integrated over the channel, so its two constants carry the
    measured Reynolds-number dependence between and beyond the cases it was fitted to; the
    wall-resolved RANS is a worse interpolant (its error against DNS changes with Re_τ by more
    than the wall models' errors, tests/test_channel.py). From one case κ is the prior `KAPPA_PRIOR`; from
    two or more it is the fit's. `covariance` is that of (1/κ, C), so `re_tau_sd` says how well
    the law knows Re_τ at a flow rate: small between the cases, growing where it extrapolates.
    """

    kappa: float
    constant: float
    covariance: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))

    @classmethod
    def fit(cls, profiles: Sequence[DNSProfile], kappa_prior: tuple[float, float] = KAPPA_PRIOR,
            noise: float = LAW_NOISE) -> "FrictionLaw":
        if not profiles:
            raise ValueError("the friction law needs at least one DNS case")
        log_re_tau = np.array([math.log(p.re_tau) for p in profiles])
        bulk = np.array([p.bulk_u_plus for p in profiles])
        if len({round(p.re_tau) for p in profiles}) < 2:
            kappa, spread = kappa_prior
            slope, slope_var = 1.0 / kappa, (spread / kappa**2) ** 2
            constant = float(np.mean(bulk - slope * log_re_tau))
            x = float(np.mean(log_re_tau))
            # C = mean(U) − slope·x: its variance is noise²/n + x²·var(slope), correlated with the slope
            covariance = ((slope_var, -x * slope_var), (-x * slope_var, noise**2 / len(bulk) + x**2 * slope_var))
            return cls(kappa, constant, covariance)
        design = np.stack([log_re_tau, np.ones_like(log_re_tau)], axis=1)
        (slope, constant), *_ = np.linalg.lstsq(design, bulk, rcond=None)
        cov = noise**2 * np.linalg.inv(design.T @ design)
        return cls(1.0 / float(slope), float(constant), tuple(map(tuple, cov.tolist())))

    def bulk_u_plus(self, re_tau: float) -> float:
        return math.log(re_tau) / self.kappa + self.constant

    def re_b(self, re_tau: float) -> float:
        """Re_b = 2 Re_τ U_b⁺."""
        return 2.0 * re_tau * self.bulk_u_plus(re_tau)

    def re_tau(self, re_b: float) -> float:
        """The inverse: Re_b(Re_τ) increases with Re_τ, so a bracketed root is unique."""
        guess = dean_re_tau(re_b)
        return float(scipy.optimize.brentq(lambda r: self.re_b(r) - re_b, 0.2 * guess, 5.0 * guess, xtol=1e-12))

    def re_tau_sd(self, re_b: float) -> float:
        """Standard deviation of ln Re_τ at this flow rate from the uncertainty of (1/κ, C).

        At fixed Re_b = 2 Re_τ U_b⁺(Re_τ), an error δU in U_b⁺ moves ln Re_τ by −δU/(U_b⁺ + 1/κ).
        """
        re_tau = self.re_tau(re_b)
        row = np.array([math.log(re_tau), 1.0])
        variance = float(row @ np.array(self.covariance) @ row)
        return math.sqrt(max(variance, 0.0)) / (self.bulk_u_plus(re_tau) + 1.0 / self.kappa)


__all__ = ["DATA", "DNSProfile", "FrictionLaw", "KAPPA_PRIOR", "LAW_NOISE", "dns_case", "dns_profiles"]
