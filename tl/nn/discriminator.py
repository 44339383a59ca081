"""The domain discriminator of the adversarial alignments and its loss (Ganin et al. 2016,
"Domain-Adversarial Training of Neural Networks", JMLR 17; Long et al. 2018, CDAN)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DomainDiscriminator(nn.Module):
    """An MLP that returns one logit per row, "source" being positive (Ganin et al. 2016 use a
    small MLP on the features; CDAN's code adds dropout 0.5 after each hidden layer; ``batch_norm``:
    BatchNorm between each hidden layer and its ReLU, as TLlib's discriminator has by default). Logits, not
    probabilities: the loss is BCE-with-logits, which is numerically safe under mixed precision."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h)] + ([nn.BatchNorm1d(h)] if batch_norm else []) + [nn.ReLU(inplace=True)] \
                + ([nn.Dropout(dropout)] if dropout > 0 else [])
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def domain_bce(d_s: torch.Tensor, d_t: torch.Tensor, w_s: torch.Tensor | None = None,
               w_t: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of discriminator logits, source labelled 1 and target 0; optional
    per-row weights (each domain's weights are normalised to sum to 1, as CDAN's code does)."""
    logits = torch.cat([d_s, d_t]).float()
    labels = torch.cat([torch.ones_like(d_s), torch.zeros_like(d_t)]).float()
    if w_s is None or w_t is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    w = torch.cat([w_s / w_s.sum(), w_t / w_t.sum()]).float()
    return (w * F.binary_cross_entropy_with_logits(logits, labels, reduction="none")).sum() / w.sum()
