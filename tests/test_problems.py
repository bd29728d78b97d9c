"""Problem families: determinism, features, reference solutions, and the solver behaviour they promise
(real PETSc through KSPOracle, real MPI through mpiexec)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from problems import EVAL_OFFSET, FAMILIES, ChannelFamily, ConvDiff, Diffusion, Poisson1D, Poisson2D, make_family
from problems.convdiff import stream_velocity
from problems.family import coarse_average, sine_coefficients, sine_modes
from solvers import KSPOracle
from tests.systems import laplacian_2d

REPO = Path(__file__).resolve().parents[1]

# Small instances of every family (grid sizes vary where the family allows it), for fast tests.
SMALL = {
    "poisson1d": {"n": 31},
    "poisson2d": {"n": 10},
    "diffusion": {"n_range": (6, 14)},
    "convdiff": {"n_range": (6, 14), "peclet_range": (10.0, 100.0)},
}


def same_task(t1, t2) -> bool:
    return (t1.A.shape == t2.A.shape and np.array_equal(t1.A.indptr, t2.A.indptr)
            and np.array_equal(t1.A.indices, t2.A.indices) and np.array_equal(t1.A.data, t2.A.data)
            and np.array_equal(t1.b, t2.b) and np.array_equal(t1.features.numpy(), t2.features.numpy())
            and np.array_equal(t1.x_ref, t2.x_ref) and t1.name == t2.name)


def test_registry_holds_every_family():
    from problems import Bratu, Mixed, ProgramFamily, RecordedFamily
    from problems.anisotropic3d import Anisotropic3D
    from problems.nonlinear_diffusion import NonlinearDiffusion

    assert FAMILIES == {"poisson1d": Poisson1D, "poisson2d": Poisson2D, "diffusion": Diffusion, "convdiff": ConvDiff,
                        "channel": ChannelFamily, "mixed": Mixed, "bratu": Bratu, "program": ProgramFamily,
                        "nonlinear_diffusion": NonlinearDiffusion, "recorded": RecordedFamily, "anisotropic3d": Anisotropic3D}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_parameters_seed_and_index_give_the_identical_task(name):
    forward = make_family(name, seed=3, **SMALL[name]).tasks([0, 1, 2])
    backward = make_family(name, seed=3, **SMALL[name]).tasks([2, 1, 0])[::-1]
    for t1, t2 in zip(forward, backward):
        assert same_task(t1, t2)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_different_index_or_seed_gives_a_different_task(name):
    family = make_family(name, seed=3, **SMALL[name])
    t0, t1 = family.task(0), family.task(1)
    other_seed = make_family(name, seed=4, **SMALL[name]).task(0)
    for other in (t1, other_seed):
        assert not np.array_equal(t0.features.numpy(), other.features.numpy())
        assert t0.b.shape != other.b.shape or not np.array_equal(t0.b, other.b)
    assert t0.name != t1.name and t0.name != other_seed.name


@pytest.mark.parametrize("name", sorted(SMALL))
def test_features_are_float64_vectors_of_feature_dim(name):
    family = make_family(name, **SMALL[name])
    tasks = family.tasks(range(8))
    for task in tasks:
        assert task.features.dtype.is_floating_point and str(task.features.dtype) == "torch.float64"
        assert task.features.shape == (family.feature_dim,)
        assert np.all(np.isfinite(task.features.numpy()))
        assert task.A.dtype == np.float64 and sp.isspmatrix_csr(task.A)
        assert int(np.prod(task.grid_shape)) == task.size


@pytest.mark.parametrize("name, params", [("diffusion", {"n_range": (4, 24)}), ("convdiff", {"n_range": (4, 24)})])
def test_feature_dim_does_not_depend_on_the_grid_size(name, params):
    family = make_family(name, **params)
    tasks = family.tasks(range(12))
    assert len({t.size for t in tasks}) >= 5, "the test needs tasks on several grid sizes"
    assert {t.features.shape[0] for t in tasks} == {family.feature_dim}


def test_poisson2d_feature_dim_is_the_same_for_every_grid_and_stays_small():
    dims = {n: make_family("poisson2d", n=n).task(0).features.shape[0] for n in (4, 12, 32)}
    assert set(dims.values()) == {Poisson2D(n=4).feature_dim} and Poisson2D().feature_dim <= 300


@pytest.mark.parametrize("name", sorted(SMALL))
def test_x_ref_solves_the_system(name):
    # Direct solves of these well-conditioned systems (kappa <~ 1e4) leave residuals near 1e-15.
    for task in make_family(name, **SMALL[name]).tasks(range(4)):
        residual = np.linalg.norm(task.b - task.A @ task.x_ref) / np.linalg.norm(task.b)
        assert residual < 1e-12


@pytest.mark.parametrize("n", [3, 10, 32])
def test_poisson2d_dmda_matrix_is_the_scipy_five_point_laplacian(n):
    A = Poisson2D(n=n).task(0).A
    difference = A - laplacian_2d(n)
    assert difference.count_nonzero() == 0 and A.nnz == laplacian_2d(n).count_nonzero()


def test_poisson1d_is_the_ni_gbms_distribution():
    family = Poisson1D(n=31)
    tridiagonal = sp.diags([-np.ones(30), 2 * np.ones(31), -np.ones(30)], [-1, 0, 1])
    modes = sine_modes(31, 31)
    for task in family.tasks(range(6)):
        assert not task.parameters["difficult"]
        assert abs(task.A - tridiagonal).max() == 0
        # Features are b's sine coefficients: synthesising them gives b back.
        np.testing.assert_allclose(modes @ task.features.numpy(), task.b, atol=1e-12)
        coefficients = np.linalg.solve(modes, task.x_ref)
        # The tent profile vanishes at both ends of the spectrum: modes 1 and n are absent.
        assert abs(coefficients[0]) < 1e-12 and abs(coefficients[-1]) < 1e-12
    hard = Poisson1D(n=31, difficult_fraction=1.0).task(0)
    assert hard.parameters["difficult"]
    assert abs(np.linalg.solve(modes, hard.x_ref)[15]) < 1e-12  # t_k^2 vanishes at the middle mode


def test_poisson2d_right_hand_sides_are_not_in_a_small_subspace():
    """docs/architecture.md (measured facts): on a low-dimensional family PETSc's fischer/POD guesses win; ours spans many modes."""
    family = Poisson2D(n=10)
    B = np.stack([t.b for t in family.tasks(range(120))])
    singular = np.linalg.svd(B, compute_uv=False)
    # White noise would give rank 100; 1e-8 relative keeps only numerically nonzero directions.
    assert np.sum(singular > 1e-8 * singular[0]) == 100


