"""Transductive feature strategies: prototypes refined with the episode's unlabelled queries.

An inductive classifier predicts each query alone; these read every query of the episode together
(unlabelled: never a query's label), so one query's prediction may change when the others do.
Their accuracy is therefore not comparable to an inductive row's without saying so: the summary
lists them apart (``tl.report``). In an exported model the unlabelled images are the target's pool
(``fit_head(..., unlabelled=...)``), and the fitted head is a fixed linear map like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tl.errors import ConfigError
from tl.strategies.feature import FeatureHead, _HeadStrategy, _l2


def _prototypes(s: np.ndarray, labels: np.ndarray, n_way: int) -> np.ndarray:
    return _l2(np.stack([s[labels == c].mean(0) for c in range(n_way)]))


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


@dataclass(frozen=True)
class _Transductive(_HeadStrategy):
    transductive = True

    def fit_head(self, support: np.ndarray, labels: np.ndarray, n_way: int,
                 unlabelled: np.ndarray | None = None) -> FeatureHead:
        raise NotImplementedError

    def fit_predict(self, support, labels, query, n_way):
        return self.fit_head(support, labels, n_way, unlabelled=query).scores(query).argmax(1)


@dataclass(frozen=True)
class BDCSPN(_Transductive):
    """Prototype rectification, BD-CSPN (Liu et al. 2020, "Prototype Rectification for Few-Shot
    Learning", ECCV). Cross-class bias: every unlabelled feature is shifted by the difference of the
    support and unlabelled means, ξ = mean(support) − mean(unlabelled). Intra-class bias: the
    ``top_z`` unlabelled images most confidently assigned to each class by the cosine prototypes
    join its support, and the prototype becomes their mean weighted by softmax(``epsilon`` × cosine
    to the old prototype). Classifies by cosine to the rectified prototypes."""

    name = "bd_cspn"
    top_z: int = 8
    epsilon: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_z < 0 or self.epsilon <= 0:
            raise ConfigError(f"strategy '{self.name}': top_z must be >= 0 and epsilon positive")

    def fit_head(self, support, labels, n_way, unlabelled=None):
        labels = np.asarray(labels)
        protos = _prototypes(_l2(support), labels, n_way)
        if unlabelled is None or not len(unlabelled):
            return FeatureHead("cosine", protos.T, normalize=True, scale=10.0)
        shift = support.mean(0) - unlabelled.mean(0)
        s, u = _l2(support), _l2(unlabelled + shift)
        sims = u @ protos.T
        pseudo, conf = sims.argmax(1), sims.max(1)
        rect = []
        for c in range(n_way):
            mine = np.flatnonzero(pseudo == c)
            picked = mine[np.argsort(-conf[mine], kind="stable")[: self.top_z]]
            x = np.concatenate([s[labels == c], u[picked]])
            w = _softmax(self.epsilon * (x @ protos[c]))
            rect.append(w @ x)
        # x + ξ as the head's standardisation ((x - mean) / std with mean = −ξ, std = 1), then cosine
        return FeatureHead("cosine", _l2(np.stack(rect)).T, mean=-shift, std=np.ones_like(shift), normalize=True,
                           scale=10.0)


@dataclass(frozen=True)
class SoftKMeans(_Transductive):
    """Prototypes refined by soft k-means over the unlabelled images (Ren et al. 2018, "Meta-Learning
    for Semi-Supervised Few-Shot Classification", ICLR): each unlabelled image is assigned to every
    class by softmax(−‖x − p‖² / 2 × ``temperature``) on L2-normalised features (= softmax of
    ``temperature`` × cosine), and each prototype becomes the mean of its support images and the
    unlabelled ones weighted by their assignments; ``iterations`` refinement steps (the paper: one).
    The default temperature was chosen on validation episodes of the embedded targets' `adapt` split
    (30 episodes of 1 and 5 shots; 10 and 30 pulled the prototypes together and lost to plain
    prototypes on optdigits under source statistics)."""

    name = "soft_kmeans"
    temperature: float = 100.0
    iterations: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 0 or self.temperature <= 0:
            raise ConfigError(f"strategy '{self.name}': iterations must be >= 0 and temperature positive")

    def fit_head(self, support, labels, n_way, unlabelled=None):
        labels = np.asarray(labels)
        s = _l2(support)
        protos = _prototypes(s, labels, n_way)
        if unlabelled is not None and len(unlabelled):
            u = _l2(unlabelled)
            onehot = np.eye(n_way)[labels]
            sums, counts = onehot.T @ s, onehot.sum(0)
            for _ in range(self.iterations):
                z = _softmax(self.temperature * (u @ protos.T))
                protos = _l2((sums + z.T @ u) / (counts + z.sum(0))[:, None])
        return FeatureHead("cosine", protos.T, normalize=True, scale=10.0)
