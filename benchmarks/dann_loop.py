"""Benchmark: a DANN run in tl against a plain single-process PyTorch loop (issue 43: a DANN run, the
DTN recipe, 3,000 steps, 1 worker, at most 1.15x the plain loop's wall time).

The run is the ``dann_dtn_tllib_aug`` entry of workflows/configs/adapt-dann-dtn-aug.yaml, seed 0, as
``workflows.adapt`` builds it (``tl.adapt_bench.AdaptExperimentConfig.run_config``): mnist -> mnistm,
``dtn`` from random weights at 32 px, 64 source (digits-augmented) + 64 target images a step, SGD
lr 0.03 (Nesterov, momentum 0.9, weight decay 1e-3) decayed as (1 + 3 p)^-0.75, the gradient-reversal
coefficient 2 / (1 + exp(-3 p)) - 1, a 1024-1024 discriminator with BatchNorm, BatchNorm of the
backbone in training mode over the concatenated source + target batch, no gradient clip
(``tl.runs.UDA_RECIPE`` under it). It runs on one Ray Train worker and scores once, at the end
(``checkpoint_every`` = steps).

- tl: ``tl.runs.run`` on a local Ray, timed from the call to its return (data to Ray Data, the Ray
  Train controller and worker start-up, the steps, the scoring, the checkpoint), in a fresh temporary
  storage folder (removed at the end).
- plain loop: this process, no Ray: the same sets (read once through tl's run data, preprocessed once
  to tensors), the same modules built from the same seed (tl's ``dtn`` backbone, a linear head, tl's
  ``DomainDiscriminator``), the loss written here (cross-entropy + the domain BCE behind a gradient
  reversal), the same optimiser and schedules, batches drawn at random from a seeded generator every
  step, the source batch augmented by ``digit_augment_preprocessed`` as tl's ``augment: digits`` does,
  then the target test accuracy. Timed from preprocessing the sets to the accuracy. Both sides run the
  torch threads tl gives a one-worker run (``tl.runtime.threads_for(cpus_per_worker(1))``).

The two final accuracies are a sanity check that both sides trained DANN, not a claim they agree
(different batch orders: tl's shuffled Ray Data streams, the plain loop's random draws).

Writes results/bench/dann_loop.md and .csv.

    python -m benchmarks.dann_loop                 # 3,000 steps each side (about 30 min on 2 cores)
    python -m benchmarks.dann_loop --smoke-test    # 20 steps
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import _table
from workflows import _cli

if TYPE_CHECKING:
    import torch

    from tl.runs import RunConfig

TARGET_RATIO = 1.15
CONFIG = Path(__file__).resolve().parent.parent / "workflows" / "configs" / "adapt-dann-dtn-aug.yaml"
LABEL = "dann_dtn_tllib_aug"


def run_config(steps: int) -> "RunConfig":
    """The ``dann_dtn_tllib_aug`` run of seed 0 as ``workflows.adapt --workers 1`` builds it, with
    ``steps`` steps and one scoring at the end."""
    from dataclasses import replace

    from tl.adapt_bench import AdaptExperimentConfig
    from tl.config import load_config

    exp = load_config(AdaptExperimentConfig, str(CONFIG), [], base={"workers": 1})
    method = next(m for m in exp.methods if m.name() == LABEL)
    cfg = exp.run_config(exp.targets[0], method, exp.seeds[0])
    return replace(cfg, params={**cfg.params, "steps": steps}, checkpoint_every=steps)


def build_plain(strategy, seed: int, num_classes: int) -> dict:
    """The plain loop's modules, drawn as tl's worker draws them: the backbone from ``seed``
    (``make_backbone``), then from the global generator seeded with ``seed`` the discriminator, then
    the head."""
    import torch
    from torch import nn

    from tl.models import make_backbone
    from tl.nn import DomainDiscriminator

    torch.manual_seed(seed)
    backbone = make_backbone("dtn", None, 32, seed=seed)
    disc = DomainDiscriminator(backbone.feature_dim, strategy.hidden, strategy.dropout, strategy.discriminator_bn)
    head = nn.Linear(backbone.feature_dim, num_classes)
    return {"backbone": backbone, "head": head, "disc": disc}


def plain_loss(m: dict, xs, ys, xt, coeff: float):
    """Cross-entropy on the source batch + the domain BCE (source 1, target 0) of the discriminator
    behind gradient reversal; one backbone pass over source and target together."""
    import torch
    import torch.nn.functional as F

    feats = m["backbone"](torch.cat([xs, xt]))
    logits = m["head"](feats[: len(xs)])
    reversed_ = feats.view_as(feats)  # gradient reversal: the identity forward, the gradient times -coeff back
    reversed_.register_hook(lambda g: -coeff * g)
    d = m["disc"](reversed_)
    domains = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))])
    return F.cross_entropy(logits, ys) + F.binary_cross_entropy_with_logits(d, domains)


def plain_optimizer(strategy, m: dict):
    """SGD over every parameter at the recipe's rate (tl's groups: head, backbone, discriminator, all at ``lr``)."""
    import torch

    params = [p for k in ("head", "backbone", "disc") for p in m[k].parameters()]
    return torch.optim.SGD(params, lr=strategy.lr, momentum=strategy.momentum, nesterov=strategy.nesterov,
                           weight_decay=strategy.weight_decay)


def plain_step(strategy, m: dict, opt, xs, ys, xt, step: int) -> "torch.Tensor":
    """One step at ``step``: the learning rate (1 + lr_gamma p)^-0.75 times ``lr`` and the reversal
    coefficient 2 / (1 + exp(-gamma p)) - 1, p = step / steps; returns the loss (on the device, not read)."""
    import math

    import torch

    p = step / strategy.steps
    for g in opt.param_groups:
        g["lr"] = strategy.lr * (1.0 + strategy.lr_gamma * p) ** -0.75
    coeff = strategy.weight * (2.0 / (1.0 + math.exp(-strategy.gamma * p)) - 1.0)
    loss = plain_loss(m, xs, ys, xt, coeff)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if strategy.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], strategy.clip_grad)
    opt.step()
    return loss.detach()


def plain_run(cfg: "RunConfig", sets: dict) -> dict[str, float]:
    """The plain loop over ``sets`` (tl's run sets): preprocess, train, score; returns its times and accuracy."""
    import torch

    from tl.models import make_backbone
    from tl.train.digit_augment import digit_augment_preprocessed

    t0 = time.perf_counter()
    strategy = cfg.make_strategy()
    pp = make_backbone(cfg.backbone, None, cfg.input_size).preprocessing

    def tensor(s):
        with torch.no_grad():
            return torch.cat([pp(torch.from_numpy(s.images[i:i + 256])) for i in range(0, len(s), 256)])

    src_x, src_y = tensor(sets["source"]), torch.from_numpy(sets["source"].labels)
    tgt_x = tensor(sets["target"])
    test_x, test_y = tensor(sets["target_test"]), torch.from_numpy(sets["target_test"].labels)
    m = build_plain(strategy, cfg.seed, len(sets["target"].classes))
    opt = plain_optimizer(strategy, m)
    draw = torch.Generator().manual_seed(cfg.seed)
    aug = torch.Generator().manual_seed(cfg.seed * 1000)  # tl's augmentation seed of rank 0
    for mod in m.values():
        mod.train()
    t1 = time.perf_counter()
    losses = []
    for step in range(strategy.steps):
        i = torch.randint(len(src_x), (strategy.batch_size,), generator=draw)
        j = torch.randint(len(tgt_x), (strategy.target_batch_size,), generator=draw)
        xs = digit_augment_preprocessed(src_x[i], pp, aug)
        losses.append(plain_step(strategy, m, opt, xs, src_y[i], tgt_x[j], step))
    loss = float(torch.stack(losses[-50:]).mean())
    t2 = time.perf_counter()
    for mod in m.values():
        mod.eval()
    with torch.no_grad():
        pred = torch.cat([m["head"](m["backbone"](test_x[i:i + 512])).argmax(1) for i in range(0, len(test_x), 512)])
    acc = float((pred == test_y).float().mean())
    t3 = time.perf_counter()
    return {"wall_s": t3 - t0, "train_s": t2 - t1, "accuracy": acc, "loss": loss}


def main() -> int:
    p = _cli.parser("dann_loop", "Benchmark a DANN run in tl against a plain PyTorch loop.", package="benchmarks")
    p.add_argument("--steps", type=int, default=3000, help="training steps of each side (default 3000)")
    args = p.parse_args()
    steps = 20 if args.smoke_test else args.steps

    import torch

    from tl.runs import _sets, run
    from tl.runtime import cpus_per_worker, threads_for

    cfg = run_config(steps)
    _cli.init_ray(args.address)
    threads = threads_for(cpus_per_worker(cfg.workers))  # what tl's worker sets (tl.train.ray_train.start)
    sets = _sets(cfg)  # the run's sets, read once before either side is timed (both read them warm)
    storage = Path(tempfile.mkdtemp(prefix="tl-bench-dann-"))
    try:
        t0 = time.perf_counter()
        record = run(cfg, storage, None, log=lambda line: print(line, flush=True))
        tl_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    tl_last = record["history"][-1]
    tl_train_s = sum(h.get("train_s", 0.0) for h in record["history"])
    torch.set_num_threads(threads)
    print(f"[dann_loop] tl: {tl_s:.1f} s; plain loop on {threads} torch thread(s) ...", flush=True)
    plain = plain_run(cfg, sets)
    print(f"[dann_loop] plain: {plain['wall_s']:.1f} s", flush=True)

    rows = _table.Rows()
    what = f"DANN dtn mnist->mnistm, {steps} steps, 1 worker"
    rows.record("dann", f"{what}: tl wall", tl_s, "s", "tl.runs.run, Ray Train start-up and scoring included")
    rows.record("dann", f"{what}: plain loop wall", plain["wall_s"], "s",
                "preprocessing, model build, steps and scoring, in this process")
    rows.record("dann", f"{what}: tl / plain loop", tl_s / plain["wall_s"], "x", f"target <= {TARGET_RATIO}")
    rows.record("dann", "tl: s per step", tl_train_s / steps, "s", "the worker's train_s over the steps")
    rows.record("dann", "plain loop: s per step", plain["train_s"] / steps, "s", "the steps alone")
    rows.record("dann", "tl: target test accuracy", tl_last["target_test_accuracy"], "",
                "sanity check: DANN trained (not a claim the sides agree)")
    rows.record("dann", "plain loop: target test accuracy", plain["accuracy"], "",
                "sanity check: DANN trained (not a claim the sides agree)")
    cmd = "python -m benchmarks.dann_loop" + (" --smoke-test" if args.smoke_test else
                                              (f" --steps {args.steps}" if args.steps != 3000 else ""))
    _table.save(rows, Path(args.output or "results/bench"), "dann_loop", args.smoke_test,
                ["# A DANN run in tl against a plain PyTorch loop", "",
                 f"Command: `{cmd}` on this machine ({os.cpu_count()} cores, {threads} torch thread(s) each side, "
                 f"a local Ray of {_cli.local_cpus()} logical CPUs), {time.strftime('%Y-%m-%d')}; the "
                 f"{LABEL} run of workflows/configs/adapt-dann-dtn-aug.yaml, seed 0, scored once at the end; the "
                 "same network, batch sizes, steps, optimiser, schedules and augmentation on both sides "
                 "(benchmarks/dann_loop.py says what each side does)."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
