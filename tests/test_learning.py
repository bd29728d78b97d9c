"""A plain torch loop (no Trainer) learns an initial guess through BlackBox and real PETSc Jacobi."""
from __future__ import annotations

import torch

from metasolve import BlackBox, ControlVariate, ForwardGradient, LogResidual, MetaSolver, Space, Surrogate, Vector
from problems import Poisson1D
from solvers import KSPOracle

STEPS, BATCH = 50, 4


def test_plain_loop_through_blackbox_lowers_the_unseen_cost():
    """NI-GBMS's Poisson1D(31) with damped Jacobi (Richardson scale 2/3, PETSc's own option).

    Damping makes the high modes decay fast, so the 6 lowest sine modes carry the slow error: the
    exact guess in those modes takes log10‖r₅₀‖/‖b‖ from −3.2 to −5.3 (533 → 61 iterations to 1e-6).
    """
    torch.manual_seed(0)
    family = Poisson1D(31)
    train, unseen = family.train_tasks(256), family.eval_tasks(16)
    space = Space({"x0": Vector(31, basis="sine", modes=6, scale=0.3)})
    meta = MetaSolver(family.feature_dim, space, depth=0)
    meta.fit_normalizer(train)
    surrogate = Surrogate(Surrogate.mlp(family.feature_dim, space.dim, hidden=32), lr=1e-3)
    oracle = KSPOracle(ksp_type="richardson", pc_type="jacobi", options={"ksp_richardson_scale": 2 / 3})
    box = BlackBox(oracle, space, LogResidual(50), ControlVariate(ForwardGradient(tangents=2, eps=1e-4), surrogate))
    optimizer = torch.optim.Adam(meta.parameters(), lr=1e-2)
    unseen_features = torch.stack([t.features for t in unseen])
    before = float(box.evaluate(meta(unseen_features).detach(), unseen).mean())
    generator = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        batch = [train[i] for i in torch.randperm(len(train), generator=generator)[:BATCH].tolist()]
        loss = box(meta(torch.stack([t.features for t in batch])), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = float(box.evaluate(meta(unseen_features).detach(), unseen).mean())
    assert box.stats.solves == STEPS * BATCH * 3 and box.stats.evaluation_solves == 2 * len(unseen)
    # Measured: −3.22 → −3.43 in 600 training solves. Ask for a 1.4x lower residual (0.15 in log10).
    assert after < before - 0.15, (before, after)
