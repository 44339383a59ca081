"""Domain-adaptation strategies: a classifier trained on labelled images while an alignment loss
pulls its features for an unlabelled target stream towards the labelled (source) ones.

Two places run them. Unsupervised domain adaptation on Ray Train (``tl.runs``): the labelled
stream is the source task, the second stream unlabelled target images. A few-shot episode
(``predict_episode``): the labelled stream is the K support shots per class, the target side the
unlabelled target pool (``task.unlabelled_x``), and, when the episode carries labelled source
images (``task.source_x``; ``task.source_y`` in the episode's label space, −1 for a source class the
episode does not have: see ``episode_source_labels``), those are the source side of the alignment
and, where labelled, extra examples for the one classifier head (semi-supervised domain
adaptation, Saito et al. 2019, where DANN is a standard baseline). Without source images the
support shots are the source side.

The defaults are the cheap in-episode ones; ``workflows.adapt`` sets the unsupervised recipe
(Ganin et al. 2016: SGD momentum 0.9, μ_p = μ0 / (1 + 10 p)^0.75, λ_p = 2 / (1 + e^(−10 p)) − 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError
from tl.models import Backbone
from tl.nn import (BN_FORWARDS, SCHEDULES, AdaptModel, Alignment, CDANLoss, CORALLoss, DANNLoss, MCCLoss, MMDLoss,
                   coefficient, reestimate_batchnorm)
from tl.strategies.base import EpisodeRun, EpisodeTask, TrainedStrategy

LR_SCHEDULES = ("ganin", "constant")


@dataclass(frozen=True)
class AdaptStrategy(TrainedStrategy):
    """Base of the adaptation strategies (besides the fine-tuning fields):

    ``target_batch_size``: unlabelled target images per step; ``source_batch_size``/``max_source``:
    labelled source images per step, and at most how many are used, in an episode that has them;
    ``bn_forward``: ``concat`` (all streams in one backbone batch, so training-mode BatchNorm sees
    both domains) or ``separate``; ``weight``: the alignment trade-off (the largest coefficient);
    ``schedule``: ``ganin`` (coefficient ``weight * λ_p``) or ``constant`` (``weight``);
    ``gamma``: γ of λ_p; ``lr_schedule``: ``ganin`` (μ0 / (1 + ``lr_gamma`` p)^0.75, Ganin et al.'s
    rate 10 by default; 3 over 3,000 steps is the (1 + 0.001 i)^−0.75 of TLlib's digits recipe) or ``constant``;
    ``hidden``/``dropout``: the discriminator's hidden layers and dropout (adversarial strategies);
    ``discriminator_bn``: BatchNorm after each hidden layer of the discriminator (as the reference
    implementations' discriminator has it);
    ``bn_stats``: ``target`` scores (and exports) the trained model with every BatchNorm layer's
    statistics re-estimated on the unlabelled target pool, as AdaBN does (Li et al. 2016), so a
    method's gain can be read with and without them (an adaptation strategy re-estimates them after
    training, rather than starting from them: ``Strategy.bn_stats_at_start``).

    Without a target stream (a plain labelled loop) the labelled batch stands in as the target
    side: the two sides are one distribution, so the alignment term pushes nowhere and the
    strategy reduces to its classification loss, while every parameter still takes part.
    """

    family: ClassVar[str] = "adapt"
    needs_target: ClassVar[bool] = True
    lr: float = 0.01
    batch_size: int = 64
    target_batch_size: int = 32
    source_batch_size: int = 32
    max_source: int = 1000
    bn_forward: str = "concat"
    weight: float = 1.0
    schedule: str = "ganin"
    gamma: float = 10.0
    lr_schedule: str = "constant"
    lr_gamma: float = 10.0
    hidden: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    discriminator_bn: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [("bn_forward", BN_FORWARDS), ("schedule", SCHEDULES), ("lr_schedule", LR_SCHEDULES)]
        for key, allowed in checks:
            if getattr(self, key) not in allowed:
                raise ConfigError(f"strategy '{self.name}': {key} must be one of {allowed}, got '{getattr(self, key)}'")
        if self.lr_gamma < 0:
            raise ConfigError(f"strategy '{self.name}': lr_gamma must be >= 0, got {self.lr_gamma}")
        if min(self.target_batch_size, self.source_batch_size, self.max_source) < 1 or self.weight < 0:
            raise ConfigError(f"strategy '{self.name}': target_batch_size, source_batch_size and max_source must be "
                              f"at least 1 and weight >= 0")

    @property
    def bn_stats_at_start(self) -> str:
        """Always ``source``: with ``bn_stats: target`` the trained model's statistics are re-estimated
        on the pool before it is scored (``scoring_model``), not taken from the weights it starts from."""
        return "source"

    # --- what each strategy adds --------------------------------------------------------------
    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment | None:
        return None

    # --- the small methods of a trained strategy ---------------------------------------------
    def prepare(self, backbone: Backbone, n_classes: int) -> AdaptModel:
        """The backbone (first k stages frozen), a new head and the alignment module."""
        bb = backbone.freeze_first(self.frozen)
        return AdaptModel(bb, n_classes, self.make_alignment(bb.feature_dim, n_classes), self.bn_forward)

    def param_groups(self, model: AdaptModel) -> list[dict]:
        """The fine-tuning groups, then the alignment module's parameters at ``lr``."""
        groups = super().param_groups(model)
        params = [p for p in model.alignment.parameters() if p.requires_grad] if model.alignment is not None else []
        if params:
            groups.append({"params": params, "lr": self.lr, "name": "alignment"})
        return groups

    def coefficient(self, step: int) -> float:
        """The alignment coefficient at ``step`` of ``steps`` (the GRL's λ for the adversarial losses)."""
        return coefficient(self.schedule, step / self.steps, self.weight, self.gamma)

    def episode_cost(self, shots: int) -> float:
        """Every step also trains on a target batch and a source batch, whatever the shots."""
        return float(self.steps) * (min(shots * 10, self.batch_size) + self.target_batch_size
                                    + self.source_batch_size) / 100

    def lr_scale(self, step: int) -> float:
        """Ganin et al.'s annealing μ_p / μ0 = (1 + lr_gamma p)^−0.75 (their lr_gamma is 10), or 1."""
        if self.lr_schedule == "constant":
            return 1.0
        return float((1.0 + self.lr_gamma * step / self.steps) ** -0.75)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, target=None) -> torch.Tensor:
        """Cross-entropy on the labelled batch + the alignment loss (+ cross-entropy on the labelled
        source images of an episode, those whose ``source_y`` is not −1). ``target``: a tensor of
        unlabelled target images, or a dict with ``target`` (or None), ``source_x`` and ``source_y``."""
        xt, xs, ys = _unpack(target)
        if xt is None and self.needs_target:
            xt = x
        if not self.needs_target:
            xt = None
        if xt is None and xs is None:
            return F.cross_entropy(model(x), y)
        logits, align, src_logits = model(x, xt, coeff=self.coefficient(step), source=xs)
        loss = F.cross_entropy(logits, y) + align
        if src_logits is not None and ys is not None and bool((ys >= 0).any()):
            keep = ys >= 0
            loss = loss + F.cross_entropy(src_logits[keep], ys[keep])
        return loss

    # --- one episode, in-process ---------------------------------------------------------------
    def start_episode(self, task: EpisodeTask) -> "AdaptEpisodeRun":
        """K labelled shots, the unlabelled pool as target side, labelled source images when the
        episode has them; advanced step by step like every trained strategy's episode."""
        return AdaptEpisodeRun(self, task)

    def scoring_model(self, model: nn.Module, target_batches, device) -> nn.Module:
        """The model to score: ``model`` itself, or (``bn_stats: target``) a copy whose BatchNorm
        statistics are re-estimated on ``target_batches`` (an iterable of unlabelled image tensors)."""
        if self.bn_stats != "target":
            return model
        import copy

        scored = copy.deepcopy(model)
        reestimate_batchnorm(scored, target_batches, device)
        return scored


