"""Under mpiexec: a user's distributed KSP (COMM_WORLD) wrapped exactly and deployed on safely.

Prints "OK distributed wrap and deploy" on rank 0 if, on every rank: from_ksp reproduces the
user's own iteration count; a setting with an initial guess applied on the user's KSP solves in
exactly the oracle's iterations on the same communicator; the options database is as found.
"""
import numpy as np

from solvers import KSPOracle, PETSc
from solvers._petsc import MPI
from solvers.deploy import applied
from tests.systems import poisson_2d

comm = PETSc.COMM_WORLD
task = poisson_2d(16, seed=3)
A, b = task.petsc(comm)
database = PETSc.Options()
database.setValue("-mine_pc_type", "bjacobi")
database.setValue("-mine_sub_pc_type", "icc")

user = PETSc.KSP().create(comm=comm)
user.setOptionsPrefix("mine_")
user.setOperators(A)
user.setType("cg")
user.setFromOptions()
user.solve(b, b.duplicate())
oracle = KSPOracle.from_ksp(user, comm=comm)
for name in ("-mine_pc_type", "-mine_sub_pc_type"):
    database.delValue(name)
problems = []
if oracle(task).iterations != user.getIterationNumber():
    problems.append(f"from_ksp {oracle(task).iterations} vs the user's {user.getIterationNumber()}")

guess = 0.5 * task.x_ref
setting = {"x0": guess, "sub_pc_factor_levels": 1}
before = database.getAll()
x = A.createVecRight()
with applied(user, setting, x):
    user.solve(b, x)
expected = oracle(task, setting).iterations
if user.getIterationNumber() != expected:
    problems.append(f"deployed {user.getIterationNumber()} vs the oracle's {expected} iterations")
if database.getAll() != before:
    problems.append("the options database changed")
if expected == oracle(task).iterations:
    problems.append("the setting changed nothing, so the comparison proves nothing")

everyone = MPI.COMM_WORLD.allgather(problems)
if MPI.COMM_WORLD.Get_rank() == 0:
    print("\n".join(sum(everyone, [])) or "OK distributed wrap and deploy")
