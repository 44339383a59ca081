"""Few-shot evaluation of many strategies on the same seeded episodes, cells run as Ray tasks.

A cell is (target, shots, seed, strategy) over all its episodes: tiny work, so it trains
in-process inside one Ray task (DESIGN: "scale the axis that is big"). Each finished cell is
written at once to ``<output>/cells/``; running the same config again skips finished cells, so an
interrupted run resumes and no row is written twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tl.config import config_hash, to_dict
from tl.data import load_embedded
from tl.errors import ConfigError, TrainingError
from tl.evaluate import run_episodes, summarize, summary_markdown
from tl.models import num_stages
from tl.report import plot_accuracy_vs_shots
from tl.runtime import provenance
from tl.strategies import TrainedStrategy, make_strategy


@dataclass(frozen=True)
class StrategyEntry:
    strategy: str
    label: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def name(self) -> str:
        if self.label:
            return self.label
        if self.strategy == "finetune":
            return f"finetune_k{self.params.get('frozen', 0)}"
        return self.strategy


def _default_strategies() -> tuple[StrategyEntry, ...]:
    return (
        StrategyEntry("prototype"), StrategyEntry("logistic"), StrategyEntry("linear_probe"),
        *(StrategyEntry("finetune", params={"frozen": k}) for k in range(5)),
        StrategyEntry("lp_ft"), StrategyEntry("scratch"),
    )


@dataclass(frozen=True)
class FewShotConfig:
    experiment: str = "fewshot"
    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    input_size: int | None = None
    targets: tuple[str, ...] = ("optdigits", "mnistm")
    split: str = "test"
    shots: tuple[int, ...] = (1, 5, 10)
    n_way: int | None = None
    queries: int = 15
    episodes: int = 100
    seeds: tuple[int, ...] = (0,)
    strategies: tuple[StrategyEntry, ...] = field(default_factory=_default_strategies)
    cpus_per_task: float = 1.0

    def __post_init__(self) -> None:
        stages = num_stages(self.backbone)
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"config key 'shots': every shot count must be at least 1, got {list(self.shots)}")
        if self.queries < 1 or self.episodes < 1 or not self.seeds:
            raise ConfigError("config keys 'queries' and 'episodes' must be at least 1, and 'seeds' not empty")
        labels = [e.name() for e in self.strategies]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"config key 'strategies': two entries share a label ({labels})")
        for e in self.strategies:
            s = make_strategy(e.strategy, e.params)
            if isinstance(s, TrainedStrategy) and not 0 <= s.frozen <= stages:
                raise ConfigError(f"strategy '{e.name()}': frozen depth {s.frozen} is out of range for backbone "
                                  f"'{self.backbone}' (0..{stages})")


def _cell_name(target: str, shots: int, seed: int, label: str, ident: str) -> str:
    """File name of a finished cell; ``ident`` hashes everything else that changes its rows."""
    return f"{target.replace(':', '_')}__{shots}shot__seed{seed}__{label}__{ident}"


def _cell_ident(cfg: dict, entry: StrategyEntry) -> str:
    keep = {k: cfg[k] for k in ("backbone", "weights", "input_size", "split", "n_way", "queries", "episodes")}
    return config_hash({**keep, "strategy": entry.strategy, "params": entry.params}, 10)


def _run_cell(cfg: dict, target: str, shots: int, seed: int, label: str, entry: dict, weights: str | None,
              embeddings) -> list[dict]:
    """One cell, inside a Ray task: every episode of one strategy on one (target, shots, seed)."""
    import platform

    import ray
    import torch

    from tl.models import make_backbone

    torch.set_num_threads(1)
    data = load_embedded(target).split(cfg["split"])
    strat = make_strategy(entry["strategy"], entry["params"])
    backbone = None if strat.uses_embeddings else make_backbone(cfg["backbone"], weights, cfg["input_size"])
    rows = run_episodes({label: strat}, data, shots=shots, queries=cfg["queries"], episodes=cfg["episodes"],
                        seed=seed, n_way=cfg["n_way"], backbone=backbone, embeddings=embeddings, target=target)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    for r in rows:
        r["node"], r["host"] = node, platform.node()
    return rows


def run_fewshot(cfg: FewShotConfig, storage: Path, output: Path, log: Callable[[str], None] = print) -> dict:
    """Run every missing cell, then write rows.parquet, summary.csv and summary.md to ``output``."""
    import ray

    from tl.embeddings import EmbedConfig, extract
    from tl.pretrain import resolve_weights

    t0 = time.time()
    cells_dir = output / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    for t in cfg.targets:
        load_embedded(t).split(cfg.split)
    entries = {e.name(): e for e in cfg.strategies}
    plain = to_dict(cfg)
    idents = {label: _cell_ident(plain, e) for label, e in entries.items()}
    todo, done = [], 0
    for target in cfg.targets:
        for shots in cfg.shots:
            for seed in cfg.seeds:
                for label in entries:
                    if (cells_dir / (_cell_name(target, shots, seed, label, idents[label]) + ".parquet")).exists():
                        done += 1
                    else:
                        todo.append((target, shots, seed, label))
    total = done + len(todo)
    # longest cells first (trained strategies, most shots), so the run does not end on a long tail
    trained = {lab: not make_strategy(e.strategy, e.params).uses_embeddings for lab, e in entries.items()}
    todo.sort(key=lambda c: (trained[c[3]], c[1]), reverse=True)
    log(f"[fewshot] {total} cells ({len(cfg.targets)} targets x {len(cfg.shots)} shots x {len(cfg.seeds)} seeds x "
        f"{len(entries)} strategies), {cfg.episodes} episodes each; {done} already finished in {cells_dir}")
    emb_refs: dict[str, Any] = {}
    if any(not trained[c[3]] for c in todo):
        for target in {c[0] for c in todo}:
            data = load_embedded(target).split(cfg.split)
            emb = extract(data, EmbedConfig(backbone=cfg.backbone, weights=weights, input_size=cfg.input_size,
                                            cpus_per_actor=min(1.0, cfg.cpus_per_task)),
                          str(storage / "cache"), log)
            emb_refs[target] = ray.put(emb.vectors)
    task = ray.remote(_run_cell).options(num_cpus=cfg.cpus_per_task, max_retries=2)
    pending = {}
    for target, shots, seed, label in todo:
        e = entries[label]
        ref = task.remote(plain, target, shots, seed, label, {"strategy": e.strategy, "params": dict(e.params)},
                          weights, emb_refs.get(target))
        pending[ref] = (target, shots, seed, label)
    failures = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        target, shots, seed, label = pending.pop(ready[0])
        try:
            rows = pd.DataFrame(ray.get(ready[0]))
        except Exception as exc:
            failures.append(f"{target} {shots}-shot seed {seed} {label}: {str(exc).splitlines()[-1]}")
            log(f"[fewshot] FAILED {failures[-1]}")
            continue
        name = _cell_name(target, shots, seed, label, idents[label])
        tmp = cells_dir / (name + ".parquet.tmp")
        rows.to_parquet(tmp)
        os.replace(tmp, cells_dir / (name + ".parquet"))
        done += 1
        log(f"[fewshot] {done}/{total} {target} {shots}-shot seed {seed} {label}: "
            f"{100 * rows['accuracy'].mean():.1f}% ({time.time() - t0:.0f} s)")
    files = sorted(cells_dir.glob("*.parquet"))
    wanted = {_cell_name(t, k, s, lab, idents[lab]) for t in cfg.targets for k in cfg.shots for s in cfg.seeds
              for lab in entries}
    parts = [pd.read_parquet(f) for f in files if f.stem in wanted]
    if not parts:
        raise TrainingError("no cell finished:\n" + "\n".join(failures))
    rows = pd.concat(parts, ignore_index=True)
    prov = provenance()
    rows["config"] = json.dumps(plain, sort_keys=True)
    rows["git_commit"] = prov["git_commit"]
    rows["versions"] = json.dumps(prov["versions"], sort_keys=True)
    rows["hardware"] = json.dumps(prov["hardware"], sort_keys=True)
    rows = rows.sort_values(["target", "shots", "seed", "strategy", "episode"]).reset_index(drop=True)
    note = describe(plain, rows, weights)
    if failures:
        note += "\n\nFAILED cells:\n" + "\n".join(f"- {f}" for f in failures)
    write_reports(rows, output, note, f"{cfg.backbone}: {cfg.episodes} episodes x {len(cfg.seeds)} seed(s), "
                  f"{cfg.queries} queries/class")
    log(f"[fewshot] {len(rows)} rows; summary in {output / 'summary.md'} ({time.time() - t0:.0f} s)")
    return {"rows": len(rows), "failures": failures, "output": str(output), "wall_s": time.time() - t0}


def write_reports(rows: pd.DataFrame, output: Path, note: str, title: str) -> pd.DataFrame:
    """rows.parquet, summary.csv, summary.md and accuracy_vs_shots.png from the result rows."""
    summary = summarize(rows)
    rows.to_parquet(output / "rows.parquet")
    summary.to_csv(output / "summary.csv", index=False)
    (output / "summary.md").write_text(summary_markdown(summary, rows, note))
    plot_accuracy_vs_shots(summary, output / "accuracy_vs_shots.png", title)
    return summary


def describe(cfg: dict, rows: pd.DataFrame, weights: str | None = None) -> str:
    """The sentence that says what a results table is (printed above every summary)."""
    return (f"Few-shot evaluation on the `{cfg.get('split', '?')}` split: {rows['n_way'].iloc[0]}-way, "
            f"{rows['queries'].iloc[0]} queries per class, {rows['episode'].nunique()} episodes x "
            f"{rows['seed'].nunique()} seed(s), the same episodes for every strategy. Backbone "
            f"{cfg.get('backbone', '?')} ({weights or cfg.get('weights', 'random')}). Hyper-parameters are the "
            f"strategies' defaults: nothing here was chosen on these test episodes. Config hash "
            f"{config_hash(cfg)}.")
