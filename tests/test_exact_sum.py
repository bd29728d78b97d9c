"""Fixed-point sums: exact to the derived bound, and the same bits for any split of the terms."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from metasolve.method.exact_sum import fixed_point_sum
from metasolve.method.surrogate import Surrogate


def _terms(n: int, length: int, seed: int) -> list[torch.Tensor]:
    """Terms spanning 16 decades, with signs: plain float64 sums of them depend on the order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(length, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (length,), generator=g)
            for _ in range(n)]


def _split_sum(terms: list[torch.Tensor], owners: list[int], ranks: int) -> list[torch.Tensor]:
    """Each of `ranks` threads sums the terms it owns; the allreduce is a barrier plus a shared reduction."""
    barrier, slots, results = threading.Barrier(ranks), [None] * ranks, [None] * ranks

    def allreduce_for(rank: int):
        def allreduce(array: np.ndarray, op: str) -> np.ndarray:
            slots[rank] = array
            barrier.wait()
            reduced = np.maximum.reduce(slots) if op == "max" else np.sum(slots, axis=0, dtype=array.dtype)
            barrier.wait()
            return reduced
        return allreduce

    def work(rank: int) -> None:
        mine = [t for t, owner in zip(terms, owners) if owner == rank]
        results[rank] = fixed_point_sum(mine, len(terms), terms[0].numel(), allreduce_for(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_the_sum_is_within_its_derived_bound_of_the_exact_sum():
    """Rounding each term to 2^-s_i with s_i = 62 - L - E_i loses at most 2^(E_i - 62 + L) per term, so
    |error_i| <= n 2^(E_i - 63 + L) + (one float64 rounding of the total)."""
    n, length = 7, 2000
    terms = _terms(n, length, seed=0)
    total = fixed_point_sum(terms, n, length).numpy()
    exact = np.array([math.fsum(float(t[i]) for t in terms) for i in range(length)])
    largest = np.max(np.abs(np.stack([t.numpy() for t in terms])), axis=0)
    exponent = np.frexp(largest)[1]
    bound = n * np.ldexp(1.0, exponent - 63 + math.ceil(math.log2(n))) + np.spacing(np.abs(exact))
    assert np.all(np.abs(total - exact) <= bound)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_any_split_of_the_terms_over_ranks_gives_the_same_bits(ranks):
    terms = _terms(9, 500, seed=1)
    whole = fixed_point_sum(terms, len(terms), 500)
    owners = list(np.random.default_rng(ranks).integers(0, ranks, len(terms)))
    for result in _split_sum(terms, owners, ranks):
        assert torch.equal(result, whole)
    assert torch.equal(fixed_point_sum(terms[::-1], len(terms), 500), whole)


def test_a_non_finite_coordinate_is_nan_and_the_others_are_unaffected():
    terms = _terms(3, 4, seed=2)
    clean = fixed_point_sum(terms, 3, 4)
    terms[1][2] = math.inf
    result = fixed_point_sum(terms, 3, 4)
    assert math.isnan(result[2]) and torch.equal(result[[0, 1, 3]], clean[[0, 1, 3]])


def test_a_split_surrogate_step_matches_the_whole_minibatch_step_to_rounding():
    """Chunks of 5 rows, gradients summed in fixed point, against one backward pass over 23 rows:
    the same gradient up to float64 rounding, so after one Adam step the weights agree to ~1e-15
    relative (Adam's first step is lr·g/(|g| + eps) per coordinate, insensitive to rounding in g)."""
    g = torch.Generator().manual_seed(3)
    rows, features, dim = 23, 3, 2
    batch = (torch.randn(rows, features, generator=g, dtype=torch.float64),
             torch.randn(rows, dim, generator=g, dtype=torch.float64),
             torch.randn(rows, generator=g, dtype=torch.float64),
             torch.randn(rows, 1, dim, generator=g, dtype=torch.float64),
             torch.randn(rows, 1, generator=g, dtype=torch.float64))
    weights = {}
    for chunk_rows in (0, 5):
        torch.manual_seed(4)
        surrogate = Surrogate(Surrogate.mlp(features, dim, hidden=8), lr=1e-2, steps=1, chunk_rows=chunk_rows)
        surrogate.update(*batch)
        weights[chunk_rows] = torch.cat([p.detach().reshape(-1) for p in surrogate.net.parameters()])
    scale = weights[0].abs().max()
    assert torch.allclose(weights[5], weights[0], rtol=0, atol=1e-13 * float(scale))


def test_the_surrogate_gradient_in_chunks_is_the_whole_batch_gradient_to_rounding():
    """Rows are independent: computing ∇_θ f̂ over chunks of 4 of 10 rows changes nothing but the
    matrix shapes BLAS sees (float64 rounding, ~1e-16 relative)."""
    g = torch.Generator().manual_seed(5)
    features, theta = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(6)
    net = Surrogate.mlp(3, 2, hidden=8)
    whole = Surrogate(net).gradient(features, theta)
    chunked = Surrogate(net, chunk_rows=4).gradient(features, theta)
    assert chunked.shape == whole.shape == (10, 2)
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-14)
