"""Backbones with declared stages and preprocessing, and where their weights come from."""

from torch import nn

from tl.models.backbones import (
    Backbone, BackboneSpec, Preprocessing, build_backbone, count_trainable, get_spec, num_stages, register, registered,
)
from tl.models.weights import load_weights, save_weights, weights_digest


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


def make_backbone(name: str, weights: str | None = None, input_size: int | None = None, seed: int = 0) -> Backbone:
    """Build a registered backbone and load its weights. Without weights the random initialisation
    is drawn from ``seed``, so every process (driver, Ray actors) builds the same model."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bb = build_backbone(name, input_size)
    load_weights(bb, weights)
    return bb


__all__ = [
    "Backbone", "BackboneSpec", "Classifier", "Preprocessing", "build_backbone", "count_trainable",
    "get_spec", "load_weights", "num_stages", "make_backbone", "register", "registered", "save_weights", "weights_digest",
]
