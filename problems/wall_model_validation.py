"""Validation of wall models against DNS: the numbers the example and the benchmark report.

For a DNS case (its Re_b given, its Re_τ the answer) and a coarse grid, each wall model's
coarse solve gives Re_τ and a velocity profile. Two errors: Re_τ against DNS (the friction a
user wants), and the RMS of U⁺ at the coarse cell centres in the log region against the DNS
profile interpolated there (the shape). The log region is taken as y⁺ ≥ 30 and y/h ≤ 0.3, the
usual bounds; at Re_τ 186 it holds few cells, at 2004 many.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from problems.channel_dns import DNSProfile
from problems.channel_flow import Profile, wall_resolved_reference
from problems.channel_task import WALL_MODEL_KEY, ChannelTask, wall_modelled_oracle, wall_modelled_profile
from problems.wall_laws import LearnedWallModel, LogLaw, Reichardt, Spalding

LOG_REGION = (30.0, 0.3)
"""(lowest y⁺, highest y/h) of the log region."""


@dataclass
class Comparison:
    """One wall model on one DNS case and grid (NaN when the solve failed or no cell is in the log region)."""

    model: str
    case: int
    grid: str
    re_tau: float
    re_tau_error: float
    u_plus_rms: float


def laws(model: LearnedWallModel | None = None, theta: np.ndarray | None = None) -> dict[str, tuple[Any, dict]]:
    """The analytic wall laws a user would try, and the learned model at θ if given: name → (oracle, setting)."""
    chosen = {"log law": (wall_modelled_oracle(LogLaw()), {}), "Spalding": (wall_modelled_oracle(Spalding()), {}),
              "Reichardt": (wall_modelled_oracle(Reichardt()), {})}
    if model is not None and theta is not None:
        chosen["learned"] = (wall_modelled_oracle(model), {WALL_MODEL_KEY: np.asarray(theta, dtype=np.float64)})
    return chosen


def log_region_rms(profile: Profile, dns: DNSProfile) -> float:
    """RMS of U⁺ − U⁺_DNS at the profile's points inside the log region (NaN if none is)."""
    lowest, highest = LOG_REGION
    inside = (profile.y_plus >= lowest) & (profile.eta <= highest)
    if not inside.any():
        return math.nan
    reference = np.interp(np.log(profile.eta[inside]), np.log(dns.y_over_h[1:]), dns.u_plus[1:])
    return float(np.sqrt(np.mean((profile.u_plus[inside] - reference) ** 2)))


def compare(dns: DNSProfile, grids: Sequence[str], models: Mapping[str, tuple[Any, dict]]) -> list[Comparison]:
    """Every model on every grid at the DNS case's Re_b, plus the wall-resolved RANS (grid "resolved")."""
    rows = []
    rans = wall_resolved_reference(float(dns.re_b))
    rows.append(Comparison("RANS wall-resolved", dns.nominal, "resolved", rans.re_tau, rans.re_tau / dns.re_tau - 1,
                           log_region_rms(rans, dns)))
    for name, (oracle, setting) in models.items():
        for grid in grids:
            task = ChannelTask(dns.re_b, grid, dns.re_tau, f"DNS Re{dns.nominal}")
            outcome = oracle(task, setting)
            if outcome.failed:
                rows.append(Comparison(name, dns.nominal, grid, math.nan, math.nan, math.nan))
                continue
            profile = wall_modelled_profile(outcome, task)
            rows.append(Comparison(name, dns.nominal, grid, profile.re_tau, profile.re_tau / dns.re_tau - 1,
                                   log_region_rms(profile, dns)))
    return rows


def error_summary(rows: Sequence[Comparison], grids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per model: RMS and max |Re_τ error| and mean log-region U⁺ RMS over the rows on `grids`."""
    summary: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.model for r in rows):
        chosen = [r for r in rows if r.model == name and (r.grid in grids or r.grid == "resolved")]
        errors = np.array([r.re_tau_error if math.isfinite(r.re_tau_error) else 1.0 for r in chosen])
        shape = np.array([r.u_plus_rms for r in chosen if math.isfinite(r.u_plus_rms)])
        summary[name] = {"rms": float(np.sqrt(np.mean(errors**2))), "max": float(np.max(np.abs(errors))),
                         "u_plus_rms": float(np.mean(shape)) if shape.size else math.nan}
    return summary


def table_rows(rows: Sequence[Comparison]) -> list[dict[str, str]]:
    """Markdown-ready rows: one per (model, case), the Re_τ error per grid and the mean U⁺ RMS."""
    grids = list(dict.fromkeys(r.grid for r in rows if r.grid != "resolved"))
    out = []
    for (name, case) in dict.fromkeys((r.model, r.case) for r in rows):
        mine = {r.grid: r for r in rows if r.model == name and r.case == case}
        entry = {"case": f"Re_tau {case}", "wall model": name}
        for grid in grids:
            r = mine.get(grid) or mine.get("resolved")
            entry[f"Re_tau err {grid}"] = f"{r.re_tau_error:+.2%}" if r is not None else "-"
        shape = [r.u_plus_rms for r in mine.values() if math.isfinite(r.u_plus_rms)]
        entry["U+ RMS (log region)"] = f"{np.mean(shape):.2f}" if shape else "-"
        out.append(entry)
    return out


__all__ = ["Comparison", "LOG_REGION", "compare", "error_summary", "laws", "log_region_rms", "table_rows"]
