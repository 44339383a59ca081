"""One many-shot run on Ray Train: fine-tuning is an adaptation run without a source.

A run trains one strategy on the target's ``target_split`` and scores it on the target's
``test_split``. Without a ``source`` those target images are labelled: many-shot fine-tuning. With a
``source``, its labelled ``source_split`` is the labelled stream and the target images become an
unlabelled pool whose labels never reach training: unsupervised domain adaptation (Ganin et al.
2016), with ``UDA_RECIPE`` under the strategy's parameters.

Each set is a Ray Data dataset preprocessed by Ray Data. The training streams are sharded over the
DDP workers; each worker iterates its labelled shard and, when adapting with a strategy that uses
the target, pulls unlabelled batches from a second iterator that restarts when it runs out. Both
drop their last partial batch, so every rank takes the same number of steps.

Every ``checkpoint_every`` steps rank 0 scores the model on the run's evaluation sets (the target
test accuracy; when adapting also the source validation accuracy and the label-free IM and SND on
the pool, for model selection, while the target test accuracy is only the oracle) and writes a
checkpoint holding that history. Running again with the same config resumes from the last
checkpoint, or hands a finished run's last checkpoint back (the same ``ray.train.RunConfig`` name
and storage).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tl.config import BackboneFields, config_hash, to_dict
from tl.data import ImageSet
from tl.data.spec import TRAIN_VAL, DataSpec, check_files_of, load_data, part, resolve
from tl.errors import ConfigError, DataError
from tl.models import Classifier, input_size_of, make_backbone, save_weights
from tl.nn import ReplayBatches
from tl.nn.scores import information_maximization, soft_neighborhood_density
from tl.pretrain import resolve_weights, weights_identity
from tl.runtime import provenance
from tl.storage import Location
from tl.strategies import REGISTRY, TrainedStrategy, make_strategy
from tl.strategies.adapt import AdaptStrategy
from tl.train import ray_train
from tl.train.augment import augment_stream
from tl.train.loop import amp_dtype, grad_scaler, make_optimizer, precision_name, say_precision, train_steps

#: The unsupervised recipe under every adaptation run's ``params`` (Ganin et al. 2016, section
#: 5.2.2): SGD with momentum 0.9, μ_p = 0.01 / (1 + 10 p)^0.75, λ_p rising from 0 to 1, BatchNorm in
#: training mode over the concatenated batch; from the source-pretrained backbone and head, 600
#: steps of 32 source + 32 target images (the paper: 64 + 64), which keeps the 30 runs of the
#: default benchmark near 20 minutes on 2 CPU cores.
UDA_RECIPE: dict[str, Any] = {
    "steps": 600, "batch_size": 32, "target_batch_size": 32, "lr": 0.01, "lr_schedule": "ganin",
    "momentum": 0.9, "weight_decay": 5e-4, "batch_norm": "train", "bn_forward": "concat", "clip_grad": 0.0,
}

#: Where a run runs, not what it computes: outside its key.
PLACE_FIELDS = ("workers", "use_gpu", "max_failures")
#: Read only by a run with a source: outside a fine-tuning run's key.
SOURCE_FIELDS = ("init_head", "source", "source_split", "source_val_split")
#: Newer fields, in a run's key only when set (finished runs keep their keys)
OPTIONAL_FIELDS = ("test",)


@dataclass(frozen=True)
class RunConfig(BackboneFields):
    """One run: ``strategy`` trains on ``target``'s ``target_split``, scored on its ``test_split``.

    Without ``source`` the target images are labelled (fine-tuning). With a ``source`` (adaptation)
    its labelled ``source_split`` trains the classifier, the target images are an unlabelled pool,
    ``source_val_split`` is scored too, and ``params`` lie over ``UDA_RECIPE``.

    ``weights``: ``pretrained`` (the tl home's source-pretrained backbone, made if missing),
    ``random``, a weights file, a pretraining folder, ``torchvision:<weights name>``, or ``imagenet``
    (the package release of ``efficientnet_lite0``/``_lite2``);
    ``init_head`` (with a source): start the head from that pretraining's head (same classes), so
    step 0 is the source model; ``limit``: at most this many images per set (0: all), for smoke tests.

    ``source``, ``target`` and ``test`` are data specs (``tl.data.spec``): an embedded name, or a
    user's folder, CSV or Parquet, local or at a URI. A user's target is split into halves
    (``adapt``/``test``) unless its spec says otherwise, a user's source into ``train``/``val``
    (0.9/0.1). With a source, the target may be a folder of unlabelled images (no class
    subfolders): every image is then the unlabelled pool, and the run is scored on ``test`` (labelled
    images of the target) when given, else on label-free scores only. A target's labels must be
    among the source's classes.
    """

    init_head: bool = True
    source: str | DataSpec | None = None
    source_split: str = "train"
    source_val_split: str = "val"
    target: str | DataSpec = "mnistm"
    test: str | DataSpec | None = None
    target_split: str = "adapt"
    test_split: str = "test"
    strategy: str = "finetune"
    params: dict[str, Any] = field(default_factory=dict)
    limit: int = 0
    workers: int = 2
    use_gpu: bool = False
    amp: bool = False
    checkpoint_every: int = 50
    max_failures: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        cls = REGISTRY.get(self.strategy)
        wanted, what = (TrainedStrategy, "a trained") if self.source is None else (AdaptStrategy, "an adaptation")
        if cls is not None and not issubclass(cls, wanted):
            names = ", ".join(n for n, c in REGISTRY.items() if issubclass(c, wanted))
            raise ConfigError(f"config key 'strategy': '{self.strategy}' is not {what} strategy ({names}), which a "
                              f"run {'without' if self.source is None else 'with'} a source trains")
        if self.make_strategy().episodic:
            raise ConfigError(f"config key 'strategy': '{self.strategy}' builds its classifier from one few-shot "
                              f"episode's support set; a run trains on a whole labelled set (use it in a comparison)")
        if self.workers < 1 or self.checkpoint_every < 1 or self.limit < 0:
            raise ConfigError("config keys 'workers' and 'checkpoint_every' must be at least 1, 'limit' at least 0")
        if self.target_split == self.test_split:
            raise ConfigError(f"config keys 'target_split' and 'test_split' are both '{self.test_split}': the "
                              f"target images training sees must not be the test set")
        for key in ("source", "target", "test"):
            if getattr(self, key) is not None:
                resolve(getattr(self, key), key)

    @property
    def target_name(self) -> str:
        return resolve(self.target, "target")[0]

    @property
    def source_name(self) -> str | None:
        return None if self.source is None else resolve(self.source, "source")[0]

    @property
    def kind(self) -> str:
        """``adapt`` with a source, ``finetune`` without: the first word of the key and of the log lines."""
        return "finetune" if self.source is None else "adapt"

    def resolved_params(self) -> dict[str, Any]:
        return dict(self.params) if self.source is None else {**UDA_RECIPE, **self.params}

    def make_strategy(self) -> TrainedStrategy:
        return make_strategy(self.strategy, self.resolved_params())  # type: ignore[return-value]

    def key(self) -> str:
        """The run's identity and its Ray Train name: every field that changes what it computes,
        with ``params`` resolved over the recipe (adaptation keys are those the former adaptation
        run module gave, so finished benchmark runs stay valid)."""
        ident = {k: v for k, v in to_dict(self).items()
                 if k not in PLACE_FIELDS and (self.source is not None or k not in SOURCE_FIELDS)
                 and not (k in OPTIONAL_FIELDS and v is None)}
        ident["weights"] = weights_identity(self.weights)  # the recipe a pretrained name stands for
        ident["params"] = self.resolved_params()
        data = self.target_name if self.source is None else f"{self.source_name}-{self.target_name}"
        return f"{self.kind}-{self.strategy}-{data.replace(':', '_')}-seed{self.seed}-{config_hash(ident)}"


def _stream(shard, per_worker: int, seed: int, labelled: bool, what: str):
    """Endless batches from a Ray Data shard, a new local shuffle each pass (the iterator restarts)."""
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                          local_shuffle_buffer_size=max(per_worker, 256),
                                          local_shuffle_seed=seed * 1000 + epoch):
            n += 1
            yield (b["image"], b["label"]) if labelled else b["image"]
        if n == 0:
            raise DataError(f"the {what} shard of a worker holds fewer than {per_worker} images: "
                            f"fewer workers, a smaller batch or more data")
        epoch += 1


def _logits(model: torch.nn.Module, shard, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, labels = [], []
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=512):
            out.append(model(b["image"].to(device)).float().cpu())
            if "label" in b:
                labels.append(b["label"])
    return torch.cat(out), (torch.cat(labels) if labels else None)


def evaluate_checkpoint(model: torch.nn.Module, shards: dict, device) -> dict[str, float]:
    """The scores of one checkpoint on the evaluation sets in ``shards``: source validation accuracy
    (``source_val``), IM and SND on the unlabelled target pool (``target_pool``; no label read) and
    the target test accuracy (``target_test``: the result of fine-tuning; of adaptation, the oracle,
    which chooses nothing)."""
    model.eval()
    scores: dict[str, float] = {}
    if "source_val" in shards:
        val, val_y = _logits(model, shards["source_val"], device)
        scores["source_val_accuracy"] = float((val.argmax(1) == val_y).float().mean())
    if "target_pool" in shards:
        pool, _ = _logits(model, shards["target_pool"], device)
        scores["target_im"] = information_maximization(pool)
        scores["target_snd"] = soft_neighborhood_density(pool)
    scores["target_test_accuracy"] = float("nan")  # an unlabelled target without test images: label-free scores only
    if "target_test" in shards:
        test, test_y = _logits(model, shards["target_test"], device)
        scores["target_test_accuracy"] = float((test.argmax(1) == test_y).float().mean())
    return scores


_SHOWN = {"source_val_accuracy": "source val", "target_im": "target IM", "target_snd": "SND",
          "target_test_accuracy": "target test"}


def _scores_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {metrics[k]:.3f}" for k, name in _SHOWN.items() if k in metrics)


def _load_head(model: torch.nn.Module, weights: str | None) -> bool:
    """The pretraining's head, when ``weights`` is a pretraining folder with one that fits."""
    from tl.pretrain import HEAD_FILE

    if not weights or not (Path(weights) / HEAD_FILE).is_file():
        return False
    from safetensors.torch import load_file

    state = load_file(str(Path(weights) / HEAD_FILE))
    if state.get("weight") is None or tuple(state["weight"].shape) != tuple(model.head.weight.shape):
        return False
    model.head.load_state_dict(state)
    return True


def _worker(c: dict) -> None:
    """Per-worker training function (every Ray Train worker runs it)."""
    import ray.train
    import ray.train.torch

    rank, world, _threads = ray_train.start(c["seed"])
    strategy = make_strategy(c["strategy"], c["params"])
    model = strategy.prepare(make_backbone(c["backbone"], c["weights"], c["input_size"], seed=c["seed"]),
                             c["num_classes"])
    if c["init_head"]:
        _load_head(model, c["weights"])
    strategy.freeze(model)  # before prepare_model's DDP wrapper, which registers the parameters that require grad
    device = ray.train.torch.get_device()
    model.to(device)  # where the batches come (Ray Data hands a GPU worker its batches on its GPU)
    batches = _stream(ray.train.get_dataset_shard(c["labelled"]), max(1, strategy.batch_size // world), c["seed"],
                      True, c["labelled"])
    # the labelled stream augmented per image as the strategy asks (the source stream when adapting)
    batches = augment_stream(batches, strategy.augment, c["seed"] * 1000 + rank, model.backbone.preprocessing)
    second = None
    if c["unlabelled"]:
        second = _stream(ray.train.get_dataset_shard(c["unlabelled"]), max(1, strategy.target_batch_size // world),
                         c["seed"] + 7919, False, c["unlabelled"])
    # resumes: the step of each resume from a checkpoint (a killed driver run again, or Ray Train's retry after
    # a failed worker), kept in the state; each checkpoint's metrics say how many came before it
    state, step, resumes = ray_train.resume(model, c["prefix"], "step")
    history = list(state["history"]) if state is not None else []
    if state is None:  # the strategy's hook (lp_ft's probe) sees the first batch, which is then trained on
        first = next(batches)
        strategy.on_start(model, *(t.to(device) for t in first))  # the batch beside the model
        batches = itertools.chain([first], batches)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(strategy, model)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    amp = bool(c["amp"]) and device.type == "cuda"
    dtype = amp_dtype(device) if amp else None
    scaler = grad_scaler(dtype)  # fp16 (a GPU without bf16): one loss scale over the whole run
    if c["amp"] and rank == 0:
        say_precision(c["prefix"], device)
    lr_scale = strategy.lr_scale if c["adapt"] else None
    shards = {k: ray.train.get_dataset_shard(k) for k in c["evaluate"]}
    if step >= strategy.steps:  # the run had finished: hand its last checkpoint back
        ray_train.report(dict(history[-1]) if history else {"step": step}, state)
    while step < strategy.steps:
        end = min(strategy.steps, (step // c["checkpoint_every"] + 1) * c["checkpoint_every"])
        t0 = time.perf_counter()
        losses = train_steps(model, strategy, batches, end, optimizer=opt, start_step=step, device=device,
                             autocast=amp, scaler=scaler, target_batches=second, lr_scale=lr_scale)
        step = end
        metrics: dict[str, float] = {"step": step, "loss": ray_train.global_mean(float(np.mean(losses)))}
        if c["adapt"]:
            metrics["coeff"] = strategy.coefficient(step - 1)
        metrics.update(lr=opt.param_groups[0]["lr"], train_s=time.perf_counter() - t0, attempt=len(resumes))
        scored = ray_train.unwrap(model)
        if rank == 0:
            if isinstance(strategy, AdaptStrategy) and "target_pool" in shards:  # AdaBN: target BatchNorm statistics
                # read again for each BatchNorm step of the exact estimate, never held whole on the device
                target_pool = shards["target_pool"]
                pool = ReplayBatches(lambda: (b["image"] for b in target_pool.iter_torch_batches(batch_size=256)))
                scored = strategy.scoring_model(scored, pool, device)
            metrics.update(evaluate_checkpoint(scored, shards, device))
            history.append(metrics)
        extra = {} if scored is ray_train.unwrap(model) else {"scored_model": scored.state_dict()}
        ray_train.checkpoint(metrics, {"model": ray_train.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                                       "step": step, "history": history, "resumes": resumes,
                                       "device": device.type, "precision": precision_name(dtype), **extra},
                             f"{c['prefix']} step {step}/{strategy.steps}  loss {metrics['loss']:.4f}  "
                             f"{_scores_text(metrics)}  ({metrics['train_s']:.1f} s training)")


def _sets(cfg: RunConfig) -> dict[str, ImageSet]:
    """The run's images by role: ``target`` (the target images training sees) and ``target_test``
    (absent for an unlabelled target without ``test``); with a source also ``source`` (labelled)
    and ``source_val``. The training sets are permuted once (the embedded rows are sorted by class,
    and shards should mix classes); ``limit`` cuts every set, the evaluation sets to a seeded sample
    of every class rather than their first (class-sorted) rows."""
    size = input_size_of(cfg.backbone, cfg.input_size)
    tname, tspec = resolve(cfg.target, "target")
    sets: dict[str, ImageSet] = {}
    classes = None
    if cfg.source is not None:
        sname, sspec = resolve(cfg.source, "source")
        src = load_data(sname, sspec, size, TRAIN_VAL, lazy=True)
        classes = src.classes
        sets = {"source": part(src, cfg.source_split, sspec, "source"),
                "source_val": part(src, cfg.source_val_split, sspec, "source")}
    try:
        tgt = load_data(tname, tspec, size, "halves", classes=classes if tspec is not None else None,
                        unlabelled=cfg.source is not None, lazy=True)
    except DataError as exc:
        if classes is None or "is not in the class list" not in str(exc):
            raise
        raise DataError(f"target '{tname}' has a label that source '{cfg.source_name}' does not have, so no source "
                        f"model can predict it: {exc}") from exc
    if classes is not None and tgt.classes != classes and (tgt.labels >= 0).any():
        raise DataError(f"source '{cfg.source_name}' and target '{tname}' have different classes "
                        f"({list(classes)} vs {list(tgt.classes)}): unsupervised adaptation needs one label space")
    if (tgt.labels < 0).all():  # an unlabelled folder: every image is the pool, test images come from ``test``
        sets["target"] = tgt
    else:
        sets.update(target=part(tgt, cfg.target_split, tspec, "target"),
                    target_test=part(tgt, cfg.test_split, tspec, "target"))
    if cfg.test is not None:
        test_name, test_spec = resolve(cfg.test, "test")
        test = load_data(test_name, replace(test_spec, split="none") if test_spec else None, size, "none",
                         classes=sets["target"].classes or None, lazy=True)
        sets["target_test"] = test if test_spec is not None else part(test, cfg.test_split, None, "test")
        if (sets["target_test"].labels < 0).any():
            raise DataError(f"test '{test_name}': test images need labels (one subfolder per class)")
    rng = np.random.default_rng(cfg.seed)
    for k in ("source", "target"):
        if k in sets:
            order = rng.permutation(len(sets[k]))
            sets[k] = sets[k].subset(order[: cfg.limit] if cfg.limit else order)
    if cfg.limit:  # a seeded sample in the set's own order: the first rows of a class-sorted set hold few classes
        pick = np.random.default_rng([cfg.seed, 1])
        for k in ("source_val", "target_test"):
            if k in sets and len(sets[k]) > cfg.limit:
                sets[k] = sets[k].subset(np.sort(pick.permutation(len(sets[k]))[: cfg.limit]))
    return sets


def check_data(cfg: RunConfig) -> dict[str, int]:
    """Read the run's data once, so bad data is one clear error before any trial starts (a missing
    split, a target label the source lacks, an unlabelled folder where labels are needed, a file
    that does not decode, mixed sizes); returns the set sizes."""
    sets = _sets(cfg)
    check_files_of(sets)
    return {k: len(v) for k, v in sets.items()}


def _datasets(cfg: RunConfig, sets: dict[str, ImageSet]) -> dict[str, Any]:
    """Ray Data datasets of the sets; when adapting, the target images twice and without labels: a
    stream to train on and the pool to score."""
    pp = make_backbone(cfg.backbone, None, cfg.input_size).preprocessing
    if cfg.source is None:
        return {k: ray_train.preprocessed_dataset(v, pp) for k, v in sets.items()}
    datasets = {k: ray_train.preprocessed_dataset(v, pp) for k, v in sets.items() if k != "target"}
    pool = ray_train.preprocessed_dataset(sets["target"], pp).select_columns(["image"])
    # the stream repeats a small pool up to the source's size (inside Ray Data: the same blocks or
    # files again, no copy), so its iterator restarts (a new Ray Data execution) about as rarely as
    # the source's rather than every few steps
    datasets["target"] = ray_train.repeated(pool, max(1, -(-len(sets["source"]) // len(sets["target"]))))
    datasets["target_pool"] = pool
    return datasets


def run(cfg: RunConfig, storage: "str | os.PathLike | Location", output: Path | None = None,
        log: Callable[[str], None] = print, checked: bool = False) -> dict[str, Any]:
    """Run (or resume, or reuse) one run; returns its record: the per-checkpoint ``history`` of
    scores, identity (key, strategy, source, target, seed), set ``sizes``, config and provenance.
    With ``output``, also writes ``model.safetensors`` (the last iterate) and ``run.json`` there.
    A user's folder, manifest or Parquet stays files: the driver holds their listing, Ray Data reads and
    decodes them as training streams; unless ``checked`` (``check_data`` ran before, as a grid does
    before its trials), every file is checked first. Needs a running Ray."""
    t0 = time.time()
    strategy = cfg.make_strategy()
    sets = _sets(cfg)
    if not checked:
        check_files_of(sets)
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    adapting = cfg.source is not None
    labelled = "source" if adapting else "target"
    unlabelled = "target" if adapting and strategy.needs_target else None
    label = (f"{strategy.name} {cfg.source_name}->{cfg.target_name}" if adapting
             else f"{strategy.name} on {cfg.target_name}")
    label += f" seed {cfg.seed}"
    log(f"[{cfg.kind}] {label}: {len(sets[labelled])} labelled {labelled}"
        f"{f' and {len(sets[unlabelled])} unlabelled target' if unlabelled else ''} images, {strategy.steps} steps "
        f"of {strategy.batch_size} {labelled}{f' + {strategy.target_batch_size} target' if unlabelled else ''} images, "
        f"{cfg.workers} Ray Train worker(s)")
    classes = sets["target"].classes
    run_dir = Location.of(storage) / "ray"
    state = ray_train.finished_state(run_dir, cfg.key())
    if state is not None:
        log(f"[{cfg.kind}] {label}: finished before; its last checkpoint is handed back, nothing is retrained")
    else:
        datasets = _datasets(cfg, sets)
        c = dict(backbone=cfg.backbone, weights=weights, input_size=cfg.input_size, init_head=adapting and cfg.init_head,
                 strategy=cfg.strategy, params=cfg.resolved_params(), num_classes=len(classes), seed=cfg.seed,
                 amp=cfg.amp, checkpoint_every=cfg.checkpoint_every,
                 prefix=f"[{cfg.kind}] {label}:", labelled=labelled, unlabelled=unlabelled, adapt=adapting,
                 evaluate=[k for k in ("source_val", "target_pool", "target_test") if k in datasets])
        result = ray_train.fit(_worker, c, datasets, name=cfg.key(), storage=run_dir, workers=cfg.workers,
                               use_gpu=cfg.use_gpu, split=(labelled, "target") if adapting else (labelled,),
                               max_failures=cfg.max_failures)
        state = ray_train.load_result_state(result)
    record = {"key": cfg.key(), "strategy": cfg.strategy, "source": cfg.source_name, "target": cfg.target_name,
              "seed": cfg.seed, "steps": int(state["step"]), "history": state["history"],
              "resumed_at_steps": ray_train.resumed_at(state), "weights": weights,
              # where the last interval trained: its workers' device type and precision
              "device": state.get("device", "unknown"), "precision": state.get("precision", "unknown"),
              "config": to_dict(cfg), "params": cfg.resolved_params(), "classes": list(classes),
              "wall_s": time.time() - t0, "sizes": {k: len(v) for k, v in sets.items()}, **provenance()}
    where = ""
    if output is not None:
        model = Classifier(make_backbone(cfg.backbone, None, cfg.input_size), len(classes))
        # the model as it was scored (AdaBN's: with the target's BatchNorm statistics)
        scored = cfg.make_strategy().plain_state(state.get("scored_model", state["model"]))
        model.load_state_dict({k: v for k, v in scored.items() if k.split(".")[0] in ("backbone", "head")})
        output.mkdir(parents=True, exist_ok=True)
        save_weights(model, output / "model.safetensors")
        (output / "run.json").write_text(json.dumps(record, indent=2))
        where = f"; model and record in {output}"
    log(f"[{cfg.kind}] {label}: done in {record['wall_s']:.0f} s after {record['steps']} steps; last iterate: "
        f"{_scores_text(record['history'][-1])}{where}")
    return record
