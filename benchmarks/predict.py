"""[predict] `metasolve predict` in a job script: a cold call per run, and a table of runs in one call.

A legacy run takes a fraction of a second (heat_stepper: 0.15–0.2 s), so the prediction in front
of it must cost less than that run, start-up included: a fresh process, as a job script starts
it. Measured from outside, the whole process (interpreter start, imports, loading the plain
model, features, the network, writing the options file), median of repeated calls:

- one run, through the `metasolve` console script and through the smallest Python entry
  (`run_predict` imported directly: what the command costs once its CLI imports lazily);
- a table of 1,000 runs in one call (`--table`, one options file per run plus the index).

The model is the size the configs train (MLP 4 → 64 → 64 → 1 on a run's argument features, an
SOR ω) with the training solver's options recorded, so every options file carries the base
options and the Richardson monitor as in deployment.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metasolve import Interval, MetaSolver, Space
from metasolve.app.predict import Delivery, save_for_program
from metasolve.app.report import markdown_table
from solvers import ArgumentFeatures

FEATURES = ArgumentFeatures(("n", "kappa", "dt", "contrast"), log=("n", "kappa", "dt"))
BASE = {"ksp_type": "richardson", "pc_type": "sor", "pc_sor_forward": None, "ksp_norm_type": "unpreconditioned",
        "ksp_rtol": 1e-6, "ksp_atol": 1e-50, "ksp_divtol": 1e4, "ksp_max_it": 10_000}
REPO = Path(__file__).resolve().parents[1]
ARGUMENTS = ["-n", "48", "-kappa", "0.7", "-dt", "0.004", "-contrast", "1.0"]


def model(directory: Path) -> Path:
    torch.manual_seed(0)
    meta = MetaSolver(4, Space({"pc_sor_omega": Interval(1.0, 1.98)}), hidden=64, depth=2)
    with torch.no_grad():
        meta.net[-1].weight.normal_(0, 0.1)
    path = directory / "heat.pt"
    save_for_program(path, meta, Delivery(FEATURES, prefix="heat_", base_options=BASE))
    return path


def table(path: Path, runs: int) -> Path:
    rng = np.random.default_rng(0)
    lines = ["id,n,kappa,dt,contrast"] + [
        f"run{i:05d},{rng.integers(16, 96)},{10 ** rng.uniform(-1, 1):.4g},{10 ** rng.uniform(-3, -1):.4g},"
        f"{rng.uniform(0, 1.5):.3g}" for i in range(runs)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str], out: Path, repeats: int) -> dict:
    """Wall and CPU seconds (user + system of the child) of `repeats` fresh processes, each writing
    into a fresh directory `out/<i>` as a job would, after one warm-up for the file cache; or the
    error of a command that failed (e.g. a CLI without that option yet). `{out}` in `command`
    is replaced by each call's directory."""
    wall, cpu = [], []
    for i in range(repeats + 1):
        argv = [str(out / str(i)) if part == "{out}" else part for part in command]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            return {"error": (result.stderr.strip().splitlines() or ["no message"])[-1][:200]}
        if i:
            wall.append(elapsed)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall),
            "cpu_median": statistics.median(cpu), "repeats": repeats}


def run(out: Path, quick: bool = False) -> dict:
    repeats = 3 if quick else 15
    runs = 100 if quick else 1000
    scratch = Path(tempfile.mkdtemp(prefix="predict-bench-"))
    try:
        path = model(scratch)
        runs_csv = table(scratch / "runs.csv", runs)
        console = shutil.which("metasolve", path=str(Path(sys.executable).parent)) or "metasolve"
        entry = ("import sys; from pathlib import Path; from metasolve.app.predict import run_predict; "
                 "sys.exit(run_predict(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or None, "
                 "None, None, None, None))")
        entry_table = ("import sys; from pathlib import Path; from metasolve.app.predict import run_predict; "
                       "sys.exit(run_predict(Path(sys.argv[1]), Path(sys.argv[2]), None, Path(sys.argv[3]), "
                       "None, None, None))")
        measured = {
            "python start-up (`python -c pass`)": timed([sys.executable, "-c", "pass"], scratch / "none", repeats),
            "one run, `run_predict` entry": timed([sys.executable, "-c", entry, str(path), "{out}", *ARGUMENTS],
                                                  scratch / "one", repeats),
            "one run, `metasolve predict`": timed([console, "predict", str(path), "--out", "{out}", "--", *ARGUMENTS],
                                                  scratch / "cli", repeats),
            f"{runs} runs, `run_predict` entry, --table": timed(
                [sys.executable, "-c", entry_table, str(path), "{out}", str(runs_csv)], scratch / "table", repeats),
            f"{runs} runs, `metasolve predict --table`": timed(
                [console, "predict", str(path), "--out", "{out}", "--table", str(runs_csv)], scratch / "cli_table",
                repeats),
        }
        written = len(list((scratch / "table" / "1").glob("*/metasolve.opts")))
        load = os.getloadavg()[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    goals = {"one run": 0.5, "runs": 2.0}
    rows = []
    for name, m in measured.items():
        goal = next((g for key, g in goals.items() if key in name), None)
        if "error" in m:
            rows.append({"call (fresh process)": name, "wall median s": "failed", "wall min–max s": m["error"],
                         "CPU median s": "", "goal s": goal if goal is not None else "", "met": ""})
            continue
        rows.append({"call (fresh process)": name, "wall median s": round(m["median"], 3),
                     "wall min–max s": f"{m['min']:.3f}–{m['max']:.3f}", "CPU median s": round(m["cpu_median"], 3),
                     "goal s": goal if goal is not None else "", "met": "" if goal is None else
                     ("yes" if m["median"] < goal else "no")})
    markdown = "\n".join([
        f"A fresh process per call, as a job script starts it; median of {repeats} calls after one warm-up "
        f"({'quick run' if quick else 'full run'}). Model: MLP 4 → 64 → 64 → 1 (SOR ω) read from its plain twin "
        f"`heat.plain.npz`; every options file carries the training solver's options and the Richardson monitor. "
        f"The table route wrote {written} options files and the index in one call. Load average when the "
        f"measurement ended: {load:.1f} on {os.cpu_count()} cores (shared machine: the wall time includes waiting "
        "for a core; the CPU time, user + system of the process, does not).",
        "",
        markdown_table(rows),
        "",
        "`metasolve predict` adds what the `metasolve` command imports before it dispatches to "
        "`metasolve.app.predict.run_predict`; the `run_predict` entry is the deploy path itself (numpy only: "
        "tests/test_deploy_plain.py checks that neither torch nor PETSc is imported).",
    ])
    return {"summary": rows, "measured": measured, "markdown": markdown}
