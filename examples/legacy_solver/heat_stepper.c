static char help[] = "Implicit-Euler heat stepper: u_t = div(k grad u) - beta u^3 + 1 on the unit square, u = 0 on the boundary.\n\
  -n <int>          n x n interior grid points (default 32)\n\
  -kappa <real>     diffusivity scale: k = kappa exp(contrast g), g a smooth random field (default 1)\n\
  -contrast <real>  standard deviation of log(k / kappa) (default 0)\n\
  -seed <int>       seed of the random coefficient field (default 0)\n\
  -dt <real>        time step (default 1e-3)\n\
  -steps <int>      number of time steps (default 4)\n\
  -beta <real>      cubic absorption; 0 (default) gives one linear KSP solve per step, > 0 one SNES solve per step\n\
The solvers read their options under the prefix heat_ (-heat_ksp_type, -heat_pc_sor_omega, -heat_snes_rtol, ...).\n\n";

/*
   A time-stepping code in the style of the applications PETSc users run for years unchanged:
   it assembles its own operator, prints its own progress lines around PETSc's, solves once per
   step with the previous step's solution as the initial guess, and lets the options database
   (prefix heat_) choose the solver.

   Discretisation: vertex-centred 5-point finite differences with harmonic-mean face coefficients
   on an n x n interior grid, h = 1/(n+1). Implicit Euler:
       (I + dt K) u^{m+1} + dt beta (u^{m+1})^3 = u^m + dt,      K = -div(k grad .) / h^2 stencil.
   The diffusion number c = kappa dt / h^2 sets how far A = I + dt K is from the identity, and with
   it the best SOR relaxation factor (about 1 for c << 1, approaching 2 - 2 pi h for c >> 1).
   With beta = 0 each step is one KSPSolve; with beta > 0 each step is one Newton solve (SNES) with
   Jacobian A + 3 dt beta diag(u^2).
*/
#include <petscsnes.h>

#define WAVES 16
#define MAX_WAVENUMBER 4.0

typedef struct {
  PetscReal kappa, contrast;
  PetscReal kx[WAVES], ky[WAVES], phase[WAVES];
} Coefficient;

typedef struct {
  Mat       A;    /* I + dt K */
  Vec       rhs;  /* u^m + dt */
  PetscReal dt, beta;
} Step;

static PetscErrorCode CoefficientCreate(PetscReal kappa, PetscReal contrast, PetscInt seed, Coefficient *coef)
{
  PetscRandom rnd;
  PetscReal   u;

  PetscFunctionBeginUser;
  coef->kappa    = kappa;
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
  return coef->kappa * PetscExpReal(coef->contrast * PetscSqrtReal(2.0 / WAVES) * g);
}

static PetscReal Face(const Coefficient *coef, PetscReal h, PetscInt i0, PetscInt j0, PetscInt i1, PetscInt j1)
{
  PetscReal a = CoefficientValue(coef, i0 * h, j0 * h), b = CoefficientValue(coef, i1 * h, j1 * h);

  return 2.0 * a * b / (a + b);
}

/* A = I + dt K, K the 5-point variable-coefficient operator divided by h^2 */
static PetscErrorCode AssembleStepMatrix(MPI_Comm comm, PetscInt n, const Coefficient *coef, PetscReal dt, Mat *A)
{
  PetscReal h = 1.0 / (n + 1), s = dt / (h * h);
  PetscInt  start, end;

  PetscFunctionBeginUser;
  PetscCall(MatCreate(comm, A));
  PetscCall(MatSetSizes(*A, PETSC_DECIDE, PETSC_DECIDE, n * n, n * n));
  PetscCall(MatSetFromOptions(*A));
  PetscCall(MatSeqAIJSetPreallocation(*A, 5, NULL));
  PetscCall(MatMPIAIJSetPreallocation(*A, 5, NULL, 2, NULL));
  PetscCall(MatGetOwnershipRange(*A, &start, &end));
  for (PetscInt row = start; row < end; row++) {
    PetscInt    i = row % n + 1, j = row / n + 1, cols[5], count = 0;
    PetscScalar vals[5];
    PetscReal   west = Face(coef, h, i, j, i - 1, j), east = Face(coef, h, i, j, i + 1, j);
    PetscReal   south = Face(coef, h, i, j, i, j - 1), north = Face(coef, h, i, j, i, j + 1);

    if (j > 1) { cols[count] = row - n; vals[count++] = -s * south; }
    if (i > 1) { cols[count] = row - 1; vals[count++] = -s * west; }
    cols[count] = row; vals[count++] = 1.0 + s * (west + east + south + north);
    if (i < n) { cols[count] = row + 1; vals[count++] = -s * east; }
    if (j < n) { cols[count] = row + n; vals[count++] = -s * north; }
    PetscCall(MatSetValues(*A, 1, &row, count, cols, vals, INSERT_VALUES));
  }
  PetscCall(MatAssemblyBegin(*A, MAT_FINAL_ASSEMBLY));
  PetscCall(MatAssemblyEnd(*A, MAT_FINAL_ASSEMBLY));
  PetscFunctionReturn(PETSC_SUCCESS);
}

