"""Feature-extraction strategies: classifiers fitted on frozen, cached embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    protocol, Kornblith et al. 2019): softmax cross-entropy, full batch, Adam (Kingma & Ba 2015),
    weight decay; features standardised per episode. Written with NumPy: at this size autograd's
    overhead would cost more than the arithmetic."""

    name = "linear_probe"
    lr: float = 0.05
    steps: int = 100
    weight_decay: float = 1e-3

    def fit_predict(self, support, labels, query, n_way):
        mu, sd = support.mean(0), support.std(0) + 1e-6
        x = ((support - mu) / sd).astype(np.float64)
        onehot = np.eye(n_way)[np.asarray(labels)]
        w = np.random.default_rng(0).normal(scale=0.01, size=(x.shape[1], n_way))
        b = np.zeros(n_way)
        params, m, v = [w, b], [np.zeros_like(w), np.zeros_like(b)], [np.zeros_like(w), np.zeros_like(b)]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for t in range(1, self.steps + 1):
            logits = x @ w + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - onehot) / len(x)
            grads = [x.T @ g + self.weight_decay * w, g.sum(0)]
            for i, gr in enumerate(grads):
                m[i] = beta1 * m[i] + (1 - beta1) * gr
                v[i] = beta2 * v[i] + (1 - beta2) * gr * gr
                params[i] -= self.lr * (m[i] / (1 - beta1**t)) / (np.sqrt(v[i] / (1 - beta2**t)) + eps)
        return (((query - mu) / sd) @ w + b).argmax(1)
