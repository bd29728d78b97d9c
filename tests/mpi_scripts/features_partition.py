"""Under mpiexec: operator features of a matrix distributed over all ranks match the serial ones."""
import numpy as np

from problems import Diffusion
from solvers._petsc import MPI, PETSc
from solvers.features import OPERATOR_FEATURE_NAMES, operator_features

task = Diffusion(n_range=12).task(0)
A, b = task.petsc(PETSc.COMM_WORLD)
distributed = operator_features(A, b)
serial = operator_features(task.A, task.b)
difference = np.abs(distributed - serial) / np.maximum(np.abs(serial), 1.0)
worst = MPI.COMM_WORLD.allreduce(float(difference.max()), op=MPI.MAX)
if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"ranks {MPI.COMM_WORLD.Get_size()} worst {worst:.3e} at {OPERATOR_FEATURE_NAMES[int(np.argmax(difference))]}")
