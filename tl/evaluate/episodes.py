"""The episode runner: the same seeded episodes for every strategy, one row per strategy x episode
(docs/architecture.md, "Evaluation protocol"). Feature strategies index the embedding cache; a
trained strategy's episode decodes and preprocesses its own images; a strategy that uses the
target's unlabelled pool (``Strategy.uses_pool``) gets it, less the episode's own queries when the
pool is the episodes' own split.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Callable, Sequence

import numpy as np
import torch

from tl.data import ImageSet
from tl.data.episodes import STREAMS, sample_episodes
from tl.models import Backbone
from tl.runtime import episode_device
from tl.strategies import EpisodeTask, Strategy

#: at most this many unlabelled images form an episode's pool (a seeded sample of a larger split):
#: an adaptation episode draws steps x target batch images from it (60 x 32 by default), so a pool
#: of a user's 50,000 images would cost memory in every trial and change nothing; the embedded
#: targets' pools (500 and 898 images) are used whole
MAX_POOL = 1024


class Episodes:
    """Seeded episodes of ``data`` and the tensors/embeddings every strategy's task is cut from.
    A trained strategy's episode decodes and preprocesses its own n_way x (K + Q) images
    (``ImageSet.pixels``), never the whole split. ``stream``: which stream of episodes
    (``tl.data.episodes.STREAMS``); ``folds``: a fold per row of ``data`` (``query_folds``): each
    episode's queries come from one fold, and ``backbone``/``embeddings`` may then be ``{fold: ...}``,
    those whose statistics were estimated without that fold."""

    def __init__(self, strategies, data: ImageSet, shots: int, queries: int, episodes: int, seed: int,
                 n_way: int | None, backbone: "Backbone | dict[int, Backbone] | None",
                 embeddings: "np.ndarray | dict[int, np.ndarray] | None",
                 unlabelled: ImageSet | None, start: int = 0, stream: str = "test", folds: np.ndarray | None = None):
        self.seed, self.backbone, self.embeddings, self.data = seed, backbone, embeddings, data
        self.device = episode_device()
        self.episodes = sample_episodes(data.labels, n_way, shots, queries, episodes, seed, data.classes, start=start,
                                        stream=STREAMS[stream], folds=folds)
        self.pool = self.pool_rows = None
        # validation episodes whose unlabelled pool is their own split: an episode's queries are left
        # out of its pool, so an adaptation strategy never trains on the images it is scored on
        self.pool_is_data = unlabelled is data
        strategies = list(strategies)
        if any(not s.uses_embeddings for s in strategies) and backbone is None:
            raise ValueError("trained strategies need a backbone")
        if any(s.uses_embeddings for s in strategies) and embeddings is None:
            raise ValueError("feature strategies need embeddings")
        wants_pool = any(s.uses_pool and not s.uses_embeddings for s in strategies)
        if unlabelled is not None and backbone is not None and wants_pool:
            rows = np.arange(len(unlabelled))
            if len(rows) > MAX_POOL:
                rows = np.sort(np.random.default_rng([seed, 7919]).choice(rows, MAX_POOL, replace=False))
            self.pool_rows, self.pool = rows, self._prepared(unlabelled, rows)

    def _prepared(self, data: ImageSet, rows: np.ndarray) -> torch.Tensor:
        backbone = next(iter(self.backbone.values())) if isinstance(self.backbone, dict) else self.backbone
        with torch.no_grad():
            return backbone.preprocessing(torch.from_numpy(data.pixels(rows)))

    @staticmethod
    def _of(value, ep):
        """``value``, or its entry for the episode's fold."""
        return value[ep.fold] if isinstance(value, dict) else value

    def task(self, strat: Strategy, ep) -> EpisodeTask:
        task = EpisodeTask(n_way=len(ep.classes), support_y=ep.support_labels, seed=self.seed * 100_003 + ep.index,
                           device=self.device)
        if strat.uses_embeddings:
            emb = self._of(self.embeddings, ep)
            task.support_emb, task.query_emb = emb[ep.support], emb[ep.query]
        else:
            backbone = self._of(self.backbone, ep)
            x = self._prepared(self.data, np.concatenate([ep.support, ep.query]))
            task.support_x, task.query_x = x[: len(ep.support)], x[len(ep.support):]
            task.backbone = lambda: copy.deepcopy(backbone)
            if strat.uses_pool and self.pool is not None:
                task.unlabelled_x = self.pool
                if self.pool_is_data:
                    keep = ~np.isin(self.pool_rows, ep.query)
                    task.unlabelled_x = self.pool[torch.from_numpy(keep)]
        return task


