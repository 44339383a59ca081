"""Classifier heads that are not a plain ``nn.Linear``, as torch modules: what a feature strategy fits
and an exported model holds (``tl.model_file`` writes and rebuilds them), and the prototype head of
``protonet_ft``. They sit here, below the strategies, so both a strategy and the model format use them."""

from __future__ import annotations

import torch
from torch import nn


class LinearFeatureHead(nn.Module):
    """The torch form of ``tl.strategies.feature.FeatureHead``: ``scores = T(f) @ weight + bias`` with
    ``T`` standardising (``mean``, ``std``) and/or L2-normalising; ``weight`` is features x classes.
    With ``normalize`` and L2-normalised class means as ``weight`` it is a cosine prototype classifier."""

    def __init__(self, in_features: int, classes: int, *, normalize: bool, standardize: bool, bias: bool,
                 scale: float = 1.0):
        super().__init__()
        self.normalize, self.standardize, self.scale = normalize, standardize, scale
        self.weight = nn.Parameter(torch.zeros(in_features, classes))
        self.bias = nn.Parameter(torch.zeros(classes)) if bias else None
        if standardize:
            self.register_buffer("mean", torch.zeros(in_features))
            self.register_buffer("std", torch.ones(in_features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            f = (f - self.mean) / self.std
        if self.normalize:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = f @ self.weight
        return s if self.bias is None else s + self.bias


class MLPHead(nn.Module):
    """Standardised features, one hidden layer with ReLU and dropout, then the classifier: the head
    ``mlp_probe`` trains on frozen embeddings (``tl.strategies.mlp``). Dropout acts in training only."""

    def __init__(self, in_features: int, classes: int, hidden: int = 512, dropout: float = 0.5):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.hidden, self.dropout = hidden, dropout
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, classes))

    @property
    def in_features(self) -> int:
        return self.net[0].in_features

    @property
    def classes(self) -> int:
        return self.net[3].out_features

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net((f - self.mean) / self.std)
