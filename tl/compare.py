"""The strategy comparison: strategies x targets x shots x seeds, each cell a Ray Tune trial.

Every cell runs on the same seeded episodes (paired differences). A strategy entry may carry a
small ``search`` (for example ``frozen: [0, 1, 2, 3, 4]``): the cell then scores each candidate on
validation episodes of the target's ``adapt`` split (no image shared with the test episodes),
keeps the best, and evaluates it on the test episodes (DESIGN: "nested search is a loop, not a
nested Tuner").

A finished cell is written by its trial, atomically, to ``<storage>/runs/<experiment>/cells/``
(shared storage on a cluster); running the same config again (or with ``--resume``) skips it, so
an interrupted comparison loses at most its unfinished cells and no row is ever written twice.
A cell whose training fails (a NaN loss) is recorded as failed with its message; the rest finish.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tl.config import config_hash, to_dict
from tl.errors import ConfigError, TLError, TrainingError
from tl.data.targets import DataSource, check_target, load_target
from tl.models import num_stages
from tl.strategies import TrainedStrategy, make_strategy


@dataclass(frozen=True)
class CompareEntry:
    """One strategy of the comparison: fixed ``params`` and an optional grid ``search`` over them."""

    strategy: str
    label: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    search: dict[str, list] = field(default_factory=dict)

    def name(self) -> str:
        if self.label:
            return self.label
        if self.strategy == "finetune" and "frozen" not in self.search:
            return f"finetune_k{self.params.get('frozen', 0)}"
        return self.strategy

    def candidates(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid (one, the fixed params, when there is no search)."""
        if not self.search:
            return [dict(self.params)]
        keys = sorted(self.search)
        return [{**self.params, **dict(zip(keys, combo))} for combo in itertools.product(*(self.search[k] for k in keys))]


def _default_entries() -> tuple[CompareEntry, ...]:
    return (
        CompareEntry("prototype"), CompareEntry("logistic"), CompareEntry("linear_probe"),
        CompareEntry("finetune", search={"frozen": [0, 1, 2, 3, 4]}),
        CompareEntry("lp_ft"), CompareEntry("scratch"), CompareEntry("dann"),
    )


@dataclass(frozen=True)
class CompareConfig:
    """The main job. ``episodes`` test episodes per cell; ``val_episodes`` per search candidate;
    ``cpus_per_trial`` for a trained cell (a feature cell takes ``feature_cpus``: many run at once);
    ``max_failures``: Tune retries of a trial lost to a dead node or process."""

    experiment: str = "compare"
    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    input_size: int | None = None
    targets: tuple[str, ...] = ("optdigits", "mnistm")
    test_split: str = "test"
    val_split: str = "adapt"
    shots: tuple[int, ...] = (1, 5, 10)
    n_way: int | None = None
    queries: int = 15
    episodes: int = 10
    val_episodes: int = 4
    seeds: tuple[int, ...] = (0,)
    strategies: tuple[CompareEntry, ...] = field(default_factory=_default_entries)
    cpus_per_trial: float = 1.0
    feature_cpus: float = 0.25
    max_concurrent: int = 0
    max_failures: int = 2
    data: dict[str, DataSource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.shots):
            raise ConfigError(f"config key 'shots': every shot count must be at least 1, got {list(self.shots)}")
        if self.queries < 1 or self.episodes < 1 or self.val_episodes < 1 or not self.seeds or not self.targets:
            raise ConfigError("config keys 'queries', 'episodes', 'val_episodes' must be at least 1, and 'seeds' "
                              "and 'targets' not empty")
        if self.cpus_per_trial <= 0 or self.feature_cpus <= 0:
            raise ConfigError("config keys 'cpus_per_trial' and 'feature_cpus' must be positive")
        if self.val_split == self.test_split:
            raise ConfigError(f"config keys 'val_split' and 'test_split' are both '{self.test_split}': validation "
                              f"episodes must share no image with test episodes")
        if not self.strategies:
            raise ConfigError("config key 'strategies' is empty")
        labels = [e.name() for e in self.strategies]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"config key 'strategies': two entries share a label ({labels})")
        for name, src in self.data.items():
            src.check(f"data.{name}")
            if src.split == "none":
                searched = [e.name() for e in self.strategies if e.search]
                if name in self.targets and searched:
                    raise ConfigError(
                        f"config key 'data.{name}.split' is none, so target '{name}' has no validation images; "
                        f"strategies {searched} search on validation episodes: use split: halves or drop the search")
        stages = num_stages(self.backbone)
        for e in self.strategies:
            for key, values in e.search.items():
                if not isinstance(values, (list, tuple)) or not values:
                    raise ConfigError(f"strategy '{e.name()}': search key 'search.{key}' needs a non-empty list")
            for params in e.candidates():
                s = make_strategy(e.strategy, params)
                if isinstance(s, TrainedStrategy) and not 0 <= s.frozen <= stages:
                    raise ConfigError(f"strategy '{e.name()}': frozen depth {s.frozen} is out of range for backbone "
                                      f"'{self.backbone}' (0..{stages})")


