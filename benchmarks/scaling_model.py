"""[scaling_model] A measured model of one training step, validated on 1 and 2 ranks, extrapolated to 1024.

One SPMD step on P ranks with a global batch of B tasks (b = B/P per rank) takes

    T(P, B) = S(P, B) + R(B) + C(P, B)

- S, the solve phase, ends when the slowest worker ends. Item i (one task's 1 + Q solves) takes
  t_i, drawn from the per-family distribution measured here. Static schedule: contiguous blocks,
  S = E[max_w Σ_{i in block w} t_i]. Balanced: longest-expected-first with the costs known from
  earlier visits, S = E[LPT makespan]. Both by Monte Carlo over random batches.
- R, the work besides the solves, fitted to in-process measurements at several B, in two
  parts: the rest, r0 + r1·B (network forward and backward, the estimate's arithmetic,
  bookkeeping, optimizer), always repeated by every rank; and the surrogate's work,
  W = w0 + w1·max(B, m) + w2·B: its update on a minibatch of the current batch topped up from
  the replay buffer to m = `batch_size` rows (measured with the buffer full), and its gradient
  at each of the B tasks. As built, the update (w0 + w1·max(B, m)) is one more item of the
  executor round, placed by the schedule like a solve (S includes it), and the gradient part
  w2·B is repeated; R still grows with the *global* batch, so under weak scaling it grows with P.
- C, the all-gather of the results: mpi4py's `allgather` of Python objects is two MPI
  collectives (sizes, then bytes), each costing α⌈log2 P⌉ + β(P−1)/P·n for n bytes (recursive
  doubling / ring; Thakur, Rabenseifner & Gropp, "Optimization of collective communication
  operations in MPICH", IJHPCA 19(1), 2005), plus unpickling all B results on every rank (u per
  item, measured): C = 2α⌈log2 P⌉ + β(P−1)/P·B·m + u·B, with m bytes per item (measured).
  InfiniBand constants: EDR (100 Gb/s) gives ~1 µs MPI latency and ~12 GB/s bandwidth in the OSU
  micro-benchmarks (mvapich.cse.ohio-state.edu/performance); we take α = 2 µs, β = 1/(10 GB/s).

Splitting (`[surrogate] chunk_rows`, built) instead runs the update on every rank and divides the
per-row part of W by P — every rank still
pays the per-pass overhead w0 (measured here: on 2 ranks a 64-row chunk costs most of what the
128-row pass did, so the split does not pay at this size) — and adds, per optimizer step of the surrogate,
two allreduces of its N_s int64 gradient words (exponent maxima, then fixed-point sums;
`metasolve.method.exact_sum`), 2·[2α⌈log2 P⌉ + 2β(P−1)/P·8·N_s], and one all-gather of the B·d
gradient rows, α⌈log2 P⌉ + β(P−1)/P·8·B·d. The rest stays repeated.
Weak-scaling efficiency is E(P) = T(1, b) / T(P, P·b); with the split it can exceed 1, because the
update's fixed cost (a minibatch of m rows whatever b) is then shared by the P ranks.

Validation on this machine (2 cores): the per-item distribution's shape comes from the
in-process measurement, scaled to the mean solve time per item of the 1-rank run of
[mpi_throughput]; R from that run; the all-gather from the time measured in each run (shared
memory, not InfiniBand); compute slows by P/capacity beyond one rank (capacity = the measured
2-rank ceiling for pure solves). Not
modelled: rank-to-rank speed differences on a cluster, node memory-bandwidth contention (here
2 ranks on 2 cores reached 1.87x, i.e. 6.5% per-core loss), OS noise, stale cost estimates.

Timing of machinery: it builds experiments and steps their trainers (the library's internals)
to time the parts of a step (`tests/test_benchmarks_measure_product.py`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import resources
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import mpi_throughput
from benchmarks.mpi_step import finish, instrument
from metasolve.app.config import override, parse_config
from metasolve.app.experiment import build_experiment
from metasolve.training.parallel import SerialExecutor, block, longest_first
from metasolve.app.report import markdown_table

ALPHA = 2e-6          # s per message, EDR InfiniBand MPI latency with software overhead
BETA = 1.0 / 10e9     # s per byte, EDR InfiniBand (~12 GB/s measured by OSU; rounded down)
RANKS = [2 ** k for k in range(11)]
TRIALS = 40
EFFICIENCY_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
"""Batch sizes per rank in the efficiency table."""

def demo_config(tasks: int) -> dict:
    """The job `make demo` runs (`metasolve/app/demo.toml`: Bratu, SNES Newton, learned initial
    guess, batch 8), with `tasks` training tasks."""
    text = resources.files("metasolve.app").joinpath("demo.toml").read_text()
    return override(parse_config(text, "metasolve/app/demo.toml"), {"problem.train_tasks": tasks, "train.steps": 1})


def heterogeneous_config(tasks: int) -> dict:
    """[mpi_throughput]'s heterogeneous family, the one measured on 1 and 2 ranks."""
    text = mpi_throughput.HETEROGENEOUS.format(steps=1, tasks=tasks, schedule="balanced", chunk_rows=0)
    return parse_config(text, "<scaling model>")


