"""Episodic evaluation: the same seeded episodes for every strategy, one row per episode, and the
validation episodes a cell's choices are made on (docs/architecture.md, "Evaluation protocol"; the statistics over the rows are
``tl.stats`` and ``tl.report``). Feature strategies index the embedding cache; nothing is recomputed
per episode.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from tl.data import ImageSet, sample_episodes
from tl.errors import ConfigError, TrainingError
from tl.models import Backbone
from tl.runtime import episode_device
from tl.strategies import EpisodeTask, Strategy, StrategyEntry

#: at most this many unlabelled images form an episode's pool (a seeded sample of a larger split):
#: an adaptation episode draws steps x target batch images from it (60 x 32 by default), so a pool
#: of a user's 50,000 images would cost memory in every trial and change nothing; the embedded
#: targets' pools (500 and 898 images) are used whole
MAX_POOL = 1024


class _Episodes:
    """Seeded episodes of ``data`` and the tensors/embeddings every strategy's task is cut from.
    A trained strategy's episode decodes and preprocesses its own n_way x (K + Q) images
    (``ImageSet.pixels``), never the whole split."""

    def __init__(self, strategies, data: ImageSet, shots: int, queries: int, episodes: int, seed: int,
                 n_way: int | None, backbone: Backbone | None, embeddings: np.ndarray | None,
                 unlabelled: ImageSet | None, start: int = 0):
        self.seed, self.backbone, self.embeddings, self.data = seed, backbone, embeddings, data
        self.device = episode_device()
        self.episodes = sample_episodes(data.labels, n_way, shots, queries, episodes, seed, data.classes, start=start)
        self.pool = self.pool_rows = None
        # validation episodes whose unlabelled pool is their own split: an episode's queries are left
        # out of its pool, so an adaptation strategy never trains on the images it is scored on
        self.pool_is_data = unlabelled is data
        if any(not s.uses_embeddings for s in strategies) and backbone is None:
            raise ValueError("trained strategies need a backbone")
        if any(s.uses_embeddings for s in strategies) and embeddings is None:
            raise ValueError("feature strategies need embeddings")
        if unlabelled is not None and backbone is not None:
            rows = np.arange(len(unlabelled))
            if len(rows) > MAX_POOL:
                rows = np.sort(np.random.default_rng([seed, 7919]).choice(rows, MAX_POOL, replace=False))
            self.pool_rows, self.pool = rows, self._prepared(unlabelled, rows)

    def _prepared(self, data: ImageSet, rows: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.preprocessing(torch.from_numpy(data.pixels(rows)))

    def task(self, strat: Strategy, ep) -> EpisodeTask:
        task = EpisodeTask(n_way=len(ep.classes), support_y=ep.support_labels, seed=self.seed * 100_003 + ep.index,
                           device=self.device)
        if strat.uses_embeddings:
            task.support_emb, task.query_emb = self.embeddings[ep.support], self.embeddings[ep.query]
        else:
            backbone = self.backbone
            x = self._prepared(self.data, np.concatenate([ep.support, ep.query]))
            task.support_x, task.query_x = x[: len(ep.support)], x[len(ep.support):]
            task.backbone = lambda: copy.deepcopy(backbone)
            task.unlabelled_x = self.pool
            if self.pool is not None and self.pool_is_data:
                keep = ~np.isin(self.pool_rows, ep.query)
                task.unlabelled_x = self.pool[torch.from_numpy(keep)]
        return task


def run_episodes(
    strategies: dict[str, Strategy],
    data: ImageSet,
    *,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    n_way: int | None = None,
    backbone: Backbone | None = None,
    embeddings: np.ndarray | None = None,
    unlabelled: ImageSet | None = None,
    target: str | None = None,
    start: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Run every strategy on the same ``episodes`` episodes of ``data``; one row per strategy x episode.

    ``backbone`` is the pretrained backbone (copied fresh for each episode of a trained strategy);
    ``embeddings`` are row-aligned with ``data`` (from the cache), for feature strategies.
    """
    eps = _Episodes(strategies.values(), data, shots, queries, episodes, seed, n_way, backbone, embeddings,
                    unlabelled, start)
    rows = []
    for n, ep in enumerate(eps.episodes):
        for label, strat in strategies.items():
            task = eps.task(strat, ep)
            t0 = time.perf_counter()
            pred = strat.predict_episode(task)
            secs = time.perf_counter() - t0
            rows.append({
                "strategy": label, "method": strat.name, "family": strat.family, "target": target or data.name,
                "shots": shots, "seed": seed, "episode": ep.index, "n_way": len(ep.classes), "queries": queries,
                "accuracy": float(np.mean(pred == ep.query_labels)), "seconds": secs,
                "params": json.dumps(strat.params(), sort_keys=True),
                "confusion": _confusion(ep, pred),
                "short_classes": json.dumps({data.classes[c]: n for c, n in ep.query_counts().items() if n < queries}),
            })
        if progress is not None:
            progress(n + 1, len(eps.episodes))
    return rows


