"""Seeded N-way K-shot Q-query episodes.

Episode ``i`` of seed ``s`` is drawn from its own generator, ``default_rng([s, i])``, so every
strategy that asks with the same seed gets the same episodes (paired comparisons, docs/architecture.md, "Evaluation protocol")
whatever the number of episodes asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tl.errors import DataError


@dataclass(frozen=True)
class Episode:
    """Indices into one ImageSet; ``classes`` are the dataset's label ids, in episode order."""

    seed: int
    index: int
    classes: tuple[int, ...]
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray

    @property
    def shots(self) -> int:
        return len(self.support) // len(self.classes)

    def query_counts(self) -> dict[int, int]:
        """Queries per class (fewer than asked only in small-data mode)."""
        return {c: int((self.query_labels == j).sum()) for j, c in enumerate(self.classes)}


def sample_episodes(
    labels: np.ndarray,
    n_way: int | None,
    k_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int,
    class_names: Sequence[str] | None = None,
    start: int = 0,
) -> list[Episode]:
    """Draw episodes ``start .. start+n_episodes-1``; ``n_way=None`` means every class.

    Episode labels are 0..N-1 in the order of ``Episode.classes``; support and query never share an
    image. Small-data mode: a class with fewer than K+Q images uses every image left after its K
    shots as queries (``query_counts`` says how many); a class with K images or fewer, leaving no
    query, is an error naming the class and the counts.
    """
    labels = np.asarray(labels)
    present = np.unique(labels[labels >= 0])
    names = list(class_names) if class_names is not None else [str(c) for c in range(int(present.max()) + 1)]
    if k_shot < 1:
        raise DataError(f"shots must be at least 1, got {k_shot}")
    if n_query < 1:
        raise DataError(f"queries per class must be at least 1, got {n_query}")
    if n_episodes < 1:
        raise DataError(f"the number of episodes must be at least 1, got {n_episodes}")
    n_way = len(present) if n_way is None else n_way
    if not 2 <= n_way <= len(present):
        raise DataError(f"{n_way}-way episodes need between 2 and {len(present)} classes")
    by_class = {int(c): np.flatnonzero(labels == c) for c in present}
    need = k_shot + n_query
    for c, idx in by_class.items():
        if len(idx) < k_shot + 1:
            raise DataError(
                f"class '{names[c]}' has {len(idx)} images, fewer than shots + one query = {k_shot} + 1 "
                f"(asked for {k_shot} + {n_query} = {need})"
            )
    episodes = []
    for i in range(start, start + n_episodes):
        rng = np.random.default_rng([seed, i])
        chosen = np.sort(rng.choice(present, size=n_way, replace=False)) if n_way < len(present) else present
        sup, sup_y, qry, qry_y = [], [], [], []
        for j, c in enumerate(chosen):
            pick = rng.choice(by_class[int(c)], size=min(need, len(by_class[int(c)])), replace=False)
            sup.append(pick[:k_shot])
            qry.append(pick[k_shot:])
            sup_y.append(np.full(k_shot, j))
            qry_y.append(np.full(len(pick) - k_shot, j))
        episodes.append(
            Episode(
                seed=seed, index=i, classes=tuple(int(c) for c in chosen),
                support=np.concatenate(sup), support_labels=np.concatenate(sup_y),
                query=np.concatenate(qry), query_labels=np.concatenate(qry_y),
            )
        )
    return episodes


def take_shots(labels: np.ndarray, classes: Sequence[str], shots: int, seed: int, where: str) -> np.ndarray:
    """Sorted row indices of ``shots`` images per class drawn by ``seed`` (what an export trains on and a
    recommendation scores); a class with fewer is an error naming it and ``where`` it is."""
    rng = np.random.default_rng(seed)
    keep = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise DataError(f"class '{name}' of '{where}' has {len(idx)} images, fewer than shots={shots}")
        keep.extend(rng.choice(idx, shots, replace=False))
    return np.sort(np.asarray(keep))
