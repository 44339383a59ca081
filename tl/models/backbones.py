"""Backbone registry: each backbone declares its builder, preprocessing, ordered stages and feature size.

Stages are ordered shallow to deep, so "freeze the first k stages" means the same thing for the
small digits CNN and for a torchvision ResNet (stem, layer1..layer4), as torchvision's own
``trainable_layers`` does for detection backbones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``size`` and normalise per channel; inputs are N x 3 x H x W in [0, 1]."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class Backbone(nn.Module):
    """Ordered stages, then global pooling to a feature vector of ``feature_dim``."""

    def __init__(self, name: str, stages: Sequence[nn.Module], feature_dim: int, preprocessing: Preprocessing):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(stages)
        self.feature_dim = feature_dim
        self.preprocessing = preprocessing
        self.frozen_stages = 0

    @property
    def num_stages(self) -> int:
        return len(self.stages)

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
    name: str
    builder: Callable[[], list[nn.Module]]
    feature_dim: int
    preprocessing: Preprocessing
    description: str
    key_map: Callable[[str], str | None] = field(default=lambda k: k)


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> list[str]:
    return sorted(_REGISTRY)


@lru_cache(maxsize=None)
def num_stages(name: str) -> int:
    """How many stages a registered backbone has (built once, then remembered)."""
    return len(get_spec(name).builder())


def get_spec(name: str) -> BackboneSpec:
    if name.startswith("timm:"):  # any timm model, built on demand (optional extra)
        from tl.models.timm_backbone import timm_spec

        return timm_spec(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backbone '{name}' (registered: {', '.join(registered())})")
    return _REGISTRY[name]


def _digits_cnn_stages() -> list[nn.Module]:
    def block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

    # 28 -> 14 -> 7 -> 3 -> 3; features are the globally pooled conv maps of the last stage
    return [block(3, 32), block(32, 64), block(64, 128), block(128, 256, pool=False)]


register(BackboneSpec(
    name="digits_cnn", builder=_digits_cnn_stages, feature_dim=256,
    preprocessing=Preprocessing((28, 28), *DIGITS),
    description="small 4-stage CNN for 28x28 digits (the default)",
))


def _resnet_stages(arch: str) -> Callable[[], list[nn.Module]]:
    def build() -> list[nn.Module]:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4]

    return build


def _torchvision_resnet_keys(key: str) -> str | None:
    """Map torchvision ResNet state-dict names onto stage names; the classifier ``fc`` is dropped."""
    if key.startswith("fc."):
        return None
    for i, name in enumerate(("conv1.", "bn1.")):
        if key.startswith(name):
            return f"stages.0.{i}." + key[len(name):]
    for n in range(1, 5):
        if key.startswith(f"layer{n}."):
            return f"stages.{n}." + key[len(f"layer{n}."):]
    return key


for _arch, _dim in (("resnet18", 512), ("resnet50", 2048)):
    register(BackboneSpec(
        name=_arch, builder=_resnet_stages(_arch), feature_dim=_dim,
        preprocessing=Preprocessing((224, 224), *IMAGENET),
        description=f"torchvision {_arch}: stem, layer1..layer4", key_map=_torchvision_resnet_keys,
    ))


def build_backbone(name: str, input_size: int | Sequence[int] | None = None) -> Backbone:
    """A randomly initialised backbone; ``input_size`` overrides the preprocessing size."""
    if name.startswith("timm:"):
        from tl.models.timm_backbone import build_timm

        return build_timm(name, input_size)
    spec = get_spec(name)
    pp = spec.preprocessing
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        pp = Preprocessing(tuple(int(s) for s in size), pp.mean, pp.std)
    return Backbone(spec.name, spec.builder(), spec.feature_dim, pp)


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
