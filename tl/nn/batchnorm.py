"""BatchNorm statistics of another domain: AdaBN (Li et al. 2016, "Revisiting Batch Normalization
For Practical Domain Adaptation", ICLR workshops).

A network trained on the source normalises every layer with the source's running mean and
variance; under a shift, the target's activations are normalised with the wrong statistics. AdaBN
re-estimates each BatchNorm layer's running statistics on unlabelled target images and changes
nothing else: no weight, no affine parameter, no label.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> int:
    """Replace every BatchNorm layer's running mean and variance by those of the images in
    ``batches`` (unlabelled: image tensors only): each batch's statistics averaged, weighted by its
    size (so the mean is the mean over every image; not the training momentum), each layer seeing the activations the layers below produce with
    their new statistics in the same pass. Every other module stays in eval mode (no dropout), no
    gradient is taken, and the model's modes are restored. Returns the number of images seen."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    before = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers}
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.train()
    seen = 0
    try:
        for x in batches:
            x = x.to(device)
            if len(x) < 2:  # a batch of one has no variance: skipped
                continue
            for m in layers:  # the running average weighted by batch size
                m.momentum = len(x) / (seen + len(x))
            model(x)
            seen += len(x)
    finally:
        for m, was in modes.items():
            m.train(was)
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m in layers:  # a layer the batches never reached (a stage skipped by the forward) keeps its own
            if int(m.num_batches_tracked) == 0 or seen == 0:
                m.running_mean.copy_(before[m][0]), m.running_var.copy_(before[m][1])
                m.num_batches_tracked.copy_(before[m][2])
    if seen == 0:
        raise ValueError("no target batch of two or more images to estimate BatchNorm statistics from")
    return seen
