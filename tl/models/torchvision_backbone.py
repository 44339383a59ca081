"""torchvision ResNets as backbones: the stem, then layer1..layer4, with torchvision's own weights
names mapped onto those stages (torchvision is imported only when one is built)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from tl.models.backbone import IMAGENET, BackboneSpec, Preprocessing
from tl.models.registry import register


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
