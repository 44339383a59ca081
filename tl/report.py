"""Every table and plot of a few-shot grid: rows.parquet, summary.csv/.md (t-based CIs, paired
differences with Holm-corrected p-values, the recommendation made on validation episodes),
accuracy_vs_shots.png, accuracy_vs_cost.png, per-class accuracy with confusion matrices, and
best.yaml (one schema that search and comparison write and export reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tl.choice import TIE_MARGIN, Choice, choose, paired_on, winners_curse
from tl.config import config_hash
from tl.stats import LEVEL, ci_half_width, holm, t_quantile


def summarize(rows: pd.DataFrame, by: Sequence[str] = ("target", "shots", "strategy")) -> pd.DataFrame:
    """Mean, per-episode sigma, the t-based 95% CI and per-seed means for each cell (the CI pools
    every episode of every seed; seeds are independent repetitions)."""
    out = []
    for key, g in rows.groupby(list(by), sort=True):
        acc = g["accuracy"].to_numpy()
        per_seed = g.groupby("seed")["accuracy"].mean()
        cell_s = g.drop_duplicates("seed")["cell_seconds"].sum() if "cell_seconds" in g else float("nan")
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "mean": acc.mean(),
                    "std": acc.std(ddof=1) if len(acc) > 1 else float("nan"), "ci95": ci_half_width(acc),
                    "t": t_quantile(len(acc)), "episodes": len(acc), "seeds": len(per_seed),
                    "per_seed": ", ".join(f"{s}:{m:.3f}" for s, m in per_seed.items()),
                    "seconds_per_episode": g["seconds"].mean(), "cell_seconds": cell_s})
    return pd.DataFrame(out)


def cell_tests(cell: pd.DataFrame, best: str, strategies: Sequence[str]) -> dict:
    """Paired test differences of each strategy to ``best`` and their Holm-corrected p-values."""
    others = [s for s in strategies if s != best]
    diffs = {s: paired_on(cell, s, best) for s in others}
    adjusted = holm([diffs[s].p_value for s in others])
    return {s: (diffs[s], p) for s, p in zip(others, adjusted)}


def _pct(x: float, digits: int = 1) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def _disagreement(c: Choice) -> str:
    if not c.test_disagrees:
        return ""
    d = c.vs_winner
    return (f". **The test episodes disagree with the tie**: {c.recommended} is {-100 * d.mean:.1f} ± {100 * d.ci:.1f} "
            f"points below {c.val_winner} there; more validation episodes (`val_episodes`) would tell them apart")


def recommendation_markdown(choices: list[Choice], summary: pd.DataFrame, val_split: str = "adapt",
                            margin: float = TIE_MARGIN) -> str:
    """The top of summary.md: what to use per (target, shots), why, and how it did on test."""
    ci = summary.set_index(["target", "shots", "strategy"])["ci95"]
    how = (f"Chosen on validation episodes of the `{val_split}` split (never on the test episodes below), "
           "then confirmed on the test episodes. A strategy is tied with the validation winner when the paired "
           f"95% interval of their validation difference lies within ±{100 * margin:g} points (practical "
           "equivalence); among the tied strategies the cheapest by its training per episode (a fixed cost, not "
           "a timing) is recommended.")
    if choices and all(not c.val for c in choices):  # a user's target with split: none has no validation images
        how = ("**No validation episodes** in these rows (a user's target with `split: none` has no validation "
               "images): each recommendation is the best on the test episodes below, so its accuracy is optimistic; "
               "`split: halves` gives the target validation episodes apart from its test ones.")
    lines = ["## Recommendation", "", how, "",
             "| target | shots | recommended | test accuracy ± 95% CI | validation accuracy | validation winner "
             "| tied on validation | test: Δ to the test-best ± 95% CI | why |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in choices:
        conf = "—" if c.recommended == c.test_best else (
            f"{100 * c.confirm.mean:+.1f} ± {_pct(c.confirm.ci)} ({c.test_best})")
        lines.append(f"| {c.target} | {c.shots} | **{c.recommended}** | {_pct(c.test[c.recommended])} ± "
                     f"{_pct(ci.get((c.target, c.shots, c.recommended), float('nan')))} | "
                     f"{_pct(c.val.get(c.recommended, float('nan')))} | {c.val_winner or '—'} | "
                     f"{', '.join(c.tied) or '—'} | {conf} | {c.reason}{_disagreement(c)} |")
    curse = winners_curse(choices)
    if curse["cells"]:
        lines += ["", f"Winner's curse: the strategy best on the test episodes differs from the validation winner in "
                      f"{curse['differ']} of {curse['cells']} (target, shots); the test winner's accuracy is above the "
                      f"validation winner's by {100 * curse['mean_gap']:.1f} points on average (at most "
                      f"{100 * curse['max_gap']:.1f}), an optimistic gap since it is measured on the episodes the test "
                      f"winner was picked on."]
    return "\n".join(lines) + "\n"


SETTINGS = ("inductive", "bn_stats: target", "transductive")  # the order tables list them in (Strategy.setting)


def _strategy_of(method: str, params: str):
    from tl.strategies import REGISTRY

    cls = REGISTRY.get(method)
    if cls is None:
        return None
    known = {k: v for k, v in json.loads(params or "{}").items() if k in cls.__dataclass_fields__}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
    except Exception:  # rows of an older strategy version: its setting is still read from the class
        return None


def settings(rows: pd.DataFrame) -> dict[str, str]:
    """Each strategy label's setting (``Strategy.setting``): ``inductive``, ``bn_stats: target``
    (BatchNorm statistics of the target's unlabelled pool) or ``transductive`` (the episode's
    queries read together); rows made before bn_stats existed are inductive or transductive by class."""
    from tl.strategies import REGISTRY

    out = {}
    for label, g in rows.groupby("strategy"):
        first = g.iloc[0]
        method = first.get("method", label)
        strat = _strategy_of(method, first.get("params", "{}"))
        cls = REGISTRY.get(method)
        out[label] = strat.setting if strat is not None else (
            "transductive" if cls is not None and cls.transductive else "inductive")
    return out


def counterparts(cell: pd.DataFrame, sets: dict[str, str] | None = None) -> dict[str, str]:
    """For each strategy of one (target, shots) that uses unlabelled target images, its plain
    counterpart among the cell's strategies: the same method and parameters with ``bn_stats:
    source`` for a target-statistics row; ``prototype`` with the same ``bn_stats`` for a
    transductive one (the classifier it refines). Keys chosen per cell on validation are ignored."""
    info = {}
    for label, g in cell.groupby("strategy"):
        first = g.iloc[0]
        params = json.loads(first.get("params", "{}") or "{}")
        for k in json.loads(first.get("chosen", "{}") or "{}"):
            params.pop(k, None)
        bn = params.pop("bn_stats", "source")
        info[label] = (first.get("method", label), bn, params)
    from tl.strategies.base import TARGET_SETTING

    sets = settings(cell) if sets is None else sets
    out = {}
    for label, (method, bn, params) in info.items():
        if sets[label] == "transductive":
            match = [o for o, (m, b, _) in info.items() if m == "prototype" and b == bn]
        elif sets[label] == TARGET_SETTING:
            match = [o for o, (m, b, p) in info.items() if m == method and b == "source" and p == params]
        else:
            continue
        if match:
            out[label] = sorted(match)[0]
    return out


def unlabelled_markdown(rows: pd.DataFrame, val_split: str = "adapt") -> str:
    """The gain of every option that uses the target's unlabelled images over its plain counterpart,
    paired on the same test episodes (empty when a comparison has none)."""
    lines = []
    for (target, shots), cell in rows.groupby(["target", "shots"], sort=True):
        sets = settings(cell)
        for label, plain in sorted(counterparts(cell, sets).items()):
            d = paired_on(cell, label, plain)
            lines.append(f"| {target} | {shots} | {label} | {sets[label]} | {plain} | "
                         f"{100 * d.mean:+.1f} ± {_pct(d.ci)} | {'—' if not np.isfinite(d.p_value) else f'{d.p_value:.3g}'} |")
    if not lines:
        return ""
    return "\n".join([
        "## What the unlabelled target images add", "",
        f"Each option that uses the target's unlabelled images against its plain counterpart, paired on the same test "
        "episodes (Δ = option − counterpart, 95% CI, two-sided paired t-test, not corrected across rows). *Target "
        f"statistics*: BatchNorm statistics re-estimated on the target's unlabelled `{val_split}` images (never a test image, "
        "never a label). *Transductive*: the episode's queries are also read together, unlabelled, so a query's "
        "prediction depends on the other queries: not comparable to an inductive row without this note.", "",
        "| target | shots | option | setting | counterpart | Δ ± 95% CI (points) | p |", "|---|---|---|---|---|---|---|",
        *lines, ""])


def summary_markdown(summary: pd.DataFrame, rows: pd.DataFrame, note: str = "",
                     choices: list[Choice] | None = None) -> str:
    """Per (target, shots): mean ± t-based CI, sigma, per-seed means, the paired difference to the
    best on these test episodes with its CI and Holm-corrected p-value, validation accuracy and cost."""
    lines = [note, ""] if note else []
    rec = {(c.target, c.shots): c for c in choices or []}
    sets = settings(rows)
    order = {name: i for i, name in enumerate(SETTINGS)}
    several = len(set(sets.values())) > 1
    for (target, shots), g in summary.groupby(["target", "shots"], sort=True):
        best = g.sort_values("mean", ascending=False).iloc[0]["strategy"]
        # rows grouped by what of the target's unlabelled images they use, best first within each
        g = g.assign(_set=g["strategy"].map(lambda n: order.get(sets.get(n, "inductive"), 0)))
        g = g.sort_values(["_set", "mean"], ascending=[True, False])
        cell = rows[(rows["target"] == target) & (rows["shots"] == shots)]
        tests = cell_tests(cell, best, list(g["strategy"]))
        c = rec.get((target, shots))
        n = int(g.iloc[0]["episodes"])
        lines += [f"### {target}, {shots}-shot ({n} test episodes, t = {g.iloc[0]['t']:.3f}; best on them: {best}"
                  + (f"; recommended: {c.recommended}" if c else "") + ")", "",
                  "| strategy | " + ("setting | " if several else "") + "accuracy ± 95% CI | σ (per episode) | "
                  "per-seed means | Δ to best ± 95% CI (paired) | p (Holm) | validation accuracy | s / episode | cell s |",
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if several else "")]
        for _, r in g.iterrows():
            name = r["strategy"]
            if name == best:
                delta, p = "—", "—"
            else:
                d, adj = tests[name]
                delta, p = f"{100 * d.mean:+.1f} ± {_pct(d.ci)}", ("—" if not np.isfinite(adj) else f"{adj:.3g}")
            mark = " ★" if c and name == c.recommended else ""
            val = _pct(c.val.get(name, float("nan"))) if c else "—"
            setting = f"{sets.get(name, 'inductive')} | " if several else ""
            lines.append(f"| {name}{mark} | {setting}{_pct(r['mean'])} ± {_pct(r['ci95'])} | {_pct(r['std'])} | "
                         f"{r['per_seed']} | {delta} | {p} | {val} | {r['seconds_per_episode']:.3f} | "
                         f"{r['cell_seconds']:.1f} |")
        lines.append("")
    if choices:
        lines.append("★ the recommendation (see the top of this file). 95% CIs use the t quantile for the number of "
                     f"episodes (level {LEVEL:g}); p: two-sided paired t-test against the best, Holm-corrected across "
                     "the strategies of a cell.")
    return "\n".join(lines)


def write_reports(rows: pd.DataFrame, output: Path, note: str, title: str,
                  rows_file: bool = True) -> tuple[pd.DataFrame, list[Choice]]:
    """rows.parquet (unless not ``rows_file``), summary.csv, summary.md, accuracy_vs_shots.png and
    accuracy_vs_cost.png."""
    summary = summarize(rows)
    summary.insert(3, "setting", summary["strategy"].map(settings(rows)))
    config = json.loads(rows["config"].iloc[0]) if "config" in rows else {}
    margin = float(config.get("tie_margin", TIE_MARGIN))
    choices = choose(rows, margin)
    if rows_file:
        rows.to_parquet(output / "rows.parquet")
    summary.to_csv(output / "summary.csv", index=False)
    val_split = config.get("val_split", "adapt")
    unlabelled = unlabelled_markdown(rows, val_split)
    (output / "summary.md").write_text(recommendation_markdown(choices, summary, val_split, margin) + "\n"
                                       + (unlabelled + "\n" if unlabelled else "")
                                       + summary_markdown(summary, rows, note, choices))
    plot_accuracy_vs_shots(summary, output / "accuracy_vs_shots.png", title)
    plot_accuracy_vs_cost(summary, output / "accuracy_vs_cost.png", title)
    return summary, choices


def weights_text(given: str, resolved: str | None) -> str:
    """The weights as a summary names them: as the user gave them, and for a pretrained backbone its
    key under ``<storage>/backbones`` (the folder's name); never the machine's absolute path."""
    if resolved and resolved != given:
        parts = str(resolved).rstrip("/").split("/")
        if len(parts) > 1 and parts[-2] == "backbones":
            return f"{given}, key {parts[-1]}"
    return given


def describe(cfg: dict, split: str, rows: pd.DataFrame, weights: str | None = None, chosen_on: str = "") -> str:
    """The sentence that says what a results table is (printed above every summary); ``chosen_on``
    says which hyper-parameters were chosen on validation episodes, and where."""
    return (f"Few-shot evaluation on the `{split}` split: {rows['n_way'].iloc[0]}-way, "
            f"{rows['queries'].iloc[0]} queries per class, {rows['episode'].nunique()} episodes x "
            f"{rows['seed'].nunique()} seed(s), the same episodes for every strategy. Backbone "
            f"{cfg.get('backbone', '?')} ({weights_text(cfg.get('weights') or 'random', weights)}). Hyper-parameters are the "
            f"strategies' defaults{chosen_on}: nothing here was chosen on these test episodes. Config hash "
            f"{config_hash(cfg)}.")


def best_entries(summary: pd.DataFrame, rows: pd.DataFrame, entries: dict, choices: list[Choice]) -> dict:
    """``{target: {shots: {...}}}``: the recommended strategy per (target, shots) (``tl.choice``:
    chosen on validation episodes, the cheapest of a tie), with its test figures and the tie."""
    top = summary.set_index(["target", "shots", "strategy"])
    best: dict = {}
    for c in choices:
        label = c.recommended
        first = rows[(rows["target"] == c.target) & (rows["shots"] == c.shots) & (rows["strategy"] == label)].iloc[0]
        t = top.loc[(c.target, c.shots, label)]
        best.setdefault(str(c.target), {})[int(c.shots)] = {
            "label": label, "strategy": entries[label].strategy, "params": json.loads(first["params"]),
            "accuracy": round(float(t["mean"]), 4), "ci95": round(float(t["ci95"]), 4),
            "episodes": int(t["episodes"]), "chosen_on_validation": json.loads(first["chosen"]),
            "val_accuracy": None if label not in c.val else round(float(c.val[label]), 4),
            "validation_winner": c.val_winner, "tied_on_validation": list(c.tied), "reason": c.reason,
            "episode_cost": round(float(c.cost[label]), 4), "test_best": c.test_best,
        }
    return best


def write_best(path: Path, cfg: Any, weights: str | None, best: dict, note: str, incomplete: list[str] | None = None,
               **extra: Any) -> Path:
    """best.yaml, atomically: the grid's header (experiment, backbone, weights, input size) and
    ``best: {target: {shots: entry}}``; ``extra`` keys (a search's trials) go beside them."""
    from tl.pretrain import weights_reference

    # the weights by their source, key and sha256, resolved again from the storage given at export
    # time: never a temporary absolute path (tl.pretrain.weights_reference)
    doc = {"experiment": cfg.experiment, "backbone": cfg.backbone, **weights_reference(cfg.weights, weights),
           "input_size": cfg.input_size, "note": note, "best": best, **extra}
    if incomplete:
        doc["incomplete"] = incomplete  # the winners above are among the finished cells only
    return _write_yaml(path, doc)


def write_config(output: Path, config: dict) -> Path:
    """config.yaml beside the results: the resolved config they were made with (``--config`` takes it back)."""
    return _write_yaml(output / "config.yaml", config)


def _write_yaml(path: Path, doc: dict) -> Path:
    """``doc`` as YAML in ``path``, atomically: a killed run leaves the old file or none, never half of one."""
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return path


def per_class_report(rows: pd.DataFrame, best: dict, classes: dict, output: Path) -> str:
    """Per-class accuracy and a confusion-matrix PNG for the strategy of ``best`` per target and shots."""
    from tl.evaluate import confusion_matrix

    lines = ["## Per-class accuracy of the recommended strategy (all test episodes pooled)", ""]
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


def pareto_front(cost: Sequence[float], acc: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (cheaper or as cheap, and more
    accurate or as accurate, one of them strictly), by increasing cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -acc[i]))
    front, best = [], float("-inf")
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return front


def plot_accuracy_vs_cost(summary: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """One panel per target: test accuracy against measured seconds per episode, a colour per shot
    count, the Pareto front of each shot count drawn as a line (what a cheaper strategy gives up)."""
    plt = pyplot()
    targets = sorted(summary["target"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(5.8 * len(targets), 4.4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    shots_all = sorted(summary["shots"].unique())
    for ax, target in zip(axes[0], targets):
        for j, shots in enumerate(shots_all):
            g = summary[(summary["target"] == target) & (summary["shots"] == shots)].reset_index(drop=True)
            if g.empty:
                continue
            colour = cmap(j / max(1, len(shots_all) - 1) * 0.85)
            cost = np.maximum(g["seconds_per_episode"].to_numpy(), 1e-4)  # log axis: a zero cost sits at 0.1 ms
            acc = 100 * g["mean"].to_numpy()
            ax.scatter(cost, acc, color=colour, s=22, label=f"{shots}-shot", zorder=3)
            front = pareto_front(list(cost), list(acc))
            ax.plot(cost[front], acc[front], color=colour, lw=1.2, alpha=0.8)
            for i, name in enumerate(g["strategy"]):
                ax.annotate(name, (cost[i], acc[i]), fontsize=6, xytext=(3, 2), textcoords="offset points",
                            fontweight="bold" if i in front else "normal")
        ax.set_xscale("log")
        ax.set_title(f"{target} (line: Pareto front; bold: on it)", fontsize=9)
        ax.set_xlabel("seconds per episode (measured; log scale)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
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
