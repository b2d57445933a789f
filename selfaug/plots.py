"""PNG plots of an evaluation report and of runs' metrics.jsonl (matplotlib, no display; docs/design.md, "Stage 3")."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, out_dir: str) -> list[str]:
    paths = []
    models = report["models"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, r in models.items():
        if "rag_accuracy" in r:
            ax.scatter(r["ifeval"]["strict_prompt_acc"], r["rag_accuracy"], s=60)
            ax.annotate(name, (r["ifeval"]["strict_prompt_acc"], r["rag_accuracy"]), textcoords="offset points",
                        xytext=(5, 5))
    ax.set_xlabel("IFEval strict prompt-level accuracy (general ability)")
    ax.set_ylabel("RAG task accuracy")
    ax.set_title("Task accuracy vs instruction following")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, "tradeoff.png"))
    runs = {name: r for name, r in report.get("runs", {}).items()}
    if runs:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for name, run_dir in runs.items():
            path = os.path.join(run_dir, "metrics.jsonl")
            if not os.path.exists(path):
                continue
            rows = [json.loads(line) for line in open(path)]
            steps = [r["step"] for r in rows]
            for ax, key in zip(axes, ("loss", "nll", "kl")):
                ax.plot(steps, [r[key] for r in rows], label=name)
        for ax, key in zip(axes, ("loss", "NLL (response)", "KL (prompt, stored teacher)")):
            ax.set_title(key)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend()
        paths.append(_save(fig, out_dir, "curves.png"))
    return paths


def plot_sweep(points: list[dict], out_dir: str) -> str:
    """points: {"label", "rag_accuracy", "ifeval", "drift_kl"}; accuracy against drift and IFEval."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in points:
        axes[0].scatter(p["drift_kl"], p["rag_accuracy"], s=50)
        axes[0].annotate(p["label"], (p["drift_kl"], p["rag_accuracy"]), textcoords="offset points", xytext=(4, 4))
        axes[1].scatter(p["ifeval"], p["rag_accuracy"], s=50)
        axes[1].annotate(p["label"], (p["ifeval"], p["rag_accuracy"]), textcoords="offset points", xytext=(4, 4))
    axes[0].set_xlabel("drift: KL(base || fine-tuned) per token")
    axes[1].set_xlabel("IFEval strict prompt-level accuracy")
    for ax in axes:
        ax.set_ylabel("RAG task accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("SelfAug trade-off: alpha sweep and KL position ablation")
    return _save(fig, out_dir, "sweep.png")


def _save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
