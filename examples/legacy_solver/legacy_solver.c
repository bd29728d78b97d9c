static char help[] = "A legacy PETSc linear solver: everything about the solve comes from the options database.\n\
  -f <file>         matrix in PETSc binary format (MatLoad); without it a diffusion problem is assembled\n\
  -rhs <file>       right-hand side in PETSc binary format (VecLoad); default: all ones\n\
  -x0 <file>        initial guess in PETSc binary format (VecLoad); default: zero\n\
  -n <int>          assembled problem: n x n interior grid points of the unit square (default 32)\n\
  -contrast <real>  assembled problem: standard deviation of log k (default 1.0)\n\
  -seed <int>       assembled problem: seed of the random coefficient field (default 0)\n\n";

/*
   Solves A x = b with a KSP configured entirely by KSPSetFromOptions(), in the style of PETSc's
   tutorials (src/ksp/ksp/tutorials/ex10.c and ex2.c). The assembled problem is
   -div(k grad u) = 1 on the unit square, u = 0 on the boundary, discretised by vertex-centred
   5-point finite differences with harmonic-mean face coefficients and scaled by h^2;
   log k = contrast * (sum of random cosine waves, unit variance) drawn with PetscRandom from -seed.
   The program prints nothing itself: use -ksp_monitor_true_residual, -ksp_converged_reason, ...
*/
#include <petscksp.h>

#define WAVES 16
#define MAX_WAVENUMBER 4.0

typedef struct {
  PetscReal contrast;
  PetscReal kx[WAVES], ky[WAVES], phase[WAVES];
} Coefficient;

static PetscErrorCode CoefficientCreate(PetscReal contrast, PetscInt seed, Coefficient *coef)
{
  PetscRandom rnd;
  PetscReal   u;

  PetscFunctionBeginUser;
  coef->contrast = contrast;
  PetscCall(PetscRandomCreate(PETSC_COMM_SELF, &rnd));
  PetscCall(PetscRandomSetType(rnd, PETSCRANDER48));
  PetscCall(PetscRandomSetSeed(rnd, (unsigned long)seed));
  PetscCall(PetscRandomSeed(rnd));
  for (PetscInt w = 0; w < WAVES; w++) {
    PetscCall(PetscRandomGetValueReal(rnd, &u));
    coef->kx[w] = MAX_WAVENUMBER * (2.0 * u - 1.0);
    PetscCall(PetscRandomGetValueReal(rnd, &u));
    coef->ky[w] = MAX_WAVENUMBER * (2.0 * u - 1.0);
    PetscCall(PetscRandomGetValueReal(rnd, &u));
    coef->phase[w] = 2.0 * PETSC_PI * u;
  }
  PetscCall(PetscRandomDestroy(&rnd));
  PetscFunctionReturn(PETSC_SUCCESS);
}

static PetscReal CoefficientValue(const Coefficient *coef, PetscReal x, PetscReal y)
{
  PetscReal g = 0.0;

  for (PetscInt w = 0; w < WAVES; w++) g += PetscCosReal(2.0 * PETSC_PI * (coef->kx[w] * x + coef->ky[w] * y) + coef->phase[w]);
  return PetscExpReal(coef->contrast * PetscSqrtReal(2.0 / WAVES) * g);
}

static PetscReal Face(const Coefficient *coef, PetscReal h, PetscInt i0, PetscInt j0, PetscInt i1, PetscInt j1)
{
  PetscReal a = CoefficientValue(coef, i0 * h, j0 * h), b = CoefficientValue(coef, i1 * h, j1 * h);

  return 2.0 * a * b / (a + b);
}

