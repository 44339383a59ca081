"""The one training loop. It runs in-process for a few-shot episode and inside each Ray Train
worker for many-shot work; it never branches on a strategy's name."""

from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from tl.train.ray_train import check_finite

#: steps between the loop's reads of its losses on the host: reading a loss on a GPU waits for every
#: step queued before it, so the loop keeps them on the device and reads (and checks) them together
SYNC_EVERY = 50


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of mixed precision on ``device``: bf16 where the GPU computes it natively
    (Ampere and later), fp16 on an older GPU (with a ``GradScaler``: fp16's narrow range underflows
    small gradients), None (plain fp32) off CUDA, where autocast would change the CPU's arithmetic."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16``, ``fp16`` or ``fp32`` (no autocast): what a log line and a run's record say."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


_SAID: set[str] = set()


def say_precision(prefix: str, device: torch.device | str) -> str:
    """Print once per process and ``prefix`` the precision the steps run in on ``device`` (a tl line
    such as ``[finetune] ...: mixed precision: bf16``): which one depends on the GPU; returns its name."""
    dtype = amp_dtype(device)
    name = precision_name(dtype)
    if prefix not in _SAID:
        _SAID.add(prefix)
        print(f"{prefix} mixed precision: {name}" + ("" if dtype else f" (no autocast on {torch.device(device).type})"),
              flush=True)
    return name


def grad_scaler(dtype: torch.dtype | None) -> "torch.amp.GradScaler | None":
    """A loss scaler where the steps run in fp16 (None otherwise): one per optimizer, kept across the
    calls of ``train_steps`` so its scale is not found again from 2^16 at every call."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


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
    scaler: "torch.amp.GradScaler | None" = None,
    target_batches: Iterable | None = None,
    lr_scale: Callable[[int], float] | None = None,
    sync_every: int = SYNC_EVERY,
) -> list[float]:
    """Run steps ``start_step .. steps-1`` of ``strategy`` on ``model``; returns the losses.

    ``target_batches``: a second stream (for example unlabelled target images for domain
    adaptation); each step takes one batch from it and the loss is called as
    ``strategy.loss(model, x, y, step, target)``. ``lr_scale(step)``: a factor on every parameter
    group's initial learning rate at that step (remembered in the group as ``base_lr``, so it
    survives a checkpoint of the optimizer). ``autocast``: mixed precision in ``amp_dtype(device)``
    (nothing off CUDA), fp16 with ``scaler`` (``grad_scaler``; one is made for this call if none).

    The losses stay on the device and are read every ``sync_every`` steps, at the last step, and at
    every step when ``on_step`` wants them: each read waits for the device. A non-finite loss stops
    training at the read (``check_finite``'s error, naming the first such step and its rate).
    """
    opt = optimizer or make_optimizer(strategy, model)
    if lr_scale is not None:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
    model.train()
    set_batch_norm(model, strategy.batch_norm)
    losses: list[float] = []
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, rate, loss on the device) not read yet
    it: Iterator = iter(batches)
    second: Iterator | None = iter(target_batches) if target_batches is not None else None
    dev = torch.device(device)
    dtype = amp_dtype(dev) if autocast else None
    if scaler is None:
        scaler = grad_scaler(dtype)
    for step in range(start_step, steps):
        if lr_scale is not None:
            scale = lr_scale(step)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        lr = opt.param_groups[0]["lr"]
        x, y = next(it)
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if second is None:
                loss = strategy.loss(model, x, y, step)
            else:
                loss = strategy.loss(model, x, y, step, _to(next(second), dev))
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if strategy.clip_grad > 0:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], strategy.clip_grad)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        pending.append((step, lr, loss.detach()))
        if on_step is not None or len(pending) >= sync_every or step == steps - 1:
            values = _read_losses(pending, strategy.name)
            losses += values
            if on_step is not None:
                on_step(step, values[-1])
    return losses


def _read_losses(pending: list[tuple[int, float, torch.Tensor]], what: str) -> list[float]:
    """The pending losses as floats, read in one copy from the device (and emptied); the first
    non-finite one raises ``check_finite``'s error with its own step and rate."""
    tensors = [loss.reshape(()) for _, _, loss in pending]
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    values = torch.stack([t.to(dtype) for t in tensors]).tolist()
    for (step, lr, loss), value in zip(pending, values):
        if not math.isfinite(value):
            check_finite(loss, what=what, step=step, lr=lr)
    pending.clear()
    return values


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i : i + batch_size].to(dev)).argmax(1).cpu().numpy())
    return np.concatenate(out)