def pool_size(task: EpisodeTask) -> int:
    """How many unlabelled target images the episode's strategy was handed (0: none)."""
    return 0 if task.unlabelled_x is None else int(len(task.unlabelled_x))


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
    stream: str = "test",
    folds: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Run every strategy on the same ``episodes`` episodes of ``data``; one row per strategy x episode.

    ``backbone`` is the pretrained backbone (copied fresh for each episode of a trained strategy);
    ``embeddings`` are row-aligned with ``data`` (from the cache), for feature strategies;
    ``unlabelled``: the target's unlabelled pool, handed to the strategies that use it; ``folds``: see
    ``Episodes`` (a row's ``fold`` says which fold its queries came from). A row's
    ``pool`` says how many pool images its strategy got; ``cost`` is the strategy's deterministic
    relative cost of one episode (``Strategy.episode_cost``), which breaks ties, never the timer.
    """
    eps = Episodes(strategies.values(), data, shots, queries, episodes, seed, n_way, backbone, embeddings,
                   unlabelled, start, stream, folds)
    rows = []
    for n, ep in enumerate(eps.episodes):
        for label, strat in strategies.items():
            task = eps.task(strat, ep)
            t0 = time.perf_counter()
            pred = strat.predict_episode(task)
            secs = time.perf_counter() - t0
            rows.append({
                "strategy": label, "method": strat.name, "family": strat.family, "target": target or data.name,
                "shots": shots, "seed": seed, "episode": ep.index, "fold": ep.fold, "n_way": len(ep.classes),
                "queries": queries,
                "accuracy": float(np.mean(pred == ep.query_labels)), "seconds": secs,
                "cost": float(strat.episode_cost(shots)), "pool": pool_size(task),
                "params": json.dumps(strat.params(), sort_keys=True),
                "confusion": _confusion(ep, pred),
                "short_classes": json.dumps({data.classes[c]: n for c, n in ep.query_counts().items() if n < queries}),
            })
        if progress is not None:
            progress(n + 1, len(eps.episodes))
    return rows


def _confusion(ep, pred: np.ndarray) -> str:
    """``{"true,pred": count}`` over the dataset's class ids: per-class accuracy and confusion
    matrices are summed from these across episodes (``tl.evaluate.confusion``)."""
    classes = np.asarray(ep.classes)
    pairs, counts = np.unique(np.stack([classes[ep.query_labels], classes[np.asarray(pred)]]), axis=1,
                              return_counts=True)
    return json.dumps({f"{int(t)},{int(p)}": int(n) for (t, p), n in zip(pairs.T, counts)})


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
    stream: str = "validation",
    folds: np.ndarray | None = None,
    on_report: Callable[[int, float], None] | None = None,
    on_pool: Callable[[int], None] | None = None,
) -> list[tuple[int, float]]:
    """Mean episode accuracy of one strategy after each of ``report_steps`` training steps.

    Every episode's model is advanced to the next milestone, then all are evaluated: a search
    (ASHA) can stop the candidate between milestones, and the budget it spent is the steps reached.
    A feature strategy has no steps: it fits once and reports the same accuracy at each milestone.
    ``unlabelled``: the target's pool for a strategy that uses it (``on_pool`` is told the smallest
    number of pool images an episode got, so a search records it).
    """
    eps = Episodes([strategy], data, shots, queries, episodes, seed, n_way, backbone, embeddings, unlabelled,
                   stream=stream, folds=folds)
    out: list[tuple[int, float]] = []
    tasks = [eps.task(strategy, ep) for ep in eps.episodes]
    if on_pool is not None:
        on_pool(min(pool_size(t) for t in tasks))
    runs = [strategy.start_episode(t) for t in tasks]
    for steps in report_steps:
        acc = []
        for run, ep in zip(runs, eps.episodes):
            run.advance(int(steps))
            acc.append(float(np.mean(run.predict() == ep.query_labels)))
        out.append((int(steps), float(np.mean(acc))))
        if on_report is not None:
            on_report(*out[-1])
    return out
