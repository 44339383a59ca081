"""Backbones with declared stages and preprocessing, and where their weights come from.

Importing the package imports every provider (digits CNN, torchvision ResNets, timm, the ImageNet
EfficientNet-Lite releases), so each has registered its backbones before anything asks the registry for one.
"""

from tl.models import digits_backbone, imagenet, timm_backbone, torchvision_backbone  # noqa: F401  (they register)
from tl.models.backbone import Backbone, BackboneSpec, Classifier, Preprocessing, count_trainable
from tl.models.registry import (build_backbone, get_spec, input_size_of, make_backbone, num_stages, register,
                                registered)
from tl.models.weights import load_weights, save_weights, weights_digest

__all__ = [
    "Backbone", "BackboneSpec", "Classifier", "Preprocessing", "build_backbone", "count_trainable",
    "get_spec", "input_size_of", "load_weights", "num_stages", "make_backbone", "register", "registered", "save_weights", "weights_digest",
]
