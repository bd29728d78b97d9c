"""Run the benchmark sections and write `benchmarks/results/<section>.{json,md}` plus an index.

Every section compares methods side by side in one run (ratios, medians over seeds), because
wall-clock numbers on shared machines drift between runs.

A repository command (`python -m benchmarks`, `make bench`): the benchmarks and their results
live in the repository, not in the installed package, and the package never imports them. A
section that trains a predictor starts from a shipped config (`examples/*.toml`,
`metasolve/app/demo.toml`), changed with `metasolve.app.config.override`, and trains it with
`metasolve.app.run.run`, the recipe `metasolve train` runs, so a benchmark measures what a config
runs; only the estimator-science and timing-of-machinery sections assemble the library's
internals (`tests/test_benchmarks_measure_product.py` holds the list and enforces it).
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ["overhead", "estimators", "estimator_training", "initial_guess", "newton", "options", "survey", "mpi_throughput", "scaling_model", "isolation", "wall_model", "executable", "heat_stepper", "discrete", "tutorials", "predict", "scale", "scale_ranks", "scale_linear", "end_to_end"]


def run_benchmarks(only: list[str] | None = None, quick: bool = False, out: Path = RESULTS) -> dict:
    """Run `only` (default: every section); each returns {"summary": [rows], "markdown": str, ...}."""
    chosen = only or SECTIONS
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; known: {SECTIONS}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in chosen:
        print(f"bench: [{name}] ...", flush=True)
        begin = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run(out, quick=quick)
        result["seconds"] = time.perf_counter() - begin
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
        (out / f"{name}.md").write_text(f"# [{name}]\n\n{result['markdown']}\n")
        print(result["markdown"], flush=True)
        results[name] = result
    _write_index(out)
    return results


def _write_index(out: Path) -> None:
    """README.md gathering every section's latest result, whichever run produced it."""
    parts = ["# metasolve benchmark results\n", "Written by `make bench` (`python -m benchmarks`); each section "
             "is the latest run of it, with its wall time in `<section>.json`.\n"]
    for name in SECTIONS:
        page = out / f"{name}.md"
        if page.exists():
            parts.append(page.read_text().replace(f"# [{name}]", f"## [{name}]", 1))
    (out / "README.md").write_text("\n".join(parts))