/* u0 = 16 x (1 - x) y (1 - y): a warm plate cooling towards the steady state of the unit source */
static PetscErrorCode InitialCondition(PetscInt n, Vec u)
{
  PetscReal h = 1.0 / (n + 1);
  PetscInt  start, end;

  PetscFunctionBeginUser;
  PetscCall(VecGetOwnershipRange(u, &start, &end));
  for (PetscInt row = start; row < end; row++) {
    PetscReal x = (row % n + 1) * h, y = (row / n + 1) * h;
    PetscCall(VecSetValue(u, row, 16.0 * x * (1.0 - x) * y * (1.0 - y), INSERT_VALUES));
  }
  PetscCall(VecAssemblyBegin(u));
  PetscCall(VecAssemblyEnd(u));
  PetscFunctionReturn(PETSC_SUCCESS);
}

/* F(u) = A u + dt beta u^3 - rhs */
static PetscErrorCode FormFunction(SNES snes, Vec u, Vec F, void *ctx)
{
  Step *step = (Step *)ctx;
  Vec   cube;

  PetscFunctionBeginUser;
  PetscCall(MatMult(step->A, u, F));
  PetscCall(VecDuplicate(u, &cube));
  PetscCall(VecPointwiseMult(cube, u, u));
  PetscCall(VecPointwiseMult(cube, cube, u));
  PetscCall(VecAXPY(F, step->dt * step->beta, cube));
  PetscCall(VecAXPY(F, -1.0, step->rhs));
  PetscCall(VecDestroy(&cube));
  PetscFunctionReturn(PETSC_SUCCESS);
}

/* J = A + 3 dt beta diag(u^2) */
static PetscErrorCode FormJacobian(SNES snes, Vec u, Mat J, Mat P, void *ctx)
{
  Step *step = (Step *)ctx;
  Vec   diagonal;

  PetscFunctionBeginUser;
  PetscCall(MatCopy(step->A, P, SAME_NONZERO_PATTERN));
  PetscCall(VecDuplicate(u, &diagonal));
  PetscCall(VecPointwiseMult(diagonal, u, u));
  PetscCall(VecScale(diagonal, 3.0 * step->dt * step->beta));
  PetscCall(MatDiagonalSet(P, diagonal, ADD_VALUES));
  PetscCall(VecDestroy(&diagonal));
  if (J != P) {
    PetscCall(MatAssemblyBegin(J, MAT_FINAL_ASSEMBLY));
    PetscCall(MatAssemblyEnd(J, MAT_FINAL_ASSEMBLY));
  }
  PetscFunctionReturn(PETSC_SUCCESS);
}