static PetscErrorCode AssembleDiffusion(MPI_Comm comm, PetscInt n, PetscReal contrast, PetscInt seed, Mat *A)
{
  Coefficient coef;
  PetscReal   h = 1.0 / (n + 1);
  PetscInt    start, end;

  PetscFunctionBeginUser;
  PetscCall(CoefficientCreate(contrast, seed, &coef));
  PetscCall(MatCreate(comm, A));
  PetscCall(MatSetSizes(*A, PETSC_DECIDE, PETSC_DECIDE, n * n, n * n));
  PetscCall(MatSetFromOptions(*A));
  PetscCall(MatSeqAIJSetPreallocation(*A, 5, NULL));
  PetscCall(MatMPIAIJSetPreallocation(*A, 5, NULL, 2, NULL));
  PetscCall(MatGetOwnershipRange(*A, &start, &end));
  for (PetscInt row = start; row < end; row++) {
    /* unknown (i, j), 1 <= i, j <= n, sits at (i h, j h); row = (j-1) n + (i-1), x fastest */
    PetscInt    i = row % n + 1, j = row / n + 1, cols[5], count = 0;
    PetscScalar vals[5];
    PetscReal   west = Face(&coef, h, i, j, i - 1, j), east = Face(&coef, h, i, j, i + 1, j);
    PetscReal   south = Face(&coef, h, i, j, i, j - 1), north = Face(&coef, h, i, j, i, j + 1);

    if (j > 1) { cols[count] = row - n; vals[count++] = -south; }
    if (i > 1) { cols[count] = row - 1; vals[count++] = -west; }
    cols[count] = row; vals[count++] = west + east + south + north;
    if (i < n) { cols[count] = row + 1; vals[count++] = -east; }
    if (j < n) { cols[count] = row + n; vals[count++] = -north; }
    PetscCall(MatSetValues(*A, 1, &row, count, cols, vals, INSERT_VALUES));
  }
  PetscCall(MatAssemblyBegin(*A, MAT_FINAL_ASSEMBLY));
  PetscCall(MatAssemblyEnd(*A, MAT_FINAL_ASSEMBLY));
  PetscFunctionReturn(PETSC_SUCCESS);
}

static PetscErrorCode LoadVec(const char *file, Vec v)
{
  PetscViewer viewer;

  PetscFunctionBeginUser;
  PetscCall(PetscViewerBinaryOpen(PetscObjectComm((PetscObject)v), file, FILE_MODE_READ, &viewer));
  PetscCall(VecLoad(v, viewer));
  PetscCall(PetscViewerDestroy(&viewer));
  PetscFunctionReturn(PETSC_SUCCESS);
}

int main(int argc, char **argv)
{
  Mat         A;
  Vec         x, b;
  KSP         ksp;
  PetscViewer viewer;
  char        matrix_file[PETSC_MAX_PATH_LEN], rhs_file[PETSC_MAX_PATH_LEN], guess_file[PETSC_MAX_PATH_LEN];
  PetscBool   has_matrix, has_rhs, has_guess;
  PetscInt    n = 32, seed = 0;
  PetscReal   contrast = 1.0;

  PetscCall(PetscInitialize(&argc, &argv, NULL, help));
  PetscCall(PetscOptionsGetString(NULL, NULL, "-f", matrix_file, sizeof(matrix_file), &has_matrix));
  PetscCall(PetscOptionsGetString(NULL, NULL, "-rhs", rhs_file, sizeof(rhs_file), &has_rhs));
  PetscCall(PetscOptionsGetString(NULL, NULL, "-x0", guess_file, sizeof(guess_file), &has_guess));

  if (has_matrix) {
    PetscCall(PetscViewerBinaryOpen(PETSC_COMM_WORLD, matrix_file, FILE_MODE_READ, &viewer));
    PetscCall(MatCreate(PETSC_COMM_WORLD, &A));
    PetscCall(MatSetFromOptions(A));
    PetscCall(MatLoad(A, viewer));
    PetscCall(PetscViewerDestroy(&viewer));
  } else {
    PetscCall(PetscOptionsGetInt(NULL, NULL, "-n", &n, NULL));
    PetscCall(PetscOptionsGetReal(NULL, NULL, "-contrast", &contrast, NULL));
    PetscCall(PetscOptionsGetInt(NULL, NULL, "-seed", &seed, NULL));
    PetscCheck(n > 0, PETSC_COMM_WORLD, PETSC_ERR_ARG_OUTOFRANGE, "-n must be positive, got %" PetscInt_FMT, n);
    PetscCall(AssembleDiffusion(PETSC_COMM_WORLD, n, contrast, seed, &A));
  }

  PetscCall(MatCreateVecs(A, &x, &b));
  if (has_rhs) PetscCall(LoadVec(rhs_file, b));
  else if (has_matrix) PetscCall(VecSet(b, 1.0));
  else PetscCall(VecSet(b, 1.0 / ((n + 1.0) * (n + 1.0))));
  if (has_guess) PetscCall(LoadVec(guess_file, x));

  PetscCall(KSPCreate(PETSC_COMM_WORLD, &ksp));
  PetscCall(KSPSetOperators(ksp, A, A));
  PetscCall(KSPSetInitialGuessNonzero(ksp, has_guess));
  PetscCall(KSPSetFromOptions(ksp));
  PetscCall(KSPSolve(ksp, b, x));

  PetscCall(KSPDestroy(&ksp));
  PetscCall(VecDestroy(&x));
  PetscCall(VecDestroy(&b));
  PetscCall(MatDestroy(&A));
  PetscCall(PetscFinalize());
  return 0;
}
