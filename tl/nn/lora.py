"""Low-rank adapters (LoRA, Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on
convolution and linear layers, written as a weight parametrization (``torch.nn.utils.parametrize``):
the layer computes with ``W = W0 + (alpha / r) * B @ A``, where ``W0`` is the pretrained weight, kept
frozen, ``A`` is r x (the rest of W's shape) and ``B`` is out x r. For a k x k convolution that is the
usual convolutional form: a k x k convolution to r channels followed by a 1 x 1 one, folded into one
weight, so a step costs the layer's own convolution and a small matrix product.

``B`` starts at zero (the model starts as pretrained), ``A`` as ``nn.Linear`` initialises its weight;
at the very first step ``A`` therefore gets a zero gradient and only ``B`` moves. Merging is exact:
``merge_lora`` turns a state dict with adapters into the plain layer's state dict.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

#: the state-dict suffixes of a parametrized weight (torch's naming)
ORIGINAL = ".parametrizations.weight.original"
ADAPTER = ".parametrizations.weight.0."


class LowRankDelta(nn.Module):
    """The parametrization ``W0 -> W0 + scale * B @ A`` (reshaped to W0's shape)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out, rest = weight.shape[0], weight.shape[1:]
        self.lora_A = nn.Parameter(torch.empty(rank, *rest))
        nn.init.kaiming_uniform_(self.lora_A.view(rank, -1), a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out, rank))
        self.register_buffer("scale", torch.tensor(float(alpha) / rank))

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B @ self.lora_A.reshape(self.lora_A.shape[0], -1)
        return w0 + self.scale * delta.reshape(w0.shape)


def adaptable(module: nn.Module) -> bool:
    """Layers that get an adapter: linear layers and ungrouped convolutions (a grouped or depthwise
    convolution's weight is not one matrix over all input channels; it stays frozen)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def add_lora(modules: Iterable[nn.Module], rank: int, alpha: float) -> int:
    """Freeze every parameter of ``modules`` and give each adaptable layer in them an adapter;
    returns the number of layers adapted."""
    n = 0
    for root in modules:
        for p in root.parameters():
            p.requires_grad_(False)
        for m in list(root.modules()):
            if adaptable(m) and not parametrize.is_parametrized(m, "weight"):
                parametrize.register_parametrization(m, "weight", LowRankDelta(m.weight.detach(), rank, alpha))
                m.parametrizations.weight.original.requires_grad_(False)
                n += 1
    return n


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with adapters as the plain layers' state dict (``W0 + scale * B @ A`` under the
    layer's own ``weight`` key); a state dict without adapters comes back as it is."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ADAPTER in key:
            continue
        if key.endswith(ORIGINAL):
            prefix = key[: -len(ORIGINAL)]
            a, b = state[prefix + ADAPTER + "lora_A"], state[prefix + ADAPTER + "lora_B"]
            scale = state[prefix + ADAPTER + "scale"]
            delta = (b.float() @ a.float().reshape(a.shape[0], -1)).reshape(value.shape)
            out[prefix + ".weight"] = (value.float() + scale.float() * delta).to(value.dtype).contiguous()
        else:
            out[key] = value
    return out
