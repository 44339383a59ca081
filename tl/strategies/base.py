"""The strategy interface: a strategy is data (its hyper-parameters) plus a few small methods.

Feature strategies classify cached embeddings; trained strategies say which parameters train
(``freeze``, before a DDP wrapper is built) and at what learning rate (``param_groups``), what the
per-step loss is (``loss``), and optional hooks (``prepare``, ``on_start``). The one training loop
(``tl.train.loop``) never branches on a name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError
from tl.models import Backbone, Classifier


@dataclass
class EpisodeTask:
    """What a strategy gets for one episode. Labels are 0..n_way-1.

    ``support_x``/``query_x`` are preprocessed image tensors (trained strategies);
    ``support_emb``/``query_emb`` index the embedding cache (feature strategies);
    ``unlabelled_x`` is the unlabelled target pool, for strategies that use one;
    ``source_x``/``source_y`` are labelled source images (preprocessed like ``support_x``) and
    their source-class labels, for the adaptation strategies (their classes need not be the episode's).
    """

    n_way: int
    support_y: np.ndarray
    seed: int
    support_x: torch.Tensor | None = None
    query_x: torch.Tensor | None = None
    support_emb: np.ndarray | None = None
    query_emb: np.ndarray | None = None
    unlabelled_x: torch.Tensor | None = None
    source_x: torch.Tensor | None = None
    source_y: np.ndarray | None = None
    backbone: Callable[[], Backbone] | None = None
    device: str = "cpu"  # where a trained strategy trains: "cuda" inside a trial that holds a GPU share


BN_STATS = ("source", "target")
TARGET_SETTING = "bn_stats: target"  # the setting of a strategy scored with the pool's BatchNorm statistics


@dataclass(frozen=True)
class Strategy:
    """Base of every registered strategy; dataclass fields are its hyper-parameters.

    ``bn_stats``: the BatchNorm running statistics the strategy is scored with: ``source`` (as
    pretrained) or ``target`` (re-estimated on the target's unlabelled pool, AdaBN's statistics, Li
    et al. 2016: a feature strategy embeds with them, a fine-tuned one starts from them, an
    adaptation strategy re-estimates them after training); the pool is unlabelled images of the
    target, never an episode's labels (``tl.embeddings.target_bn_stats``). One name, ``bn_stats:
    target``, for these statistics in config keys, code, the ``setting`` column and entry labels
    (``<method>_bn_target`` in the default comparison).
    ``transductive`` strategies also read the episode's unlabelled queries together, so a query's
    prediction may depend on the other queries: their accuracy is not comparable to an inductive
    row's without saying so (``tl.report`` keeps them apart)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    uses_embeddings: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False  # trains on an unlabelled target pool (adaptation)
    transductive: ClassVar[bool] = False  # reads the episode's queries (unlabelled) together
    budget_key: ClassVar[str | None] = None  # the hyper-parameter that counts training steps (a search's budget)
    bn_stats: str = "source"

    def __post_init__(self) -> None:
        if self.bn_stats not in BN_STATS:
            raise ConfigError(f"strategy '{self.name}': bn_stats must be one of {BN_STATS}, got '{self.bn_stats}'")

    @property
    def uses_pool(self) -> bool:
        """Whether the strategy needs the target's unlabelled pool: it trains on it (``needs_target``)
        or its BatchNorm statistics are the pool's (``bn_stats: target``). The one property every
        engine hands the pool by."""
        return self.needs_target or self.bn_stats == "target"

    @property
    def bn_stats_at_start(self) -> str:
        """The statistics of the weights the strategy embeds with or starts training from: which
        weights a cell, a search or an export hands it (``bn_stats``, but see ``AdaptStrategy``)."""
        return self.bn_stats

    @property
    def setting(self) -> str:
        """What of the target's unlabelled images it uses: ``inductive`` (none), ``bn_stats: target``
        (the pool, through BatchNorm statistics) or ``transductive`` (the episode's queries too)."""
        if self.transductive:
            return "transductive"
        return TARGET_SETTING if self.bn_stats == "target" else "inductive"

    def predict_episode(self, task: EpisodeTask) -> np.ndarray:
        """Predicted labels for the episode's queries."""
        raise NotImplementedError

    def start_episode(self, task: EpisodeTask) -> "EpisodeRun | FittedEpisode":
        """An episode that ``advance(steps)`` trains and ``predict()`` scores; a strategy without
        training steps fits at once (so a search reports it once, at any milestone)."""
        return FittedEpisode(self, task)

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def display_label(self, searched: Iterable[str] = ()) -> str:
        """The strategy's name in tables; ``searched``: hyper-parameters chosen per cell."""
        return self.name

    def check_depth(self, stages: int, where: str) -> None:
        """Raise when this strategy cannot run on a backbone with ``stages`` stages."""

    def episode_cost(self, shots: int) -> float:
        """A relative cost of one episode, to start long cells first (no idle cores at the tail)."""
        return 0.01


class FittedEpisode:
    """An episode of a strategy without training steps: predictions are fixed at the start."""

    def __init__(self, strategy: Strategy, task: EpisodeTask):
        self.strategy, self.task, self._pred = strategy, task, None

    def advance(self, steps: int) -> None:
        """Nothing to train."""

    def predict(self) -> np.ndarray:
        if self._pred is None:
            self._pred = self.strategy.predict_episode(self.task)
        return self._pred


@dataclass(frozen=True)
class FeatureStrategy(Strategy):
    """A classifier fitted on support embeddings; no image is touched."""

    family: ClassVar[str] = "feature"
    uses_embeddings: ClassVar[bool] = True

    def fit_predict(self, support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int) -> np.ndarray:
        raise NotImplementedError

    def predict_episode(self, task: EpisodeTask) -> np.ndarray:
        if task.support_emb is None or task.query_emb is None:
            raise ConfigError(f"strategy '{self.name}' needs cached embeddings")
        return self.fit_predict(task.support_emb, task.support_y, task.query_emb, task.n_way)


BN_MODES = ("train", "frozen")


@dataclass(frozen=True)
class TrainedStrategy(Strategy):
    """Trains a backbone and a new linear head with the one training loop.

    ``frozen``: first k stages frozen; ``lr``: head learning rate; ``backbone_lr_mult``: the
    backbone's rate as a multiple of it; ``batch_norm``: ``train`` (batch statistics, updated) or
    ``frozen`` (running statistics fixed: the safe choice for tiny few-shot batches);
    ``clip_grad``: gradient-norm clip (0: none), which keeps 1-shot fine-tuning from diverging;
    ``nesterov``: Nesterov momentum (Sutskever et al. 2013) in the SGD optimiser.
    """

    family: ClassVar[str] = "finetune"
    budget_key: ClassVar[str | None] = "steps"
    episodic: ClassVar[bool] = False  # its classifier is built from one episode's support set (no run over a dataset)
    frozen: int = 0
    lr: float = 0.01
    backbone_lr_mult: float = 1.0
    steps: int = 60
    batch_size: int = 128
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_norm: str = "frozen"
    clip_grad: float = 1.0
    augment: str = "none"

    def check_depth(self, stages: int, where: str) -> None:
        if not 0 <= self.frozen <= stages:
            raise ConfigError(f"{where}: frozen depth {self.frozen} is out of range for a backbone of {stages} "
                              f"stages (0..{stages})")

    def episode_cost(self, shots: int) -> float:
        return float(self.steps) * max(1, min(shots * 10, self.batch_size)) / 100

    def __post_init__(self) -> None:
        super().__post_init__()
        from tl.train.augment import AUGMENTATIONS

        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"strategy '{self.name}': augment must be one of {AUGMENTATIONS}, got '{self.augment}'")
        if self.batch_norm not in BN_MODES:
            raise ConfigError(f"strategy '{self.name}': batch_norm must be one of {BN_MODES}, got '{self.batch_norm}'")
        if self.lr <= 0 or self.steps < 1 or self.batch_size < 1 or self.frozen < 0:
            raise ConfigError(f"strategy '{self.name}': lr, steps and batch_size must be positive and frozen >= 0")

    # --- the three small methods -------------------------------------------------------------
    def prepare(self, backbone: Backbone, n_classes: int) -> Classifier:
        """The model to train: here, the given backbone with its first k stages frozen."""
        return Classifier(backbone.freeze_first(self.frozen), n_classes)

    def freeze(self, model: Classifier) -> None:
        """Switch off ``requires_grad`` of the parameters the strategy never trains (the backbone's when
        ``backbone_lr_mult`` is 0), once, before anything wraps the model: DDP registers the parameters
        that require grad when it is built and waits for each one's gradient at every step."""
        if self.backbone_lr_mult <= 0:
            for p in model.backbone.parameters():
                p.requires_grad_(False)

    def param_groups(self, model: Classifier) -> list[dict]:
        """Head at ``lr``; trainable backbone parameters at ``lr * backbone_lr_mult`` (none at a rate of
        0; ``freeze`` switched their gradients off). Builds the groups only: no parameter changes here."""
        groups = [{"params": list(model.head.parameters()), "lr": self.lr, "name": "head"}]
        trainable = [p for p in model.backbone.parameters() if p.requires_grad]
        if trainable and self.backbone_lr_mult > 0:
            groups.append({"params": trainable, "lr": self.lr * self.backbone_lr_mult, "name": "backbone"})
        return groups

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def on_start(self, model: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
        """Hook before the first step (``lp_ft`` fits its linear probe here)."""

    def ready(self, model: Classifier) -> None:
        """Hook before the model predicts or is exported (``protonet_ft`` computes its prototypes here);
        it must leave training able to continue (a search scores between steps)."""

    def plain_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained model's state dict as the plain backbone's (``lora`` merges its adapters), so an
        exported model or a run's weights load into the architecture without the strategy."""
        return state

    # --- one episode, in-process ---------------------------------------------------------------
    def start_episode(self, task: EpisodeTask) -> "EpisodeRun":
        """A model set up for this episode, trained step by step (a search reports between steps)."""
        return EpisodeRun(self, task)

    def predict_episode(self, task: EpisodeTask) -> np.ndarray:
        run = self.start_episode(task)
        run.advance(self.steps)
        return run.predict()


class EpisodeRun:
    """One episode of a trained strategy, advanced in stages: ``advance(s)`` trains up to step ``s``
    with the same optimizer and batch stream, so a run stopped at 20 steps and continued to 60 is the
    run of 60 steps. This is what lets ASHA spend its budget in training steps."""

    #: run the frozen stages once per episode where they are a fixed function (BatchNorm frozen, no
    #: augmentation); off, every step runs them on its batch (a test compares the two: the same rows)
    cache_prefix: ClassVar[bool] = True

    def __init__(self, strategy: TrainedStrategy, task: EpisodeTask,
                 extra: dict[str, torch.Tensor | None] | None = None):
        """``extra``: more image tensors a subclass trains on (for example an unlabelled pool);
        they pass through the frozen prefix with the support set and are kept in ``self.extra``."""
        from tl.train.loop import amp_dtype, grad_scaler, make_optimizer, say_precision

        if task.backbone is None or task.support_x is None or task.query_x is None:
            raise ConfigError(f"strategy '{strategy.name}' needs images and a backbone")
        self.strategy, self.step = strategy, 0
        self.second: Iterator | None = None  # a second batch stream (tl.train.loop.train_steps)
        self.lr_scale: Callable[[int], float] | None = None
        torch.manual_seed(task.seed)
        # channels-last convolutions: about a quarter faster per step on CPU (oneDNN) than the default
        # layout, the same arithmetic up to rounding. On a GPU every tensor of the episode lives there
        # and the steps run in mixed precision (``tl.train.loop.amp_dtype``: bf16 where the GPU has it,
        # else fp16 with a loss scaler); the CPU path is unchanged.
        self.device = torch.device(task.device)
        if self.device.type == "cuda":
            say_precision("[episode]", self.device)
        self.scaler = grad_scaler(amp_dtype(self.device))
        model = strategy.prepare(task.backbone(), task.n_way).to(self.device, memory_format=torch.channels_last)
        strategy.freeze(model)
        x, q = _channels_last(_on(task.support_x, self.device)), _channels_last(_on(task.query_x, self.device))
        y = torch.as_tensor(task.support_y).to(self.device)
        extra = {name: _channels_last(_on(t, self.device)) for name, t in (extra or {}).items()}
        k = model.backbone.frozen_stages
        if k and strategy.batch_norm == "frozen" and strategy.augment == "none" and self.cache_prefix:
            # frozen stages in eval mode are a fixed function: run them once, train the rest
            model.backbone.eval()
            with torch.no_grad():
                x, q = model.backbone.run_stages(x, 0, k), model.backbone.run_stages(q, 0, k)
                extra = {name: None if t is None else model.backbone.run_stages(t, 0, k) for name, t in extra.items()}
            model.start = k
        strategy.on_start(model, x, y)
        self.model, self.query, self.extra = model, q, extra
        self.optimizer = make_optimizer(strategy, model)
        self.batches = _support_batches(x, y, strategy.batch_size, task.seed, strategy.augment,
                                        model.backbone.preprocessing)

    def advance(self, steps: int) -> None:
        from tl.train.loop import train_steps

        if steps > self.step:
            train_steps(self.model, self.strategy, self.batches, steps, optimizer=self.optimizer, start_step=self.step,
                        target_batches=self.second, lr_scale=self.lr_scale, device=self.device,
                        autocast=self.device.type == "cuda", scaler=self.scaler)
            self.step = steps

    def predict(self) -> np.ndarray:
        from tl.train.loop import predict

        self.strategy.ready(self.model)
        return predict(self.model, self.query)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t.to(device) if t is not None else None


def _channels_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t


def _support_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, augment: str = "none",
                     preprocessing=None):
    """Endless shuffled mini-batches of the support set (the whole set when it fits one batch),
    augmented per image when the strategy asks for it (``tl.train.augment``)."""
    from tl.train.augment import augment_stream

    return augment_stream(_shuffled_batches(x, y, batch_size, seed), augment, seed + 1, preprocessing)


def _shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """Each pass a new permutation cut into batches; a last batch of one image joins the batch before
    it, since BatchNorm in training mode cannot normalise a single sample (DTN's and digits_cnn's
    BatchNorm1d raise on it)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [n]
    while True:
        order = torch.randperm(n, generator=gen)
        for i, j in zip(starts, ends):
            idx = order[i:j]
            yield x[idx], y[idx]
