"""PNG plots of an evaluation report and of runs' metrics.jsonl (matplotlib, no display; docs/design.md, "Stage 3")."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, out_dir: str) -> list[str]:
    """tradeoff.png (what a run keeps against what it learns, one point per model, base included) and
    curves.png (the runs' training curves)."""
    paths = []
    points = [{"label": name, "accuracy": r.get("rag_strict_accuracy", r["rag_accuracy"]), "drift_kl": r["drift_kl"],
               "instruction": r["ifeval"]["strict_instruction_acc"]}
              for name, r in report["models"].items() if "rag_accuracy" in r]
    if points:
        paths.append(plot_tradeoff(points, out_dir))
    runs = {name: r for name, r in report.get("runs", {}).items()}
    if runs:
        paths.append(plot_curves(runs, out_dir))
    return paths


def plot_curves(runs: dict, out_dir: str, name: str = "curves.png") -> str:
    """The runs' training curves (metrics.jsonl): loss, NLL, KL with each run's drift budget as a dashed
    line of its colour, and alpha (steered by the controller under a budget)."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for label, run_dir in runs.items():
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("loss", "nll", "kl", "alpha")):
            line, = ax.plot(steps, [r[key] for r in rows], label=label)
            if key == "kl" and rows and rows[-1].get("drift_budget"):
                ax.axhline(rows[-1]["drift_budget"], color=line.get_color(), linestyle="--",
                           label=f"{label}: budget")
    for ax, key in zip(axes, ("loss", "NLL (response)", "KL (prompt, stored teacher)", "alpha")):
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, out_dir, name)


def plot_tradeoff(points: list[dict], out_dir: str, name: str = "tradeoff.png") -> str:
    """points: {"label", "accuracy" (strict RAG), "drift_kl", "instruction" (IFEval strict, instruction level)}:
    task accuracy against drift and against instruction following."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in points:
        for ax, x in zip(axes, (p["drift_kl"], p["instruction"])):
            ax.scatter(x, p["accuracy"], s=50)
            ax.annotate(p["label"], (x, p["accuracy"]), textcoords="offset points", xytext=(4, 4))
    axes[0].set_xlabel("drift: KL(base || fine-tuned) per token (lower keeps more)")
    axes[1].set_xlabel("IFEval strict instruction-level accuracy")
    for ax in axes:
        ax.set_ylabel("RAG accuracy, strict (no other document's answer)")
        ax.grid(alpha=0.3)
    fig.suptitle("What each run learns (RAG) against what it keeps (drift, instruction following)")
    return _save(fig, out_dir, name)


def _save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