class AdaptEpisodeRun(EpisodeRun):
    """One few-shot episode of an adaptation strategy, advanced like every trained strategy's
    episode (``tl.strategies.base.EpisodeRun``): the support batches are the labelled stream, and a
    second stream draws unlabelled pool images and (when given, at most ``max_source``) source images
    with their episode labels, every step, from the episode's seed."""

    def __init__(self, strategy: AdaptStrategy, task: EpisodeTask):
        gen = torch.Generator().manual_seed(task.seed + 2)
        xs = ys = None
        if task.source_x is not None:
            sy = None if task.source_y is None else np.asarray(task.source_y)
            if sy is None or len(sy) != len(task.source_x) or sy.min() < -1 or sy.max() >= task.n_way:
                raise ConfigError(f"strategy '{strategy.name}': the episode's source_y must give each source_x "
                                  f"image a label in 0..{task.n_way - 1}, or -1 (a class the episode does not have)")
            keep = torch.randperm(len(task.source_x), generator=gen)[: strategy.max_source]
            xs, ys = task.source_x[keep], torch.as_tensor(sy, dtype=torch.long)[keep]
        if task.unlabelled_x is None and (strategy.bn_stats == "target" or (strategy.needs_target and xs is None)):
            # without a pool DANN would align the labelled batch with itself and AdaBN score with the
            # source's statistics: another algorithm than the one named, so it is an error, not a fallback
            raise ConfigError(f"strategy '{strategy.name}' uses the target's unlabelled pool, and this episode was "
                              f"given none (an engine that runs it must hand it the pool: Strategy.uses_pool)")
        pool = task.unlabelled_x if strategy.uses_pool else None
        super().__init__(strategy, task, {"pool": pool, "source": xs})
        self.second = _episode_stream(self.extra["pool"] if strategy.needs_target else None, self.extra["source"], ys,
                                      strategy.target_batch_size, strategy.source_batch_size, gen)
        self.lr_scale = strategy.lr_scale

    def predict(self) -> np.ndarray:
        """The queries' labels; with ``bn_stats: target``, under BatchNorm statistics re-estimated on
        the pool (after the stages an episode runs once, when it froze some: those keep the source's)."""
        from tl.train.loop import predict

        pool = self.extra["pool"]
        if self.strategy.bn_stats != "target" or pool is None:
            return super().predict()
        batches = (pool[i:i + 256] for i in range(0, len(pool), 256))
        return predict(self.strategy.scoring_model(self.model, batches, self.device), self.query)


