"""The scale section's pieces: the 3-D anisotropic family under real PETSc CG + GAMG, and
deploying a sine-mode guess trained on a coarse grid on a finer one (`MetaSolver.on_grid`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metasolve.method.meta_solver import MetaSolver
from metasolve.method.params import Space, Vector
from problems import make_family
from problems.anisotropic3d import Anisotropic3D, anisotropic_matrix_3d
from problems.bratu import Bratu, BratuOracle
from solvers.ksp import KSPOracle


def test_anisotropic_3d_matrix_has_the_sine_modes_as_eigenvectors():
    n, ey, ez = 6, 0.3, 0.01
    A = anisotropic_matrix_3d(n, ey, ez)
    assert A.shape == (n ** 3, n ** 3) and abs(A - A.T).max() == 0.0
    h = 1.0 / (n + 1)
    s = [np.sin(k * np.pi * np.arange(1, n + 1) * h) for k in (1, 2, 3)]
    mode = np.einsum("k,j,i->kji", s[2], s[1], s[0]).ravel()  # sin(πx) sin(2πy) sin(3πz), x fastest
    symbol = [4 * np.sin(k * np.pi * h / 2) ** 2 for k in (1, 2, 3)]
    assert np.allclose(A @ mode, (symbol[0] + ey * symbol[1] + ez * symbol[2]) * mode, atol=1e-13)


def test_anisotropic_3d_tasks_are_deterministic_and_solved_by_gamg():
    family = make_family("anisotropic3d", n=10, epsilon_range=(1e-3, 1.0), seed=3)
    task, again = family.task(5), Anisotropic3D(n=10, epsilon_range=(1e-3, 1.0), seed=3).task(5)
    assert abs(task.A - again.A).max() == 0.0 and torch.equal(task.features, again.features)
    assert task.features[0] == pytest.approx(np.log10(task.parameters["epsilon_y"]))
    oracle = KSPOracle(ksp_type="cg", pc_type="gamg", rtol=1e-8, max_it=200, return_solution=True)
    for setting in ({"pc_gamg_threshold": 0.0}, {"pc_gamg_threshold": 0.05, "mg_levels_pc_type": "sor"}):
        outcome = oracle(task, setting)
        assert outcome.converged
        assert np.linalg.norm(task.b - task.A @ outcome.solution) <= 1e-8 * np.linalg.norm(task.b)
    with pytest.raises(ValueError, match="epsilon_range"):
        Anisotropic3D(epsilon_range=(0.1, 2.0))


def _constant_guess(coefficients: torch.Tensor, shape: tuple[int, int], modes: int, decay: float) -> MetaSolver:
    """A predictor whose guess is the same sine series for every task (its bias)."""
    meta = MetaSolver(1, Space({"u0": Vector(shape, modes=modes, decay=decay)}), depth=0)
    with torch.no_grad():
        meta.net[-1].bias.copy_(coefficients)
    return meta


def test_on_grid_evaluates_the_same_sine_series_on_the_finer_grid():
    modes = 3
    coefficients = torch.arange(1.0, modes * modes + 1, dtype=torch.float64)
    fine = _constant_guess(coefficients, (7, 7), modes, decay=2.0).on_grid((31, 31))
    guess = fine.predict(type("T", (), {"features": torch.zeros(1)})())["u0"].reshape(31, 31)
    x = np.arange(1, 32) / 32
    weights = (np.add.outer(np.arange(1, 4) ** 2, np.arange(1, 4) ** 2) / 2.0) ** -1.0  # decay 2
    series = sum(c * w * np.outer(np.sin((j + 1) * np.pi * x), np.sin((k + 1) * np.pi * x))
                 for (j, k), c, w in zip(np.ndindex(3, 3), coefficients.numpy(), weights.ravel()))
    assert np.allclose(guess, series, atol=1e-12)
    identity = MetaSolver(1, Space({"u0": Vector(9, basis="identity")}), depth=0)
    with pytest.raises(ValueError, match="identity"):
        identity.on_grid((5,))


def test_a_guess_fitted_on_a_coarse_bratu_grid_saves_newton_steps_on_a_fine_one():
    """The coarse solution's 6 x 6 sine coefficients, deployed at n = 65: the continuous
    solutions differ from the two discrete ones by O(h²), so the guess's error on the fine grid
    stays that of the truncated series, and Newton needs fewer steps than from zero."""
    coarse, fine = Bratu(n=17, lam_range=(6.5, 6.5)).task(0), Bratu(n=65, lam_range=(6.5, 6.5)).task(0)
    oracle = BratuOracle(rtol=1e-10)
    coarse_solution = oracle(coarse).solution
    vector = Vector(coarse.grid_shape, modes=6)
    meta = _constant_guess(vector.encode(coarse_solution), coarse.grid_shape, 6, decay=0.0).on_grid(fine.grid_shape)
    guess = meta.predict(type("T", (), {"features": torch.zeros(1)})())["u0"]
    zero = oracle(fine)
    error = np.linalg.norm(guess - zero.solution) / np.linalg.norm(zero.solution)
    assert error < 0.05
    warm = oracle(fine, {"u0": guess})
    assert warm.converged and warm.iterations <= zero.iterations - 2


def test_contrast_3d_matrix_is_the_laplacian_for_uniform_k_and_uses_harmonic_mean_faces():
    from problems.contrast3d import seven_point_matrix
    n = 5
    assert abs(seven_point_matrix(np.ones((n + 2,) * 3)) - anisotropic_matrix_3d(n, 1.0, 1.0)).max() == 0.0
    k = np.ones((n + 2,) * 3)
    k[:, :, 3:] = 100.0  # a jump between x index 2 and 3 of the full grid: interior columns 1 and 2
    A = seven_point_matrix(k)
    assert abs(A - A.T).max() == 0.0
    row, right, up = 1, 2, 1 + n  # interior vertex (z, y, x) = (0, 0, 1): +x neighbour across the jump
    assert A[row, right] == pytest.approx(-2 * 100 / 101) and A[row, up] == pytest.approx(-1.0)
    assert A[row, row] == pytest.approx(5.0 + 2 * 100 / 101)  # 4 unit faces, one to the boundary, one jump face


def test_contrast_3d_tasks_are_deterministic_and_solved_by_gamg_and_icc():
    from problems.contrast3d import Contrast3D
    family = Contrast3D(n=10, contrast_range=(-6.0, 6.0), seed=2)
    task, again = family.task(4), Contrast3D(n=10, contrast_range=(-6.0, 6.0), seed=2).task(4)
    assert abs(task.A - again.A).max() == 0.0 and torch.equal(task.features, again.features)
    c = task.parameters["contrast_exponent"]
    assert task.features[0] == c and -6.0 <= c <= 6.0
    values = np.unique(np.round(task.A.diagonal() / (task.A.diagonal().min()), 6))
    assert values.max() > 10 ** (abs(c) - 0.5)  # the jump is in the operator (diagonals ~ k)
    oracle = KSPOracle(ksp_type="cg", pc_type="gamg", rtol=1e-8, max_it=500, return_solution=True)
    for setting in ({}, {"pc_type": "icc"}, {"mg_levels_ksp_type": "richardson", "mg_levels_pc_type": "sor"}):
        outcome = oracle(task, setting)
        assert outcome.converged
        assert np.linalg.norm(task.b - task.A @ outcome.solution) <= 1e-8 * np.linalg.norm(task.b)
    with pytest.raises(ValueError, match="fraction_range"):
        Contrast3D(fraction_range=(0.2, 1.0))
    with pytest.raises(ValueError, match="contrast_range"):
        Contrast3D(contrast_range=(3.0, -3.0))


def test_scale_linear_headroom_picks_on_one_repeat_and_charges_the_other():
    """Two tasks, three configurations: the per-instance pick is made on repeat 0 and paid at
    repeat 1's prices; a failure is never picked and is charged with the fallback's solve."""
    from benchmarks.scale_linear import CONFIGS, FALLBACK, bandit_streams, charged_costs, headroom, hindsight_headroom
    names = list(CONFIGS)
    cpu = np.full((2, len(names), 2), 10.0)
    cpu[0, 1] = (1.0, 2.0)  # config 1 looks best on task 0 at repeat 0, costs 2 at repeat 1
    cpu[1, 2] = (1.0, 3.0)
    cpu[:, names.index(FALLBACK)] = 4.0
    failed = np.zeros_like(cpu, dtype=bool)
    failed[1, 1] = True
    cpu[1, 1] = (0.5, 0.5)  # fast but failed: never picked
    measured = {"cpu": cpu, "failed": failed}
    result = headroom(measured, 0, 1)
    assert result["picked"] == [1, 2]
    assert result["best single"] == names.index(FALLBACK) and result["best single CPU s"] == 4.0
    assert result["per-instance best CPU s"] == pytest.approx(2.5)
    assert result["headroom"] == pytest.approx(1 - 2.5 / 4.0)
    assert charged_costs(measured, 1)[1, 1] == pytest.approx(0.5 + 4.0)
    assert hindsight_headroom(measured) == pytest.approx(1 - 1.0 / 4.0)  # least of repeats: 1 and 1 vs 4
    length = 1000
    streams = bandit_streams(charged_costs(measured, 1), result["best single"], result["picked"], length, 2)
    assert np.allclose(streams["per-instance best"][:, -1] / length, 2.5, atol=0.15)  # tasks drawn ~uniformly
    # The cheapest arm at repeat-1 prices is config 1 (2 and 0.5 + 4 → 3.25 a solve); a uniform
    # choice costs ~8.2. Over the stream's second half a policy that learned pays < 4 a solve.
    for policy in ("UCB1", "Thompson"):
        late = streams[policy][:, -1] - streams[policy][:, length // 2 - 1]
        assert late.mean() / (length - length // 2) < 4.0