int main(int argc, char **argv)
{
  Coefficient coef;
  Step        step;
  Mat         J = NULL;
  Vec         u;
  KSP         ksp  = NULL;
  SNES        snes = NULL;
  PetscInt    n = 32, seed = 0, steps = 4;
  PetscReal   kappa = 1.0, contrast = 0.0, dt = 1e-3, beta = 0.0, umax, usum;

  PetscCall(PetscInitialize(&argc, &argv, NULL, help));
  PetscCall(PetscOptionsGetInt(NULL, NULL, "-n", &n, NULL));
  PetscCall(PetscOptionsGetReal(NULL, NULL, "-kappa", &kappa, NULL));
  PetscCall(PetscOptionsGetReal(NULL, NULL, "-contrast", &contrast, NULL));
  PetscCall(PetscOptionsGetInt(NULL, NULL, "-seed", &seed, NULL));
  PetscCall(PetscOptionsGetReal(NULL, NULL, "-dt", &dt, NULL));
  PetscCall(PetscOptionsGetInt(NULL, NULL, "-steps", &steps, NULL));
  PetscCall(PetscOptionsGetReal(NULL, NULL, "-beta", &beta, NULL));
  PetscCheck(n > 0 && steps > 0, PETSC_COMM_WORLD, PETSC_ERR_ARG_OUTOFRANGE, "-n and -steps must be positive");
  PetscCheck(kappa > 0 && dt > 0 && beta >= 0, PETSC_COMM_WORLD, PETSC_ERR_ARG_OUTOFRANGE, "need -kappa > 0, -dt > 0, -beta >= 0");

  PetscCall(CoefficientCreate(kappa, contrast, seed, &coef));
  PetscCall(AssembleStepMatrix(PETSC_COMM_WORLD, n, &coef, dt, &step.A));
  step.dt   = dt;
  step.beta = beta;
  PetscCall(MatCreateVecs(step.A, &u, &step.rhs));
  PetscCall(InitialCondition(n, u));
  PetscCall(PetscPrintf(PETSC_COMM_WORLD, "heat_stepper: %" PetscInt_FMT " x %" PetscInt_FMT " grid, kappa %g, contrast %g, dt %g, diffusion number %g, %s\n",
                        n, n, (double)kappa, (double)contrast, (double)dt, (double)(kappa * dt * (n + 1) * (n + 1)),
                        beta > 0 ? "nonlinear (SNES)" : "linear (KSP)"));

  if (beta > 0) {
    PetscCall(SNESCreate(PETSC_COMM_WORLD, &snes));
    PetscCall(SNESSetOptionsPrefix(snes, "heat_"));
    PetscCall(MatDuplicate(step.A, MAT_COPY_VALUES, &J));
    PetscCall(SNESSetFunction(snes, NULL, FormFunction, &step));
    PetscCall(SNESSetJacobian(snes, J, J, FormJacobian, &step));
    PetscCall(SNESSetFromOptions(snes));
  } else {
    PetscCall(KSPCreate(PETSC_COMM_WORLD, &ksp));
    PetscCall(KSPSetOptionsPrefix(ksp, "heat_"));
    PetscCall(KSPSetOperators(ksp, step.A, step.A));
    PetscCall(KSPSetInitialGuessNonzero(ksp, PETSC_TRUE));
    PetscCall(KSPSetFromOptions(ksp));
  }

  for (PetscInt m = 1; m <= steps; m++) {
    PetscCall(VecCopy(u, step.rhs));
    PetscCall(VecShift(step.rhs, dt));
    if (snes) PetscCall(SNESSolve(snes, NULL, u));
    else PetscCall(KSPSolve(ksp, step.rhs, u));
    PetscCall(VecMax(u, NULL, &umax));
    PetscCall(VecSum(u, &usum));
    PetscCall(PetscPrintf(PETSC_COMM_WORLD, "step %" PetscInt_FMT "/%" PetscInt_FMT "  t = %.4e  max u = %.6e  mean u = %.6e  (linear solve of this step done)\n",
                          m, steps, (double)(m * dt), (double)umax, (double)(usum / (n * n))));
  }
  PetscCall(PetscPrintf(PETSC_COMM_WORLD, "heat_stepper: done, %" PetscInt_FMT " steps\n", steps));

  PetscCall(SNESDestroy(&snes));
  PetscCall(KSPDestroy(&ksp));
  PetscCall(MatDestroy(&J));
  PetscCall(MatDestroy(&step.A));
  PetscCall(VecDestroy(&step.rhs));
  PetscCall(VecDestroy(&u));
  PetscCall(PetscFinalize());
  return 0;
}
