"""Fine-tuning on Ray Train: many-shot fine-tuning of a backbone on a target with one strategy.

The same strategy code and the same training loop as an in-process few-shot episode; here the
data reach the DDP workers as Ray Data shards preprocessed by Ray Data, and the run checkpoints
every ``checkpoint_every`` steps and resumes from the last checkpoint when run again.
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

from tl.config import config_hash, to_dict
from tl.data import load_embedded
from tl.errors import ConfigError
from tl.models import Classifier, make_backbone, save_weights
from tl.pretrain import resolve_weights
from tl.runtime import provenance, torch_threads
from tl.strategies import TrainedStrategy, make_strategy
from tl.train import ray_train
from tl.train.loop import make_optimizer, train_steps


@dataclass(frozen=True)
class FinetuneConfig:
    """``weights``: ``pretrained`` (the tl home's pretrained backbone, made if missing), ``random``,
    a weights file, a pretraining folder, or ``torchvision:<weights name>``."""

    backbone: str = "digits_cnn"
    weights: str = "pretrained"
    input_size: int | None = None
    target: str = "mnistm"
    train_split: str = "adapt"
    eval_split: str = "test"
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
        strat = make_strategy(self.strategy, self.params)
        if not isinstance(strat, TrainedStrategy):
            raise ConfigError(f"strategy '{self.strategy}' is a feature strategy; workflows.finetune trains "
                              f"a {', '.join(['finetune', 'lp_ft', 'scratch'])} strategy")
        if self.workers < 1 or self.checkpoint_every < 1:
            raise ConfigError("config keys 'workers' and 'checkpoint_every' must be at least 1")

    def key(self) -> str:
        ident = {k: v for k, v in to_dict(self).items() if k not in ("workers", "use_gpu", "max_failures")}
        return f"finetune-{self.strategy}-{self.target.replace(':', '_')}-{config_hash(ident)}"


def _batches(shard, per_worker: int, seed: int):
    """Endless (x, y) batches from a Ray Data shard, a new local shuffle each pass."""
    epoch = 0
    while True:
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                          local_shuffle_buffer_size=max(per_worker, 256),
                                          local_shuffle_seed=seed * 1000 + epoch):
            yield b["image"], b["label"]
        epoch += 1


def _global_mean(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _worker(c: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = make_strategy(c["strategy"], c["params"])
    model = strategy.prepare(make_backbone(c["backbone"], c["weights"], c["input_size"]), c["num_classes"])
    device = ray.train.torch.get_device()
    per_worker = max(1, strategy.batch_size // world)
    batches = _batches(ray.train.get_dataset_shard("train"), per_worker, c["seed"])
    state = ray_train.restore_state()
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        step = int(state["step"])
        if rank == 0:
            print(f"[finetune] resuming from the checkpoint at step {step}", flush=True)
    else:
        x, y = next(batches)
        strategy.on_start(model, x, y)
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(strategy, model)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    amp = bool(c["amp"]) and device.type == "cuda"
    print(f"[finetune] worker rank {rank} pid {os.getpid()} starts at step {step}", flush=True)
    if step >= strategy.steps:  # the run had finished: hand its last checkpoint back
        ray_train.report({"step": step, "loss": state["loss"], "last_loss": state["loss"],
                          "eval_accuracy": state["eval_accuracy"]}, state)
    while step < strategy.steps:
        end = min(strategy.steps, (step // c["checkpoint_every"] + 1) * c["checkpoint_every"])
        losses = train_steps(model, strategy, batches, end, optimizer=opt, start_step=step, device=device, autocast=amp)
        step = end
        loss = _global_mean(float(np.mean(losses)) if losses else float("nan"))
        acc = ray_train.shard_accuracy(model, ray.train.get_dataset_shard("eval"), device)
        ray_train.report({"step": step, "loss": loss, "last_loss": _global_mean(losses[-1]) if losses else loss,
                          "eval_accuracy": acc},
                         {"model": ray_train.unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "eval_accuracy": acc, "loss": loss})
        # printed after the report returns: Ray Train's result queue holds one report, so by now the
        # previous checkpoint is registered and a crash from here on redoes at most one interval
        if rank == 0:
            print(f"[finetune] step {step}/{strategy.steps}  loss {loss:.4f}  eval accuracy {acc:.4f}", flush=True)


def finetune(cfg: FinetuneConfig, storage: Path, output: Path, log: Callable[[str], None] = print) -> dict:
    """Fine-tune on Ray Train, then write ``model.safetensors`` and ``metrics.json`` to ``output``."""
    t0 = time.time()
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, log)
    full = load_embedded(cfg.target)
    train, evald = full.split(cfg.train_split), full.split(cfg.eval_split)
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    train = train.subset(order[: cfg.limit] if cfg.limit else order)
    pp = make_backbone(cfg.backbone, None, cfg.input_size).preprocessing
    log(f"[finetune] {cfg.strategy} {cfg.params} of {cfg.backbone} on {cfg.target}: {len(train)} training images "
        f"({cfg.train_split}), {len(evald)} evaluation images ({cfg.eval_split}), {cfg.workers} Ray Train workers")
    c = dict(backbone=cfg.backbone, weights=weights, input_size=cfg.input_size, strategy=cfg.strategy,
             params=dict(cfg.params), num_classes=len(full.classes), seed=cfg.seed, amp=cfg.amp,
             checkpoint_every=cfg.checkpoint_every, threads=torch_threads(cfg.workers))
    datasets = {"train": ray_train.preprocessed_dataset(train, pp), "eval": ray_train.preprocessed_dataset(evald, pp)}
    result = ray_train.fit(_worker, c, datasets,
                           name=cfg.key(), storage=Path(storage) / "ray", workers=cfg.workers, use_gpu=cfg.use_gpu,
                           split=("train",), max_failures=cfg.max_failures)
    state = ray_train.load_result_state(result)
    model = Classifier(make_backbone(cfg.backbone, None, cfg.input_size), len(full.classes))
    model.load_state_dict(state["model"])
    output.mkdir(parents=True, exist_ok=True)
    save_weights(model, output / "model.safetensors")
    metrics = {"strategy": cfg.strategy, "target": cfg.target, "steps": int(state["step"]),
               "eval_accuracy": float(state["eval_accuracy"]), "eval_split": cfg.eval_split,
               "final_loss": float(state["loss"]), "wall_s": time.time() - t0, "weights": weights,
               "config": to_dict(cfg), "classes": list(full.classes), **provenance()}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"[finetune] {cfg.eval_split} accuracy {metrics['eval_accuracy']:.4f} after {metrics['steps']} steps; "
        f"model and metrics in {output}")
    return metrics
