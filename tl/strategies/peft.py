"""Parameter-efficient fine-tuning: train a small, chosen part of the backbone (or a low-rank update
of it) and a new head.

The default learning rate, 0.05, was checked on validation episodes of the targets' ``adapt``
splits (10-way, 8 episodes at 1 and 5 shots, both embedded targets, default source model): 0.01,
0.05 and 0.2 were within 1.5 points of each other but for 0.2 at 1 shot (up to 3.5 points lower).

Beside the frozen depth (whole stages frozen), these keep every stage's weights and train only
parameters of one kind everywhere: with a handful of labelled images per class, fewer trainable
parameters overfit less, and the pretrained features move less. ``frozen`` still freezes the first
k stages entirely, so the two can be searched together.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tl.errors import ConfigError
from tl.models import Backbone, Classifier
from tl.strategies.base import TrainedStrategy

#: normalisation layers whose affine parameters ``norm_tuning`` trains
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class PartialTuning(TrainedStrategy):
    """Fine-tuning restricted to the backbone parameters ``selects`` accepts (the head trains whole)."""

    def selects(self, module: nn.Module, param_name: str) -> bool:
        raise NotImplementedError

    def prepare(self, backbone: Backbone, n_classes: int) -> Classifier:
        model = super().prepare(backbone, n_classes)
        for module in model.backbone.modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and not self.selects(module, pname):
                    p.requires_grad_(False)
        return model


@dataclass(frozen=True)
class BitFit(PartialTuning):
    """BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models"): only the backbone's bias terms train (a
    convolution followed by BatchNorm has none of its own, so there it is BatchNorm's shift)."""

    name = "bitfit"
    lr: float = 0.05

    def selects(self, module: nn.Module, param_name: str) -> bool:
        return param_name == "bias"


@dataclass(frozen=True)
class NormTuning(PartialTuning):
    """Normalisation tuning: only the affine scale and shift of the backbone's normalisation layers
    train, the rest of every stage stays as pretrained (the "train only BatchNorm" result of Frankle
    et al. 2021, used for transfer by e.g. Mudrakarta et al. 2019, "K for the Price of 1")."""

    name = "norm_tuning"
    lr: float = 0.05

    def selects(self, module: nn.Module, param_name: str) -> bool:
        return isinstance(module, NORM_LAYERS) and param_name in ("weight", "bias")


@dataclass(frozen=True)
class LoRA(TrainedStrategy):
    """Low-rank adapters (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): every
    convolution and linear layer of the unfrozen stages keeps its pretrained weight and learns a
    rank-``rank`` update ``(alpha / rank) * B @ A`` (``tl.nn.lora``); BatchNorm's affine parameters stay
    as pretrained, the head trains whole. An exported model or a run's weights have the adapters merged
    into the layers, so they load as the plain backbone."""

    name = "lora"
    rank: int = 4
    alpha: float = 4.0
    lr: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"strategy '{self.name}': rank must be at least 1 and alpha positive")

    def prepare(self, backbone: Backbone, n_classes: int) -> Classifier:
        from tl.nn.lora import add_lora

        model = super().prepare(backbone, n_classes)
        add_lora(model.backbone.stages[model.backbone.frozen_stages:], self.rank, self.alpha)
        return model

    def plain_state(self, state):
        from tl.nn.lora import merge_lora

        return merge_lora(state)
