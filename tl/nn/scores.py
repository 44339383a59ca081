"""Unsupervised model-selection scores on unlabelled target predictions (higher is better).

No target label is read: these choose a checkpoint (or hyper-parameter) for unsupervised domain
adaptation where target accuracy cannot be measured (docs/architecture.md, "Evaluation protocol"; Musgrave et al. 2022,
"Benchmarking Validation Methods for Unsupervised Domain Adaptation").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def information_maximization(logits: torch.Tensor, eps: float = 1e-8) -> float:
    """IM = H(E[p]) − E[H(p)] of the softmax of ``logits`` (``tl.transfer_scores.information_maximization``:
    Shi & Sha 2012; the objective of SHOT, Liang et al. 2020). High when each prediction is confident and
    the classes are used evenly; a collapsed or unsure model scores low."""
    from tl.transfer_scores import information_maximization as im

    return im(F.softmax(logits.detach().float(), dim=1).cpu().numpy(), eps)


def soft_neighborhood_density(logits: torch.Tensor, temperature: float = 0.05) -> float:
    """SND (Saito et al. 2021, "Tune it the Right Way: Unsupervised Validation of Domain Adaptation
    via Soft Neighborhood Density"): the mean entropy of each target example's softmax-weighted
    similarity to the others (cosine of L2-normalised class probabilities, temperature τ).
    High when target predictions form dense, well-clustered neighbourhoods."""
    p = F.normalize(F.softmax(logits.float(), dim=1), dim=1)
    sim = p @ p.T
    sim.fill_diagonal_(float("-inf"))
    q = F.softmax(sim / temperature, dim=1)
    return float(-(q * torch.log(q + 1e-12)).sum(1).mean())


SCORES = {"im": information_maximization, "snd": soft_neighborhood_density}
