"""Under mpiexec: structural features of a Mat distributed over COMM_WORLD equal those of the same
system on one rank, for a structurally symmetric matrix (the asymmetry's shared-pattern path) and
for one that is not (its general sparse-axpy path); so do the same entries of operator_features.

Prints "OK distributed features" on rank 0 if every rank agrees to rounding (rtol 1e-12: only the
order of the sums differs between one and several ranks). The Ritz values are not compared: a
50-step Arnoldi run on a nonnormal matrix amplifies that rounding.
"""
import numpy as np
import scipy.sparse as sp

from problems import ConvDiff
from solvers import PETSc
from solvers.features import OPERATOR_FEATURE_NAMES, STRUCTURAL_FEATURE_NAMES, operator_features, structural_features

comm = PETSc.COMM_WORLD
convdiff = ConvDiff(n_range=10, peclet_range=50.0).task(0)
n = 60
lopsided = sp.diags([-np.ones(n - 1), 3 * np.ones(n), -0.5 * np.ones(n - 2)], [-1, 0, 2], format="csr")
systems = [(convdiff.A, convdiff.b), (lopsided, np.linspace(1.0, 2.0, n))]
problems = []
for A, b in systems:
    csr = sp.csr_matrix(A)

    def mat(on):
        M = PETSc.Mat().createAIJ(csr.shape, comm=on)
        M.setUp()
        start, end = M.getOwnershipRange()
        for row in range(start, end):
            columns = csr.indices[csr.indptr[row]:csr.indptr[row + 1]]
            M.setValues(row, columns, csr.data[csr.indptr[row]:csr.indptr[row + 1]])
        M.assemble()
        return M

    distributed, serial = mat(comm), mat(PETSc.COMM_SELF)
    shared = [OPERATOR_FEATURE_NAMES.index(name) for name in STRUCTURAL_FEATURE_NAMES]
    for function, entries in ((structural_features, slice(None)), (operator_features, shared)):
        here, alone = function(distributed, b)[entries], function(serial, b)[entries]
        if not np.allclose(here, alone, rtol=1e-12, atol=1e-14):
            problems.append(f"{function.__name__}: {here} vs {alone}")
bad = comm.tompi4py().allgather(problems)
if comm.getRank() == 0:
    print("OK distributed features" if not any(bad) else bad)
