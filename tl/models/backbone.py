"""The backbone interface: ordered stages, a feature size, and the preprocessing the weights expect.

Stages are ordered shallow to deep, so "freeze the first k stages" means the same thing for the
small digits CNN and for a torchvision ResNet (stem, layer1..layer4), as torchvision's own
``trainable_layers`` does for detection backbones. This module imports nothing else from
``tl.models``: providers, the registry and the weights sources all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Preprocessing:
    """Resize the whole image to ``size`` (``interpolation``: bilinear, or bicubic where the weights'
    release was trained so; antialiased) and normalise per channel; inputs are N x 3 x H x W in [0, 1]."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
            if self.interpolation == "bicubic":  # cubic weights overshoot: back into the images' range
                x = x.clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        """What keys a cache of this preprocessing's outputs (bilinear, the default, is left unsaid, so
        the keys made before the option existed stay valid)."""
        out = {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}
        if self.interpolation != "bilinear":
            out["interpolation"] = self.interpolation
        return out


def image_size(input_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """An ``input_size`` override as (height, width); one number is a square."""
    if input_size is None:
        return None
    return (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(s) for s in input_size)


def same_key(key: str) -> str | None:
    """The key map of a backbone whose weights files already use its own state-dict names."""
    return key


class Backbone(nn.Module):
    """Ordered stages, then global pooling to a feature vector of ``feature_dim``.

    ``key_map`` turns a foreign state-dict name (torchvision's, timm's) into a stage name, or None
    for a key the backbone does not use; weights loading applies it, so it travels with the model.
    """

    def __init__(self, name: str, stages: Sequence[nn.Module], feature_dim: int, preprocessing: Preprocessing,
                 key_map: Callable[[str], str | None] = same_key):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.feature_dim = feature_dim
        self.preprocessing = preprocessing
        self.key_map = key_map
        self.frozen_stages = 0

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def native_names(self) -> dict[str, str]:
        """Stage state-dict names -> the names the architecture's own library uses (timm's), where
        they differ: what an error about a weights file shows. Empty when the stage names are the names."""
        return {}

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.ndim == 2 else F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor, stage: int | None = None, start: int = 0) -> torch.Tensor:
        """Features after stage ``stage`` (1-based; default: the last), pooled to N x C.

        ``start`` > 0 means ``x`` is already the output of the first ``start`` stages (a cached
        frozen prefix), so only the stages after it run.
        """
        last = self.num_stages if stage is None else stage
        if not 1 <= last <= self.num_stages:
            raise ConfigError(f"backbone '{self.name}' has stages 1..{self.num_stages}, not {last}")
        return self._pool(self.run_stages(x, start, last))

    def run_stages(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Unpooled output of stages ``start+1 .. end`` applied to ``x``."""
        for s in self.stages[start:end]:
            x = s(x)
        return x

    def stage_dim(self, stage: int | None = None) -> int:
        """Feature size after a stage (found by a forward pass on one blank image)."""
        if stage is None or stage == self.num_stages:
            return self.feature_dim
        was = self.training
        self.eval()
        with torch.no_grad():
            d = self.forward(torch.zeros(1, 3, *self.preprocessing.size), stage).shape[1]
        self.train(was)
        return int(d)

    def freeze_first(self, k: int) -> "Backbone":
        """Freeze the first ``k`` stages: no gradients, and their BatchNorm statistics stay fixed."""
        if not 0 <= k <= self.num_stages:
            raise ConfigError(f"frozen depth {k} is out of range for backbone '{self.name}' (0..{self.num_stages})")
        self.frozen_stages = k
        for i, s in enumerate(self.stages):
            for p in s.parameters():
                p.requires_grad_(i >= k)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for s in self.stages[: self.frozen_stages]:
            s.eval()
        return self


@dataclass(frozen=True)
class BackboneSpec:
    """What a provider registers: how to build the stages, and what they produce and expect."""

    name: str
    builder: Callable[[], list[nn.Module]]
    feature_dim: int
    preprocessing: Preprocessing
    description: str
    key_map: Callable[[str], str | None] = field(default=same_key)


class Classifier(nn.Module):
    """A backbone and a linear head on its last-stage features.

    ``start`` > 0: inputs are the cached output of the first ``start`` (frozen) stages.
    """

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.start = 0

    def features(self, x):
        return self.backbone(x, start=self.start)

    def forward(self, x):
        return self.head(self.features(x))


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
