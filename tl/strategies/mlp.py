"""A two-layer probe on frozen embeddings: the head of the project's source description (a 512-unit
hidden layer with ReLU and dropout 0.5 on the frozen features, then the classifier), as a feature
strategy, so it reads the embedding cache like ``linear_probe`` and never touches an image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tl.errors import ConfigError
from tl.nn.heads import MLPHead
from tl.strategies.base import EpisodeTask, FeatureStrategy


@dataclass(frozen=True)
class MLPProbe(FeatureStrategy):
    """Standardised embeddings -> Linear(``hidden``) -> ReLU -> Dropout(``dropout``) -> Linear, trained
    full-batch on the support embeddings with Adam (Kingma & Ba 2015) and weight decay for ``steps``
    steps, from a seed fixed per episode."""

    name = "mlp_probe"
    hidden: int = 512
    dropout: float = 0.5
    lr: float = 1e-3
    steps: int = 200
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1 or not 0 <= self.dropout < 1 or self.lr <= 0 or self.steps < 1:
            raise ConfigError(f"strategy '{self.name}': hidden and steps must be positive, lr positive, "
                              f"dropout in [0, 1)")

    def fit_head(self, support: np.ndarray, labels: np.ndarray, n_way: int, seed: int = 0) -> MLPHead:
        """The trained head (eval mode) for classes 0..n_way-1."""
        x = torch.as_tensor(np.asarray(support), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = MLPHead(x.shape[1], n_way, self.hidden, self.dropout)
            head.mean.copy_(x.mean(0))
            head.std.copy_(x.std(0, unbiased=False) + 1e-6)
            opt = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            head.train()
            for _ in range(self.steps):
                opt.zero_grad()
                F.cross_entropy(head(x), y).backward()
                opt.step()
        return head.eval()

    def fit_predict(self, support, labels, query, n_way, seed: int = 0):
        head = self.fit_head(support, labels, n_way, seed)
        with torch.no_grad():
            return head(torch.as_tensor(np.asarray(query), dtype=torch.float32)).argmax(1).numpy()

    def predict_episode(self, task: EpisodeTask) -> np.ndarray:
        if task.support_emb is None or task.query_emb is None:
            raise ConfigError(f"strategy '{self.name}' needs cached embeddings")
        return self.fit_predict(task.support_emb, task.support_y, task.query_emb, task.n_way, task.seed)
