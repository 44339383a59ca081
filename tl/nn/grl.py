"""Gradient reversal (Ganin & Lempitsky 2015; Ganin et al. 2016, "Domain-Adversarial Training of
Neural Networks", JMLR 17): the identity forwards, −λ times the gradient backwards, so one
backward pass trains the domain discriminator to separate the domains and the features to fool it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tl.errors import ConfigError

SCHEDULES = ("ganin", "constant")


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """The identity on ``x`` whose backward multiplies the incoming gradient by ``-coeff``."""
    return _Reverse.apply(x, float(coeff))


def ganin_lambda(progress: float, gamma: float = 10.0) -> float:
    """λ_p = 2 / (1 + exp(−γ p)) − 1 over training progress p in [0, 1] (Ganin et al. 2016, eq. 14):
    0 at the start, when the discriminator's signal is noise, rising towards 1."""
    p = min(1.0, max(0.0, float(progress)))
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def coefficient(schedule: str, progress: float, scale: float = 1.0, gamma: float = 10.0) -> float:
    """The alignment coefficient at ``progress``: ``scale * λ_p`` (``ganin``) or ``scale`` (``constant``)."""
    if schedule == "ganin":
        return scale * ganin_lambda(progress, gamma)
    if schedule == "constant":
        return scale
    raise ConfigError(f"unknown coefficient schedule '{schedule}' (known: {', '.join(SCHEDULES)})")


class GradientReversal(nn.Module):
    """Gradient reversal as a layer; ``coeff`` is set by the caller each step (see ``coefficient``)."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor, coeff: float | None = None) -> torch.Tensor:
        return grad_reverse(x, self.coeff if coeff is None else coeff)
