"""Seeded N-way K-shot Q-query episodes.

Episode ``i`` of seed ``s`` is drawn from its own generator, ``default_rng([s, i])``, so every
strategy that asks with the same seed gets the same episodes (paired comparisons, docs/architecture.md, "Evaluation protocol")
whatever the number of episodes asked for. Episodes of another *stream* (validation, the choice of
a searched candidate) are drawn from ``default_rng([s, stream, i])``: validation episode ``i`` and
test episode ``i`` never share a generator, so with ``n_way`` below the class count they do not draw
the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tl.errors import DataError


#: episode streams: test episodes, the validation episodes every strategy is scored on (the
#: recommendation), and the episodes on which a searched entry chooses its candidate (never the ones
#: that score it, so a searched entry's validation figure is not the maximum of its candidates')
STREAMS = {"test": 0, "validation": 1, "selection": 2}


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
    fold: int = -1  # the fold its queries come from (``folds``), -1 when drawn from every row

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
    stream: int = 0,
    folds: np.ndarray | None = None,
) -> list[Episode]:
    """Draw episodes ``start .. start+n_episodes-1``; ``n_way=None`` means every class.

    ``stream``: 0 for test episodes (``[seed, i]``, as every table so far drew them), another value
    for another stream of episodes (``STREAMS``), independent of the test stream.
    ``folds``: a fold id per row (``query_folds``): episode ``i`` then draws its queries from fold
    ``i % n_folds`` only and its shots from the rest of the class, so statistics estimated on the
    other folds never saw its queries.

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
    n_folds = 0 if folds is None else int(np.max(folds)) + 1
    if folds is not None:
        folds = np.asarray(folds)
        for c, idx in by_class.items():
            empty = [f for f in range(n_folds) if not np.any(folds[idx] == f)]
            if empty:
                raise DataError(f"class '{names[c]}' has no image in validation fold {empty[0]} of {n_folds} "
                                f"({len(idx)} images in all): it needs at least {n_folds}")
    episodes = []
    for i in range(start, start + n_episodes):
        rng = np.random.default_rng([seed, i] if stream == 0 else [seed, stream, i])
        chosen = np.sort(rng.choice(present, size=n_way, replace=False)) if n_way < len(present) else present
        sup, sup_y, qry, qry_y = [], [], [], []
        for j, c in enumerate(chosen):
            idx = by_class[int(c)]
            if folds is None:
                pick = rng.choice(idx, size=min(need, len(idx)), replace=False)
                shots, queries = pick[:k_shot], pick[k_shot:]
            else:
                inside = idx[folds[idx] == i % n_folds]
                queries = rng.choice(inside, size=min(n_query, len(inside), len(idx) - k_shot), replace=False)
                shots = rng.choice(np.setdiff1d(idx, queries), size=k_shot, replace=False)
            sup.append(shots)
            qry.append(queries)
            sup_y.append(np.full(k_shot, j))
            qry_y.append(np.full(len(queries), j))
        episodes.append(
            Episode(
                seed=seed, index=i, classes=tuple(int(c) for c in chosen),
                support=np.concatenate(sup), support_labels=np.concatenate(sup_y),
                query=np.concatenate(qry), query_labels=np.concatenate(qry_y),
                fold=-1 if folds is None else i % n_folds,
            )
        )
    return episodes


def query_folds(labels: np.ndarray, n_folds: int = 2, seed: int = 7919) -> np.ndarray:
    """A fold id per row, stratified by class (a seeded permutation of each class dealt in turn), for
    validation episodes whose queries must stay out of statistics estimated on the other folds
    (``bn_stats: target``, ``tl.evaluate.cell``). Rows with label -1 get fold -1."""
    labels = np.asarray(labels)
    out = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[labels >= 0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = np.arange(len(idx)) % n_folds
    return out


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