def _confusion(ep, pred: np.ndarray) -> str:
    """``{"true,pred": count}`` over the dataset's class ids: per-class accuracy and confusion
    matrices are summed from these across episodes."""
    classes = np.asarray(ep.classes)
    pairs, counts = np.unique(np.stack([classes[ep.query_labels], classes[np.asarray(pred)]]), axis=1,
                              return_counts=True)
    return json.dumps({f"{int(t)},{int(p)}": int(n) for (t, p), n in zip(pairs.T, counts)})


def confusion_matrix(rows: pd.DataFrame, n_classes: int) -> np.ndarray:
    """Summed confusion counts (true class x predicted class) of the given result rows."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cell in rows["confusion"]:
        for key, n in json.loads(cell).items():
            t, p = map(int, key.split(","))
            m[t, p] += n
    return m


def staged_accuracy(
    strategy: Strategy,
    data: ImageSet,
    *,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    report_steps: Sequence[int],
    n_way: int | None = None,
    backbone: Backbone | None = None,
    embeddings: np.ndarray | None = None,
    unlabelled: ImageSet | None = None,
    on_report: Callable[[int, float], None] | None = None,
) -> list[tuple[int, float]]:
    """Mean episode accuracy of one strategy after each of ``report_steps`` training steps.

    Every episode's model is advanced to the next milestone, then all are evaluated: a search
    (ASHA) can stop the candidate between milestones, and the budget it spent is the steps reached.
    A feature strategy has no steps: it fits once and reports the same accuracy at each milestone.
    """
    eps = _Episodes([strategy], data, shots, queries, episodes, seed, n_way, backbone, embeddings, unlabelled)
    out: list[tuple[int, float]] = []
    runs = [strategy.start_episode(eps.task(strategy, ep)) for ep in eps.episodes]
    for steps in report_steps:
        acc = []
        for run, ep in zip(runs, eps.episodes):
            run.advance(int(steps))
            acc.append(float(np.mean(run.predict() == ep.query_labels)))
        out.append((int(steps), float(np.mean(acc))))
        if on_report is not None:
            on_report(*out[-1])
    return out


def run_cell(spec: dict, data: dict, embeddings: dict, weights: str | None, fixed: dict,
             target_weights: dict | None = None) -> tuple[pd.DataFrame, str]:
    """The work of one few-shot cell, wherever it runs (a Tune trial, a plain loop): the inner search
    on validation episodes when the entry has one, then the test episodes. ``spec``: target, shots,
    seed, label and the strategy entry; ``embeddings``: ``{target: {bn_stats: {split: vectors}}}``;
    ``target_weights``: ``{target: weights}`` with target BatchNorm statistics, for a strategy with
    ``bn_stats: target``. Returns the rows and a short line for the progress output."""
    from tl.models import make_backbone

    target, shots, seed, label = spec["target"], spec["shots"], spec["seed"], spec["label"]
    entry = StrategyEntry(**spec["entry"])
    cands = [entry.build(p) for p in entry.candidates()]
    bn = cands[0].bn_stats
    if bn == "target":
        if target not in (target_weights or {}):
            raise ConfigError(f"strategy '{label}': bn_stats target, but no target-statistics weights were made "
                              f"for target '{target}'")
        weights = target_weights[target]
    emb = (embeddings.get(target) or {}).get(bn) or {}
    backbone = None if cands[0].uses_embeddings else make_backbone(fixed["backbone"], weights, fixed["input_size"])
    # an adaptation strategy's unlabelled target pool: the validation half (docs/architecture.md, "The embedded suite"), never a test image
    pool = data[target]["val"] if cands[0].needs_target else None
    # every cell scores its strategy on the validation episodes (the recommendation is made there);
    # a cell with a search also chooses its candidate there
    sel = None
    if fixed.get("validate", True) and data[target].get("val") is not None:
        sel = select_on_validation(
            cands, data[target]["val"], shots=shots, queries=fixed["queries"], episodes=fixed["val_episodes"],
            seed=seed, n_way=fixed["n_way"], backbone=backbone, embeddings=emb.get("val"), unlabelled=pool,
            rule=fixed.get("val_rule", "full") if len(cands) > 1 else "full")
    strat = cands[sel.best if sel else 0]
    rows = run_episodes({label: strat}, data[target]["test"], shots=shots, queries=fixed["queries"],
                        episodes=fixed["episodes"], seed=seed, n_way=fixed["n_way"], backbone=backbone,
                        embeddings=emb.get("test"), target=target, unlabelled=pool)
    df = pd.DataFrame(rows)
    chosen = json.dumps({k: strat.params()[k] for k in entry.search}, sort_keys=True)
    df["chosen"] = chosen
    df["val_accuracy"] = sel.scores[sel.best] if sel else float("nan")
    df["val_scores"] = json.dumps([[{k: c.params()[k] for k in entry.search}, a, n] for c, a, n in
                                   zip(cands, sel.scores, sel.steps)] if len(cands) > 1 else [])
    # the chosen strategy's accuracy per validation episode (index, accuracy): paired across strategies
    df["val_episodes"] = json.dumps(sel.per_episode[sel.best] if sel else [])
    extra = f" (chose {chosen} on validation)" if chosen != "{}" else ""
    return df, f"{100 * df['accuracy'].mean():.1f}%{extra}"


VAL_RULES = ("full", "halving")


@dataclass
class Selection:
    """Validation scores of a cell's candidates: ``scores[i]`` at ``steps[i]`` training steps;
    ``best`` is the highest score among the candidates trained to their full budget."""

    scores: list[float]
    steps: list[int]
    best: int
    per_episode: list[list[tuple[int, float]]]  # per candidate: (episode index, accuracy) at its last steps


def select_on_validation(cands: list[Strategy], data: ImageSet, *, shots: int, queries: int, episodes: int,
                         seed: int, n_way: int | None, backbone: Backbone | None, embeddings: np.ndarray | None,
                         unlabelled: ImageSet | None, rule: str = "full", eta: int = 3) -> Selection:
    """Score every candidate on the same validation episodes (-inf for one that diverges).

    ``full`` trains every candidate to its full budget. ``halving`` is successive halving (Jamieson
    and Talwalkar 2016; the rule inside ASHA, Li et al. 2020): every candidate trains a third of its
    steps, the best ``ceil(n / eta)`` go on to the full budget, and the choice is made among those."""
    eps = _Episodes(cands, data, shots, queries, episodes, seed, n_way, backbone, embeddings, unlabelled)
    budgets = [int(getattr(s, s.budget_key)) if s.budget_key else 1 for s in cands]
    rungs = [[b] if rule == "full" else sorted({max(1, b // eta), b}) for b in budgets]
    runs: dict[int, list] = {}
    scores, steps = [float("-inf")] * len(cands), [0] * len(cands)
    per_episode: list[list[tuple[int, float]]] = [[] for _ in cands]
    alive = list(range(len(cands)))
    levels = max(len(r) for r in rungs)
    for level in range(levels):
        for i in alive:
            steps[i] = rungs[i][min(level, len(rungs[i]) - 1)]
            try:
                if i not in runs:
                    runs[i] = [cands[i].start_episode(eps.task(cands[i], ep)) for ep in eps.episodes]
                acc = []
                for run, ep in zip(runs[i], eps.episodes):
                    run.advance(steps[i])
                    acc.append(float(np.mean(run.predict() == ep.query_labels)))
                scores[i] = float(np.mean(acc))
                per_episode[i] = [(int(ep.index), a) for ep, a in zip(eps.episodes, acc)]
            except TrainingError:
                scores[i] = float("-inf")  # a candidate that diverges loses the search; the others go on
                per_episode[i] = []
        if level + 1 < levels:
            alive = sorted(alive, key=lambda i: (-scores[i], i))[:max(1, math.ceil(len(alive) / eta))]
            runs = {i: r for i, r in runs.items() if i in alive}  # free the eliminated candidates' models
    best = max(alive, key=lambda i: (scores[i], -i))
    return Selection(scores, steps, best, per_episode)
