"""The default backbone: a small 4-stage CNN for 28x28 digits, fast enough to train on a laptop."""

from __future__ import annotations

from torch import nn

from tl.models.backbone import BackboneSpec, Preprocessing
from tl.models.registry import register

DIGITS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


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
