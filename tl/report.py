"""Plots from result rows (PNG): accuracy against shots, one panel per target, CI bands."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def plot_accuracy_vs_shots(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One panel per target, a line per strategy, the 95% CI as a band (from ``evaluate.summarize``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(summary["target"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False, sharey=True)
    strategies = sorted(summary["strategy"].unique())
    cmap = plt.get_cmap("tab20" if len(strategies) > 10 else "tab10")
    for ax, target in zip(axes[0], targets):
        sub = summary[summary["target"] == target]
        for i, name in enumerate(strategies):
            s = sub[sub["strategy"] == name].sort_values("shots")
            if s.empty:
                continue
            mean, ci = 100 * s["mean"].to_numpy(), 100 * s["ci95"].fillna(0).to_numpy()
            ax.plot(s["shots"], mean, marker="o", label=name, color=cmap(i))
            ax.fill_between(s["shots"], mean - ci, mean + ci, alpha=0.18, color=cmap(i))
        ax.set_title(target)
        ax.set_xlabel("shots (labelled images per class)")
        ax.set_xticks(sorted(sub["shots"].unique()))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("query accuracy (%), mean ± 95% CI")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(matrix, classes, path: str | Path, title: str = "") -> Path:
    """A row-normalised confusion matrix (true class down, predicted across), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
    ax.set_yticks(range(n), classes)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
