"""A neural wall model trained through a PETSc SNES channel-flow solve against DNS, then checked on DNS.

Runs the config through the run layer (`metasolve.app.run.run`, what `metasolve train
examples/wall_model.toml` runs: checkpoints, metrics, report, MPI), then solves every DNS case (Hoyas & Jiménez, Re_τ 186/547/2004) at its own bulk
Reynolds number on each coarse grid with the learned model and with the laws a user would try
(log law, Spalding, Reichardt), next to the wall-resolved RANS, and prints the table: Re_τ error
against DNS per grid, and the RMS of U⁺ against DNS in the log region. Cases marked "unseen" were
never used in training.

    python examples/wall_model.py [--config examples/wall_model.toml] [--out runs/wall_model] [--steps N]

Writes `dns_table.md` and `dns_table.json` next to the run's own outputs.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from metasolve.app.config import load_config, override
from metasolve.app.report import markdown_table
from metasolve.app.run import run
from problems.channel_dns import dns_profiles
from problems.wall_model_validation import compare, error_summary, laws, table_rows

CONFIG = Path(__file__).resolve().with_name("wall_model.toml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs/wall_model"))
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    config = load_config(arguments.config)
    if arguments.steps is not None:
        config = override(config, {"train.steps": arguments.steps}, str(arguments.config))
    experiment = run(config, arguments.out, quiet=True, overwrite=True).experiment
    family = experiment.family
    theta = experiment.meta_solver.theta.detach().numpy().copy()
    grids = family.parameters["eval_grids"]
    unseen = set(family.parameters["eval_dns"])
    rows = []
    for dns in dns_profiles():
        rows += compare(dns, grids, laws(family.wall_model, theta))
    table = table_rows(rows)
    for entry in table:
        if int(entry["case"].split()[-1]) in unseen:
            entry["case"] += " (unseen)"
    summary = {case: error_summary([r for r in rows if r.case == case], grids) for case in sorted({r.case for r in rows})}
    bands = []
    for task in family.eval_tasks(len(family.eval_cases) * len(grids)):  # responses measured when the family was built
        band = family.calibration.predict([task])[0]
        bands.append({"case": task.source, "grid": task.grid_name, "DNS Re_tau": f"{task.target:.1f}",
                      "predicted": f"{band['re_tau']:.1f}", "band": f"{band['lo']:.1f} to {band['hi']:.1f}",
                      "DNS in band": "yes" if band["lo"] <= task.target <= band["hi"] else "no"})
    seconds = time.perf_counter() - begin
    text = "\n".join([
        f"## Against DNS at the DNS bulk Reynolds numbers (trained on {family.parameters['train_dns']}, "
        f"target {family.target})\n", markdown_table(table),
        "\nRe_tau error = coarse solve vs DNS; U+ RMS = root mean square of U+ - U+_DNS at the coarse cell centres "
        "with y+ >= 30 and y/h <= 0.3 (the wall-resolved row: its own 256 cells).",
        "\n## The calibration's band on the unseen case(s) (spread of the cross-validation fits and the friction "
        "law's uncertainty; prediction linearised around Spalding)\n", markdown_table(bands),
        f"\n{seconds:.0f} s in all (training and the tables).\n"])
    (arguments.out / "dns_table.md").write_text(text)
    (arguments.out / "dns_table.json").write_text(json.dumps(
        {"rows": [asdict(r) for r in rows], "summary": {str(k): v for k, v in summary.items()},
         "theta": theta.tolist(), "seconds": seconds}, indent=1, default=float))
    print(text)
    unseen_errors = np.array([r.re_tau_error for r in rows if r.case in unseen and r.model == "learned"])
    print(f"learned model on the unseen case(s): max |Re_tau error| {np.max(np.abs(unseen_errors)):.2%}; "
          f"written to {arguments.out}/")


if __name__ == "__main__":
    main()