def cell_name(target: str, shots: int, seed: int, label: str, ident: str) -> str:
    """File name of a finished cell; ``ident`` hashes everything else that changes its rows."""
    return f"{target.replace(':', '_')}__{shots}shot__seed{seed}__{label}__{ident}"


def _ident(plain: dict, entry: CompareEntry) -> str:
    keep = {k: plain[k] for k in ("backbone", "weights", "input_size", "test_split", "val_split", "n_way", "queries",
                                  "episodes")}
    if entry.search:
        keep["val_episodes"] = plain["val_episodes"]
    if plain.get("data"):
        keep["data"] = plain["data"]  # a user's data source (folder, size, split) changes every row
    return config_hash({**keep, "strategy": entry.strategy, "params": entry.params, "search": entry.search}, 10)


def compute_cell(cell: dict, data: dict, embeddings: dict, weights: str | None, fixed: dict) -> pd.DataFrame:
    """The work of one cell, wherever it runs (a Tune trial, a plain loop, a process pool): the inner
    search on validation episodes when the entry has one, then the test episodes."""
    from tl.evaluate import run_episodes, staged_accuracy
    from tl.models import make_backbone

    target, shots, seed, label = cell["target"], cell["shots"], cell["seed"], cell["label"]
    entry = CompareEntry(**cell["entry"])
    emb = embeddings.get(target) or {}
    t0 = time.time()
    cands = [make_strategy(entry.strategy, p) for p in entry.candidates()]
    backbone = None if cands[0].uses_embeddings else make_backbone(fixed["backbone"], weights, fixed["input_size"])
    # an adaptation strategy's unlabelled target pool: the validation half (DESIGN section 2), never a test image
    pool = data[target]["val"] if getattr(cands[0], "needs_target", False) else None
    val_scores = []
    if len(cands) > 1:
        for s in cands:
            try:
                (_, acc), = staged_accuracy(
                    s, data[target]["val"], shots=shots, queries=fixed["queries"], episodes=fixed["val_episodes"],
                    seed=seed, report_steps=[getattr(s, "steps", 1)], n_way=fixed["n_way"], backbone=backbone,
                    embeddings=emb.get("val"), unlabelled=pool)[-1:]
            except TrainingError:
                acc = float("-inf")  # a candidate that diverges loses the search; the others go on
            val_scores.append(acc)
    best = max(range(len(cands)), key=lambda i: val_scores[i]) if val_scores else 0
    strat = cands[best]
    rows = run_episodes({label: strat}, data[target]["test"], shots=shots, queries=fixed["queries"],
                        episodes=fixed["episodes"], seed=seed, n_way=fixed["n_way"], backbone=backbone,
                        embeddings=emb.get("test"), target=target, unlabelled=pool)
    df = pd.DataFrame(rows)
    df["chosen"] = json.dumps({k: strat.params()[k] for k in entry.search}, sort_keys=True)
    df["val_accuracy"] = val_scores[best] if val_scores else float("nan")
    df["val_scores"] = json.dumps([[{k: c.params()[k] for k in entry.search}, a] for c, a in zip(cands, val_scores)])
    df["cell_seconds"] = time.time() - t0
    return df


