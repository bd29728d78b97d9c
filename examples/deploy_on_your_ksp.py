"""Use a trained meta-solver in front of a PETSc solve you wrote yourself.

    .venv/bin/python examples/deploy_on_your_ksp.py                                  # trains a small model first
    .venv/bin/python examples/deploy_on_your_ksp.py runs/sor_omega/meta_solver.pt    # or uses yours

Without an argument, a small version of `examples/sor_omega.toml` (per-instance SOR ω for
Richardson + forward SOR, operator features, Young's ω* as the anchor) is trained by the run
layer, `metasolve.app.run.run` — what `metasolve train` runs — into `runs/deploy_example/`.

The KSP below is an ordinary petsc4py solve, configured the way the meta-solver was trained
(Richardson + forward SOR, rtol 1e-6). A meta-solver trained on operator features
(`features = "operator"`) predicts for any `LinearSystem(A, b)` of yours, no family needed: the
features are computed from A and b as in training. `MetaSolver.apply` puts the predicted setting
on your KSP for one solve: options go into the options database under the KSP's prefix (checked
as read, removed afterwards), an initial guess into the solution vector.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from metasolve import MetaSolver
from problems import Diffusion
from solvers import LinearSystem, PETSc

EXAMPLES = Path(__file__).resolve().parent
SMALL = {"problem.train_tasks": 64, "problem.eval_tasks": 8, "pretrain.tasks": 8, "train.steps": 20,
         "train.batch_size": 8, "evaluate.constant_tasks": 4}


def train_small_model(out: Path) -> Path:
    """`examples/sor_omega.toml` at a size that trains in about 25 s of CPU time (one rank)."""
    from metasolve.app.config import load_config, override
    from metasolve.app.run import run

    config = override(load_config(EXAMPLES / "sor_omega.toml"), SMALL, "examples/sor_omega.toml")
    return run(config, out, overwrite=True, quiet=True).files["model"]


def my_solver(A: PETSc.Mat) -> PETSc.KSP:
    """Your own solve, as your code sets it up."""
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOptionsPrefix("mycode_")
    ksp.setOperators(A)
    ksp.setType("richardson")
    ksp.getPC().setType("sor")
    ksp.setTolerances(rtol=1e-6, max_it=20_000)
    ksp.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    ksp.setMonitor(lambda *_: None)  # Richardson + SOR skips its convergence test without a monitor
    PETSc.Options("mycode_")["pc_sor_forward"] = None   # as -mycode_pc_sor_forward on the command line
    ksp.setFromOptions()
    return ksp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meta_solver", nargs="?", type=Path,
                        help="a model written by `metasolve train` on operator features (default: train one)")
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    model = args.meta_solver or train_small_model(Path("runs/deploy_example"))
    meta = MetaSolver.load(model)
    print(f"\n{model}: your KSP (Richardson + forward SOR) on unseen systems, PETSc's default ω = 1 vs the prediction")
    print(f"{'task':>6} {'its ω=1':>9} {'its predicted':>14} {'ms ω=1':>8} {'ms predicted':>13}  setting")
    for index, task in enumerate(Diffusion(n_range=(12, 40), contrast_range=(0.2, 2.5)).eval_tasks(args.tasks)):
        mine = LinearSystem(task.A, task.b)      # only A and b: no family, no hand-made features
        A, b = mine.petsc(PETSc.COMM_SELF)
        ksp = my_solver(A)
        x = A.createVecRight()
        begin = time.perf_counter()
        ksp.solve(b, x)
        default_seconds, default_iterations = time.perf_counter() - begin, ksp.getIterationNumber()

        x.set(0.0)
        begin = time.perf_counter()
        setting = meta.predict(mine)          # operator features + the network, inside the timing
        with MetaSolver.apply(setting, ksp, x):
            ksp.solve(b, x)
        seconds = time.perf_counter() - begin
        shown = ", ".join(f"{name} = {value:.4f}" if isinstance(value, float) else name for name, value in setting.items())
        print(f"{index:>6} {default_iterations:>9} {ksp.getIterationNumber():>14} {1e3 * default_seconds:>8.2f} "
              f"{1e3 * seconds:>13.2f}  {shown}")
        ksp.destroy()


if __name__ == "__main__":
    main()