def test_grid_feature_helpers():
    n = 13
    X, Y = np.meshgrid(np.arange(1, n + 1) / (n + 1), np.arange(1, n + 1) / (n + 1), indexing="xy")
    mode = np.sin(2 * np.pi * X) * np.sin(3 * np.pi * Y)
    expected = np.zeros((5, 5))
    expected[2, 1] = 1.0  # (l - 1, k - 1) = (y mode 3, x mode 2)
    np.testing.assert_allclose(sine_coefficients(mode, 5), expected, atol=1e-13)
    assert np.all(sine_coefficients(np.ones((3, 3)), 5)[3:, :] == 0)  # modes a 3 x 3 grid lacks
    for cells in (4, 20):  # fewer and more coarse cells than grid points
        np.testing.assert_allclose(coarse_average(np.full((n, n), 2.5), cells), 2.5, rtol=1e-14)


def test_diffusion_matrix_is_symmetric_positive_definite():
    for task in Diffusion(n_range=5, contrast_range=2.5).tasks(range(4)):
        A = task.A.toarray()
        assert np.array_equal(A, A.T)
        assert np.linalg.eigvalsh(A).min() > 0


def test_diffusion_contrast_scales_log_k_and_nothing_else():
    low, high = Diffusion(contrast_range=(0.2, 0.3)), Diffusion(contrast_range=(2.4, 2.5))
    for t_low, t_high in zip(low.tasks(range(3)), high.tasks(range(3))):
        c_low, c_high = t_low.parameters["contrast"], t_high.parameters["contrast"]
        assert 0.2 <= c_low <= 0.3 and 2.4 <= c_high <= 2.5
        # Same index, same unit random field: log k (and its std, the last feature) scale with the contrast.
        assert t_high.features[-1] / t_low.features[-1] == pytest.approx(c_high / c_low, rel=1e-12)
        assert t_low.size == t_high.size and np.array_equal(t_low.b, t_high.b)