def _cell_trial(config: dict, *, data: dict, embeddings: dict, weights: str | None, fixed: dict) -> None:
    """One cell as a Tune trial; its rows are written to the cells folder before it reports."""
    import io

    import ray
    import torch
    from ray import tune

    torch.set_num_threads(1)
    cell = config["cell"]
    out_dir = Path(fixed["cells_dir"])
    what = f"{cell['target']} {cell['shots']}-shot seed {cell['seed']} {cell['label']}"
    try:
        df = compute_cell(cell, data, embeddings, weights, fixed)
    except TLError as exc:
        # a diverging cell is a recorded result, not a crash for Tune to retry
        msg = f"{type(exc).__name__}: {exc}"
        _atomic_write(out_dir / (cell["name"] + ".failed.json"), json.dumps({"cell": cell, "error": msg}).encode())
        tune.report({"accuracy": float("nan"), "failed": msg, "progress_line": f"{what}: FAILED {msg}"})
        return
    node = ray.get_runtime_context().get_node_id()
    df["node"], df["host"] = node, platform.node()
    buf = io.BytesIO()
    df.to_parquet(buf)
    _atomic_write(out_dir / (cell["name"] + ".parquet"), buf.getvalue())
    chosen = df["chosen"].iloc[0]
    extra = f" (chose {chosen} on validation)" if chosen != "{}" else ""
    tune.report({"accuracy": float(df["accuracy"].mean()), "failed": "", "node": node,
                 "progress_line": f"{what}: {100 * df['accuracy'].mean():.1f}%{extra}"})


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cost(entry: CompareEntry, shots: int) -> float:
    """A rough relative cost, to start the longest cells first (no long tail at the end)."""
    s = make_strategy(entry.strategy, entry.params)
    if s.uses_embeddings:
        return 0.0
    return float(shots) * (1 + len(entry.candidates()) if entry.search else 1)


def plan(cfg: CompareConfig, cells_dir: Path, retry_failed: bool = False) -> dict:
    """Which cells exist, which are finished, failed before, or still to run (nothing runs here)."""
    plain = to_dict(cfg)
    entries = {e.name(): e for e in cfg.strategies}
    idents = {label: _ident(plain, e) for label, e in entries.items()}
    todo, done, failed = [], [], []
    for target in cfg.targets:
        for shots in cfg.shots:
            for seed in cfg.seeds:
                for label, e in entries.items():
                    name = cell_name(target, shots, seed, label, idents[label])
                    cell = {"target": target, "shots": shots, "seed": seed, "label": label, "name": name,
                            "entry": {"strategy": e.strategy, "label": e.label, "params": dict(e.params),
                                      "search": {k: list(v) for k, v in e.search.items()}}}
                    if (cells_dir / (name + ".parquet")).exists():
                        done.append(cell)
                    elif (cells_dir / (name + ".failed.json")).exists() and not retry_failed:
                        failed.append(cell)
                    else:
                        todo.append(cell)
    todo.sort(key=lambda c: _cost(entries[c["label"]], c["shots"]), reverse=True)
    return {"todo": todo, "done": done, "failed": failed, "entries": entries, "plain": plain}


def prepare(cfg: CompareConfig, todo: list[dict], entries: dict, weights: str | None, storage: Path,
            cells_dir: Path, log: Callable[[str], None] = print) -> tuple[dict, dict, dict]:
    """Target splits, cached embeddings (feature cells only) and the settings every cell shares."""
    from tl.embeddings import EmbedConfig, extract

    targets = sorted({c["target"] for c in todo})
    data = {t: target_data(cfg, t) for t in targets}
    embeddings: dict = {}
    if any(make_strategy(entries[c["label"]].strategy, entries[c["label"]].params).uses_embeddings for c in todo):
        ecfg = EmbedConfig(backbone=cfg.backbone, weights=weights, input_size=cfg.input_size,
                           cpus_per_actor=min(1.0, cfg.cpus_per_trial))
        for t in targets:
            embeddings[t] = {s: extract(data[t][s], ecfg, str(storage / "cache"), log).vectors
                             for s in ("test", "val") if data[t][s] is not None}
    fixed = {"backbone": cfg.backbone, "input_size": cfg.input_size, "queries": cfg.queries, "n_way": cfg.n_way,
             "episodes": cfg.episodes, "val_episodes": cfg.val_episodes, "cells_dir": str(cells_dir)}
    return data, embeddings, fixed


