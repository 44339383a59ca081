"""Unsupervised domain adaptation on Ray Train: two input streams, DDP, checkpoints, resume.

The labelled source stream and the unlabelled target stream are two Ray Data datasets, each
sharded over the DDP workers (``DataConfig(datasets_to_split=["source", "target"])``). Each worker
iterates its source shard and pulls target batches from a second iterator that restarts when it
runs out; both drop their last partial batch, so every rank takes the same number of steps. The
target stream carries images only: no target label reaches training.

Every ``checkpoint_every`` steps rank 0 scores the model for model selection (source validation
accuracy; the unsupervised IM and SND scores on the unlabelled target pool; the target test
accuracy, which is reported only as the oracle) and writes a checkpoint holding that history.
Running again with the same config resumes from the last checkpoint (same ``RunConfig`` name and
storage).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tl.nn.scores import information_maximization, soft_neighborhood_density
from tl.config import config_hash, to_dict
from tl.data import ImageSet, load_embedded
from tl.errors import ConfigError, DataError
from tl.models import Classifier, make_backbone, save_weights
from tl.pretrain import resolve_weights
from tl.runtime import provenance, torch_threads
from tl.strategies import make_strategy
from tl.strategies.adapt import AdaptStrategy
from tl.train import ray_train
from tl.train.loop import make_optimizer, train_steps

#: The unsupervised recipe under every run's ``params`` (Ganin et al. 2016, section 5.2.2):
#: SGD with momentum 0.9, μ_p = 0.01 / (1 + 10 p)^0.75, λ_p rising from 0 to 1, BatchNorm in
#: training mode over the concatenated batch; from the source-pretrained backbone and head, 600
#: steps of 32 source + 32 target images (the paper: 64 + 64), which keeps the 30 runs of the
#: default benchmark near 20 minutes on 2 CPU cores.
UDA_RECIPE: dict[str, Any] = {
    "steps": 600, "batch_size": 32, "target_batch_size": 32, "lr": 0.01, "lr_schedule": "ganin",
    "momentum": 0.9, "weight_decay": 5e-4, "batch_norm": "train", "bn_forward": "concat", "clip_grad": 0.0,
}


@dataclass(frozen=True)
class AdaptConfig:
    """One run: ``strategy`` adapts ``source`` (labelled ``source_split``) to ``target`` (its
    unlabelled ``target_split`` pool); scored on ``source_val_split`` and ``test_split``.

    ``weights``: as in fine-tuning (``pretrained``: the tl home's source-pretrained backbone);
    ``init_head``: start the classifier head from that pretraining's head (same classes), so step 0
    is the source model; ``params``: strategy hyper-parameters over ``UDA_RECIPE``; ``limit``: at
    most this many images per stream (0: all), for smoke tests."""

    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    input_size: int | None = None
    init_head: bool = True
    source: str = "mnist"
    source_split: str = "train"
    source_val_split: str = "val"
    target: str = "mnistm"
    target_split: str = "adapt"
    test_split: str = "test"
    strategy: str = "dann"
    params: dict[str, Any] = field(default_factory=dict)
    limit: int = 0
    workers: int = 2
    use_gpu: bool = False
    amp: bool = False
    checkpoint_every: int = 100
    max_failures: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        from tl.strategies import REGISTRY

        if not issubclass(REGISTRY.get(self.strategy, object), AdaptStrategy):
            names = ", ".join(n for n, c in REGISTRY.items() if issubclass(c, AdaptStrategy))
            raise ConfigError(f"config key 'strategy': '{self.strategy}' is not an adaptation strategy ({names})")
        self.make_strategy()
        if self.workers < 1 or self.checkpoint_every < 1 or self.limit < 0:
            raise ConfigError("config keys 'workers' and 'checkpoint_every' must be at least 1, 'limit' at least 0")
        if self.target_split == self.test_split:
            raise ConfigError(f"config keys 'target_split' and 'test_split' are both '{self.test_split}': the "
                              f"unlabelled pool must not be the test set")

    def resolved_params(self) -> dict[str, Any]:
        return {**UDA_RECIPE, **self.params}

    def make_strategy(self) -> AdaptStrategy:
        return make_strategy(self.strategy, self.resolved_params())  # type: ignore[return-value]

    def key(self) -> str:
        ident = {k: v for k, v in to_dict(self).items() if k not in ("workers", "use_gpu", "max_failures")}
        ident["params"] = self.resolved_params()
        pair = f"{self.source}-{self.target}".replace(":", "_")
        return f"adapt-{self.strategy}-{pair}-seed{self.seed}-{config_hash(ident)}"


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


def _global_mean(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _logits(model: torch.nn.Module, shard, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, labels = [], []
    with torch.no_grad():
        for b in shard.iter_torch_batches(batch_size=512):
            out.append(model(b["image"].to(device)).float().cpu())
            if "label" in b:
                labels.append(b["label"])
    return torch.cat(out), (torch.cat(labels) if labels else None)


def evaluate_checkpoint(model: torch.nn.Module, shards: dict, device) -> dict[str, float]:
    """The selection scores of one checkpoint: source validation accuracy, IM and SND on the
    unlabelled target pool, and the target test accuracy (the oracle; chooses nothing itself)."""
    model.eval()
    val, val_y = _logits(model, shards["source_val"], device)
    pool, _ = _logits(model, shards["target_pool"], device)
    test, test_y = _logits(model, shards["target_test"], device)
    return {
        "source_val_accuracy": float((val.argmax(1) == val_y).float().mean()),
        "target_im": information_maximization(pool),
        "target_snd": soft_neighborhood_density(pool),
        "target_test_accuracy": float((test.argmax(1) == test_y).float().mean()),
    }


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

    torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy: AdaptStrategy = make_strategy(c["strategy"], c["params"])  # type: ignore[assignment]
    model = strategy.prepare(make_backbone(c["backbone"], c["weights"], c["input_size"], seed=c["seed"]),
                             c["num_classes"])
    if c["init_head"]:
        _load_head(model, c["weights"])
    device = ray.train.torch.get_device()
    src = _stream(ray.train.get_dataset_shard("source"), max(1, strategy.batch_size // world), c["seed"], True,
                  "source")
    tgt = None
    if strategy.needs_target:
        tgt = _stream(ray.train.get_dataset_shard("target"), max(1, strategy.target_batch_size // world),
                      c["seed"] + 7919, False, "target")
    state = ray_train.restore_state()
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        step, history = int(state["step"]), list(state["history"])
        if rank == 0:
            print(f"[adapt] {c['label']}: resuming from the checkpoint at step {step}", flush=True)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(strategy, model)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    amp = bool(c["amp"]) and device.type == "cuda"
    shards = {k: ray.train.get_dataset_shard(k) for k in ("source_val", "target_pool", "target_test")}
    print(f"[adapt] worker rank {rank} pid {os.getpid()} starts at step {step}", flush=True)
    if step >= strategy.steps:  # the run had finished: hand its last checkpoint back
        ray_train.report(dict(history[-1]) if history else {"step": step}, state)
    while step < strategy.steps:
        end = min(strategy.steps, (step // c["checkpoint_every"] + 1) * c["checkpoint_every"])
        t0 = time.perf_counter()
        losses = train_steps(model, strategy, src, end, optimizer=opt, start_step=step, device=device,
                             autocast=amp, target_batches=tgt, lr_scale=strategy.lr_scale)
        step = end
        loss = _global_mean(float(np.mean(losses)))
        metrics: dict[str, float] = {"step": step, "loss": loss, "coeff": strategy.coefficient(step - 1),
                                     "lr": opt.param_groups[0]["lr"], "train_s": time.perf_counter() - t0}
        if rank == 0:
            metrics.update(evaluate_checkpoint(ray_train.unwrap(model), shards, device))
            history.append(metrics)
        ray_train.report(metrics, {"model": ray_train.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                                   "step": step, "history": history})
        # printed after the report returns: Ray Train's result queue holds one report, so the previous
        # checkpoint is registered by now and a crash from here on redoes at most one interval
        if rank == 0:
            print(f"[adapt] {c['label']}: step {step}/{strategy.steps}  loss {loss:.4f}  source val "
                  f"{metrics['source_val_accuracy']:.3f}  target IM {metrics['target_im']:.3f}  "
                  f"SND {metrics['target_snd']:.3f}  target test (oracle) {metrics['target_test_accuracy']:.3f}  "
                  f"({metrics['train_s']:.1f} s training)", flush=True)


def _sets(cfg: AdaptConfig) -> dict[str, ImageSet]:
    src, tgt = load_embedded(cfg.source), load_embedded(cfg.target)
    if src.classes != tgt.classes:
        raise DataError(f"source '{cfg.source}' and target '{cfg.target}' have different classes "
                        f"({list(src.classes)} vs {list(tgt.classes)}): unsupervised adaptation needs one label space")
    sets = {"source": src.split(cfg.source_split), "source_val": src.split(cfg.source_val_split),
            "target": tgt.split(cfg.target_split), "target_test": tgt.split(cfg.test_split)}
    rng = np.random.default_rng(cfg.seed)
    for k in ("source", "target"):  # sorted by class on disk: permute once, so shards mix classes
        order = rng.permutation(len(sets[k]))
        sets[k] = sets[k].subset(order[: cfg.limit] if cfg.limit else order)
    if cfg.limit:
        for k in ("source_val", "target_test"):
            sets[k] = sets[k].subset(np.arange(min(cfg.limit, len(sets[k]))))
    return sets


def adapt(cfg: AdaptConfig, storage: Path, output: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume, or reuse) one adaptation run; returns its record: config, the per-checkpoint
    history of selection scores, and provenance. With ``output``, also writes ``model.safetensors``
    (the last iterate) and ``run.json`` there. Needs a running Ray."""
    t0 = time.time()
    strategy = cfg.make_strategy()
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    sets = _sets(cfg)
    pp = make_backbone(cfg.backbone, None, cfg.input_size).preprocessing
    label = f"{strategy.name} {cfg.source}->{cfg.target} seed {cfg.seed}"
    log(f"[adapt] {label}: {len(sets['source'])} labelled source and {len(sets['target'])} unlabelled target images, "
        f"{strategy.steps} steps of {strategy.batch_size} source"
        f"{f' + {strategy.target_batch_size} target' if strategy.needs_target else ''} images, "
        f"{cfg.workers} Ray Train worker(s)")
    # the stream repeats a small pool up to the source's size, so its iterator restarts (a new Ray
    # Data execution) about as rarely as the source's rather than every few steps
    repeats = max(1, -(-len(sets["source"]) // len(sets["target"])))
    stream = sets["target"].subset(np.tile(np.arange(len(sets["target"])), repeats))
    datasets = {k: ray_train.preprocessed_dataset(v, pp) for k, v in sets.items() if k != "target"}
    datasets["target"] = ray_train.preprocessed_dataset(stream, pp).select_columns(["image"])
    datasets["target_pool"] = ray_train.preprocessed_dataset(sets["target"], pp).select_columns(["image"])
    c = dict(backbone=cfg.backbone, weights=weights, input_size=cfg.input_size, init_head=cfg.init_head,
             strategy=cfg.strategy, params=cfg.resolved_params(), num_classes=len(sets["source"].classes),
             seed=cfg.seed, amp=cfg.amp, checkpoint_every=cfg.checkpoint_every, threads=torch_threads(cfg.workers),
             label=label)
    result = ray_train.fit(_worker, c, datasets, name=cfg.key(), storage=Path(storage) / "ray", workers=cfg.workers,
                           use_gpu=cfg.use_gpu, split=("source", "target"), max_failures=cfg.max_failures)
    state = ray_train.load_result_state(result)
    record = {"key": cfg.key(), "strategy": cfg.strategy, "source": cfg.source, "target": cfg.target,
              "seed": cfg.seed, "steps": int(state["step"]), "history": state["history"], "weights": weights,
              "config": to_dict(cfg), "params": cfg.resolved_params(), "wall_s": time.time() - t0,
              "sizes": {k: len(v) for k, v in sets.items()}, **provenance()}
    if output is not None:
        model = Classifier(make_backbone(cfg.backbone, None, cfg.input_size), len(sets["source"].classes))
        model.load_state_dict({k: v for k, v in state["model"].items() if k.split(".")[0] in ("backbone", "head")})
        output.mkdir(parents=True, exist_ok=True)
        save_weights(model, output / "model.safetensors")
        (output / "run.json").write_text(json.dumps(record, indent=2))
    last = record["history"][-1]
    log(f"[adapt] {label}: done in {record['wall_s']:.0f} s; last iterate: target test {last['target_test_accuracy']:.4f}"
        f", source val {last['source_val_accuracy']:.4f}")
    return record