def episode_source_labels(source_labels: np.ndarray, source_classes: Sequence[str],
                          episode_classes: Sequence[str]) -> np.ndarray:
    """Source labels in an episode's label space: the index of the episode class of the same name,
    or −1 where the episode has no such class (those images still serve as the source domain)."""
    where = {name: i for i, name in enumerate(episode_classes)}
    remap = np.array([where.get(name, -1) for name in source_classes], dtype=np.int64)
    return remap[np.asarray(source_labels)]


def _unpack(target) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    if target is None or isinstance(target, torch.Tensor):
        return target, None, None
    return target.get("target"), target.get("source_x"), target.get("source_y")


def _episode_stream(pool, xs, ys, target_batch: int, source_batch: int, gen: torch.Generator):
    """Endless random batches of the pool and of the labelled source (None when absent)."""
    if pool is None and xs is None:
        return None

    def stream():
        while True:
            out: dict = {"target": None}
            if pool is not None:
                out["target"] = pool[torch.randint(len(pool), (min(target_batch, len(pool)),), generator=gen)]
            if xs is not None:
                idx = torch.randint(len(xs), (min(source_batch, len(xs)),), generator=gen)
                out["source_x"], out["source_y"] = xs[idx], ys[idx]
            yield out

    return stream()


@dataclass(frozen=True)
class SourceOnly(AdaptStrategy):
    """The baseline every adaptation table needs: the same network, optimiser, schedule and steps,
    trained on the labelled stream alone (no target image is seen, not even by BatchNorm)."""

    name = "source_only"
    needs_target = False


