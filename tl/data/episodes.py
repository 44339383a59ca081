"""Seeded N-way K-shot Q-query episodes.

Episode ``i`` of seed ``s`` is drawn from its own generator, ``default_rng([s, i])``, so every
strategy that asks with the same seed gets the same episodes (paired comparisons, DESIGN section 3)
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
    image. A class with fewer than K+Q images is an error naming the class and the counts.
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
        if len(idx) < need:
            raise DataError(
                f"class '{names[c]}' has {len(idx)} images, fewer than shots + queries = "
                f"{k_shot} + {n_query} = {need}"
            )
    episodes = []
    for i in range(start, start + n_episodes):
        rng = np.random.default_rng([seed, i])
        chosen = np.sort(rng.choice(present, size=n_way, replace=False)) if n_way < len(present) else present
        sup, sup_y, qry, qry_y = [], [], [], []
        for j, c in enumerate(chosen):
            pick = rng.choice(by_class[int(c)], size=need, replace=False)
            sup.append(pick[:k_shot])
            qry.append(pick[k_shot:])
            sup_y.append(np.full(k_shot, j))
            qry_y.append(np.full(n_query, j))
        episodes.append(
            Episode(
                seed=seed, index=i, classes=tuple(int(c) for c in chosen),
                support=np.concatenate(sup), support_labels=np.concatenate(sup_y),
                query=np.concatenate(qry), query_labels=np.concatenate(qry_y),
            )
        )
    return episodes
