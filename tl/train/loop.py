"""The one training loop. It runs in-process for a few-shot episode and inside each Ray Train
worker for many-shot work; it never branches on a strategy's name."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from tl.train.ray_train import check_finite


def set_batch_norm(model: nn.Module, mode: str) -> None:
    """``frozen``: every BatchNorm layer of the backbone uses and keeps its running statistics (eval
    mode). A strategy's ``batch_norm`` is about the backbone's statistics: the other modules (an
    adaptation model's domain discriminator with ``discriminator_bn``, a head) keep the model's mode
    and train theirs. A model without a ``backbone`` (under a DDP wrapper's ``module``) is all backbone."""
    if mode == "frozen":
        base = model.module if hasattr(model, "module") else model
        backbone = getattr(base, "backbone", None)
        for m in (backbone if isinstance(backbone, nn.Module) else base).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def make_optimizer(strategy, model: nn.Module) -> torch.optim.Optimizer:
    base = model.module if hasattr(model, "module") else model
    return torch.optim.SGD(strategy.param_groups(base), lr=strategy.lr, momentum=strategy.momentum,
                           nesterov=strategy.nesterov, weight_decay=strategy.weight_decay)


def _to(batch, dev: torch.device):
    """A tensor, or a tuple/list/dict of tensors (or None), moved to ``dev``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, dev) for v in batch)
    return batch


def train_steps(
    model: nn.Module,
    strategy,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    autocast: bool = False,
    target_batches: Iterable | None = None,
    lr_scale: Callable[[int], float] | None = None,
) -> list[float]:
    """Run steps ``start_step .. steps-1`` of ``strategy`` on ``model``; returns the losses.

    ``target_batches``: a second stream (for example unlabelled target images for domain
    adaptation); each step takes one batch from it and the loss is called as
    ``strategy.loss(model, x, y, step, target)``. ``lr_scale(step)``: a factor on every parameter
    group's initial learning rate at that step (remembered in the group as ``base_lr``, so it
    survives a checkpoint of the optimizer).
    """
    opt = optimizer or make_optimizer(strategy, model)
    if lr_scale is not None:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
    model.train()
    set_batch_norm(model, strategy.batch_norm)
    losses = []
    it: Iterator = iter(batches)
    second: Iterator | None = iter(target_batches) if target_batches is not None else None
    dev = torch.device(device)
    for step in range(start_step, steps):
        if lr_scale is not None:
            scale = lr_scale(step)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        x, y = next(it)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
            if second is None:
                loss = strategy.loss(model, x, y, step)
            else:
                loss = strategy.loss(model, x, y, step, _to(next(second), dev))
        check_finite(loss, what=strategy.name, step=step, lr=opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if strategy.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], strategy.clip_grad)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size].to(dev)).argmax(1).cpu().numpy())
    return np.concatenate(out)
