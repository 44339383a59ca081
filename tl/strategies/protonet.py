"""Fine-tuning with a prototype head: the P>M>F recipe's last step (Hu et al. 2022, "Pushing the
Limits of Simple Pipelines for Few-Shot Learning: External Data and Fine-Tuning Make a Difference").

Meta-learning and transfer combined: the classifier is the support set's cosine prototypes under the
current backbone (a ProtoNet head, Snell et al. 2017, in the cosine form of ``prototype``), so there is
no new head to learn from a few shots; fine-tuning moves the backbone to lower that classifier's loss on
the support images (augmented when ``augment`` says so, as P>M>F does to make pseudo-queries). The
prototypes are recomputed at every step and, before predicting or exporting, from the final backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tl.errors import ConfigError
from tl.models import Backbone, Classifier
from tl.nn.heads import LinearFeatureHead
from tl.strategies.base import TrainedStrategy


def _prototypes(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """L2-normalised means of L2-normalised features per class: n_classes x D."""
    f = F.normalize(features, dim=1)
    return F.normalize(torch.stack([f[labels == c].mean(0) for c in range(n_classes)]), dim=1)


@dataclass(frozen=True)
class ProtoNetFT(TrainedStrategy):
    """The backbone fine-tuned through a cosine prototype head on the episode's support set; ``scale``
    multiplies the cosines into logits (10, as ``prototype`` uses for probabilities). ``lr`` is the
    backbone's rate (times ``backbone_lr_mult``): the head has no trained parameters."""

    name = "protonet_ft"
    episodic: ClassVar[bool] = True
    scale: float = 10.0
    lr: float = 0.01

    def prepare(self, backbone: Backbone, n_classes: int) -> Classifier:
        if self.frozen >= backbone.num_stages:
            raise ConfigError(f"strategy '{self.name}' with all {backbone.num_stages} stages frozen trains nothing: "
                              f"that is the 'prototype' strategy")
        model = Classifier(backbone.freeze_first(self.frozen), n_classes)
        model.head = LinearFeatureHead(backbone.feature_dim, n_classes, normalize=True, standardize=False, bias=False,
                                       scale=self.scale)
        model.head.weight.requires_grad_(False)
        return model

    def freeze(self, model: Classifier) -> None:
        """Nothing more: the backbone is all it trains, at ``lr * backbone_lr_mult`` (0 leaves it as it is)."""

    def param_groups(self, model: Classifier) -> list[dict]:
        trainable = [p for p in model.backbone.parameters() if p.requires_grad]
        return [{"params": trainable, "lr": self.lr * self.backbone_lr_mult, "name": "backbone"}]

    def on_start(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
        model.support = (x, y)  # as the steps see them (after a cached frozen prefix); not in the state dict

    def loss(self, model, x, y, step):
        sx, sy = model.support
        n = model.head.weight.shape[1]
        f_support = model.features(sx)
        protos = _prototypes(f_support, sy, n)
        if self.augment == "none":  # the queries are the support images themselves: one forward
            f, y = f_support, sy
        else:
            f = model.features(x)
        return F.cross_entropy(self.scale * F.normalize(f, dim=1) @ protos.T, y)

    def ready(self, model: Classifier) -> None:
        sx, sy = model.support
        was = model.training
        model.eval()
        with torch.no_grad():
            model.head.weight.copy_(_prototypes(model.features(sx).float(), sy, model.head.weight.shape[1]).T)
        model.train(was)
