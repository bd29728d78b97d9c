"""Under `mpiexec -n 2` (or 4): the DMDA Newton driver on COMM_WORLD solves like the serial one.

For a 33 x 33 Bratu grid (CG + GAMG inside Newton) and a 33 x 33 nonlinear diffusion grid
(GMRES + GAMG: its Jacobian is nonsymmetric), from zero, from a guess and with
`snes_grid_sequence 2`, the 2-rank solve must
- converge to ‖F‖ ≤ rtol·‖F(0)‖ in as many Newton steps (per grid level) as the 1-rank solve;
- agree with the 1-rank solution within the bound the stopping test gives. Both solves stop at
  ‖F(u)‖ ≤ rtol·‖F(0)‖ but reach it through different Krylov iterates (GAMG aggregates per rank),
  so near the root u* = u₁ + δ, ‖u₂ − u₁‖ ≤ ‖J(u₁)⁻¹‖₂ (‖F(u₁)‖ + ‖F(u₂)‖), to first order in the
  tiny residuals; the check allows twice that (the second-order term);
- hold the identical solution and Newton history on both ranks (the solution is gathered);
- have been distributed: the Outcome's flops (summed over the ranks) exceed each rank's own flops
  for the whole call by 20% (a redundant serial solve on each rank would report its own count);
and LU inside Newton, the serial default, is refused by name on 2 ranks (this PETSc has no MUMPS).

On 2 ranks PETSc splits a square grid into two strips of whole rows, where its ordering is the
natural one; on 4 it splits it 2 x 2, where it is not (checked): the run on 4 ranks is the one
that tests the natural <-> PETSc mapping of vectors (boxes) and Jacobian rows and columns (AO).
Exits non-zero on every rank if anything fails.
"""
import sys

import numpy as np
import torch

from problems.bratu import BratuOracle, BratuTask
from problems.nonlinear_diffusion import NonlinearDiffusionOracle, NonlinearDiffusionTask
from solvers._petsc import MPI, PETSc

RTOL = 1e-10
world = MPI.COMM_WORLD
problems: list[str] = []
report: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        problems.append(message)


def largest_inverse_norm(problem, task, interior: np.ndarray) -> float:
    """‖J(u)⁻¹‖₂ = 1/σ_min of the whole-grid Jacobian at a solution (dense: 1089 unknowns)."""
    grid = problem.embed(task, interior)
    return 1.0 / np.linalg.svd(problem.jacobian(task, grid).toarray(), compute_uv=False)[-1]


def compare(name: str, oracle_class, task, linear: dict) -> None:
    serial_oracle = oracle_class(rtol=RTOL, options=linear)
    parallel_oracle = oracle_class(rtol=RTOL, options=linear, comm=PETSc.COMM_WORLD)
    zero = serial_oracle.solve(task, {})
    check(zero.outcome.converged, f"{name}: the serial reference failed: {zero.outcome.error}")
    inverse_norm = largest_inverse_norm(serial_oracle.problem, task, zero.outcome.solution)
    guess = 0.7 * zero.outcome.solution
    cases = {"zero": {}, "guess": {"u0": guess}, "grid sequence 2": {"snes_grid_sequence": 2}}
    for case, setting in cases.items():
        label = f"{name}, {case}"
        serial = serial_oracle.solve(task, setting)
        own_flops = PETSc.Log.getFlops()
        parallel = parallel_oracle.solve(task, setting)
        own_flops = PETSc.Log.getFlops() - own_flops
        one, two = serial.outcome, parallel.outcome
        check(one.converged and two.converged,
              f"{label}: converged serial {one.converged}, {world.size} ranks {two.converged} ({two.error})")
        if not (one.converged and two.converged):
            continue
        atol = RTOL * serial_oracle.problem.reference_norm(task)
        check(two.residuals[-1] <= atol, f"{label}: final ‖F‖ {two.residuals[-1]:.3e} > {atol:.3e}")
        check(two.iterations == one.iterations and parallel.level_iterations == serial.level_iterations,
              f"{label}: Newton steps {parallel.level_iterations} on {world.size} ranks, "
              f"{serial.level_iterations} serial")
        difference = np.linalg.norm(two.solution - one.solution)
        bound = 2.0 * inverse_norm * (one.residuals[-1] + two.residuals[-1])
        check(difference <= bound, f"{label}: ‖u₂ − u₁‖ = {difference:.3e} > bound {bound:.3e}")
        gathered = world.allgather((two.solution, two.residuals, two.iterations, two.flops))
        check(all(np.array_equal(other[0], two.solution) and np.array_equal(other[1], two.residuals)
                  and other[2:] == (two.iterations, two.flops) for other in gathered),
              f"{label}: the ranks hold different solutions or histories")
        check(two.flops > 1.2 * own_flops, f"{label}: summed flops {two.flops:.3e} vs this rank's {own_flops:.3e}: "
                                           "not distributed, or not summed")
        report.append(f"{label}: its {parallel.level_iterations}, ‖F‖ {two.residuals[-1]:.2e}, "
                      f"rel diff {difference / np.linalg.norm(one.solution):.1e} "
                      f"(bound {bound / np.linalg.norm(one.solution):.1e})")


probe = PETSc.DMDA().create(dim=2, sizes=(33, 33), dof=1, stencil_width=1, comm=PETSc.COMM_WORLD)
natural_is_petsc = np.array_equal(probe.getAO().app2petsc(np.arange(33 * 33, dtype=PETSc.IntType)), np.arange(33 * 33))
check(world.size != 4 or not natural_is_petsc, "on 4 ranks the 33 x 33 grid's PETSc ordering is the natural one: "
                                               "the mapping is not tested")
report.append(f"processes {probe.getProcSizes()}, PETSc ordering {'=' if natural_is_petsc else '!='} natural")
probe.destroy()

compare("Bratu", BratuOracle, BratuTask(lam=6.0, n=33, features=torch.zeros(1)),
        {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-8})
compare("nonlinear diffusion", NonlinearDiffusionOracle,
        NonlinearDiffusionTask(mu=10.0, amplitude=100.0, n=33, features=torch.zeros(1)),
        {"ksp_type": "gmres", "pc_type": "gamg", "ksp_rtol": 1e-8})

try:
    BratuOracle(comm=PETSc.COMM_WORLD).solve(BratuTask(lam=1.0, n=9, features=torch.zeros(1)))
    problems.append("LU inside Newton on 2 ranks was not refused")
except ValueError as error:
    check("parallel direct solver" in str(error) and "pc_type gamg" in str(error), f"unclear refusal: {error}")

for problem in problems:
    print(f"rank {world.rank}: {problem}", flush=True)
if world.allreduce(len(problems)):
    sys.exit(1)
if world.rank == 0:
    print(f"OK DMDA SNES on {world.size} ranks matches serial:\n" + "\n".join(report), flush=True)
