"""The torch twins against real PETSc (through KSPOracle) and against autograd's own checks.

Tolerances. Twin and PETSc perform the same vector operations in the same order; they differ
only in summation order inside dot products, norms and sparse mat-vecs (BLAS vs torch), i.e.
by O(n·eps) ≈ 1e-15 per operation. Jacobi is a contraction, so those differences do not grow,
but its residual b − A x is computed afresh and carries an absolute error ≈ eps·‖A‖‖x‖: relative
to ‖r_k‖ that stays far below 1e-10 while ‖r_k‖/‖r_0‖ ≥ 1e-4, which the tests check (measured:
≤ 6e-15 over 100 iterations). CG's recurrences amplify perturbations once its Krylov space is
nearly exhausted: on Poisson1D(31) the two histories agree to 3e-15 up to iteration 30 and part
at 31 (= n), where the residual has reached round-off. So CG is compared over its first 20
iterations (measured ≤ 3e-15). 1e-10 leaves five orders of magnitude of margin and still
catches any wrong coefficient, sign or off-by-one, which would show at the 1e-2 level or more.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from solvers import KSPOracle, LinearSystem
from solvers.twins import cg_residuals, jacobi_residuals, twin_for
from tests.systems import laplacian_1d

JACOBI_ITERATIONS = 100
CG_ITERATIONS = 20


def random_spd(n: int, seed: int) -> sp.csr_matrix:
    """A random weighted graph Laplacian plus 0.05 I: symmetric, strictly diagonally dominant
    with a positive diagonal, hence SPD and convergent under Jacobi; its spread spectrum keeps
    CG from exhausting its Krylov space early."""
    rng = np.random.default_rng(seed)
    weights = sp.random(n, n, density=0.03, random_state=rng, data_rvs=lambda k: rng.uniform(0.1, 1.0, k))
    weights = sp.triu(weights + weights.T, 1)
    weights = weights + weights.T
    degrees = np.asarray(weights.sum(axis=1)).ravel()
    return (sp.diags(degrees + 0.05) - weights).tocsr()


SYSTEMS = {"poisson1d-31": lambda: laplacian_1d(31), "random-spd-100": lambda: random_spd(100, seed=3)}
SOLVERS = {
    "jacobi": ("richardson", "jacobi", jacobi_residuals, JACOBI_ITERATIONS),
    "cg": ("cg", "none", cg_residuals, CG_ITERATIONS),
}


def petsc_history(A: sp.csr_matrix, b: np.ndarray, x0: np.ndarray | None, ksp_type: str, pc_type: str,
                  iterations: int) -> np.ndarray:
    """Exactly `iterations` iterations of real PETSc (no tolerance can stop it early)."""
    oracle = KSPOracle(ksp_type=ksp_type, pc_type=pc_type, rtol=0, atol=0, max_it=iterations)
    outcome = oracle(LinearSystem(A, b), {} if x0 is None else {"x0": x0})
    assert outcome.hit_max_it and outcome.norm_type == "unpreconditioned"
    assert outcome.residuals.shape == (iterations + 1,)
    return outcome.residuals


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("guess", ["none", "zero", "random"])
def test_twin_history_equals_petsc(system, solver, guess):
    ksp_type, pc_type, twin, iterations = SOLVERS[solver]
    A = SYSTEMS[system]()
    n = A.shape[0]
    rng = np.random.default_rng(7)
    b = rng.standard_normal(n)
    x0 = {"none": None, "zero": np.zeros(n), "random": rng.standard_normal(n)}[guess]
    expected = petsc_history(A, b, x0, ksp_type, pc_type, iterations)
    actual = twin(A, torch.from_numpy(b), None if x0 is None else torch.from_numpy(x0), iterations)
    assert actual.dtype == torch.float64 and actual.shape == (iterations + 1,)
    assert expected[-1] / expected[0] >= 1e-4  # far above round-off: the regime argued for above
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-10, atol=0)


def test_cg_after_exact_convergence_matches_petsc_and_keeps_finite_gradients():
    """On A = 2I CG converges exactly in one step; PETSc stops, the twin pads with zeros."""
    n, iterations = 5, 4
    A = sp.identity(n, format="csr") * 2.0
    b = np.arange(1.0, n + 1)
    x0 = torch.full((n,), 0.25, dtype=torch.float64, requires_grad=True)
    oracle = KSPOracle(ksp_type="cg", pc_type="none", rtol=0, atol=0, max_it=iterations)
    outcome = oracle(LinearSystem(A, b), {"x0": x0.detach().numpy()})
    assert outcome.converged and len(outcome.residuals) == 2 and outcome.residuals[1] == 0.0
    b_torch = torch.from_numpy(b).requires_grad_(True)
    history = cg_residuals(A, b_torch, x0, iterations)
    assert history[0].item() == pytest.approx(outcome.residuals[0], rel=1e-14)
    assert history[1:].tolist() == [0.0] * iterations
    history.sum().backward()
    assert torch.isfinite(x0.grad).all() and torch.isfinite(b_torch.grad).all()
    # Only ‖r_0‖ = ‖b − 2 x0‖ contributes; its gradient w.r.t. x0 is −2 r_0/‖r_0‖.
    r0 = b_torch.detach() - 2 * x0.detach()
    torch.testing.assert_close(x0.grad, -2 * r0 / r0.norm(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("twin, iterations", [(jacobi_residuals, 5), (cg_residuals, 4)])
def test_gradients_pass_gradcheck(twin, iterations):
    A = laplacian_1d(6)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, rhs: twin(A, rhs, x, iterations), (x0, b))


@pytest.mark.parametrize("twin", [jacobi_residuals, cg_residuals])
def test_batch_and_dense_inputs_give_the_same_histories(twin):
    A = random_spd(100, seed=3)
    generator = torch.Generator().manual_seed(1)
    b = torch.randn(100, dtype=torch.float64, generator=generator)
    guesses = torch.randn(3, 100, dtype=torch.float64, generator=generator)
    batched = twin(A, b, guesses, 6)
    assert batched.shape == (3, 7)
    one_by_one = torch.stack([twin(A, b, guess, 6) for guess in guesses])
    dense = twin(A.toarray(), b, guesses, 6)
    # Same operations on the same numbers, only the mat-vec's summation order may differ.
    torch.testing.assert_close(batched, one_by_one, rtol=1e-13, atol=0)
    torch.testing.assert_close(dense, one_by_one, rtol=1e-13, atol=0)


def test_twin_for_knows_exactly_the_two_twins():
    assert twin_for("richardson", "jacobi") is jacobi_residuals
    assert twin_for("cg", "none") is cg_residuals
    for ksp_type, pc_type in [("cg", "jacobi"), ("gmres", "ilu"), ("richardson", "sor")]:
        with pytest.raises(ValueError, match="no differentiable twin"):
            twin_for(ksp_type, pc_type)


def test_bad_inputs_raise_value_errors_naming_the_problem():
    A, b = laplacian_1d(4), torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="x0 has shape"):
        cg_residuals(A, b, torch.zeros(5, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="b has shape"):
        cg_residuals(A, torch.ones(3), None, 3)
    with pytest.raises(ValueError, match="right-hand sides"):
        cg_residuals(A, torch.ones(2, 4), torch.zeros(3, 4), 3)
    with pytest.raises(ValueError, match="iterations"):
        jacobi_residuals(A, b, None, -1)
    with pytest.raises(ValueError, match="zero on its diagonal"):
        jacobi_residuals(sp.csr_matrix(np.array([[0.0, 1.0], [1.0, 2.0]])), torch.ones(2), None, 3)
    with pytest.raises(ValueError, match="square"):
        cg_residuals(np.ones((3, 4)), torch.ones(3), None, 3)
