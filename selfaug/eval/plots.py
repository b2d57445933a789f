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
               "instruction": r["ifeval"]["strict_instruction_acc"], "alpha": r.get("alpha"),
               "drift_budget": r.get("drift_budget")}
              for name, r in report["models"].items() if "rag_accuracy" in r]
    if points:
        paths.append(plot_tradeoff(points, out_dir))
    runs = {name: r for name, r in report.get("runs", {}).items()}
    if runs:
        paths.append(plot_curves(runs, out_dir))
    return paths


def plot_curves(runs: dict, out_dir: str, name: str = "curves.png") -> str:
    """The runs' training curves (metrics.jsonl): loss, NLL, KL with each run's drift budget as a dashed
    line of its colour (a run at alpha = 0: its monitored KL, as points), and alpha (steered by the controller
    under a budget)."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for label, run_dir in runs.items():
        path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path)]
        for ax, key in zip(axes, ("loss", "nll", "kl", "alpha")):
            have = [r for r in rows if key in r]  # the KL only where it was measured (alpha = 0: the monitor's steps)
            sparse = 0 < len(have) < len(rows)
            line, = ax.plot([r["step"] for r in have], [r[key] for r in have], label=label,
                            marker="o" if sparse else None, markersize=3)
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
    """points: {"label", "accuracy" (strict RAG), "drift_kl", "instruction" (IFEval strict, instruction level),
    optionally "alpha" and "drift_budget"}: task accuracy against drift and against instruction following.
    Runs at a fixed alpha (ordered by alpha) and runs under a drift budget (ordered by budget) are each
    joined by a line where there are two or more: the trade-off curve each knob traces."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, p in enumerate(points):
        sd = p.get("sd", {})
        for ax, key in zip(axes, ("drift_kl", "instruction")):
            ax.errorbar(p[key], p["accuracy"], xerr=sd.get(key), yerr=sd.get("accuracy"), fmt="o", ms=7, capsize=3)
            ax.annotate(p["label"], (p[key], p["accuracy"]), textcoords="offset points",  # neighbours apart
                        xytext=(6, 4 if i % 2 == 0 else -12))
    knobs = {"fixed alpha": _means(points, "alpha", lambda p: p.get("alpha") is not None and not p.get("drift_budget")),
             "drift budget": _means(points, "drift_budget", lambda p: bool(p.get("drift_budget")))}
    for knob, line in knobs.items():
        if len(line) >= 2:
            for ax, x in zip(axes, ("drift_kl", "instruction")):
                ax.plot([p[x] for p in line], [p["accuracy"] for p in line], linestyle="-" if knob == "fixed alpha"
                        else "--", alpha=0.7, label=knob)
    if any(len(line) >= 2 for line in knobs.values()):
        axes[0].legend()
    axes[0].set_xlabel("drift: KL(base || fine-tuned) per token (lower keeps more)")
    axes[1].set_xlabel("IFEval strict instruction-level accuracy")
    for ax in axes:
        ax.set_ylabel("RAG accuracy, strict (no other document's answer)")
        ax.grid(alpha=0.3)
    fig.suptitle("What each run learns (RAG) against what it keeps (drift, instruction following)")
    return _save(fig, out_dir, name)


def _means(points: list[dict], knob: str, keep) -> list[dict]:
    """The points of one knob, one per value of it (the mean of the seeds at that value), ordered by it: the
    trade-off curve the knob traces, not a line between seeds."""
    groups: dict = {}
    for p in filter(keep, points):
        groups.setdefault(p[knob], []).append(p)
    return [{key: sum(p[key] for p in ps) / len(ps) for key in ("accuracy", "drift_kl", "instruction")}
            for _, ps in sorted(groups.items())]


def plot_study_tradeoff(result: dict, out_dir: str, name: str = "study_tradeoff.png") -> str:
    """study_tradeoff.png: tradeoff.png for a study: the base and each arm's mean over its seeds, with the
    seeds' standard deviation as error bars."""
    keys = {"accuracy": "rag_strict_accuracy", "drift_kl": "drift_kl", "instruction": "ifeval_strict_instruction"}
    points = [{"label": "base", **{k: result["base"][m] for k, m in keys.items()}}]
    for arm, by in result["by_arm"].items():
        points.append({"label": f"{arm} ({result['seeds']} seeds)", **{k: by[m]["mean"] for k, m in keys.items()},
                       "sd": {k: by[m]["sd"] for k, m in keys.items()}})
    return plot_tradeoff(points, out_dir, name)


def _save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(result: dict, out_dir: str, name: str = "study.png") -> str:
    """study.png: each metric per arm, every seed's value as a dot and the mean with its standard deviation;
    the base model as a dashed line."""
    metrics = result["metrics"]
    arms = list(result["by_arm"])
    cols = min(4, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics.items()):
        for x, arm in enumerate(arms):
            s = result["by_arm"][arm][key]
            ax.scatter([x] * len(s["values"]), s["values"], s=18, alpha=0.6)
            ax.errorbar(x + 0.15, s["mean"], yerr=s["sd"], fmt="o", color="black", capsize=4)
        ax.axhline(result["base"][key], color="grey", linestyle="--", label="base")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=20)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{result['seeds']} seeds per arm: each seed (dots), mean ± sd (black), base model (dashed)")
    return _save(fig, out_dir, name)
