"""The digits backbones: the default small 4-stage CNN for 28x28 digits, fast enough to train on a
laptop, and the DTN of the domain-adaptation literature (the reference implementations' digits network)."""

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


def _dtn_stages() -> list[nn.Module]:
    def block(cin: int, cout: int, drop: float) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 5, stride=2, padding=2), nn.BatchNorm2d(cout),
                             nn.Dropout2d(drop), nn.ReLU(inplace=True))

    # 32 (or 28) -> 16 -> 8 -> 4; the last stage keeps the 4x4 layout (flattened, not pooled: where a
    # stroke is matters for a digit) and maps it to 512 features; the adaptive pool only makes other
    # input sizes work and is the identity at 28 and 32
    fc = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(1), nn.Linear(256 * 16, 512), nn.BatchNorm1d(512),
                       nn.ReLU(inplace=True), nn.Dropout(0.5))
    return [block(3, 64, 0.1), block(64, 128, 0.3), block(128, 256, 0.5), fc]


register(BackboneSpec(
    name="dtn", builder=_dtn_stages, feature_dim=512,
    preprocessing=Preprocessing((32, 32), *DIGITS),
    description="the digits network of the domain-adaptation literature (DTN: Taigman et al. 2017; Long et al. "
                "2018 for CDAN): three strided 5x5 convolutions with dropout, then 512 features on 32x32 inputs",
))


def _dtn_b256_stages() -> list[nn.Module]:
    return _dtn_stages() + [nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True))]


register(BackboneSpec(
    name="dtn_b256", builder=_dtn_b256_stages, feature_dim=256,
    preprocessing=Preprocessing((32, 32), *DIGITS),
    description="dtn with the 256-unit bottleneck (linear, BatchNorm, ReLU) that TLlib's classifier puts between "
                "the DTN and its head and discriminator, as a fifth stage",
))
