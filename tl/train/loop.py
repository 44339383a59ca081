"""The one training loop. It runs in-process for a few-shot episode and inside each Ray Train
worker for many-shot work; it never branches on a strategy's name."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from tl.train.ray_train import check_finite


def set_batch_norm(model: nn.Module, mode: str) -> None:
    """``frozen``: every BatchNorm uses and keeps its running statistics (eval mode)."""
    if mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def make_optimizer(strategy, model: nn.Module) -> torch.optim.Optimizer:
    base = model.module if hasattr(model, "module") else model
    return torch.optim.SGD(strategy.param_groups(base), lr=strategy.lr, momentum=strategy.momentum,
                           weight_decay=strategy.weight_decay)


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
) -> list[float]:
    """Run steps ``start_step .. steps-1`` of ``strategy`` on ``model``; returns the losses."""
    opt = optimizer or make_optimizer(strategy, model)
    model.train()
    set_batch_norm(model, strategy.batch_norm)
    losses = []
    it: Iterator = iter(batches)
    dev = torch.device(device)
    for step in range(start_step, steps):
        x, y = next(it)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = strategy.loss(model, x, y, step)
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
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size]).argmax(1).cpu().numpy())
    return np.concatenate(out)
