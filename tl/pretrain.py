"""Source pretraining on Ray Train: a backbone and a linear head trained on the source task.

DDP over N workers (CPU here, GPUs when asked), SGD with Nesterov momentum and a cosine schedule,
a checkpoint every epoch. Augmentation: the digits recipe (``augment: digits``,
``tl.train.digit_augment``: warps, stroke width, colours of either polarity, texture, low
resolution, noise), which makes a source model that transfers and is the default on the embedded
digits; or small random shifts (``augment: shift``), the former default and the default on a
user's own source images, where digit strokes and inversion would not fit. Running again with the same config
resumes from the last checkpoint; a finished backbone is kept in the tl home, keyed by backbone,
data and config, and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tl.config import config_hash, to_dict
from tl.data import ImageSet
from tl.data.spec import TRAIN_VAL, DataSpec, check_files_of, is_embedded, load_data, part, resolve
from tl.errors import ConfigError
from tl.models import Classifier, build_backbone, get_spec, input_size_of, save_weights
from tl.models.weights import META_FILE, MODEL_FILE, file_sha256
from tl.runtime import provenance
from tl.storage import Location
from tl.train import ray_train
from tl.train.digit_augment import SOURCE_AUGMENTS, digit_augment_preprocessed

HEAD_FILE = "head.safetensors"
#: fields added after backbones were pretrained: in the key only when not at these values, so a
#: finished backbone of the same recipe keeps its key
NEWER_DEFAULTS = {"augment": "shift", "label_smoothing": 0.0}
#: in the key: 2 since the data order and every epoch's draws are seeded (the same config gives the
#: same weights, docs/finetuning.md); a backbone of the former runs (keyed without it, made in an order
#: Ray Data chose) is not what this code makes, and is not reused
PROTOCOL = 2


def default_augment(data: "str | DataSpec") -> str:
    """The recipe ``augment: auto`` stands for: ``digits`` on an embedded source (every embedded set
    is digits), ``shift`` on a user's own images."""
    return "digits" if isinstance(data, str) and is_embedded(data) else "shift"


@dataclass(frozen=True)
class PretrainConfig:
    """Source pretraining. ``data`` is a data spec (``tl.data.spec``): ``mnist`` (10 classes),
    ``mnist:base`` (classes 0-4), or the user's labelled images (a folder with one subfolder per
    class, a CSV or Parquet, local or at a URI), split ``train``/``val`` (0.9/0.1, stratified)
    unless its spec gives a split with those names. ``augment``: ``digits``
    (``tl.train.digit_augment``), ``shift`` (random translation by up to ``augment_shift``
    pixels), or ``auto`` (the default): ``digits`` for an embedded source, ``shift`` for the
    user's own images; it is resolved when the config is made, so the key names the recipe that
    ran. ``label_smoothing`` of the cross-entropy (Szegedy et al. 2016)."""

    backbone: str = "digits_cnn"
    data: str | DataSpec = "mnist"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment_shift: int = 2
    augment: str = "auto"
    label_smoothing: float = 0.0
    input_size: int | None = None
    seed: int = 0
    limit: int = 0
    workers: int = 2
    use_gpu: bool = False

    def __post_init__(self) -> None:
        get_spec(self.backbone)
        for key in ("epochs", "batch_size", "workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"config key 'lr' must be positive, got {self.lr}")
        if self.limit < 0:
            raise ConfigError(f"config key 'limit' must be 0 (all) or positive, got {self.limit}")
        if self.augment == "auto":
            object.__setattr__(self, "augment", default_augment(self.data))
        if self.augment not in SOURCE_AUGMENTS:
            raise ConfigError(f"config key 'augment' must be one of {('auto',) + SOURCE_AUGMENTS}, got '{self.augment}'")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"config key 'label_smoothing' must be in [0, 1), got {self.label_smoothing}")
        resolve(self.data, "data")

    @property
    def data_name(self) -> str:
        return resolve(self.data, "data")[0]

    def key(self, protocol: int = PROTOCOL) -> str:
        """Identity of the trained weights: everything but where it runs, and the ``PROTOCOL``
        (``protocol=1``: the key the same config had before, which result files may still name)."""
        ident = {k: v for k, v in to_dict(self).items() if k not in ("workers", "use_gpu")
                 and not (k in NEWER_DEFAULTS and v == NEWER_DEFAULTS[k])}
        if protocol > 1:
            ident["protocol"] = protocol
        return f"{self.backbone}-{self.data_name.replace(':', '_')}-{config_hash(ident)}"


