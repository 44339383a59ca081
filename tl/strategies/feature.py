"""Feature-extraction strategies: classifiers fitted on frozen, cached embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tl.strategies.base import FeatureStrategy


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Prototype(FeatureStrategy):
    """Nearest class mean by cosine similarity (prototypes as in Snell et al. 2017; the cosine,
    L2-normalised form of SimpleShot, Wang et al. 2019). No hyper-parameters."""

    name = "prototype"

    def fit_predict(self, support, labels, query, n_way):
        s, q = _l2(support), _l2(query)
        protos = _l2(np.stack([s[labels == c].mean(0) for c in range(n_way)]))
        return (q @ protos.T).argmax(1)


@dataclass(frozen=True)
class Logistic(FeatureStrategy):
    """L2-regularised logistic regression on L2-normalised embeddings (Tian et al. 2020,
    "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need"). ``C`` is the
    inverse regularisation strength."""

    name = "logistic"
    C: float = 10.0
    max_iter: int = 1000

    def fit_predict(self, support, labels, query, n_way):
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
        clf.fit(_l2(support), labels)
        return clf.predict(_l2(query))


@dataclass(frozen=True)
class LinearProbe(FeatureStrategy):
    """A linear head trained by gradient descent on the support embeddings (the linear evaluation
    protocol, Kornblith et al. 2019), full batch with Adam; features are standardised per episode."""

    name = "linear_probe"
    lr: float = 0.05
    steps: int = 100
    weight_decay: float = 1e-3

    def fit_predict(self, support, labels, query, n_way):
        mu, sd = support.mean(0), support.std(0) + 1e-6
        x = torch.from_numpy((support - mu) / sd).float()
        y = torch.from_numpy(np.asarray(labels)).long()
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(x.shape[1], n_way, generator=gen) * 0.01).requires_grad_()
        b = torch.zeros(n_way, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            opt.zero_grad()
            F.cross_entropy(x @ w + b, y).backward()
            opt.step()
        with torch.no_grad():
            q = torch.from_numpy((query - mu) / sd).float()
            return (q @ w + b).argmax(1).numpy()
