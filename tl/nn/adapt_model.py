"""The model an adaptation strategy trains: a classifier plus its alignment module, in one forward.

Everything a step needs (features of every stream, classifier logits, the alignment loss) is
computed inside ``forward``, so under DistributedDataParallel every parameter, the discriminator's
included, is used in the wrapped forward and its gradients are averaged across workers.
"""

from __future__ import annotations

import torch

from tl.errors import ConfigError
from tl.models import Backbone, Classifier
from tl.nn.alignment import Alignment

BN_FORWARDS = ("concat", "separate")


class AdaptModel(Classifier):
    """Backbone, classification head and an ``alignment`` module (None: source-only).

    ``bn_forward``: ``concat`` runs every stream through the backbone in one batch, so training-mode
    BatchNorm normalises with statistics of both domains (as DANN implementations do); ``separate``
    runs each stream alone, so each is normalised by its own batch statistics while the running
    statistics used at test time mix both.
    """

    def __init__(self, backbone: Backbone, num_classes: int, alignment: Alignment | None = None,
                 bn_forward: str = "concat"):
        super().__init__(backbone, num_classes)
        if bn_forward not in BN_FORWARDS:
            raise ConfigError(f"bn_forward must be one of {BN_FORWARDS}, got '{bn_forward}'")
        self.alignment = alignment
        self.bn_forward = bn_forward

    def _features(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.bn_forward == "concat" and len(parts) > 1:
            return list(self.features(torch.cat(parts)).split([len(p) for p in parts]))
        return [self.features(p) for p in parts]

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, *, coeff: float = 0.0,
                source: torch.Tensor | None = None):
        """``model(x)``: logits. With ``target`` and/or ``source``: a tuple of the logits of ``x``, the
        alignment loss between the source side (``source`` when given, else ``x``) and ``target``
        (0 without a target or an alignment), and the logits of ``source`` (or None)."""
        if target is None and source is None:
            return self.head(self.features(x))
        parts = [x] + [p for p in (target, source) if p is not None]
        feats = self._features(parts)
        f_x = feats[0]
        f_t = feats[1] if target is not None else None
        f_src = feats[-1] if source is not None else None
        logits_x = self.head(f_x)
        logits_src = self.head(f_src) if f_src is not None else None
        align = logits_x.new_zeros(())
        if self.alignment is not None and f_t is not None:
            f_s, logits_s = (f_src, logits_src) if f_src is not None else (f_x, logits_x)
            align = self.alignment(f_s, f_t, logits_s, self.head(f_t), coeff)
        return logits_x, align, logits_src
