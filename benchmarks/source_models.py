"""Benchmark: how well a source model transfers before any adaptation, per pretraining recipe.

For each recipe (``augment: shift``, the former default, and ``augment: digits``, the default on the
embedded source since the digits recipe replaced it) and pretraining seed:
pretrain digits_cnn on mnist (or reuse it from the tl home), then score the source model as it is
(head included, no target image seen) on the test split of each embedded target, and with AdaBN
(BatchNorm statistics re-estimated on the target's unlabelled ``adapt`` split, no label). Writes
results/bench/source_models.md and .csv.

    python -m benchmarks.source_models                      # both recipes, seed 0 (about 4 minutes on 2 cores)
    python -m benchmarks.source_models --seeds 0 1 2
    python -m benchmarks.source_models --smoke-test         # 1 epoch on 600 images
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import _table
from workflows import _cli

TARGETS = ("mnistm", "optdigits")


def score(folder: str) -> dict[str, float]:
    """Target test accuracy of the pretrained backbone and head in ``folder``: as trained (source
    BatchNorm statistics) and with AdaBN on the target's ``adapt`` split."""
    import torch
    from safetensors.torch import load_file

    from tl.data import load_embedded
    from tl.models import Classifier, make_backbone
    from tl.nn import reestimate_batchnorm
    from tl.pretrain import HEAD_FILE

    bb = make_backbone("digits_cnn", folder)
    model = Classifier(bb, 10)
    model.head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    model.eval()
    out = {}
    for target in TARGETS:
        data = load_embedded(target)
        test, pool = data.split("test"), data.split("adapt")
        x, y = bb.preprocessing(torch.from_numpy(test.images)), torch.from_numpy(test.labels)
        xp = bb.preprocessing(torch.from_numpy(pool.images))
        adabn = copy.deepcopy(model)
        reestimate_batchnorm(adabn, [xp[i:i + 256] for i in range(0, len(xp), 256)])
        with torch.no_grad():
            out[f"{target} source"] = float((model(x).argmax(1) == y).float().mean())
            out[f"{target} adabn"] = float((adabn.eval()(x).argmax(1) == y).float().mean())
    return out


def main() -> int:
    p = _cli.parser("source_models", "Benchmark how pretraining recipes transfer before adaptation.",
                    package="benchmarks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="pretraining seeds (default 0)")
    p.add_argument("--recipes", nargs="+", default=["shift", "digits"], help="values of 'augment'")
    args = p.parse_args()

    from tl.pretrain import PretrainConfig, pretrain
    from tl.runtime import resolve_storage

    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    rows = _table.Rows()
    small = {"epochs": 1, "limit": 600} if args.smoke_test else {}
    for recipe in args.recipes:
        found: dict[str, list[float]] = {}
        for seed in args.seeds:
            res = pretrain(PretrainConfig(augment=recipe, seed=seed, **small), storage, log=lambda _: None)
            scores = {"source val": res.val_accuracy, **score(str(res.path))}
            scores["pretraining s"] = res.wall_s if not res.reused else float("nan")
            for k, v in scores.items():
                found.setdefault(k, []).append(v)
        for k, values in found.items():
            v = np.array(values, dtype=float)
            if k == "pretraining s":
                done = v[np.isfinite(v)]
                if len(done):
                    rows.record(recipe, "pretraining wall time", float(done.mean()), "s",
                                f"{len(done)} of {len(v)} pretrained in this run (others reused)")
                continue
            what = {"source val": "mnist validation accuracy"}.get(k, f"{k.split()[0]} test accuracy, "
                                                                       + ("source-only, no target image"
                                                                          if k.endswith("source") else
                                                                          "AdaBN on the adapt split, no label"))
            rows.record(recipe, what, 100 * float(v.mean()), "%",
                        f"seeds {args.seeds}: " + ", ".join(f"{100 * x:.1f}" for x in v)
                        + (f"; std {100 * v.std(ddof=1):.1f}" if len(v) > 1 else ""))
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "") + \
        (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else "")
    _table.save(rows, Path(args.output or "results/bench"), "source_models", args.smoke_test, [
        "# Source models before adaptation", "", f"Command: `{cmd}` on {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d')}: digits_cnn pretrained on mnist (3,600 train images, 15 epochs, 2 Ray Train "
        "workers) with each recipe ('augment: shift', the former default: random shifts of up to 2 pixels; "
        "'augment: digits', the default: tl/train/digit_augment.py), scored as it is on each target's test split (500 mnistm, 898 "
        "optdigits images) and with AdaBN (BatchNorm statistics of the target's unlabelled adapt split)."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