@dataclass
class PretrainResult:
    path: Path
    val_accuracy: float
    epochs_run: int
    wall_s: float
    reused: bool


def _source_sets(cfg: PretrainConfig) -> tuple[ImageSet, ImageSet]:
    name, spec = resolve(cfg.data, "data")
    # a user's folder, manifest or Parquet stays files: Ray Data reads and decodes them as the epochs stream
    src = load_data(name, spec, input_size_of(cfg.backbone, cfg.input_size), TRAIN_VAL, lazy=True)
    check_files_of({"data": src})  # every file decodes, one size: before any worker starts
    train, val = part(src, "train", spec, "data"), part(src, "val", spec, "data")
    # the source rows come sorted by class: permute them once, so shards and batches mix classes
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    if cfg.limit:
        order = order[: cfg.limit]
    return train.subset(order), val


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels, per image (zero padding)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _augment(x: torch.Tensor, c: dict, pp, gen: torch.Generator) -> torch.Tensor:
    """The recipe's augmentation of a preprocessed batch: ``shift`` (random translation, the former
    default) or ``digits`` (``tl.train.digit_augment``, applied in [0, 1] between undoing and
    redoing the backbone's normalisation)."""
    if c["augment"] == "shift":
        return _shift(x, c["augment_shift"], gen)
    return digit_augment_preprocessed(x, pp, gen)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _worker(c: dict) -> None:
    """Per-worker training function (runs on every Ray Train worker). Its own loop, not
    ``tl.train.loop``: an epoch is a fixed number of steps over one shuffle of the shard, the rate
    is set per step (warm-up, then cosine), SGD is Nesterov's and each image is shifted; the resume
    protocol (``tl.train.ray_train``) is the one every run follows.

    Bit-reproducible (docs/finetuning.md, "Same command, same numbers"): the train set is read in
    its (seeded) order and split the same way every pass (``ordered``), the local shuffle and every
    draw are seeded per epoch, and the thread count is what Ray assigned the worker (``ray_train.start``); so the same
    config on the same cluster with the same number of workers gives the same weights, resumed or
    not."""
    import ray.train
    import ray.train.torch

    rank, world, threads = ray_train.start(c["seed"])
    if c["use_gpu"]:  # cuDNN's own choice of convolution algorithms is not the same from run to run
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model = Classifier(build_backbone(c["backbone"], c["input_size"]), c["num_classes"])
    pp = model.backbone.preprocessing
    # resumes: the epoch each resume started at, carried from checkpoint to checkpoint into the backbone's meta.json
    state, start, resumes = ray_train.resume(model, "[pretrain]", "epoch")
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"], nesterov=True,
                          weight_decay=c["weight_decay"])
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    per_worker = max(1, c["batch_size"] // world)
    steps_per_epoch = max(1, (c["train_size"] // world) // per_worker)
    total = steps_per_epoch * c["epochs"]
    warmup = int(c["warmup_epochs"] * steps_per_epoch)
    gen = torch.Generator()
    if start >= c["epochs"]:  # the run had finished: hand its last checkpoint back
        ray_train.report({"epoch": start, "loss": float("nan"), "val_accuracy": float(state["val_accuracy"])},
                         dict(state, resumes=resumes))
    for epoch in range(start, c["epochs"]):
        # an epoch's draws (dropout, augmentation) are seeded by (seed, rank, epoch), so an epoch
        # resumed from a checkpoint draws what it would have drawn in a run that went through
        torch_seed, augment_seed = ray_train.epoch_seeds(c["seed"], rank, epoch)
        torch.manual_seed(torch_seed)
        gen.manual_seed(augment_seed)
        model.train()
        losses = []
        step = epoch * steps_per_epoch
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=1024,
            local_shuffle_seed=c["seed"] * 1000 + epoch,
        )
        for i, batch in enumerate(batches):
            if i >= steps_per_epoch:
                break
            lr = _lr_at(step, total, warmup, c["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            x = _augment(batch["image"], c, pp, gen).to(device)
            loss = F.cross_entropy(model(x), batch["label"].to(device), label_smoothing=c["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # read once per epoch: a read per step waits for a GPU every step
            step += 1
        values = torch.stack(losses).tolist() if losses else []
        for i, value in enumerate(values):  # the first non-finite loss stops the run, naming its step
            if not np.isfinite(value):
                bad = epoch * steps_per_epoch + i
                ray_train.check_finite(losses[i], what="pretrain", step=bad, lr=_lr_at(bad, total, warmup, c["lr"]))
        acc = ray_train.shard_accuracy(model, ray.train.get_dataset_shard("val"), device)
        loss = ray_train.global_mean(float(np.mean(values)) if values else float("nan"))
        # a line every few epochs (about five in a run, and the last): progress without a screenful
        said = (epoch + 1) % max(1, c["epochs"] // 5) == 0 or epoch + 1 == c["epochs"]
        ray_train.checkpoint({"epoch": epoch + 1, "loss": loss, "val_accuracy": acc},
                             {"model": ray_train.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                              "epoch": epoch + 1, "val_accuracy": acc, "resumes": resumes, "threads": threads},
                             f"[pretrain] epoch {epoch + 1}/{c['epochs']}  loss {loss:.4f}  source val accuracy "
                             f"{acc:.4f}" if said else "")


def pretrain(cfg: PretrainConfig, storage: "str | os.PathLike | Location",
             log: Callable[[str], None] = print) -> PretrainResult:
    """Pretrain (or reuse, or resume) the backbone for ``cfg``; needs a running Ray. The folder is
    ``<storage>/backbones/<key>`` (a local ``Path``, or a ``Location`` on remote storage); its
    ``meta.json`` is written last, so a folder without it is not a backbone."""
    storage = Location.of(storage)
    out = storage / "backbones" / cfg.key()
    meta_path = out / META_FILE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        log(f"[pretrain] reusing the finished backbone in {out} (source val accuracy {meta['val_accuracy']:.4f})")
        return PretrainResult(out.local or out, float(meta["val_accuracy"]), int(meta["epochs"]), 0.0, True)
    t0 = time.time()
    train, val = _source_sets(cfg)
    spec = get_spec(cfg.backbone)
    model_pp = build_backbone(cfg.backbone, cfg.input_size).preprocessing
    log(f"[pretrain] {cfg.backbone} on {cfg.data_name}: {len(train)} train / {len(val)} val images, "
        f"{cfg.epochs} epochs, {cfg.workers} Ray Train workers{' on GPUs' if cfg.use_gpu else ''}")
    worker_cfg = dict(dataclasses.asdict(cfg), num_classes=len(train.classes), train_size=len(train))
    result = ray_train.fit(
        _worker, worker_cfg,
        {"train": ray_train.preprocessed_dataset(train, model_pp, ordered=True),
         "val": ray_train.preprocessed_dataset(val, model_pp)},
        name=f"pretrain-{cfg.key()}", storage=storage / "ray", workers=cfg.workers, use_gpu=cfg.use_gpu,
        split=("train",),
    )
    state = ray_train.load_result_state(result)
    model = Classifier(build_backbone(cfg.backbone, cfg.input_size), len(train.classes))
    model.load_state_dict(state["model"])
    acc = float(state["val_accuracy"])
    wall = time.time() - t0
    meta = {
        "backbone": cfg.backbone, "data": to_dict(cfg)["data"], "classes": list(train.classes), "val_accuracy": acc,
        "epochs": int(state["epoch"]), "resumed_at_epochs": ray_train.resumed_at(state),
        "preprocessing": model_pp.describe(), "feature_dim": spec.feature_dim,
        "config": to_dict(cfg), "threads": int(state.get("threads", 0)), "wall_s": wall, **provenance(),
    }
    with tempfile.TemporaryDirectory(prefix="tl-pretrain-") as tmp:
        save_weights(model.backbone, Path(tmp) / MODEL_FILE)
        save_weights(model.head, Path(tmp) / HEAD_FILE)
        (Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=2))
        out.upload(Path(tmp), last=(META_FILE,))
    log(f"[pretrain] source validation accuracy {acc:.4f} after {meta['epochs']} epochs ({wall:.0f} s); weights in {out}")
    return PretrainResult(out.local or out, acc, int(state["epoch"]), wall, False)


def pretrained_path(storage: "str | os.PathLike | Location", backbone: str = "digits_cnn", data: str = "mnist",
                    **overrides) -> Location:
    """Where the default pretrained backbone for (backbone, data) lives."""
    return Location.of(storage) / "backbones" / PretrainConfig(backbone=backbone, data=data, **overrides).key()


def ensure_pretrained(storage: "str | os.PathLike | Location", backbone: str = "digits_cnn", data: str = "mnist",
                      log: Callable[[str], None] = print, **overrides) -> "Path | Location":
    """The default pretrained backbone, pretraining it first (and saying so) when it is not there."""
    cfg = PretrainConfig(backbone=backbone, data=data, **overrides)
    if not (Location.of(storage) / "backbones" / cfg.key() / META_FILE).is_file():
        log(f"[pretrain] no pretrained {backbone} for {data} in {storage}: pretraining it first")
    return pretrain(cfg, storage, log).path


def is_pretrained(weights: str) -> bool:
    """``pretrained`` or ``pretrained:<recipe>``: a backbone the tl home pretrains when missing."""
    return weights == "pretrained" or weights.startswith("pretrained:")


def _recipe(weights: str) -> dict:
    """The pretraining overrides a ``pretrained:<recipe>`` weights name stands for: ``digits`` is the
    digits augmentation recipe (``augment: digits``), ``shift`` the former default; plain
    ``pretrained`` the default config (``augment: auto``: the digits recipe on the embedded mnist)."""
    recipe = weights.partition(":")[2]
    if not recipe:
        return {}
    if recipe not in SOURCE_AUGMENTS:
        raise ConfigError(f"weights '{weights}': the pretraining recipe must be one of {SOURCE_AUGMENTS} "
                          f"(pretrained:<recipe>), got '{recipe}'")
    return {"augment": recipe}


def weights_identity(weights: str) -> str:
    """The weights name that keys a comparison cell, a run or a search: a ``pretrained`` name is keyed
    by the recipe it stands for, spelled as it was when each was made (``pretrained`` for the
    former default ``shift``, ``pretrained:digits`` for the digits recipe). So plain ``pretrained``,
    now the digits recipe, finds the cells and runs ``pretrained:digits`` finished, never those of
    the former default; ``pretrained:shift`` finds those. The embedding cache needs none of this:
    it is keyed by the weights' digest."""
    if not is_pretrained(weights):
        return weights
    recipe = PretrainConfig(**_recipe(weights)).augment
    return "pretrained" if recipe == "shift" else f"pretrained:{recipe}"


def pretrained_weights_if_present(weights: str, backbone: str, storage: "str | os.PathLike | Location") -> str | None:
    """The finished backbone folder a ``pretrained`` name stands for, or None when it is still to be
    pretrained (nothing is pretrained here)."""
    cfg = PretrainConfig(backbone=backbone, **_recipe(weights))
    folder = Location.of(storage) / "backbones" / cfg.key()
    return str(folder) if (folder / META_FILE).is_file() else None


def resolve_weights(weights: str, backbone: str, storage: "str | os.PathLike | Location", log: Callable[[str], None]) -> str | None:
    """``pretrained`` -> the tl home's pretrained backbone folder (pretraining it first if missing);
    ``pretrained:<recipe>`` -> the same with that augmentation recipe (``digits``, ``shift``)."""
    if is_pretrained(weights):
        return str(ensure_pretrained(storage, backbone, log=log, **_recipe(weights)))
    return None if weights in ("random", "none", "") else weights


def weights_reference(source: str | None, resolved: str | None) -> dict:
    """How a result file names its backbone's weights so that it stays valid on another machine:
    the source as the user gave it (``pretrained``, a file, a torchvision or timm name), and for a
    local file or backbone folder the sha256 of its weights, plus the folder's key under
    ``<storage>/backbones`` for a pretrained one. Never a temporary absolute path alone."""
    ref: dict = {"weights": source or "random"}
    if resolved:
        p = Location.of(resolved)
        folder = p.is_dir()
        f = p / MODEL_FILE if folder else p
        if f.is_file():
            ref["weights_sha256"] = _sha256(f)
        if folder and p.parent.name == "backbones":
            ref["weights_key"] = p.name
    return ref


def _sha256(f: Location) -> str:
    return file_sha256(f.local) if f.local else hashlib.sha256(f.read_bytes()).hexdigest()


def resolve_reference(ref: dict, backbone: str, storage: "str | os.PathLike | Location", log: Callable[[str], None] = print) -> str | None:
    """The local weights that ``ref`` (``weights_reference``, as best.yaml stores it) names, found in
    the user's ``storage``: a ``weights_key`` is looked up in ``<storage>/backbones`` (the default
    backbone is pretrained there first when missing). A sha256 that does not match is said, not
    hidden: pretraining is not bit-reproducible between runs, so figures may move a little."""
    storage = Location.of(storage)
    source = ref.get("weights") or "pretrained"
    key = ref.get("weights_key")
    given = Path(str(source))
    if not is_pretrained(str(source)) and source not in ("random", "none", "") and Location.of(str(source)).exists():
        key = None  # a file or folder the user named, here on this machine: use it
    elif key is None and given.is_absolute() and given.parent.name == "backbones":
        key = given.name  # a best.yaml written before references: its folder name is the key
    if key:
        path: Path | Location = storage / "backbones" / key
        if not (path / META_FILE).is_file():
            # a default backbone of any recipe (a best.yaml made when ``pretrained`` meant ``shift``
            # names that key): pretrain it here with that recipe
            # (a key of the former protocol too: a best.yaml written before pretraining was reproducible
            # names the recipe, which is pretrained here as this code makes it; its sha256 differs and is said)
            known = {PretrainConfig(backbone=backbone, augment=r).key(v): r
                     for r in SOURCE_AUGMENTS for v in (1, PROTOCOL)}
            if key not in known:
                default = PretrainConfig(backbone=backbone, **_recipe(str(source))).key()
                raise ConfigError(f"weights_key '{key}': no such pretrained backbone in {storage / 'backbones'} "
                                  f"(the default one for {backbone} is '{default}'); pretrain it there with the config "
                                  f"it was made with, or give the weights with --set weights=PATH")
            path = ensure_pretrained(storage, backbone, log=log, augment=known[key])
        resolved: str | None = str(path)
    else:
        resolved = resolve_weights(str(source), backbone, storage, log)
    want = ref.get("weights_sha256")
    if want and resolved:
        p = Location.of(resolved)
        got = _sha256(p / MODEL_FILE if p.is_dir() else p)
        if got != want:
            log(f"[weights] warning: {resolved} is not byte-identical to the weights the results were made with "
                f"(sha256 {got[:12]} against {want[:12]}); a fresh pretraining differs slightly, so accuracies may too")
    return resolved
