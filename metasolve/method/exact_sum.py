"""A sum of float64 vectors whose result does not depend on how the terms are split across ranks.

Data-parallel training sums per-rank gradient pieces with an allreduce. In floating point that
sum depends on the grouping — (a + b) + c ≠ a + (b + c) — so 1, 2 and 4 ranks would train
different weights, and a run could not be resumed on another rank count with the same result.
metasolve keeps bitwise-identical weights for any rank count, so it sums in fixed point, where
addition is exact and therefore associative:

1. The terms are fixed before any rank is involved: term t is computed from the same inputs by
   the same operations on whichever rank owns it, so it is the same float64 vector everywhere.
2. For each coordinate i, E_i = max over all terms of the binary exponent of |g_t,i|
   (|g| < 2^E), found with an allreduce of integer maxima (exact, order-free).
3. Each term is scaled by 2^s_i with s_i = 62 − L − E_i, L = ⌈log2 n⌉ for n terms, and rounded to
   an int64: |q_t,i| ≤ 2^(62−L), so the n-term sum stays below 2^62 and cannot overflow.
   Scaling by a power of two is exact; the rounding loses only what lies below 2^−s_i, i.e. a
   relative 2^−(61−L) of the coordinate's largest term — finer than float64's own 2^−53 for
   n ≤ 2^8 terms, and at most a few bits coarser beyond.
4. Integer sums, local and then an allreduce, are exact; the total is converted back with the
   same 2^−s_i. Every step is a pure function of the multiset of terms, so any assignment of
   terms to ranks gives the same bits.

A coordinate that is NaN or infinite in any term is NaN in the result (flagged through the same
exponent maximum), as it would be in a plain sum. Exponents below −900 are raised to −900, so
values under ~1e-271 count as zero instead of overflowing the scale. References: the same idea
underlies reproducible BLAS summation (Demmel & Nguyen, "Parallel reproducible summation", IEEE
TC 2015), which adds a second int64 per coordinate for full float64 range; one suffices here.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Allreduce = Callable[[np.ndarray, str], np.ndarray]
"""`allreduce(array, op)` with op "max" or "sum": the elementwise reduction over all ranks
(the identity in one process)."""

_FLOOR = -900
_NOT_FINITE = 1 << 20


def local_allreduce(array: np.ndarray, op: str) -> np.ndarray:
    """One process: the reduction over all ranks is the rank's own array."""
    return array.copy()


def fixed_point_sum(terms: Sequence[torch.Tensor], n_terms: int, length: int, allreduce: Allreduce = local_allreduce
                    ) -> torch.Tensor:
    """Σ of all ranks' terms (this rank's `terms`: flat float64 vectors of `length`), the same bits
    for any split of the `n_terms` terms over ranks. Collective: every rank calls it."""
    if n_terms < 1:
        raise ValueError(f"fixed_point_sum needs at least one term in all, got {n_terms}")
    stacked = np.stack([t.detach().to(torch.float64).reshape(-1).numpy() for t in terms]) if terms \
        else np.zeros((0, length))
    if stacked.shape[1] != length:
        raise ValueError(f"fixed_point_sum: terms have {stacked.shape[1]} coordinates, expected {length}")
    finite = np.isfinite(stacked)
    exponents = np.frexp(np.where(finite, stacked, 0.0))[1].astype(np.int64)
    local = np.maximum(np.where(finite, exponents, _NOT_FINITE).max(0, initial=_FLOOR), _FLOOR)
    exponent = allreduce(local, "max")
    not_finite = exponent >= _NOT_FINITE
    shift = 62 - math.ceil(math.log2(n_terms)) - np.where(not_finite, 0, exponent)
    usable = finite & ~not_finite[None, :]
    scaled = np.rint(np.ldexp(np.where(usable, stacked, 0.0), shift[None, :])).astype(np.int64)
    total = allreduce(scaled.sum(0, dtype=np.int64), "sum")
    result = np.ldexp(total.astype(np.float64), -shift)
    return torch.from_numpy(np.where(not_finite, np.nan, result))


__all__ = ["Allreduce", "fixed_point_sum", "local_allreduce"]