def dry_run(cfg: CompareConfig, storage: Path, log: Callable[[str], None] = print, retry_failed: bool = False) -> dict:
    """Say what a run would do (trials, episodes, estimated wall time) and run nothing: no Ray, no
    pretraining, no output folder."""
    cells_dir = storage / "runs" / cfg.experiment / "cells"
    p = plan(cfg, cells_dir, retry_failed)
    for t in cfg.targets:
        check_target(target_data(cfg, t), t, max(cfg.shots))
    est = estimate(cfg, p["todo"], p["entries"])
    log(f"[dry-run] {len(p['todo'])} trials to run of {len(p['todo']) + len(p['done']) + len(p['failed'])} cells "
        f"({len(p['done'])} finished, {len(p['failed'])} failed before); {est['test_episodes']} test episodes and "
        f"{est['val_episodes']} validation episodes; about {est['core_seconds'] / 60:.1f} core-minutes of training, "
        f"estimated wall time {est['wall_s'] / 60:.1f} min on {est['cores']} cores (from timed training steps on "
        f"this machine; pretraining, if the backbone is missing, adds about 1.5 min)")
    return {**est, "plan": p}


def run_compare(cfg: CompareConfig, storage: Path, output: Path, log: Callable[[str], None] = print,
                retry_failed: bool = False) -> dict:
    """Run every missing cell as a Tune trial, then write rows.parquet, summary.md, summary.csv,
    accuracy_vs_shots.png and best.yaml to ``output``."""
    from ray import tune

    from tl.pretrain import resolve_weights
    from tl.search import TrialProgress

    t0 = time.time()
    cells_dir = storage / "runs" / cfg.experiment / "cells"
    p = plan(cfg, cells_dir, retry_failed)
    todo, entries, plain = p["todo"], p["entries"], p["plain"]
    for t in cfg.targets:
        check_target(target_data(cfg, t), t, max(cfg.shots))  # bad data stops here, before any pretraining or trial
    cells_dir.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    if todo:
        from tl.models import make_backbone

        make_backbone(cfg.backbone, weights, cfg.input_size)  # weights that do not fit stop here, once
    total = len(todo) + len(p["done"]) + len(p["failed"])
    log(f"[compare] {total} cells ({len(cfg.targets)} targets x {len(cfg.shots)} shots x {len(cfg.seeds)} seeds x "
        f"{len(entries)} strategies), {cfg.episodes} test episodes each; {len(p['done'])} finished and "
        f"{len(p['failed'])} failed before (in {cells_dir}); {len(todo)} to run")
    if todo:
        data, embeddings, fixed = prepare(cfg, todo, entries, weights, storage, cells_dir, log)
        feature_labels = {lab for lab, e in entries.items() if make_strategy(e.strategy, e.params).uses_embeddings}

        def resources(config: dict) -> dict:
            return {"cpu": cfg.feature_cpus if config["cell"]["label"] in feature_labels else cfg.cpus_per_trial}

        trainable = tune.with_resources(
            tune.with_parameters(_cell_trial, data=data, embeddings=embeddings, weights=weights, fixed=fixed), resources)
        name = f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        tuner = tune.Tuner(
            trainable, param_space={"cell": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent or None, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage / "tune"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      callbacks=[TrialProgress(log, len(todo), "compare")]))
        tuner.fit()
    return write_outputs(cfg, cells_dir, output, weights, log, t0)