@dataclass(frozen=True)
class AdaBN(SourceOnly):
    """AdaBN (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): the
    source-only model, scored with every BatchNorm layer's running statistics re-estimated on the
    unlabelled target pool (``tl.nn.batchnorm``); no weight changes and no target label is read.
    The baseline that separates what BatchNorm statistics alone give from what alignment gives."""

    name = "adabn"
    bn_stats: str = "target"


@dataclass(frozen=True)
class DANN(AdaptStrategy):
    """Domain-adversarial training (Ganin et al. 2016, "Domain-Adversarial Training of Neural
    Networks", JMLR): a domain discriminator behind gradient reversal on the features."""

    name = "dann"

    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment:
        return DANNLoss(feature_dim, self.hidden, self.dropout, self.discriminator_bn)


@dataclass(frozen=True)
class CDAN(AdaptStrategy):
    """Conditional adversarial adaptation with entropy conditioning, CDAN+E (Long et al. 2018,
    "Conditional Adversarial Domain Adaptation", NeurIPS); ``entropy: false`` gives plain CDAN."""

    name = "cdan"
    entropy: bool = True

    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment:
        return CDANLoss(feature_dim, num_classes, self.hidden, entropy=self.entropy, dropout=self.dropout,
                        batch_norm=self.discriminator_bn)


@dataclass(frozen=True)
class MMD(AdaptStrategy):
    """Deep adaptation by multi-kernel Gaussian MMD between source and target features (DAN, Long
    et al. 2015, "Learning Transferable Features with Deep Adaptation Networks", ICML).
    ``kernels``: bandwidths as multiples of the batch's mean squared distance."""

    name = "mmd"
    schedule: str = "constant"
    kernels: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment:
        return MMDLoss(self.kernels)


@dataclass(frozen=True)
class CORAL(AdaptStrategy):
    """Deep CORAL (Sun & Saenko 2016, "Deep CORAL: Correlation Alignment for Deep Domain
    Adaptation", ECCV workshops): match the second-order statistics of the features. The
    distance is divided by 4 d², so its ``weight`` is large: the paper sets it so that the losses
    are of one size; between source and target batches of the digits CNN's 256-d features the
    distance is about 1e-3 (within the source alone about 5e-4), so 1000 makes the term about 1,
    the size of DANN's domain loss and DAN's MMD (a choice made without any label)."""

    name = "coral"
    schedule: str = "constant"
    weight: float = 1000.0

    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment:
        return CORALLoss()


@dataclass(frozen=True)
class MCC(AdaptStrategy):
    """Minimum Class Confusion (Jin et al. 2020, "Minimum Class Confusion for Versatile Domain
    Adaptation", ECCV): cross-entropy on the labelled batch plus ``weight`` times the class
    confusion of the target batch's predictions at ``temperature`` (``tl.nn.alignment``); no
    discriminator. The paper's digits settings: weight 1, temperature 2.5."""

    name = "mcc"
    schedule: str = "constant"
    temperature: float = 2.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError(f"strategy '{self.name}': temperature must be positive, got {self.temperature}")

    def make_alignment(self, feature_dim: int, num_classes: int) -> Alignment:
        return MCCLoss(self.temperature)


ADAPT_STRATEGIES = (SourceOnly, AdaBN, DANN, CDAN, MMD, CORAL, MCC)
