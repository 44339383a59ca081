"""Fine-tuning strategies: train the unfrozen stages and a new head with the one training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tl.errors import ConfigError
from tl.models import Backbone, Classifier, build_backbone
from tl.strategies.base import TrainedStrategy


@dataclass(frozen=True)
class Finetune(TrainedStrategy):
    """Freeze the first ``frozen`` stages of the pretrained backbone, train the rest and a new
    head (Yosinski et al. 2014, "How transferable are features in deep neural networks?")."""

    name = "finetune"

    def display_label(self, searched=()) -> str:
        """``finetune_k<frozen>`` unless the frozen depth is chosen per cell."""
        return self.name if "frozen" in searched else f"finetune_k{self.frozen}"


@dataclass(frozen=True)
class LPFT(TrainedStrategy):
    """Linear probe, then fine-tune (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
    Features and Underperform Out-of-Distribution"): the head is first fitted on frozen features
    for ``probe_steps``, so fine-tuning starts from a good head and distorts the features less."""

    name = "lp_ft"
    probe_lr: float = 0.05
    probe_steps: int = 100
    probe_weight_decay: float = 1e-3
    lr: float = 0.005

    def on_start(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            feats = model.features(x)
        opt = torch.optim.Adam(model.head.parameters(), lr=self.probe_lr, weight_decay=self.probe_weight_decay)
        for _ in range(self.probe_steps):
            opt.zero_grad()
            F.cross_entropy(model.head(feats), y).backward()
            opt.step()
        model.train(was)


@dataclass(frozen=True)
class Scratch(TrainedStrategy):
    """No transfer: the same architecture from a random initialisation, every stage trained.
    The baseline every table needs."""

    name = "scratch"
    batch_norm: str = "train"
    lr: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.frozen != 0:
            raise ConfigError("strategy 'scratch' trains every stage: frozen must be 0")

    def prepare(self, backbone: Backbone, n_classes: int) -> Classifier:
        fresh = build_backbone(backbone.name, backbone.preprocessing.size)
        return Classifier(fresh, n_classes)
