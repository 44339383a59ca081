"""The choice of a searched entry's candidate on validation episodes: every candidate to its full
budget, or successive halving (Jamieson and Talwalkar 2016; the rule inside ASHA, Li et al. 2020).
It runs on the ``selection`` stream of episodes, never on the ``validation`` episodes that then
score the chosen candidate beside the other strategies (the maximum of several candidates' means
on the same episodes is biased upwards: the winner's curse)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tl.data import ImageSet
from tl.errors import TrainingError
from tl.evaluate.episodes import Episodes
from tl.models import Backbone
from tl.strategies import Strategy

VAL_RULES = ("full", "halving")


@dataclass
class Selection:
    """Scores of a cell's candidates: ``scores[i]`` at ``steps[i]`` training steps; ``best`` is the
    highest score among the candidates trained to their full budget."""

    scores: list[float]
    steps: list[int]
    best: int
    per_episode: list[list[tuple[int, float]]]  # per candidate: (episode index, accuracy) at its last steps


def select_on_validation(cands: list[Strategy], data: ImageSet, *, shots: int, queries: int, episodes: int,
                         seed: int, n_way: int | None, backbone: "Backbone | dict | None", embeddings,
                         unlabelled: ImageSet | None, rule: str = "full", eta: int = 3,
                         stream: str = "selection", folds: np.ndarray | None = None) -> Selection:
    """Score every candidate on the same episodes of ``stream`` (-inf for one that diverges).

    ``full`` trains every candidate to its full budget. ``halving``: every candidate trains a third
    of its steps, the best ``ceil(n / eta)`` go on to the full budget, and the choice is made among those."""
    eps = Episodes(cands, data, shots, queries, episodes, seed, n_way, backbone, embeddings, unlabelled,
                   stream=stream, folds=folds)
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
