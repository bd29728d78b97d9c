"""[scale_ranks] The largest size with each task solved on 2 ranks (issue 23).

`benchmarks.scale` solves every task on one rank. At 10⁶ unknowns a PETSc user runs each solve
on several ranks, so here every method of that section (zero guess, grid sequencing k = 2..4,
continuation from the nearest solved task, Fischer/POD Krylov guesses, the learned guess) solves
the n = 1025 tasks with each solve on both ranks of `mpiexec -n 2`: the DMDA Newton driver on
COMM_WORLD (`solvers.dmda_snes`, the problem's callbacks fed by a gather), GAMG-preconditioned
Krylov inside Newton. The learned guess is trained exactly as in `scale` (the family's config
through `metasolve.app.run.run`, one rank, on the coarse grid), saved, and loaded by the ranks;
its training is counted in the break-even as there. Times: the slowest rank's wall time and the
CPU time summed over both ranks (every rank computes the deployed guess: counted twice).

On this 2-core machine both ranks share the cores with nothing else only when it is quiet; the
wall column says how much 2 ranks bought, the CPU column what the solve cost.
Results: benchmarks/results/scale_ranks.{md,json}.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.scale import FAMILIES, Nonlinear, measure_size, summarize_size, train, verdict
from metasolve.app.report import markdown_table

RANKS = 2
SIZE = 1025
QUICK_SIZE = 65
REPO = Path(__file__).resolve().parent.parent


def measure_on_ranks(spec: Nonlinear, trained: dict, n: int, count: int) -> dict[str, Any]:
    """`scale.measure_size` under `mpiexec -n RANKS`, each solve on all ranks; the per-size record."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-ranks-") as directory:
        model, record = Path(directory) / "meta_solver.pt", Path(directory) / "size.json"
        trained["meta"].save(model)
        family = trained["family"]
        job = {"spec": spec.name, "model": str(model), "family": family.key, "parameters": family.parameters,
               "n": n, "count": count, "out": str(record)}
        subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", str(RANKS), sys.executable, "-m",
                        "benchmarks.scale_ranks", json.dumps(job)], cwd=REPO, check=True, timeout=3600)
        return json.loads(record.read_text())


def _ranks_main(job: dict[str, Any]) -> None:
    """One rank of the `mpiexec` job: the same tasks and guess on every rank, each solve collective."""
    from metasolve.method.meta_solver import MetaSolver
    from problems import FAMILIES as REGISTRY
    from solvers._petsc import PETSc

    spec = next(s for s in FAMILIES if s.name == job["spec"])
    family = REGISTRY[job["family"]](**job["parameters"])
    trained = {"spec": spec, "family": family, "meta": MetaSolver.load(job["model"])}
    size = measure_size(job["n"], job["count"], trained, comm=PETSc.COMM_WORLD)
    if PETSc.COMM_WORLD.getRank() == 0:
        Path(job["out"]).write_text(json.dumps(size))


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    rows, sections = [], []
    for spec in FAMILIES:
        trained = train(spec, quick)
        n, count = (QUICK_SIZE, 2) if quick else (SIZE, spec.sizes[SIZE])
        family_rows = summarize_size(measure_on_ranks(spec, trained, n, count), trained)
        rows += family_rows
        sections += [f"## {spec.name}, n = {n}, each solve on {RANKS} ranks",
                     f"Guess trained once at n = {trained['family'].n} through `run` "
                     f"(`examples/{spec.config.name}`): {trained['cpu']:.1f} s CPU, {trained['solves']} solves; "
                     f"Newton-Krylov {spec.krylov}.",
                     markdown_table(family_rows), verdict(family_rows, smallest=0 if quick else 250_000)]
    return {"summary": rows, "markdown": "\n\n".join(sections)}


if __name__ == "__main__":
    _ranks_main(json.loads(sys.argv[1]))
