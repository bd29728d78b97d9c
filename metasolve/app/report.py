"""Markdown reports with PNG plots: learning curves against solver calls, iteration distributions."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metasolve.app.evaluation import summarize  # noqa: E402


def plot_learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: Path,
                         key: str = "loss", title: str = "training loss") -> Path:
    """`key` against the cumulative number of solver calls, one line per run."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in histories.items():
        axis.plot([r["solves"] for r in rows if key in r], [r[key] for r in rows if key in r], label=name)
    axis.set_xlabel("solver calls")
    axis.set_ylabel(key)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_iterations(evaluation: Mapping[str, Mapping[str, list[float]]], path: Path,
                    title: str = "iterations on unseen tasks") -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(evaluation)
    axis.boxplot([evaluation[n]["iterations"] for n in names])
    axis.set_xticks(range(1, len(names) + 1), names, rotation=20)
    axis.set_ylabel("iterations to tolerance")
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def per_task_table(evaluation: Mapping[str, Mapping[str, list]]) -> str:
    """One row per evaluation task: each method's setting and cost ("failed" where it failed)."""
    names = list(evaluation)
    first = evaluation[names[0]]
    rows = []
    for i, task in enumerate(first.get("tasks", range(len(first["iterations"])))):
        row: dict[str, Any] = {"task": task}
        for name in names:
            result = evaluation[name]
            setting = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in result.get("settings", [{}] * (i + 1))[i].items()) or "default"
            cost = "failed" if result.get("failed", [False] * (i + 1))[i] else f"{result['iterations'][i]:.4g}"
            row[name] = f"{cost} ({setting})"
        rows.append(row)
    return markdown_table(rows)


def write_report(out_dir: Path, title: str, history: Sequence[Mapping[str, Any]],
                 evaluation: Mapping[str, Mapping[str, list[float]]], notes: str = "") -> Path:
    """report.md with a before/after table and the two plots, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = plot_learning_curves({"training": history}, out_dir / "learning_curve.png")
    box = plot_iterations(evaluation, out_dir / "iterations.png")
    last = history[-1] if history else {}
    text = [f"# {title}", "", notes, "",
            f"Training: {last.get('step', 0)} steps, {last.get('solves', 0)} solver calls, "
            f"{last.get('failed_queries', 0)} failed queries and {last.get('failed_centres', 0)} failed centre solves survived.",
            "", "## Unseen evaluation tasks", "", markdown_table(summarize(evaluation)), "",
            f"![learning curve]({curve.name})", "", f"![iterations]({box.name})", "",
            "## Per task: the setting each method used and its iterations", "", per_task_table(evaluation), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text))
    return path
