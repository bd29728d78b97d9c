"""A plain torch loop (no Trainer) learns an initial guess through BlackBox and real PETSc Jacobi."""
from __future__ import annotations

import torch

from metasolve import BlackBox, ControlVariate, ForwardGradient, LogResidual, Space, Surrogate, Vector
from metasolve.meta_solver import MetaSolver
from problems import Poisson1D
from solvers import KSPOracle


def test_plain_loop_through_blackbox_lowers_the_unseen_cost():
    torch.manual_seed(0)
    family = Poisson1D(31)
    train, unseen = family.train_tasks(32), family.eval_tasks(16)
    space = Space({"x0": Vector(31, basis="sine", modes=31)})
    meta = MetaSolver(family.feature_dim, space, depth=0)
    meta.fit_normalizer(train)
    surrogate = Surrogate(Surrogate.mlp(family.feature_dim, space.dim, hidden=32), lr=1e-3)
    box = BlackBox(KSPOracle(ksp_type="richardson", pc_type="jacobi"), space, LogResidual(50),
                   ControlVariate(ForwardGradient(tangents=2, eps=1e-4), surrogate), seed=0)
    optimizer = torch.optim.Adam(meta.parameters(), lr=3e-3)
    features = torch.stack([t.features for t in unseen])
    before = float(box.evaluate(meta(features).detach(), unseen).mean())
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = [train[i] for i in torch.randperm(len(train), generator=generator)[:4].tolist()]
        loss = box(meta(torch.stack([t.features for t in batch])), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = float(box.evaluate(meta(features).detach(), unseen).mean())
    print(before, after, box.stats.solves)
    assert box.stats.solves <= 4 * 3 * STEPS + 2 * len(unseen)
    assert after < before - MARGIN, (before, after)


STEPS = 60
MARGIN = 0.3
