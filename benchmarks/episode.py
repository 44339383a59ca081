"""Benchmark: a trained strategy's few-shot episode in tl against a plain PyTorch loop (issue 43:
"trained cells at the machine's speed", at most 1.15x the plain loop's wall time).

Both sides get the same episode (mnistm, the default source model, 10-way, 15 queries per class,
the same support images and labels), the same network (the pretrained ``digits_cnn`` with a new
linear head), the same optimiser (SGD, momentum 0.9, weight decay 5e-4, gradient-norm clip 1.0),
the same steps (60) and batches (the whole support set each step: it is smaller than the batch
size), BatchNorm statistics frozen (``batch_norm: frozen``, the default), one torch thread (what a
trial of one core runs). tl's side is ``strategy.predict_episode(task)`` (``tl.strategies.base``:
a fresh copy of the backbone, the frozen stages' output computed once, channels-last); the plain
loop is what a practitioner writes: the stages in a loop, frozen ones with ``requires_grad`` off,
``model.eval()`` for frozen BatchNorm, the default memory layout, then argmax over the queries.
Each figure is the median of ``--repeats`` alternated runs; the first run of each side is a
warm-up and is not counted.

Writes results/bench/episode.md and .csv.

    python -m benchmarks.episode                 # frozen depths 0 and 2, 1 and 5 shots, 5 repeats (about 2 min)
    python -m benchmarks.episode --smoke-test    # one setting, 1 repeat, 5 steps
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import _table
from workflows import _cli

if TYPE_CHECKING:
    import numpy as np

TARGET_RATIO = 1.15


def _plain_loop(task, frozen: int, steps: int, lr: float) -> "np.ndarray":
    """The same episode as a practitioner's loop: returns the query predictions."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(task.seed)
    backbone = task.backbone()
    stages = backbone.stages
    head = nn.Linear(backbone.feature_dim, task.n_way)
    for stage in stages[:frozen]:
        for p in stage.parameters():
            p.requires_grad_(False)

    def forward(x):
        for stage in stages:
            x = stage(x)
        return head(F.adaptive_avg_pool2d(x, 1).flatten(1))

    params = [p for p in [*stages.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    stages.eval()  # frozen BatchNorm: running statistics used and kept
    x, y = task.support_x, torch.as_tensor(task.support_y)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        return forward(task.query_x).argmax(1).numpy()


def main() -> int:
    p = _cli.parser("episode", "Benchmark a trained episode in tl against a plain PyTorch loop.", package="benchmarks")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side per setting (the median is reported)")
    args = p.parse_args()

    import numpy as np
    import torch

    from tl.compare import CompareConfig, target_data
    from tl.evaluate.episodes import Episodes
    from tl.models import build_backbone
    from tl.models.weights import load_weights
    from tl.pretrain import pretrained_path, resolve_weights
    from tl.runtime import resolve_storage
    from tl.strategies import make_strategy

    torch.set_num_threads(1)
    storage = resolve_storage(args.storage)
    if not (pretrained_path(storage) / "meta.json").is_file():
        _cli.init_ray(args.address)  # pretraining the default source model needs Ray
    weights = resolve_weights("pretrained", "digits_cnn", storage, print)
    backbone = build_backbone("digits_cnn")
    load_weights(backbone, weights)
    backbone.eval()
    test = target_data(CompareConfig(), "mnistm")["test"]
    settings = [(0, 5), (2, 5), (0, 1)] if not args.smoke_test else [(2, 1)]
    steps = 5 if args.smoke_test else 60
    repeats = 1 if args.smoke_test else args.repeats
    rows = _table.Rows()
    for frozen, shots in settings:
        strategy = make_strategy("finetune", {"frozen": frozen, "steps": steps})
        episodes = Episodes([strategy], test, shots, 15, 1, 0, None, backbone, None, None)
        ep = episodes.episodes[0]
        times: dict[str, list[float]] = {"tl": [], "plain": []}
        agree = []
        for i in range(repeats + 1):
            for side in ("tl", "plain"):
                task = episodes.task(strategy, ep)
                t0 = time.perf_counter()
                pred = (strategy.predict_episode(task) if side == "tl"
                        else _plain_loop(task, frozen, steps, strategy.lr))
                if i:  # the first round warms both sides up
                    times[side].append(time.perf_counter() - t0)
                if side == "tl":
                    tl_pred = np.asarray(pred)
                else:
                    agree.append(float(np.mean(tl_pred == np.asarray(pred))))
        tl_s, plain_s = statistics.median(times["tl"]), statistics.median(times["plain"])
        what = f"finetune frozen {frozen}, {shots}-shot, {steps} steps"
        for side, s in (("tl", tl_s), ("plain", plain_s)):
            rows.record("episode", f"{what}: {side}", s, "s",
                        f"median of {len(times[side])}: " + ", ".join(f"{v:.2f}" for v in times[side]))
        rows.record("episode", f"{what}: tl / plain loop", tl_s / plain_s, "x",
                    f"target <= {TARGET_RATIO}; query predictions agreeing: {min(agree):.3f}")
    cmd = "python -m benchmarks.episode" + (" --smoke-test" if args.smoke_test else "")
    _table.save(rows, Path(args.output or "results/bench"), "episode", args.smoke_test,
                ["# A trained episode in tl against a plain PyTorch loop", "",
                 f"Command: `{cmd}` on this machine ({os.cpu_count()} cores, one torch thread), "
                 f"{time.strftime('%Y-%m-%d')}; mnistm, 10-way, 15 queries per class, the default source model; "
                 "the same episode, network, optimiser, steps and batches on both sides (benchmarks/episode.py "
                 "says what each side does). Agreement: the share of query predictions the two sides agree on "
                 "(tl runs channels-last and the frozen prefix once: the same arithmetic up to rounding)."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