def test_convdiff_velocity_is_divergence_free_with_no_flow_through_the_walls():
    rng = np.random.default_rng(0)
    amplitudes = rng.standard_normal((3, 3))
    t = np.linspace(0.0, 1.0, 401)
    X, Y = np.meshgrid(t, t, indexing="xy")
    wx, wy = stream_velocity(amplitudes, X, Y)
    h = t[1] - t[0]
    divergence = np.gradient(wx, h, axis=1) + np.gradient(wy, h, axis=0)
    # Second-order differences of a field with |w''| ~ 100 on h = 1/400: truncation error ~ 1e-3.
    assert np.abs(divergence[1:-1, 1:-1]).max() < 1e-2 * np.abs(wx).max()
    assert np.abs(wx[:, [0, -1]]).max() < 1e-12 and np.abs(wy[[0, -1], :]).max() < 1e-12


def test_convdiff_is_nonsymmetric_and_gmres_converges():
    family = ConvDiff(n_range=16, peclet_range=(20.0, 200.0))
    for pc_type in ("ilu", "jacobi"):
        oracle = KSPOracle(ksp_type="gmres", pc_type=pc_type, rtol=1e-10, max_it=2000, return_solution=True)
        for task in family.tasks(range(3)):
            asymmetry = abs(task.A - task.A.T).max() / abs(task.A).max()
            assert asymmetry > 0.05
            outcome = oracle(task)
            assert outcome.converged, (pc_type, task.name, outcome.reason)
            # rtol 1e-10 on a system with condition number ~1e3 leaves a relative error << 1e-6.
            error = np.linalg.norm(outcome.solution - task.x_ref) / np.linalg.norm(task.x_ref)
            assert error < 1e-6


def test_cg_jacobi_on_poisson2d_32():
    """docs/architecture.md (measured facts): 86 CG + Jacobi iterations at rtol 1e-6 from zero for a random right-hand side."""
    oracle = KSPOracle(ksp_type="cg", pc_type="jacobi", rtol=1e-6)
    iterations = [oracle(task).iterations for task in Poisson2D(n=32).tasks(range(4))]
    # Measured 81-88 over the first 12 tasks: smooth and rough right-hand sides alike need ~86.
    assert all(70 <= its <= 100 for its in iterations), iterations


def test_forward_sor_best_omega_moves_with_the_task():
    """The regime docs/architecture.md records: forward SOR's optimal omega depends on the grid and coefficient."""
    family = Diffusion(n_range=(10, 36), seed=0)
    tasks = family.tasks(range(20))
    small, large = min(tasks, key=lambda t: t.size), max(tasks, key=lambda t: t.size)
    assert small.parameters["n"] <= 16 and large.parameters["n"] >= 30, "the test needs a small and a large grid"
    omegas = [1.3, 1.45, 1.6, 1.7, 1.8, 1.9]
    oracle = KSPOracle(ksp_type="richardson", pc_type="sor", rtol=1e-6, max_it=5000,
                       options={"pc_sor_forward": True})
    iterations = {t.name: [oracle(t, {"pc_sor_omega": w}).iterations for w in omegas] for t in (small, large)}
    best = {name: int(np.argmin(its)) for name, its in iterations.items()}
    assert omegas[best[small.name]] < omegas[best[large.name]], iterations
    # Each task solved at the other's optimum takes at least 1.5x its own optimum: the choice matters.
    for task, other in ((small, large), (large, small)):
        its = iterations[task.name]
        assert its[best[other.name]] >= 1.5 * its[best[task.name]], iterations


