"""Benchmark: the honesty of the whole chain, as the regret a user pays for following tl's advice.

For each (target, shots) of the full comparison (``workflows/configs/compare-full.yaml``, the grid of
results/compare, unless ``--config`` names another) and several independent draws of the validation episodes
(and of a searched entry's selection episodes), the recommendation is made exactly as a comparison
makes it (``tl.choice.choose`` on that draw's validation rows) and then judged on one large set of
held-out test episodes (100 per cell for a feature strategy, 30 for a trained one by default), the
same for every draw: the regret is the best strategy's mean test accuracy there less the recommended
strategy's. The cells run as Ray tasks (``tl.evaluate.validation_draws``: each candidate's test
episodes are run once, whatever the number of draws). Writes results/bench/regret.md/.csv.

    python -m benchmarks.regret                  # about an hour on 2 cores (the default backbone exists)
    python -m benchmarks.regret --smoke-test     # one target, one shot count, four strategies, a few episodes
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import _table
from workflows import _cli

#: the grid the committed table measures (the default comparison until make demo's grid became smaller)
FULL_GRID = Path(__file__).resolve().parent.parent / "workflows" / "configs" / "compare-full.yaml"

SMOKE = {"experiment": "regret-smoke", "targets": ["optdigits"], "shots": [1], "val_episodes": 2,
         "feature_val_episodes": 10,
         "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                        {"strategy": "finetune", "params": {"steps": 5}, "search": {"frozen": [3, 4]}},
                        {"strategy": "prototype", "label": "prototype_bn_target", "params": {"bn_stats": "target"}}]}


def main() -> int:
    p = _cli.parser("regret", "Benchmark the regret of following tl's recommendation.", package="benchmarks")
    p.add_argument("--draws", type=int, default=3, help="independent draws of the validation episodes (default 3)")
    p.add_argument("--trained-episodes", type=int, default=30, help="test episodes of a trained cell (default 30)")
    p.add_argument("--feature-episodes", type=int, default=100, help="test episodes of a feature cell (default 100)")
    args = p.parse_args()

    import ray

    from tl.choice import choose
    from tl.compare import CompareConfig, cells, prepare, weights_content
    from tl.config import load_config
    from tl.evaluate import validation_draws
    from tl.pretrain import resolve_weights
    from tl.runtime import resolve_storage
    from tl.strategies import StrategyEntry

    t0 = time.time()
    storage = resolve_storage(args.storage)
    _cli.init_ray(args.address)
    config = args.config or (None if args.smoke_test else str(FULL_GRID))
    cfg = load_config(CompareConfig, config, args.overrides, base=dict(SMOKE) if args.smoke_test else None)
    trained_eps, feature_eps = ((3, 5) if args.smoke_test else (args.trained_episodes, args.feature_episodes))
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, print)
    grid = cells(cfg, content=weights_content(cfg, weights))
    inputs = ray.put(prepare(cfg, grid, weights, storage, print)["inputs"])
    print(f"[regret] {len(grid)} cells x {args.draws} validation draws; test episodes: {feature_eps} per feature "
          f"cell, {trained_eps} per trained cell", flush=True)

    @ray.remote
    def one(spec: dict, inputs, episodes: int) -> pd.DataFrame:
        import torch

        torch.set_num_threads(1)
        return pd.concat(validation_draws(spec, inputs, args.draws, episodes), ignore_index=True)

    futures = []
    for c in sorted(grid, key=lambda c: -c.cost):  # long cells first
        feature = StrategyEntry(**c.spec["entry"]).build().uses_embeddings
        task = one.options(num_cpus=cfg.feature_cpus if feature else 1)
        futures.append(task.remote(c.spec, inputs, feature_eps if feature else trained_eps))
    frames, pending = [], list(futures)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        frames.append(ray.get(done[0]))
        print(f"[regret] {len(frames)}/{len(futures)} cells ({time.time() - t0:.0f} s)", flush=True)
    rows = pd.concat(frames, ignore_index=True)

    table = _table.Rows()
    regrets = []
    for d in range(args.draws):
        draw = rows[rows["draw"] == d]
        for c in choose(draw, cfg.tie_margin):
            regret = 100 * (c.test[c.test_best] - c.test[c.recommended])
            regrets.append(regret)
            table.record(f"draw {d}", f"{c.target} {c.shots}-shot regret", round(regret, 2), "points",
                         f"recommended {c.recommended} ({100 * c.test[c.recommended]:.1f}%), best on the held-out "
                         f"test episodes {c.test_best} ({100 * c.test[c.test_best]:.1f}%); validation winner "
                         f"{c.val_winner}; tied: {', '.join(c.tied)}")
    table.record("all", "mean regret", round(float(np.mean(regrets)), 2), "points",
                 f"{len(regrets)} (target, shots, draw); target <= 1.0")
    table.record("all", "max regret", round(float(np.max(regrets)), 2), "points", "target <= 3.0")
    table.record("all", "wall time", round(time.time() - t0, 1), "s", f"{os.cpu_count()} CPU cores")
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "")
    _table.save(table, Path(args.output or "results/bench"), "regret", args.smoke_test, [
        "# The regret of following tl's recommendation", "",
        f"Command: `{cmd}` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}; weights "
        f"`{cfg.weights}` (digest {weights_content(cfg, weights)[:12]}). Each (target, shots) of the comparison is "
        f"recommended {args.draws} times, on independent draws of the validation (and selection) episodes, as "
        f"`tl.choice.choose` makes it (ties: practical equivalence within ±{100 * cfg.tie_margin:g} points, then "
        f"the cheapest by a fixed cost); each time it is judged on the same held-out test episodes ({feature_eps} per "
        f"feature cell, {trained_eps} per trained cell): regret = the best strategy's mean test accuracy less the "
        "recommended one's, in points. The best on the test episodes is itself a maximum of noisy means, so the "
        "regret is, if anything, overstated."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
