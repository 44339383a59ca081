"""The dry-run cost model: trials, episodes and an estimated wall time of a comparison's todo
cells, from a few training steps timed on this machine (nothing is trained for real)."""

from __future__ import annotations

import os
import time

from tl.strategies import StrategyEntry

FEATURE_EPISODE_S = 0.03  # a feature strategy's episode on cached embeddings, measured here
TRIAL_OVERHEAD_S = 3.0


def step_seconds(backbone: str, input_size: int | None, strat, n: int, cache: dict) -> float:
    """Measured seconds of one training step of ``strat`` on ``n`` images (random weights and data:
    the cost does not depend on them). Run in this process, single-threaded, like a trial."""
    import torch

    from tl.models import make_backbone
    from tl.strategies import EpisodeTask

    key = (strat.name, getattr(strat, "frozen", 0), getattr(strat, "batch_norm", ""), min(n, strat.batch_size))
    if key not in cache:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            bb = make_backbone(backbone, None, input_size)
            size = bb.preprocessing.size
            x = torch.rand(key[3], 3, *((size, size) if isinstance(size, int) else size))
            task = EpisodeTask(n_way=2, support_y=(torch.arange(key[3]) % 2).numpy(), seed=0, support_x=x,
                               query_x=x[:2], unlabelled_x=x, backbone=lambda: bb)
            run = strat.start_episode(task)
            run.advance(1)
            t0 = time.perf_counter()
            run.advance(4)
            cache[key] = (time.perf_counter() - t0) / 3
        finally:
            torch.set_num_threads(threads)
    return cache[key]


def estimate(cfg, todo: list, cores: int | None = None) -> dict:
    """Trials, episodes and an estimated wall time for the ``todo`` cells of comparison ``cfg``."""
    cores = cores or os.cpu_count() or 1
    cache: dict = {}
    total_s, test_eps, val_eps = 0.0, 0, 0
    for c in todo:
        entry = StrategyEntry(**c.spec["entry"])
        cands = [entry.build(p) for p in entry.candidates()]
        n_way = cfg.n_way or 10
        test_eps += cfg.episodes
        # every cell scores on validation episodes (a feature cell on its own, larger number); a searched
        # entry first scores each candidate on as many selection episodes. A user's target with
        # ``split: none`` has no validation images: its cells run test episodes only
        val = getattr(cfg, "feature_val_episodes", cfg.val_episodes) if cands[0].uses_embeddings else cfg.val_episodes
        spec = cfg.spec(c.spec["target"]) if hasattr(cfg, "spec") else None
        if spec is not None and spec.split == "none":
            val = 0
        select = cfg.val_episodes if len(cands) > 1 else 0
        val_eps += val + select * len(cands)
        for s in cands:
            eps = select + (cfg.episodes + val if s is cands[0] else 0)  # the chosen one, as costly as the first
            if s.uses_embeddings:
                total_s += eps * FEATURE_EPISODE_S
            else:
                total_s += eps * s.steps * step_seconds(cfg.backbone, cfg.input_size, s, n_way * c.spec["shots"], cache)
    wall = total_s / cores + TRIAL_OVERHEAD_S * len(todo) / cores + 10.0
    return {"trials": len(todo), "test_episodes": test_eps, "val_episodes": val_eps, "core_seconds": total_s,
            "wall_s": wall, "cores": cores}
