"""Feature-alignment losses, all with one signature.

Every alignment is a module called as ``align(f_s, f_t, logits_s, logits_t, coeff)`` on a batch of
source features ``f_s`` and target features ``f_t`` (N x D; the classifier logits are used only by
CDAN) and returns a scalar to add to the classification loss. ``coeff`` is the alignment
coefficient of the step: for the adversarial losses it is the gradient-reversal coefficient λ (the
discriminator itself always learns at full rate), for the statistic-matching losses a multiplier.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError
from tl.nn.discriminator import DomainDiscriminator, domain_bce
from tl.nn.grl import grad_reverse


class Alignment(nn.Module):
    """Base: ``forward(f_s, f_t, logits_s, logits_t, coeff) -> loss``."""

    adversarial: ClassVar[bool] = False

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_s: torch.Tensor | None = None,
                logits_t: torch.Tensor | None = None, coeff: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


class DANNLoss(Alignment):
    """DANN (Ganin et al. 2016): a discriminator on the features behind a gradient reversal layer;
    the loss is its domain BCE, which is log 2 when it cannot tell the domains apart."""

    adversarial = True

    def __init__(self, feature_dim: int, hidden: Sequence[int] = (256, 256), dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__()
        self.discriminator = DomainDiscriminator(feature_dim, hidden, dropout, batch_norm)

    def forward(self, f_s, f_t, logits_s=None, logits_t=None, coeff=1.0):
        d = self.discriminator(grad_reverse(torch.cat([f_s, f_t]), coeff))
        return domain_bce(d[: len(f_s)], d[len(f_s):])


class CDANLoss(Alignment):
    """CDAN+E (Long et al. 2018, "Conditional Adversarial Domain Adaptation", NeurIPS): the
    discriminator sees the multilinear map f ⊗ g of features and (detached) class probabilities,
    so it aligns the joint distribution; with entropy conditioning each example is weighted by
    1 + exp(−H(g)), putting confident (transferable) examples first. Above ``max_dim`` the map is
    the paper's randomized multilinear map (R_f f) ⊙ (R_g g) / √d with fixed Gaussian R."""

    adversarial = True

    def __init__(self, feature_dim: int, num_classes: int, hidden: Sequence[int] = (256, 256),
                 entropy: bool = True, max_dim: int = 4096, random_dim: int = 1024, dropout: float = 0.0,
                 batch_norm: bool = False):
        super().__init__()
        self.entropy = entropy
        self.randomized = feature_dim * num_classes > max_dim
        out = random_dim if self.randomized else feature_dim * num_classes
        if self.randomized:
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("r_f", torch.randn(feature_dim, random_dim, generator=gen))
            self.register_buffer("r_g", torch.randn(num_classes, random_dim, generator=gen))
        self.discriminator = DomainDiscriminator(out, hidden, dropout, batch_norm)

    def multilinear(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return (f @ self.r_f) * (g @ self.r_g) / math.sqrt(self.r_f.shape[1])
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)

    def forward(self, f_s, f_t, logits_s=None, logits_t=None, coeff=1.0):
        if logits_s is None or logits_t is None:
            raise ConfigError("CDAN needs the classifier logits of both domains")
        g = F.softmax(torch.cat([logits_s, logits_t]).float(), dim=1).detach()
        h = self.multilinear(torch.cat([f_s, f_t]).float(), g)
        d = self.discriminator(grad_reverse(h, coeff))
        n = len(f_s)
        if not self.entropy:
            return domain_bce(d[:n], d[n:])
        w = 1.0 + torch.exp(-entropy(g))
        return domain_bce(d[:n], d[n:], w[:n], w[n:])


def entropy(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Shannon entropy (nats) of probability rows."""
    return -(p * torch.log(p + eps)).sum(1)


def gaussian_mmd2(x: torch.Tensor, y: torch.Tensor, mults: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared MMD (biased V-statistic, Gretton et al. 2012) with a sum of Gaussian kernels whose
    bandwidths are ``mults`` times the mean pairwise squared distance of the pooled sample (the
    multi-kernel of DAN, Long et al. 2015). Exactly 0 when ``x`` and ``y`` are the same sample."""
    z = torch.cat([x, y]).float()
    d2 = torch.cdist(z, z).pow(2)
    n = len(z)
    base = d2.detach().sum() / max(1, n * n - n)
    base = torch.clamp(base, min=1e-8)
    k = sum(torch.exp(-d2 / (base * m)) for m in mults)
    nx = len(x)
    kxx, kyy, kxy = k[:nx, :nx], k[nx:, nx:], k[:nx, nx:]
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


class MMDLoss(Alignment):
    """DAN (Long et al. 2015, "Learning Transferable Features with Deep Adaptation Networks"):
    multi-kernel Gaussian MMD² between source and target features, times ``coeff``."""

    def __init__(self, mults: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)):
        super().__init__()
        self.mults = tuple(float(m) for m in mults)

    def forward(self, f_s, f_t, logits_s=None, logits_t=None, coeff=1.0):
        return coeff * gaussian_mmd2(f_s, f_t, self.mults)


def coral(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Deep CORAL distance ||C_s − C_t||²_F / (4 d²) between the feature covariances
    (Sun & Saenko 2016, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation")."""
    def cov(f: torch.Tensor) -> torch.Tensor:
        f = f.float() - f.float().mean(0, keepdim=True)
        return f.T @ f / max(1, len(f) - 1)

    d = f_s.shape[1]
    return (cov(f_s) - cov(f_t)).pow(2).sum() / (4 * d * d)


def minimum_class_confusion(logits_t: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """MCC (Jin et al. 2020, "Minimum Class Confusion for Versatile Domain Adaptation", ECCV) on a
    batch of target logits: probabilities Ŷ = softmax(logits / T); each example weighted by
    W_i = B (1 + e^(−H(Ŷ_i))) / Σ_j (1 + e^(−H(Ŷ_j))); the class correlation C = Ŷᵀ diag(W) Ŷ;
    each column of C divided by its sum (category normalisation); the loss is the sum of the
    off-diagonal entries over the number of classes: how much the batch's predictions confuse
    one class with another."""
    p = F.softmax(logits_t.float() / temperature, dim=1)
    b, k = p.shape
    w = 1.0 + torch.exp(-entropy(p))
    w = (b * w / w.sum()).unsqueeze(1)
    c = p.T @ (w * p)
    c = c / c.sum(0, keepdim=True)
    return (c.sum() - torch.trace(c)) / k


class MCCLoss(Alignment):
    """Minimum Class Confusion: ``coeff`` times the class confusion of the target predictions
    (``minimum_class_confusion``). No discriminator and no source feature: it only asks the
    classifier to keep target classes apart."""

    def __init__(self, temperature: float = 2.5):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, f_s, f_t, logits_s=None, logits_t=None, coeff=1.0):
        if logits_t is None:
            raise ConfigError("MCC needs the classifier logits of the target batch")
        return coeff * minimum_class_confusion(logits_t, self.temperature)


class CORALLoss(Alignment):
    """Deep CORAL: the covariance distance between source and target features, times ``coeff``."""

    def forward(self, f_s, f_t, logits_s=None, logits_t=None, coeff=1.0):
        return coeff * coral(f_s, f_t)