def write_outputs(cfg: CompareConfig, cells_dir: Path, output: Path, weights: str | None,
                  log: Callable[[str], None] = print, t0: float | None = None) -> dict:
    """Gather the finished cells of this config into the four outputs (and list failed cells)."""
    import yaml

    from tl.fewshot import describe, write_reports
    from tl.runtime import provenance

    p = plan(cfg, cells_dir)
    parts = [pd.read_parquet(cells_dir / (c["name"] + ".parquet")) for c in p["done"]]
    failures, unfinished = [], []
    for c in p["failed"] + p["todo"]:
        f = cells_dir / (c["name"] + ".failed.json")
        what = f"{c['target']} {c['shots']}-shot seed {c['seed']} {c['label']}"
        if f.exists():
            failures.append(f"{what}: {json.loads(f.read_text())['error']}")
        else:  # interrupted, or its trial died without a message: not a result, not a failure
            unfinished.append(what)
    if not parts:
        raise TrainingError("no cell finished:\n" + "\n".join(failures + unfinished))
    rows = pd.concat(parts, ignore_index=True)
    prov = provenance()
    rows["config"] = json.dumps(p["plain"], sort_keys=True)
    rows["git_commit"] = prov["git_commit"]
    rows["versions"] = json.dumps(prov["versions"], sort_keys=True)
    rows["hardware"] = json.dumps(prov["hardware"], sort_keys=True)
    rows = rows.sort_values(["target", "shots", "seed", "strategy", "episode"]).reset_index(drop=True)
    searched = [e.name() for e in cfg.strategies if e.search]
    note = describe({**p["plain"], "split": cfg.test_split}, rows, weights).replace(
        "Hyper-parameters are the strategies' defaults: nothing here was chosen on these test episodes.",
        "Hyper-parameters are the strategies' defaults" +
        (f", except {', '.join(searched)}, whose searched keys were chosen per cell on {cfg.val_episodes} validation "
         f"episodes of the `{cfg.val_split}` split (no image shared with the test episodes)" if searched else "") +
        ": nothing here was chosen on these test episodes.")
    chosen = rows.groupby(["target", "shots", "strategy"])["chosen"].first()
    chosen = chosen[chosen != "{}"]
    if len(chosen):
        note += "\n\nChosen on validation episodes: " + "; ".join(
            f"{s} {t} {k}-shot: {v}" for (t, k, s), v in chosen.items()) + "."
    short = rows[rows["short_classes"].fillna("{}") != "{}"] if "short_classes" in rows else rows.iloc[:0]
    for (t, k), g in short.groupby(["target", "shots"]):
        counts = json.loads(g["short_classes"].iloc[0])
        note += (f"\n\nSmall-data mode, {t} {k}-shot: these classes have fewer than {k} + {cfg.queries} images, so "
                 f"every image left after the shots is a query: effective queries per class "
                 + ", ".join(f"{c}: {n}" for c, n in counts.items()) + f" (others: {cfg.queries}).")
    if failures:
        note += "\n\nFAILED cells:\n" + "\n".join(f"- {f}" for f in failures)
    if unfinished:
        note = (f"**INCOMPLETE: {len(unfinished)} of {len(p['todo']) + len(p['done']) + len(p['failed'])} cells have "
                f"not finished** (rerun the same command, or with --resume, to finish them; finished cells are kept): "
                + ", ".join(unfinished) + ".\n\n" + note)
    summary = write_reports(rows, output, note, f"{cfg.backbone}: {cfg.episodes} test episodes x {len(cfg.seeds)} "
                            f"seed(s), {cfg.queries} queries/class")
    best = {}
    for (target, shots), g in summary.groupby(["target", "shots"]):
        top = g.sort_values("mean", ascending=False).iloc[0]
        label = top["strategy"]
        e = p["entries"][label]
        first = rows[(rows["target"] == target) & (rows["shots"] == shots) & (rows["strategy"] == label)].iloc[0]
        best.setdefault(str(target), {})[int(shots)] = {
            "label": label, "strategy": e.strategy, "params": json.loads(first["params"]),
            "accuracy": round(float(top["mean"]), 4), "ci95": round(float(top["ci95"]), 4),
            "episodes": int(top["episodes"]), "chosen_on_validation": json.loads(first["chosen"]),
        }
    per_class = per_class_report(rows, best, {t: target_data(cfg, t)["test"].classes for t in best}, output)
    with open(output / "summary.md", "a") as f:
        f.write("\n" + per_class)
    doc = {"experiment": cfg.experiment, "backbone": cfg.backbone, "weights": weights or cfg.weights,
           "note": "winner per target and shots by mean test accuracy over the shared episodes", "best": best}
    if unfinished:
        doc["incomplete"] = unfinished  # the winners above are among the finished cells only
    tmp = output / "best.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, output / "best.yaml")
    wall = time.time() - t0 if t0 else float("nan")
    log(f"[compare] {len(rows)} rows; summary in {output / 'summary.md'}; best in {output / 'best.yaml'} ({wall:.0f} s)")
    if failures:
        log("[compare] FAILED cells (rerun with --retry-failed after fixing them):\n" + "\n".join(f"  {f}" for f in failures))
    if unfinished:
        log(f"[compare] INCOMPLETE: {len(unfinished)} cells did not finish; run the same command again (or --resume)")
    return {"rows": len(rows), "failures": failures + unfinished, "unfinished": unfinished, "output": str(output), "wall_s": wall, "cells_dir": str(cells_dir)}


