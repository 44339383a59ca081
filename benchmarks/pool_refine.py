"""Benchmark: how many soft k-means steps ``pool_im`` should take at one shot per class.

With one labelled image per class, each prototype is one image: an atypical draw puts it off its
class's cluster in the unlabelled pool, and the score then reads the embedding's clusters wrongly.
``tl.transfer_scores.pool_im`` moves the prototypes onto the pool by ``refine`` soft k-means steps
(Ren et al. 2018) before it scores. This benchmark scores the candidates of ``benchmarks/recommend.py``
(5 backbones pretrained here, 22 (backbone, stage) candidates) at 1 shot on both embedded targets, on
``--draws`` draws of the shots (seeds 0..draws-1, each with its pool of 512 unlabelled adapt images, as
``tl.recommend`` draws them), with each number of steps, and reports the weighted Kendall's τ against
the realised accuracy (the better of logistic and prototype on the frozen embeddings, 20 test
episodes, as in benchmarks/recommend.py) and the top-1 regret. Writes results/bench/pool_refine.md/.csv.

    python -m benchmarks.pool_refine                 # about 2 minutes on 2 cores once the candidates exist
    python -m benchmarks.pool_refine --smoke-test    # two digits_cnn candidates, 2 draws, 5 episodes
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from benchmarks import _table
from workflows import _cli

STEPS = (0, 1, 2, 3, 5, 10)


def main() -> int:
    p = _cli.parser("pool_refine", "Benchmark pool_im's soft k-means steps at one shot per class.",
                    package="benchmarks")
    p.add_argument("--draws", type=int, default=10, help="draws of the shots per target (default 10)")
    args = p.parse_args()

    from scipy.stats import weightedtau

    from benchmarks.recommend import TARGETS, candidates, realised
    from tl.data import load_embedded
    from tl.models import make_backbone
    from tl.recommend import RecommendConfig, draw, stage_features
    from tl.runtime import resolve_storage
    from tl.transfer_scores import POOL_REFINE, pool_im

    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    cands = candidates(storage, args.smoke_test)
    draws = range(2 if args.smoke_test else args.draws)
    episodes = 5 if args.smoke_test else 20
    pool_size = RecommendConfig().pool
    rows = _table.Rows()
    backbones = {lab: make_backbone(b, w, s) for lab, b, w, s in cands}
    for target in TARGETS:
        t0 = time.perf_counter()
        real = realised(cands, target, 1, episodes, {})
        keys = list(real)
        got = np.array([real[k] for k in keys])
        data = load_embedded(target).split("adapt")
        taus: dict[int, list[float]] = {k: [] for k in STEPS}
        regrets: dict[int, list[float]] = {k: [] for k in STEPS}
        for seed in draws:  # the shots and the pool as tl.recommend draws them for this seed
            shots, pool = draw(data, 1, seed, pool_size)
            images, y = data.pixels(np.concatenate([shots, pool])), data.labels[shots]  # no pool label read
            feats = {}
            for lab, bb in backbones.items():
                for s, v in stage_features(bb, images, list(range(1, bb.num_stages + 1))).items():
                    feats[(lab, s)] = (v[: len(shots)], v[len(shots):])
            for k in STEPS:
                score = np.array([pool_im(feats[c][0], y, feats[c][1], refine=k) for c in keys])
                taus[k].append(float(weightedtau(score, got)[0]))
                regrets[k].append(100 * float(got.max() - got[int(score.argmax())]))
        best = keys[int(got.argmax())]
        for k in STEPS:
            part = f"{target} 1-shot"
            mark = " (tl's default)" if k == POOL_REFINE else ""
            rows.record(part, f"refine={k}{mark}: weighted Kendall tau", round(float(np.mean(taus[k])), 3), "",
                        f"mean of {len(draws)} draws, lowest {min(taus[k]):.3f}")
            picked_worse = sum(r > 0 for r in regrets[k])
            rows.record(part, f"refine={k}{mark}: top-1 regret", round(float(np.mean(regrets[k])), 1), "points",
                        f"mean of {len(draws)} draws, max {max(regrets[k]):.1f}; {picked_worse} of {len(draws)} draws "
                        f"pick below the best ({best[0]} stage {best[1]}, {100 * got.max():.1f}%)")
        print(f"{target}: {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "") + ("" if args.draws == 10 else f" --draws {args.draws}")
    _table.save(rows, Path(args.output or "results/bench"), "pool_refine", args.smoke_test, [
        "# pool_im's soft k-means steps at one shot per class", "",
        f"Command: `{cmd}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. Candidates: "
        + "; ".join(lab for lab, *_ in cands) + f", at every stage. {len(draws)} draws of one shot per class from "
        f"the adapt split (seeds 0-{len(draws) - 1}), each with {pool_size} of its other images unlabelled; pool_im "
        f"with each number of refinement steps (temperature 20); realised: the better of logistic and prototype on "
        f"the frozen embeddings, {episodes} test episodes (10-way, 15 queries)."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
