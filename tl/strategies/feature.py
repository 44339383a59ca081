"""Feature-extraction strategies: classifiers fitted on frozen, cached embeddings.

Each strategy fits a ``FeatureHead`` (``fit_head``), a linear map on transformed embeddings, and
classifies with it (``fit_predict``): one code path for the few-shot episodes and for the exported
model, whose head holds the same arrays (``tl.model_file``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tl.strategies.base import FeatureStrategy


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class FeatureHead:
    """A fitted classifier on embeddings: ``scores = T(x) @ weight + bias``, where ``T`` standardises
    (``mean``, ``std``) and/or L2-normalises (``normalize``); ``weight`` is features x classes.
    ``scale`` turns scores into logits for probabilities (cosine similarities lie in [-1, 1]); it
    never changes the predicted class."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    normalize: bool = False
    scale: float = 1.0

    def scores(self, x: np.ndarray) -> np.ndarray:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.normalize:
            x = _l2(x)
        s = x @ self.weight
        return s if self.bias is None else s + self.bias


@dataclass(frozen=True)
class _HeadStrategy(FeatureStrategy):
    def fit_head(self, support: np.ndarray, labels: np.ndarray, n_way: int) -> FeatureHead:
        """The fitted head for classes 0..n_way-1."""
        raise NotImplementedError

    def fit_predict(self, support, labels, query, n_way):
        return self.fit_head(support, labels, n_way).scores(query).argmax(1)


@dataclass(frozen=True)
class Prototype(_HeadStrategy):
    """Nearest class mean by cosine similarity (prototypes as in Snell et al. 2017; the cosine,
    L2-normalised form of SimpleShot, Wang et al. 2019). No hyper-parameters. Probabilities of an
    exported model are a softmax of 10 x cosine (the scale of cosine classifiers, Chen et al. 2019)."""

    name = "prototype"

    def fit_head(self, support, labels, n_way):
        s = _l2(support)
        protos = _l2(np.stack([s[labels == c].mean(0) for c in range(n_way)]))
        return FeatureHead("cosine", protos.T, normalize=True, scale=10.0)


@dataclass(frozen=True)
class Logistic(_HeadStrategy):
    """L2-regularised logistic regression on L2-normalised embeddings (Tian et al. 2020,
    "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need"). ``C`` is the
    inverse regularisation strength."""

    name = "logistic"
    C: float = 10.0
    max_iter: int = 1000

    def fit_head(self, support, labels, n_way):
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=self.C, max_iter=self.max_iter)
        clf.fit(_l2(support), labels)
        coef, intercept, seen = clf.coef_, clf.intercept_, np.asarray(clf.classes_)
        if len(seen) == 2:  # binary: one decision value d; class 1 when d > 0, as softmax([0, d])
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        if len(seen) == n_way and np.array_equal(seen, np.arange(n_way)):
            return FeatureHead("logistic", coef.T, intercept, normalize=True)
        weight = np.zeros((coef.shape[1], n_way))  # classes without a support image are never predicted
        bias = np.full(n_way, -np.inf)
        weight[:, seen], bias[seen] = coef.T, intercept
        return FeatureHead("logistic", weight, bias, normalize=True)


@dataclass(frozen=True)
class LinearProbe(_HeadStrategy):
    """A linear head trained by gradient descent on the support embeddings (the linear evaluation
    protocol, Kornblith et al. 2019): softmax cross-entropy, full batch, Adam (Kingma & Ba 2015),
    weight decay; features standardised per episode. Written with NumPy: at this size autograd's
    overhead would cost more than the arithmetic."""

    name = "linear_probe"
    lr: float = 0.05
    steps: int = 100
    weight_decay: float = 1e-3

    def fit_head(self, support, labels, n_way):
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
        return FeatureHead("standardized", w, b, mean=mu, std=sd)
