"""The unsupervised adaptation benchmark: source-only and each method, on each target, over seeds,
with three model-selection rules reported side by side (docs/architecture.md, "Evaluation protocol").

Each run is one Ray Train run, scored at every checkpoint, and one cell of ``tl.grid``: a Tune trial
that builds and fits its ``TorchTrainer`` (Train V2's Tune-around-function pattern), so a cluster
runs several at once. Per run, a rule
picks one checkpoint and the table reports that checkpoint's target test accuracy:
the last iterate; (a) the highest source validation accuracy; (b) the highest unsupervised score on
the unlabelled target pool (IM, and SND beside it); (c) the oracle, the highest target test accuracy,
which uses test labels and is an upper bound, never a result. Finished runs are kept in the cell
store ``<storage>/runs/<experiment>/cells`` and skipped when the same experiment runs again; an
unfinished run resumes from its last Ray Train checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tl.config import BackboneFields, config_hash, to_dict
from tl.data.spec import DataSpec, resolve
from tl.errors import ConfigError, TrainingError
from tl.grid import Cell, CellStore, GridResult, run_cells, stamp
from tl.report import write_config
from tl.runs import UDA_RECIPE, RunConfig, check_data, run
from tl.runtime import check_shared_storage
from tl.storage import Location
from tl.strategies import StrategyEntry, check_labels

RULES = {
    "last": ("last iterate", None),
    "source_val": ("(a) source val", "source_val_accuracy"),
    "im": ("(b) target IM", "target_im"),
    "snd": ("(b) target SND", "target_snd"),
    "oracle": ("(c) oracle (test labels)", "target_test_accuracy"),
}


def _default_methods() -> tuple[StrategyEntry, ...]:
    return tuple(StrategyEntry(s) for s in ("source_only", "adabn", "dann", "cdan", "mmd", "coral", "mcc"))


@dataclass(frozen=True)
class AdaptExperimentConfig(BackboneFields):
    """``params``: shared by every method, over ``UDA_RECIPE`` and under each method's own params;
    ``score``: the unsupervised rule named (b) in the headline (both IM and SND are recorded);
    ``max_concurrent``: runs at once (0: as many as the cluster's CPUs hold, ``workers`` each)."""

    experiment: str = "adapt"
    source: str | DataSpec = "mnist"
    targets: tuple[str | DataSpec, ...] = ("mnistm", "optdigits")
    test: dict[str, str | DataSpec] = field(default_factory=dict)
    methods: tuple[StrategyEntry, ...] = field(default_factory=_default_methods)
    params: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    score: str = "im"
    limit: int = 0
    workers: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 100
    max_failures: int = 2
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        if not self.targets or not self.methods or not self.seeds:
            raise ConfigError("config keys 'targets', 'methods' and 'seeds' must not be empty")
        if self.score not in ("im", "snd"):
            raise ConfigError(f"config key 'score' must be 'im' or 'snd', got '{self.score}'")
        check_labels(self.methods, "methods")
        unknown = sorted(set(self.test) - set(self.target_names()))
        if unknown:
            raise ConfigError(f"config key 'test.{unknown[0]}': no target is named '{unknown[0]}' "
                              f"(targets: {self.target_names()})")
        for t in self.targets:
            for m in self.methods:
                self.run_config(t, m, self.seeds[0])  # every run's config is valid before any work starts

    @property
    def source_name(self) -> str:
        return resolve(self.source, "source")[0]

    def target_names(self) -> list[str]:
        return [resolve(t, f"targets[{i}]")[0] for i, t in enumerate(self.targets)]

    def run_config(self, target: "str | DataSpec", method: StrategyEntry, seed: int) -> RunConfig:
        name = resolve(target, "targets")[0]
        try:
            return RunConfig(backbone=self.backbone, weights=self.weights, input_size=self.input_size,
                               source=self.source, target=target, test=self.test.get(name), strategy=method.strategy,
                               params={**self.params, **method.params}, limit=self.limit, workers=self.workers,
                               use_gpu=self.use_gpu, checkpoint_every=self.checkpoint_every, seed=seed,
                               max_failures=self.max_failures)
        except ConfigError as exc:
            raise ConfigError(f"method '{method.name()}': {exc}") from exc


def pick(history: list[dict], rule: str) -> dict:
    """The checkpoint a rule selects from one run's history (ties: the later checkpoint)."""
    if rule == "last":
        return history[-1]
    key = RULES[rule][1]
    values = [history[i].get(key, float("nan")) for i in range(len(history))]
    if all(v != v for v in values):  # a score the run could not compute (no labelled target test images)
        return history[-1]
    best = max((i for i in range(len(history)) if values[i] == values[i]), key=lambda i: (values[i], i))
    return history[best]


def run_rows(record: dict, label: str) -> list[dict]:
    """One row per checkpoint of a run, with the run's identity and the rule(s) that pick it."""
    rows = []
    chosen = {rule: pick(record["history"], rule)["step"] for rule in RULES}
    for h in record["history"]:
        rows.append({"target": record["target"], "method": label, "strategy": record["strategy"],
                     "seed": record["seed"], "source": record["source"], **h,
                     "selected_by": ",".join(r for r, s in chosen.items() if s == h["step"]),
                     "run": record["key"], "run_wall_s": record["wall_s"],
                     "source_images": record["sizes"]["source"], "target_images": record["sizes"]["target"]})
    return rows


TRIAL_CPU = 0.05  # an adaptation trial only drives its trainer, whose workers hold the CPUs


def _run_cell(spec: dict, storage: str) -> tuple[pd.DataFrame, str]:
    """One adaptation run inside a Tune trial: its TorchTrainer is built and fitted here."""
    from tl.config import from_dict

    cfg = from_dict(RunConfig, spec["run"])
    started = time.time()
    record = run(cfg, storage, log=lambda line: print(line, flush=True), checked=True)
    rows = pd.DataFrame(run_rows(record, spec["label"]))
    rows["started_at"], rows["finished_at"] = started, time.time()
    last = record["history"][-1]
    test = last["target_test_accuracy"]
    said = f"target test {100 * test:.1f}% (last iterate)" if test == test else f"target IM {last['target_im']:.3f}"
    return rows, f"{said}, {record['wall_s']:.0f} s"


def cells(cfg: AdaptExperimentConfig) -> list[Cell]:
    """One cell per (target, method, seed); its identity is the run's own key."""
    out = []
    for t, name in zip(cfg.targets, cfg.target_names()):
        for m in cfg.methods:
            for s in cfg.seeds:
                rc = cfg.run_config(t, m, s)
                out.append(Cell((name, m.name(), f"seed{s}"), rc.key(), f"{cfg.source_name}->{name} {m.name()} seed {s}",
                                {"label": m.name(), "run": to_dict(rc)}, cpu=TRIAL_CPU))
    return out


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (target, method): mean and std over seeds of the test accuracy each rule selects."""
    out = []
    for (target, method), g in rows.groupby(["target", "method"], sort=False):
        rec: dict[str, Any] = {"target": target, "method": method, "seeds": g["seed"].nunique()}
        chosen = g["selected_by"].str.split(",")
        for rule in RULES:
            mask = chosen.apply(lambda names, r=rule: r in names)  # one checkpoint per run (seed)
            per_seed = g[mask].sort_values("seed")["target_test_accuracy"].to_numpy(dtype=float)
            rec[f"{rule}_mean"] = float(np.mean(per_seed))
            rec[f"{rule}_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
            rec[f"{rule}_per_seed"] = ", ".join(f"{v:.3f}" for v in per_seed)
        rec["source_val_last"] = float(g.sort_values("step").groupby("seed").tail(1)["source_val_accuracy"].mean())
        rec["minutes_per_run"] = float(g.groupby("seed")["run_wall_s"].first().mean() / 60)
        out.append(rec)
    return pd.DataFrame(out)


def curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of the target test accuracy and the target IM score at each checkpoint, per
    (target, method): how a method moves during training. A diagnostic that uses test labels: it
    explains a result (a method that peaks early and then declines), it never selects one."""
    g = rows.groupby(["target", "method", "step"], sort=False)[["target_test_accuracy", "target_im"]].mean()
    return g.reset_index()


def curves_markdown(c: pd.DataFrame) -> list[str]:
    lines = ["Training curves (diagnostic, uses test labels): mean target test accuracy (%) over seeds at each "
             "checkpoint, and the target IM score beside it in brackets.", ""]
    for target, g in c.groupby("target", sort=False):
        steps = sorted(g["step"].unique())
        lines += [f"#### {target}", "", "| method | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for method, m in g.groupby("method", sort=False):
            m = m.set_index("step")
            lines.append(f"| {method} | " + " | ".join(
                f"{100 * m.loc[s, 'target_test_accuracy']:.1f} ({m.loc[s, 'target_im']:.2f})" if s in m.index else ""
                for s in steps) + " |")
        lines.append("")
    return lines


def plot_curves(c: pd.DataFrame, path: Path, source: str) -> Path:
    """One panel per target, a line per method: mean target test accuracy against training step."""
    from tl.report import pyplot, save_figure

    plt = pyplot()
    targets = list(dict.fromkeys(c["target"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for method, m in c[c["target"] == target].groupby("method", sort=False):
            ax.plot(m["step"], 100 * m["target_test_accuracy"], marker="o", label=method)
        ax.set_title(f"{source} → {target}")
        ax.set_xlabel("training step")
        ax.set_ylabel("target test accuracy % (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Domain adaptation training curves (diagnostic: uses test labels, selects nothing)", fontsize=10)
    return save_figure(fig, path)


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "—"  # no labelled target test images
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if np.isfinite(std) else f"{100 * mean:.1f}"


def summary_markdown(summary: pd.DataFrame, note: str, score: str) -> str:
    rules = ["last", "source_val", score, "snd" if score == "im" else "im", "oracle"]
    lines = [note, "", "Target test accuracy (%), mean ± std over seeds, of the checkpoint each rule selects.", ""]
    for target, g in summary.groupby("target", sort=False):
        # each method's gain over source-only and over AdaBN (BatchNorm statistics alone), when they ran
        bases = [(name, g[g["method"] == name]) for name in ("source_only", "adabn")]
        bases = [(name, b.iloc[0]) for name, b in bases if not b.empty]
        heads = "".join(f" | Δ vs {'source-only' if n == 'source_only' else 'AdaBN'} (last / (b))" for n, _ in bases)
        lines += [f"### {g.iloc[0]['source']} → {target}", "",
                  "| method | " + " | ".join(RULES[r][0] for r in rules) + heads + " | source val (last) | min / run |",
                  "|---|" + "---|" * (len(rules) + len(bases) + 2)]
        for _, r in g.iterrows():
            deltas = "".join(" | —" if r["method"] == name else
                             f" | {100 * (r['last_mean'] - b['last_mean']):+.1f} / "
                             f"{100 * (r[f'{score}_mean'] - b[f'{score}_mean']):+.1f}" for name, b in bases)
            cells = [_pm(r[f"{rule}_mean"], r[f"{rule}_std"]) for rule in rules]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + f"{deltas} | {100 * r['source_val_last']:.1f} "
                         f"| {r['minutes_per_run']:.1f} |")
        lines.append("")
    lines += ["Per-seed values (last iterate; (b); oracle):", ""]
    for _, r in summary.iterrows():
        lines.append(f"- {r['target']} {r['method']}: {r['last_per_seed']}; {r[f'{score}_per_seed']}; "
                     f"{r['oracle_per_seed']}")
    return "\n".join(lines) + "\n"


def describe(cfg: AdaptExperimentConfig, rows: pd.DataFrame) -> str:
    p = {**UDA_RECIPE, **cfg.params}
    first = rows.iloc[0]
    return (f"Unsupervised domain adaptation {cfg.source_name} → each target: labelled `{cfg.source_name}` train split "
            f"({first['source_images']} images), the target's unlabelled `adapt` split as the target stream "
            f"({first['target_images']} images for {first['target']}), scored on the target's `test` split. "
            f"Backbone {cfg.backbone} ({cfg.weights}), {p['steps']} steps of {p['batch_size']} source + "
            f"{p['target_batch_size']} target images, SGD momentum {p['momentum']}, lr {p['lr']} "
            f"({p['lr_schedule']} annealing), BatchNorm `{p['batch_norm']}` with a `{p['bn_forward']}` forward, "
            f"{_other_settings(cfg)}{cfg.workers} Ray Train workers, a checkpoint scored every {cfg.checkpoint_every} "
            f"steps; seeds {list(cfg.seeds)}.{_own_settings(cfg)} Selection rules: last iterate; (a) source validation accuracy; (b) information "
            f"maximisation (IM) and soft neighbourhood density (SND) of predictions on the unlabelled target pool; "
            f"(c) oracle = best target test accuracy over checkpoints (uses test labels: an upper bound, not a "
            f"result). Nothing was chosen on the target test split. Config hash {config_hash(to_dict(cfg))}.")


_STATED = {"steps", "batch_size", "target_batch_size", "momentum", "lr", "lr_schedule", "batch_norm", "bn_forward"}


def _other_settings(cfg: AdaptExperimentConfig) -> str:
    """The experiment's params that the sentence above does not spell out (weight decay, augmentation, ...)."""
    other = [f"{k} {v}" for k, v in cfg.params.items() if k not in _STATED]
    return f"{', '.join(other)}, " if other else ""


def _own_settings(cfg: AdaptExperimentConfig) -> str:
    """The methods' own params over the recipe, so a table never states a recipe a row did not run."""
    own = [f"{m.name()}: " + ", ".join(f"{k} {v}" for k, v in m.params.items()) for m in cfg.methods if m.params]
    return f" Each method's own settings over that recipe: {'; '.join(own)}." if own else ""


def _concurrent(cfg: AdaptExperimentConfig) -> int:
    """Runs at once: as many trainers as the cluster's CPUs hold, ``workers`` each, with room for
    the Ray Data tasks that feed them (docs/architecture.md, "Ray in this project": starvation hangs)."""
    import ray

    from tl.runtime import cpus_per_worker

    if cfg.max_concurrent:
        return cfg.max_concurrent
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(total // (cfg.workers * cpus_per_worker(cfg.workers) + 0.5)))


def run_experiment(cfg: AdaptExperimentConfig, storage: "str | os.PathLike | Location", output: Path,
                   log: Callable[[str], None] = print, retry_failed: bool = False) -> "AdaptResult":
    """Run every missing run as a Tune trial (several at once where the cluster has room), then
    write ``runs.csv``, ``summary.csv``, ``summary.md`` and ``curves.png`` (target accuracy over
    training steps: a diagnostic)."""
    from tl.pretrain import resolve_weights

    t0 = time.time()
    storage = Location.of(storage)
    check_shared_storage(storage)  # on several nodes, a folder one of them cannot see stops here
    output.mkdir(parents=True, exist_ok=True)
    for t in cfg.targets:  # bad data stops here, before any pretraining or trial
        check_data(cfg.run_config(t, cfg.methods[0], cfg.seeds[0]))
    resolve_weights(cfg.weights, cfg.backbone, storage, log)  # pretrain once here, never inside a trial
    store = CellStore(storage / "runs" / cfg.experiment / "cells")
    grid = cells(cfg)
    concurrent = _concurrent(cfg)
    log(f"[adapt] {len(grid)} runs ({len(cfg.targets)} targets x {len(cfg.methods)} methods x {len(cfg.seeds)} "
        f"seeds), up to {concurrent} at once; finished runs are kept in {store.root}")
    result = run_cells(grid, store, _run_cell, shared={"storage": str(storage)}, what="adapt", storage=storage,
                       log=log, retry_failed=retry_failed, max_concurrent=concurrent, max_failures=cfg.max_failures,
                       experiment=cfg.experiment)
    failures = [f"{c.what}: {msg}" for c, msg in result.failed] + [f"{c.what}: unfinished" for c in result.unfinished]
    rows = result.rows(store)
    if rows.empty:
        raise TrainingError("no adaptation run finished:\n" + "\n".join(failures))
    summary = summarize(rows)
    summary.insert(0, "source", cfg.source_name)
    rows = stamp(rows, to_dict(cfg))
    rows.to_csv(output / "runs.csv", index=False)
    summary.to_csv(output / "summary.csv", index=False)
    write_config(output, to_dict(cfg))
    note = describe(cfg, rows)
    if failures:
        note += "\n\nFAILED runs:\n" + "\n".join(f"- {f}" for f in failures)
    wall = time.time() - t0
    runs = rows.groupby("run").first()
    span = runs["finished_at"].max() - runs["started_at"].min()
    note += (f"\n\nWall time: {runs['run_wall_s'].sum() / 60:.1f} min for the {len(runs)} runs (the sum of each "
             f"run's wall time, Ray Train start-up included), {span / 60:.1f} min from the first start to the last end "
             f"(up to {concurrent} at once); this invocation took {wall / 60:.1f} min (finished runs are reused).")
    curve = curves(rows)
    plot_curves(curve, output / "curves.png", cfg.source_name)
    text = summary_markdown(summary, note, cfg.score) + "\n" + "\n".join(curves_markdown(curve)) + \
        "\n![training curves](curves.png)\n"
    (output / "summary.md").write_text(text)
    log(f"[adapt] {len(runs)} runs; summary in {output / 'summary.md'} ({wall:.0f} s)")
    return AdaptResult(grid=result, failures=failures, output=output, wall_s=wall, summary=summary)


@dataclass
class AdaptResult:
    grid: GridResult
    failures: list[str]
    output: Path
    wall_s: float
    summary: pd.DataFrame

    @property
    def exit_status(self) -> int:
        """``EXIT_INCOMPLETE``, ``EXIT_FAILED_CELLS`` or ``EXIT_OK`` (``tl.errors``)."""
        from tl.errors import grid_exit_status

        return grid_exit_status(len(self.grid.failed), len(self.grid.unfinished))