def target_data(cfg: CompareConfig, target: str) -> dict:
    return load_target(target, cfg.data.get(target), cfg.test_split, cfg.val_split)


def per_class_report(rows: pd.DataFrame, best: dict, classes: dict, output: Path) -> str:
    """Per-class accuracy and a confusion-matrix PNG for the best strategy of each target and shots."""
    from tl.evaluate import confusion_matrix
    from tl.report import plot_confusion

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


def _step_seconds(backbone: str, input_size: int | None, strat, n: int, cache: dict) -> float:
    """Measured seconds of one training step of ``strat`` on ``n`` images (random weights and data:
    the cost does not depend on them). Run in this process, single-threaded, like a trial."""
    import torch

    from tl.models import make_backbone
    from tl.strategies.base import EpisodeTask

    key = (strat.name, getattr(strat, "frozen", 0), getattr(strat, "batch_norm", ""), min(n, strat.batch_size))
    if key not in cache:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            bb = make_backbone(backbone, None, input_size)
            size = bb.preprocessing.size
            x = torch.rand(key[3], 3, *((size, size) if isinstance(size, int) else size))
            task = EpisodeTask(n_way=2, support_y=(torch.arange(key[3]) % 2).numpy(), seed=0, support_x=x,
                               query_x=x[:2], backbone=lambda: bb)
            run = strat.start_episode(task)
            run.advance(1)
            t0 = time.perf_counter()
            run.advance(4)
            cache[key] = (time.perf_counter() - t0) / 3
        finally:
            torch.set_num_threads(threads)
    return cache[key]


def estimate(cfg: CompareConfig, todo: list[dict], entries: dict, cores: int | None = None) -> dict:
    """Trials, episodes and an estimated wall time for ``todo``, from a few timed training steps on
    this machine (nothing is trained for real and no trial runs)."""
    cores = cores or os.cpu_count() or 1
    cache: dict = {}
    total_s, test_eps, val_eps = 0.0, 0, 0
    for c in todo:
        e = entries[c["label"]]
        cands = [make_strategy(e.strategy, p) for p in e.candidates()]
        n_way = cfg.n_way or 10
        test_eps += cfg.episodes
        v = cfg.val_episodes * len(cands) if len(cands) > 1 else 0
        val_eps += v
        for s in cands:
            eps = (cfg.val_episodes if len(cands) > 1 else 0) + (cfg.episodes if s is cands[0] else 0)
            if s.uses_embeddings:
                total_s += eps * 0.03
            else:
                total_s += eps * s.steps * _step_seconds(cfg.backbone, cfg.input_size, s, n_way * c["shots"], cache)
    trial_overhead = 3.0
    wall = total_s / cores + trial_overhead * len(todo) / cores + 10.0
    return {"trials": len(todo), "test_episodes": test_eps, "val_episodes": val_eps, "core_seconds": total_s,
            "wall_s": wall, "cores": cores}