def test_train_and_evaluation_indices_are_disjoint():
    family = Poisson1D()
    train, evaluation = family.train_tasks(3), family.eval_tasks(2)
    assert [t.name for t in train] == [family.task(i).name for i in range(3)]
    assert same_task(evaluation[0], family.task(EVAL_OFFSET))
    assert not {t.name for t in train} & {t.name for t in evaluation}


def test_make_family_names_unknown_families_and_parameters():
    with pytest.raises(ValueError, match="'heat'.*bratu, channel, convdiff, diffusion, mixed, nonlinear_diffusion, poisson1d, poisson2d"):
        make_family("heat")
    with pytest.raises(ValueError, match="'contrast'.*diffusion.*contrast_range"):
        make_family("diffusion", contrast=1.0)
    assert isinstance(make_family("diffusion", n_range=[12, 40], contrast_range=[0.2, 2.5]), Diffusion)


@pytest.mark.parametrize("name, params, message", [
    ("poisson1d", {"n": 0}, "n must be an integer >= 2"),
    ("poisson1d", {"difficult_fraction": 1.5}, "difficult_fraction"),
    ("poisson2d", {"n": 8.5}, "n must be an integer"),
    ("diffusion", {"n_range": (20, 10)}, "n_range must have lo <= hi"),
    ("diffusion", {"contrast_range": (-1.0, 1.0)}, "contrast_range"),
    ("diffusion", {"correlation_range": (0.0, 0.5)}, "correlation_range"),
    ("convdiff", {"peclet_range": "high"}, "peclet_range"),
    ("convdiff", {"seed": -1}, "seed"),
])
def test_bad_parameters_raise_naming_them(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_family(name, **params)


@pytest.mark.parametrize("index", [-1, 1.5, True])
def test_bad_index_raises(index):
    with pytest.raises(ValueError, match="task index"):
        Poisson1D().task(index)


def test_describe_is_one_paragraph_naming_the_distributions():
    for name, family in FAMILIES.items():
        if name in ("program", "recorded"):  # built from the user's runs or files: tests/test_user_routes.py
            continue
        text = family().describe()
        assert "\n" not in text and len(text) > 100
        assert "Features" in text and str(family().feature_dim) in text


MPI_SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    from solvers._petsc import MPI
    from problems import make_family
    comm = MPI.COMM_WORLD
    indices = [0, 1, 2, 7] if comm.rank == 0 else [7, 2, 1, 0]
    digests = {}
    for name in ("poisson1d", "poisson2d", "diffusion", "convdiff"):
        for task in make_family(name, seed=5).tasks(indices):
            h = hashlib.sha256()
            for array in (task.A.indptr, task.A.indices, task.A.data, task.b, task.features.numpy(), task.x_ref):
                h.update(np.ascontiguousarray(array).tobytes())
            digests[task.name] = h.hexdigest()
    everyone = comm.allgather(digests)
    if comm.rank == 0:
        print("SAME" if all(d == everyone[0] for d in everyone) else "DIFFERENT", len(everyone[0]))
""")


def test_every_mpi_rank_rebuilds_identical_tasks():
    """Only indices travel between ranks, so two ranks building tasks in any order must agree bit for bit."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", MPI_SCRIPT], capture_output=True,
                            text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SAME", "16"], result.stdout + result.stderr
