"""Operator features (solvers/features.py) on matrices whose answers are known analytically, with
real PETSc: the 1-D Laplacian's Jacobi spectrum is 1 - cos(k pi/(n+1)), k = 1..n."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from problems import ConvDiff, Diffusion
from problems.family import OperatorFeatures, with_features
from solvers import PETSc
from solvers.executable import write_petsc_binary
from solvers.features import (FEATURE_FUNCTIONS, OPERATOR_FEATURE_NAMES, STRUCTURAL_FEATURE_NAMES, operator_features,
                               structural_features)
from tests.mpi_run import REPO_ROOT, run_mpi
from tests.systems import laplacian_1d, laplacian_2d

INDEX = {name: i for i, name in enumerate(OPERATOR_FEATURE_NAMES)}


def feature(values: np.ndarray, name: str) -> float:
    return float(values[INDEX[name]])


def sine_mode(n: int, k: int) -> np.ndarray:
    return np.sin(np.pi * k * np.arange(1, n + 1) / (n + 1))


def test_1d_laplacian_spectrum_gershgorin_and_young_omega():
    n = 20
    values = operator_features(laplacian_1d(n), steps=40)   # CG ends in <= n steps: Ritz values exact
    rho = math.cos(math.pi / (n + 1))
    assert values.dtype == np.float64 and values.shape == (len(OPERATOR_FEATURE_NAMES),)
    assert feature(values, "jacobi_spectral_radius") == pytest.approx(rho, abs=1e-10)
    assert feature(values, "ritz_min") == pytest.approx(1 - rho, abs=1e-10)
    assert feature(values, "ritz_max") == pytest.approx(1 + rho, abs=1e-10)
    assert feature(values, "sor_omega_star") == pytest.approx(2 / (1 + math.sin(math.pi / (n + 1))), abs=1e-8)
    assert feature(values, "log10_jacobi_gap") == pytest.approx(math.log10(1 - rho), abs=1e-6)
    assert feature(values, "krylov_iterations") <= n
    # Gershgorin for D^-1 A: interior rows have r_i = 1, the two end rows 1/2.
    assert feature(values, "gershgorin_lower") == pytest.approx(0.0, abs=1e-15)
    assert feature(values, "gershgorin_upper") == pytest.approx(2.0, abs=1e-15)
    assert feature(values, "offdiag_ratio_mean") == pytest.approx((n - 2 + 1.0) / n)
    assert feature(values, "dominant_row_fraction") == 1.0
    assert feature(values, "nnz_per_row_mean") == pytest.approx((3 * n - 2) / n)
    assert feature(values, "nnz_per_row_max") == 3.0
    assert feature(values, "log10_rows") == pytest.approx(math.log10(n))
    assert feature(values, "log10_diag_mean") == pytest.approx(math.log10(2.0))
    assert feature(values, "diag_cv") == pytest.approx(0.0, abs=1e-15)
    assert feature(values, "asymmetry") == 0.0
    assert feature(values, "ritz_imag_max") == 0.0
    assert feature(values, "log10_rhs_norm") == 0.0 and feature(values, "rhs_slow_weight") == 0.0


def test_short_krylov_run_estimates_the_2d_jacobi_radius_from_inside():
    """Ritz values lie inside the spectrum, so the default 50 steps (far fewer than the 900 unknowns)
    can only underestimate rho_J = cos(pi h); Lanczos converges fast at the extremes (measured
    1 + 7e-8 here), so the Jacobi gap, which sets omega*, must come out within 0.1%."""
    n = 30
    values = operator_features(laplacian_2d(n))
    rho = math.cos(math.pi / (n + 1))
    estimate = feature(values, "jacobi_spectral_radius")
    assert estimate <= rho + 1e-12
    assert (1 - estimate) / (1 - rho) < 1.001


def test_rhs_weight_on_the_slowest_ritz_direction():
    n = 16
    A = laplacian_1d(n)
    slowest = operator_features(A, sine_mode(n, 1), steps=40)
    fastest = operator_features(A, sine_mode(n, n), steps=40)
    assert feature(slowest, "rhs_slow_weight") == pytest.approx(1.0, abs=1e-8)
    ratio = (1 - math.cos(math.pi / (n + 1))) / (1 + math.cos(math.pi / (n + 1)))
    assert feature(fastest, "rhs_slow_weight") == pytest.approx(ratio, rel=1e-6)
    assert feature(slowest, "log10_rhs_norm") == pytest.approx(math.log10(np.linalg.norm(sine_mode(n, 1))))


def test_symmetry_measure_is_zero_for_spd_and_positive_for_convection_diffusion():
    assert feature(operator_features(Diffusion(n_range=8).task(0).A), "asymmetry") == 0.0
    task = ConvDiff(n_range=8, peclet_range=50.0).task(0)
    values = operator_features(task.A, task.b)
    dense = task.A.toarray()
    expected = np.linalg.norm(dense - dense.T) / np.linalg.norm(dense)
    assert feature(values, "asymmetry") == pytest.approx(expected, rel=1e-12) and expected > 0.05
    assert np.all(np.isfinite(values))


def test_deterministic_and_the_same_from_petsc_objects_scipy_and_binary_files(tmp_path):
    task = Diffusion(n_range=10).task(3)
    A, b = task.petsc(PETSc.COMM_SELF)
    first = operator_features(A, b)
    assert np.array_equal(first, operator_features(A, b))
    assert np.array_equal(first, operator_features(task.A, task.b))
    write_petsc_binary(A, str(tmp_path / "A.bin"))
    write_petsc_binary(b, str(tmp_path / "b.bin"))
    loaded_A = PETSc.Mat().load(PETSc.Viewer().createBinary(str(tmp_path / "A.bin"), "r", comm=PETSc.COMM_SELF))
    loaded_b = PETSc.Vec().load(PETSc.Viewer().createBinary(str(tmp_path / "b.bin"), "r", comm=PETSc.COMM_SELF))
    assert np.array_equal(first, operator_features(loaded_A, loaded_b))


@pytest.mark.parametrize("A, b, message", [
    (sp.random(3, 4, density=1.0, format="csr"), None, "square"),
    (laplacian_1d(5), np.ones(4), "b has shape"),
    (laplacian_1d(5), np.zeros(5), "b is zero"),
    (sp.csr_matrix(np.array([[1.0, 1.0], [1.0, 0.0]])), None, "zero diagonal entry in row 1"),
    (np.eye(3), None, "PETSc Mat or a SciPy sparse"),
])
def test_bad_input_raises_naming_the_problem(A, b, message):
    with pytest.raises((ValueError, TypeError), match=message):
        operator_features(A, b)


def test_bad_petsc_input_raises():
    rectangular = PETSc.Mat().createAIJ((3, 4), nnz=1, comm=PETSc.COMM_SELF)
    rectangular.assemble()
    with pytest.raises(ValueError, match="square"):
        operator_features(rectangular)
    A = PETSc.Mat().createAIJ((5, 5), csr=(np.arange(6, dtype=PETSc.IntType), np.arange(5, dtype=PETSc.IntType),
                                           np.ones(5)), comm=PETSc.COMM_SELF)
    with pytest.raises(ValueError, match="has 7 entries"):
        operator_features(A, PETSc.Vec().createSeq(7))
    with pytest.raises(ValueError, match="steps"):
        operator_features(A, steps=1)


def test_families_carry_operator_features_alone_or_with_their_own():
    family = Diffusion(n_range=(6, 9))
    operator, both = with_features(family, "operator"), with_features(family, "both")
    assert with_features(family, "family") is family and isinstance(operator, OperatorFeatures)
    task, own = operator.task(2), family.task(2)
    assert task.features.dtype == torch.float64 and task.features.shape == (operator.feature_dim,)
    assert operator.feature_dim == len(OPERATOR_FEATURE_NAMES)
    assert torch.equal(both.task(2).features, torch.cat([task.features, own.features]))
    assert both.feature_dim == operator.feature_dim + family.feature_dim
    assert np.array_equal(task.b, own.b) and operator.n_range == family.n_range
    with pytest.raises(ValueError, match="features must be one of"):
        with_features(family, "spectral")


def test_structural_features_are_the_operator_features_without_the_krylov_run():
    """The same numbers, computed the same way, for a symmetric and a nonsymmetric system; and the
    upwind asymmetry that decides between CG and a nonsymmetric method grows with the Péclet number."""
    tasks = [(laplacian_1d(20), None), *[(task.A, task.b) for task in ConvDiff(n_range=12, peclet_range=10.0).tasks([0, 1])]]
    for A, b in tasks:
        structural, full = structural_features(A, b), operator_features(A, b)
        assert structural.dtype == np.float64 and structural.shape == (len(STRUCTURAL_FEATURE_NAMES),)
        assert np.array_equal(structural, full[[INDEX[name] for name in STRUCTURAL_FEATURE_NAMES]])
    asymmetry = [float(structural_features(ConvDiff(n_range=12, peclet_range=pe).task(0).A)[STRUCTURAL_FEATURE_NAMES.index("asymmetry")])
                 for pe in (1.0, 10.0, 100.0)]
    assert 0 < asymmetry[0] < asymmetry[1] < asymmetry[2]
    assert FEATURE_FUNCTIONS == {"operator": operator_features, "structural": structural_features}


def test_a_family_without_features_of_its_own_takes_the_matrix_features():
    from problems import Mixed

    mixed = Mixed(n_range=(6, 9))
    structural = with_features(mixed, "structural")
    task = structural.task(1)
    assert structural.feature_dim == len(STRUCTURAL_FEATURE_NAMES) and task.features.shape == (structural.feature_dim,)
    assert np.array_equal(task.features.numpy(), structural_features(*task.petsc(PETSc.COMM_SELF)))
    for kind in ("family", "both"):
        with pytest.raises(ValueError, match="no features of its own.*structural"):
            with_features(mixed, kind)


def test_survey_families_are_spd_and_their_features_see_what_makes_them_hard():
    """Rotated anisotropy gives positive corner couplings (not an M-matrix: Gershgorin reaches below
    0), binary high contrast a diagonal spread of about its 10^c jump; both stay SPD."""
    from problems.anisotropic import RotatedAnisotropic, rotated_anisotropic_matrix
    from problems.contrast import HighContrast

    rotated = rotated_anisotropic_matrix(6, 0.01, math.pi / 4).toarray()
    assert np.allclose(rotated, rotated.T) and np.linalg.eigvalsh(rotated).min() > 0
    aligned = rotated_anisotropic_matrix(6, 0.01, 0.0).toarray()
    assert np.allclose(aligned, np.kron(np.eye(6), laplacian_1d(6).toarray())
                       + 0.01 * np.kron(laplacian_1d(6).toarray(), np.eye(6)))
    anisotropic = RotatedAnisotropic(n_range=8, epsilon_range=0.01, angle_range=math.pi / 4).task(0)
    values = operator_features(anisotropic.A, anisotropic.b)
    assert feature(values, "asymmetry") < 1e-15 and feature(values, "gershgorin_lower") < 0
    assert feature(values, "nnz_per_row_max") == 9.0
    contrast = HighContrast(n_range=10, contrast_range=4.0).task(0)
    assert np.linalg.eigvalsh(contrast.A.toarray()).min() > 0
    assert 3.0 < feature(operator_features(contrast.A), "log10_diag_contrast") < 5.0



@pytest.mark.mpi
def test_distributed_structural_features_equal_the_serial_ones():
    result = run_mpi(REPO_ROOT / "tests" / "mpi_scripts" / "features_distributed.py", n=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK distributed features", result.stdout + result.stderr