FAMILIES = {"demo (Bratu 25x25, SNES Newton, u0)": (demo_config, 8),
            "diffusion 12-40 (SOR omega)": (heterogeneous_config, 16)}


def _experiment(make_config: Callable[[int], dict], tasks: int, batch: int):
    config = make_config(tasks)
    config["train"]["batch_size"] = batch
    torch.set_num_threads(1)
    return config, build_experiment(config, SerialExecutor())


def item_seconds(make_config: Callable[[int], dict], tasks: int) -> np.ndarray:
    """Seconds of one batch item (a task's centre and query solves, as in training), per task:
    the fastest of 3 repeats after a first visit that builds the task's PETSc objects."""
    _, experiment = _experiment(make_config, tasks, 1)
    box, meta = experiment.blackbox, experiment.meta_solver
    seconds = []
    with torch.no_grad():
        for task in experiment.train_tasks:
            theta = meta(task.features[None, :].to(torch.float64))
            box(theta, [task])
            best = math.inf
            for _ in range(3):
                begin = time.perf_counter()
                box(theta, [task])
                best = min(best, time.perf_counter() - begin)
            seconds.append(best)
    return np.array(seconds)


def replicated_seconds(make_config: Callable[[int], dict], batches: list[int], steps: int = 3) -> tuple[dict, int, dict]:
    """Per-step seconds of the work besides the solves — the surrogate's, and the rest — at each global
    batch size (in-process), with the bytes of one item's result and the
    sizes the split's collectives move."""
    seconds: dict[str, list[float]] = {"rest": [], "surrogate": []}
    for batch in batches:
        config, experiment = _experiment(make_config, max(batch, 16), batch)
        trainer = experiment.trainer
        trainer.progress = False
        # Warm-up: first visits build PETSc objects, and the surrogate's replay buffer fills to its
        # minibatch size, so the update is measured at its steady-state cost.
        surrogate = getattr(experiment.blackbox.estimator, "surrogate", None)
        warm_up = 1 + (-(-surrogate.batch_size // batch) if surrogate is not None else 0)
        trainer.fit(experiment.train_tasks, warm_up, batch)
        parts, _ = instrument(experiment, experiment.blackbox.executor)
        history = trainer.fit(experiment.train_tasks, warm_up + steps, batch)[warm_up:]
        parts = finish(parts, history)
        seconds["surrogate"].append(parts["surrogate"] / steps)
        seconds["rest"].append((sum(parts.values()) - parts["solve"] - parts["gather"] - parts["surrogate"]) / steps)
    per_point = 1 + config["estimator"]["tangents"]
    item_bytes = len(pickle.dumps(([0.1] * per_point, 0.1), protocol=pickle.HIGHEST_PROTOCOL))
    sizes = {"network": sum(p.numel() for p in experiment.meta_solver.parameters()),
             "theta": experiment.blackbox.space.dim,
             "surrogate": sum(p.numel() for p in surrogate.net.parameters()) if surrogate is not None else 0,
             "surrogate_steps": surrogate.steps if surrogate is not None else 0,
             "surrogate_rows": surrogate.batch_size if surrogate is not None else 0}
    return {k: np.array(v) for k, v in seconds.items()}, item_bytes, sizes


def nonnegative_least_squares(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Coefficients ≥ 0 (a cost has no negative part) minimising ‖design·c − target‖."""
    from scipy.optimize import nnls

    return nnls(design, np.asarray(target, dtype=float))[0]


def unpack_seconds_per_item(item_bytes: int, items: int = 4096) -> float:
    data = pickle.dumps([[0.1] * max(1, (item_bytes - 20) // 9)] * items, protocol=pickle.HIGHEST_PROTOCOL)
    begin = time.perf_counter()
    for _ in range(5):
        pickle.loads(data)
    return (time.perf_counter() - begin) / 5 / items


def solve_phase(times: np.ndarray, ranks: int, batch: int, schedule: str, rng: np.random.Generator,
                extra: float = 0.0) -> float:
    """E[slowest worker's time in the executor round] over random batches drawn from the measured
    item times, plus one `extra` item (the surrogate update the round also runs; last, for the
    static blocks). Exact on one rank; fewer draws for big batches, whose maximum varies less."""
    if ranks == 1:
        return batch * float(times.mean()) + extra
    spans = []
    for _ in range(max(5, min(TRIALS, 4096 // batch))):
        costs = rng.choice(times, size=batch).tolist() + ([extra] if extra else [])
        batch_items = len(costs)
        if schedule == "static":
            spans.append(max(sum(costs[block(batch_items, ranks, w).start:block(batch_items, ranks, w).stop])
                             for w in range(ranks)))
        else:
            spans.append(max(sum(costs[i] for i in worker) for worker in longest_first(costs, ranks)))
    return float(np.mean(spans))


class StepModel:
    """T(P, B) for one family from its measured inputs (see the module docstring). `fits` holds the
    coefficients (r0, r1) of "rest" and (w0, w1, w2) of "surrogate"; `sizes` what the collectives move."""

    def __init__(self, times: np.ndarray, fits: dict[str, tuple[float, float]], item_bytes: int, unpack: float,
                 sizes: dict, alpha: float = ALPHA, beta: float = BETA) -> None:
        self.times, self.fits = times, fits
        self.item_bytes, self.unpack, self.sizes = item_bytes, unpack, sizes
        self.alpha, self.beta = alpha, beta

    def _collective(self, ranks: int, words: float, reduce: bool) -> float:
        """One allreduce (Rabenseifner: latency log P, twice the bandwidth term) or all-gather of 8-byte words."""
        lg = math.ceil(math.log2(ranks))
        return (2 if reduce else 1) * (self.alpha * lg + self.beta * (ranks - 1) / ranks * 8 * words)

    def gather(self, ranks: int, batch: int) -> float:
        if ranks == 1:
            return 0.0
        lg = math.ceil(math.log2(ranks))
        return 2 * self.alpha * lg + self.beta * (ranks - 1) / ranks * batch * self.item_bytes + self.unpack * batch

    def update(self, batch: int) -> float:
        """The surrogate update's seconds (its minibatch: max(B, m) rows)."""
        _, w1, _ = self.fits["surrogate"]
        return self.fits["surrogate"][0] + w1 * max(batch, self.sizes.get("surrogate_rows", 0))

    def replicated(self, ranks: int, batch: int, split: bool) -> float:
        """Work besides the executor round: the rest, the surrogate's gradient at the B tasks, and —
        split — every rank's share of the update with its collectives."""
        (r0, r1), (w0, w1, w2) = self.fits["rest"], self.fits["surrogate"]
        rest = r0 + r1 * batch
        if not split or ranks == 1:
            return rest + w2 * batch + (self.update(batch) if split else 0.0)
        collectives = (self.sizes["surrogate_steps"] * 2 * self._collective(ranks, 1 + self.sizes["surrogate"], True)
                       + self._collective(ranks, batch * self.sizes["theta"], False))
        rows = w1 * max(batch, self.sizes.get("surrogate_rows", 0)) + w2 * batch
        return rest + w0 + rows / ranks + collectives  # every rank still pays the per-pass overhead w0

    def step(self, ranks: int, batch: int, schedule: str, split: bool = False, seed: int = 0) -> float:
        """Scheduled (`split = False`, the default): the update is one more item of the round."""
        extra = 0.0 if split else self.update(batch)
        solve = solve_phase(self.times, ranks, batch, schedule, np.random.default_rng(seed), extra)
        return solve + self.replicated(ranks, batch, split) + self.gather(ranks, batch)

    def efficiency(self, ranks: int, per_rank: int, schedule: str, split: bool) -> float:
        return self.step(1, per_rank, schedule, split) / self.step(ranks, ranks * per_rank, schedule, split)


def validate(model_inputs: dict, throughput: dict) -> list[dict]:
    """Model vs measured steps/s on the ranks [mpi_throughput] ran, heterogeneous family (strong scaling, B = 16),
    the surrogate update scheduled or split. Collectives over shared memory are taken as free."""
    raw = throughput["raw"]
    family = next(k for k in raw if k.startswith("diffusion")).split("|")[0]
    serial = raw[f"{family}|1|static|0"]
    parts = serial["per_rank"][0]["parts"]
    steps = serial["steps"]
    times, batch = model_inputs["times"], 16
    scale = parts["solve"] / steps / batch / times.mean()  # this run's load, not the in-process one's
    rest = (sum(parts.values()) - parts["solve"] - parts["gather"] - parts["surrogate"]) / steps
    surrogate = parts["surrogate"] / steps
    capacity = throughput["machine_capacity"]
    rows = []
    for key, run in raw.items():
        name, ranks, schedule, chunk_rows = key.split("|")
        ranks = int(ranks)
        if name != family:
            continue
        slow = 1.0 if ranks == 1 else ranks / capacity
        fits = {"rest": (rest * slow, 0.0), "surrogate": (surrogate * slow, 0.0, 0.0)}
        model = StepModel(times * scale * slow, fits, 0, 0.0, {"surrogate": 0, "surrogate_steps": 0, "theta": 0},
                          alpha=0.0, beta=0.0)
        predicted = (model.step(ranks, batch, schedule, split=chunk_rows != "0")
                     + (run.get("allgather_seconds", 0.0) if ranks > 1 else 0.0))
        measured = run["seconds"] / run["steps"]
        rows.append({"ranks": ranks, "schedule": schedule, "surrogate update": "split" if chunk_rows != "0" else "scheduled",
                     "measured_steps_per_s": 1 / measured, "model_steps_per_s": 1 / predicted,
                     "error": f"{100 * (measured / predicted - 1):+.0f}%"})
    return rows


def run(out: Path, quick: bool = False) -> dict:
    tasks = 24 if quick else 96
    batches = [8, 32, 256] if quick else [8, 32, 128, 256]
    models, inputs = {}, {}
    for name, (make_config, _) in FAMILIES.items():
        times = item_seconds(make_config, tasks)
        seconds, item_bytes, sizes = replicated_seconds(make_config, batches)
        b = np.array(batches, dtype=float)
        slope, intercept = np.polyfit(b, seconds["rest"], 1)
        design = np.stack([np.ones_like(b), np.maximum(b, sizes["surrogate_rows"]), b], axis=1)
        fits = {"rest": (max(float(intercept), 0.0), max(float(slope), 0.0)),
                "surrogate": tuple(max(float(c), 0.0) for c in nonnegative_least_squares(design, seconds["surrogate"]))}
        unpack = unpack_seconds_per_item(item_bytes)
        models[name] = StepModel(times, fits, item_bytes, unpack, sizes)
        inputs[name] = {"times": times, "item_ms_mean": 1e3 * times.mean(), "item_ms_p10_p90":
                        [1e3 * float(np.percentile(times, 10)), 1e3 * float(np.percentile(times, 90))],
                        "max_over_min": float(times.max() / times.min()),
                        "measured_ms": {k: (1e3 * v).tolist() for k, v in seconds.items()}, "batches": batches,
                        "fits_seconds": fits,
                        "item_bytes": item_bytes, "unpack_us_per_item": 1e6 * unpack, "sizes": sizes}
    results_json = out / "mpi_throughput.json"
    throughput = json.loads(results_json.read_text()) if results_json.exists() else None
    if throughput is None or "raw" not in throughput:
        throughput = mpi_throughput.run(out, quick=quick)
    validation = validate(inputs[list(FAMILIES)[1]], throughput)
    errors = [abs(float(r["error"].rstrip("%"))) for r in validation if r["ranks"] > 1]

    curves, rows, thresholds = {}, [], []
    for name, (_, per_rank) in FAMILIES.items():
        model = models[name]
        for schedule in ("static", "balanced"):
            for split in (False, True):
                label = f"{name}, {schedule}, surrogate update {'split' if split else 'scheduled'}"
                curves[label] = [model.efficiency(p, per_rank, schedule, split) for p in RANKS]
        for p in (256, 1024):
            row = {"family": name, "ranks": p, "batch_per_rank": per_rank}
            for schedule in ("static", "balanced"):
                for split in (False, True):
                    row[f"{schedule}{'+split' if split else ''}"] = f"{100 * model.efficiency(p, per_rank, schedule, split):.0f}%"
            rows.append(row)
        for p in (256, 1024):
            for split in (False, True):
                row = {"family": name, "ranks": p, "surrogate update": "split" if split else "scheduled"}
                row.update({f"b={b}": f"{100 * model.efficiency(p, b, 'balanced', split):.0f}%" for b in EFFICIENCY_BATCHES})
                thresholds.append(row)
    _plot(curves, out / "scaling_model.png")
    demo = models[list(FAMILIES)[0]]
    demo_256 = demo.efficiency(256, 8, "balanced", True)
    demo_256_built = demo.efficiency(256, 8, "balanced", False)
    input_rows = []
    for k, v in inputs.items():
        (r0, r1), (w0, w1, w2) = v["fits_seconds"]["rest"], v["fits_seconds"]["surrogate"]
        m = v["sizes"]["surrogate_rows"]
        input_rows.append({"family": k, "item_ms_mean": v["item_ms_mean"], "item_max/min": v["max_over_min"],
                           "rest_ms": f"{1e3 * r0:.2f} + {1e3 * r1:.4f} B",
                           "surrogate_ms": f"{1e3 * w0:.2f} + {1e3 * w1:.4f} max(B, {m}) + {1e3 * w2:.4f} B",
                           "bytes_per_item": v["item_bytes"],
                           "params (network, surrogate)": f"{v['sizes']['network']}, {v['sizes']['surrogate']}"})
    markdown = (
        "Model (derivation in `benchmarks/scaling_model.py`): T(P, B) = S(P, B) + R(B) + C(P, B), solve "
        "phase S by Monte Carlo over the measured per-item times (static blocks or longest-first), "
        "work besides the solves R = rest + the surrogate's work (its gradient at each task and its update: "
        "what `[surrogate] chunk_rows` splits across ranks, with an all-gather and two fixed-point allreduces "
        "per surrogate step), each fitted in-process, all-gather C with InfiniBand EDR constants "
        f"α = {ALPHA * 1e6:g} µs, β = 1/{1 / BETA / 1e9:g} GB/s (OSU micro-benchmarks; Thakur et al. 2005 "
        "cost models). Weak scaling: the batch per rank stays fixed.\n\n"
        f"Measured inputs (in-process, shared machine):\n\n{markdown_table(input_rows)}\n\n"
        f"Validation against [mpi_throughput] (heterogeneous family, batch 16, same run's 1-rank "
        f"numbers as the model's inputs):\n\n{markdown_table(validation)}\n\n"
        f"Model error beyond one rank: up to {max(errors) if errors else float('nan'):.0f}%.\n\n"
        f"Weak-scaling efficiency (model):\n\n{markdown_table(rows)}\n\n"
        f"Demo-sized batch (8 per rank) at 256 ranks, balanced: **{100 * demo_256_built:.0f}%** with the "
        f"surrogate update scheduled as one item (the default; its minibatch grows with the global batch), "
        f"**{100 * demo_256:.0f}%** with it split across ranks (goal >= 85%: "
        f"{'met' if demo_256 >= 0.85 else 'missed'} with the split, "
        f"{'met' if demo_256_built >= 0.85 else 'missed'} scheduled).\n\n"
        f"Modelled efficiency by batch per rank b (balanced schedule). It is not monotone in b: fixed costs "
        f"per step (the surrogate's minibatch of 128 rows) weigh on small b, and the work every rank repeats "
        f"per task of the *global* batch caps it at large b near t/(t + r1·P) for a solve item of t "
        f"seconds:\n\n"
        f"{markdown_table(thresholds)}\n\n![efficiency](scaling_model.png)\n")
    return {"summary": rows, "validation": validation, "thresholds": thresholds, "inputs":
            {k: {kk: vv for kk, vv in v.items() if kk != "times"} for k, v in inputs.items()},
            "item_seconds": {k: v["times"].tolist() for k, v in inputs.items()},
            "curves": {"ranks": RANKS, **curves}, "demo_256_split": demo_256, "demo_256_as_built": demo_256_built,
            "markdown": markdown}


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, family in zip(axes, FAMILIES):
        for label, values in curves.items():
            if label.startswith(family):
                axis.plot(RANKS, values, marker="o", label=label[len(family) + 2:])
        axis.axhline(0.8, color="grey", lw=0.8, ls="--")
        axis.set(xscale="log", xlabel="ranks (weak scaling)", title=family, ylim=(0, 1.05))
        axis.legend(fontsize=8)
    axes[0].set_ylabel("parallel efficiency (model)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
