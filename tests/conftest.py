"""Test-session settings: one torch thread (the solves are single-threaded PETSc, and several
MPI ranks share two cores, so more threads only contend)."""
import torch

torch.set_num_threads(1)
