"""Every table and plot of a few-shot grid: rows.parquet, summary.csv/.md, accuracy_vs_shots.png,
per-class accuracy with confusion matrices, and best.yaml (one schema that search and comparison
write and export reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from tl.config import config_hash


def write_reports(rows: pd.DataFrame, output: Path, note: str, title: str) -> pd.DataFrame:
    """rows.parquet, summary.csv, summary.md and accuracy_vs_shots.png from the result rows."""
    from tl.evaluate import summarize, summary_markdown

    summary = summarize(rows)
    rows.to_parquet(output / "rows.parquet")
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(summary_markdown(summary, rows, note))
    plot_accuracy_vs_shots(summary, output / "accuracy_vs_shots.png", title)
    return summary


def describe(cfg: dict, split: str, rows: pd.DataFrame, weights: str | None = None, chosen_on: str = "") -> str:
    """The sentence that says what a results table is (printed above every summary); ``chosen_on``
    says which hyper-parameters were chosen on validation episodes, and where."""
    return (f"Few-shot evaluation on the `{split}` split: {rows['n_way'].iloc[0]}-way, "
            f"{rows['queries'].iloc[0]} queries per class, {rows['episode'].nunique()} episodes x "
            f"{rows['seed'].nunique()} seed(s), the same episodes for every strategy. Backbone "
            f"{cfg.get('backbone', '?')} ({weights or cfg.get('weights', 'random')}). Hyper-parameters are the "
            f"strategies' defaults{chosen_on}: nothing here was chosen on these test episodes. Config hash "
            f"{config_hash(cfg)}.")


def best_entries(summary: pd.DataFrame, rows: pd.DataFrame, entries: dict) -> dict:
    """``{target: {shots: {...}}}``: the strategy with the highest mean accuracy per (target, shots)."""
    best: dict = {}
    for (target, shots), g in summary.groupby(["target", "shots"]):
        top = g.sort_values("mean", ascending=False).iloc[0]
        label = top["strategy"]
        first = rows[(rows["target"] == target) & (rows["shots"] == shots) & (rows["strategy"] == label)].iloc[0]
        best.setdefault(str(target), {})[int(shots)] = {
            "label": label, "strategy": entries[label].strategy, "params": json.loads(first["params"]),
            "accuracy": round(float(top["mean"]), 4), "ci95": round(float(top["ci95"]), 4),
            "episodes": int(top["episodes"]), "chosen_on_validation": json.loads(first["chosen"]),
        }
    return best


def write_best(path: Path, cfg: Any, weights: str | None, best: dict, note: str, incomplete: list[str] | None = None,
               **extra: Any) -> Path:
    """best.yaml, atomically: the grid's header (experiment, backbone, weights, input size) and
    ``best: {target: {shots: entry}}``; ``extra`` keys (a search's trials) go beside them."""
    import yaml

    doc = {"experiment": cfg.experiment, "backbone": cfg.backbone, "weights": weights or cfg.weights,
           "input_size": cfg.input_size, "note": note, "best": best, **extra}
    if incomplete:
        doc["incomplete"] = incomplete  # the winners above are among the finished cells only
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return path


def per_class_report(rows: pd.DataFrame, best: dict, classes: dict, output: Path) -> str:
    """Per-class accuracy and a confusion-matrix PNG for the best strategy of each target and shots."""
    from tl.evaluate import confusion_matrix

    lines = ["## Per-class accuracy of the best strategy (all test episodes pooled)", ""]
    for target, by_shots in sorted(best.items()):
        names = list(classes[target])
        lines += [f"### {target}", "", "| shots | strategy | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for shots, b in sorted(by_shots.items()):
            sel = rows[(rows["target"] == target) & (rows["shots"] == shots) & (rows["strategy"] == b["label"])]
            m = confusion_matrix(sel, len(names))
            acc = [f"{100 * m[i, i] / m[i].sum():.1f}" if m[i].sum() else "—" for i in range(len(names))]
            lines.append(f"| {shots} | {b['label']} | " + " | ".join(acc) + " |")
            png = output / f"confusion_{target.replace(':', '_')}_{shots}shot.png"
            plot_confusion(m, names, png, f"{target}, {shots}-shot, {b['label']} ({len(sel)} episodes)")
        lines.append("")
    lines.append("Confusion matrices: `confusion_<target>_<shots>shot.png` beside this file.")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_shots(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One panel per target, a line per strategy, the 95% CI as a band (from ``evaluate.summarize``)."""
    plt = pyplot()
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
    return save_figure(fig, path)


def plot_confusion(matrix, classes, path: str | Path, title: str = "") -> Path:
    """A row-normalised confusion matrix (true class down, predicted across), counts in the cells."""
    import numpy as np

    plt = pyplot()
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
    return save_figure(fig, path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no screen on a cluster node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a PNG atomically (a killed run leaves no half-written plot) and close the figure."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path
