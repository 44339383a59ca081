"""Benchmark: the grid engine's own time on a large comparison of cheap cells.

"Schedule large strategy comparisons" means thousands of feature-classifier cells (milliseconds an
episode) over many seeds and shot counts. This runs such a comparison's cells twice on the default
backbone's cached embeddings: (a) as a plain loop in one process (``tl.evaluate.run_cell`` on each
cell, nothing else), and (b) through the engine (``tl.grid.run_cells``: Ray Tune trials, many cheap
cells to a trial, each cell's rows written to the cell store as one Parquet file and reported to
Tune), on a local Ray of ``--cpus`` CPUs (1 by default, and a trial asks for a whole CPU, so both
run one cell at a time on one core and the difference is the engine's). The engine's time per
cell is (b's wall time - a's) / cells. Writes results/bench/grid.md and grid.csv.

    python -m benchmarks.grid                 # 2,010 cells (67 seeds), about 5 minutes on 2 cores
    python -m benchmarks.grid --smoke-test    # 60 cells
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import _table
from workflows import _cli


def main() -> int:
    p = _cli.parser("grid", "Benchmark the grid engine's time per cheap cell.", package="benchmarks")
    p.add_argument("--seeds", type=int, default=67, help="seeds (cells = 2 targets x 5 shot counts x 3 strategies x seeds)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the local Ray the engine runs on (default 1)")
    args = p.parse_args()

    import ray

    from tl.compare import CompareConfig, cells, prepare, weights_content
    from tl.config import load_config
    from tl.evaluate import run_cell
    from tl.grid import CELLS_PER_TRIAL, CellStore, bundles, run_cells
    from tl.pretrain import resolve_weights
    from tl.runtime import resolve_storage

    seeds = 2 if args.smoke_test else args.seeds
    storage = resolve_storage(args.storage)
    base = {"experiment": "bench-grid", "targets": ["optdigits", "mnistm"], "shots": [1, 2, 3, 5, 10],
            "episodes": 2, "feature_val_episodes": 2, "seeds": list(range(seeds)),
            "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"}, {"strategy": "bd_cspn"}],
            "feature_cpus": 1.0}  # a trial takes the whole CPU: one cell at a time, as in the plain loop
    cfg = load_config(CompareConfig, args.config, args.overrides, base=base)
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    quiet = lambda _line: None  # noqa: E731
    weights = resolve_weights(cfg.weights, cfg.backbone, storage, print)
    grid = cells(cfg, 0.0, weights_content(cfg, weights))
    shared = prepare(cfg, grid, weights, storage, quiet)
    n = len(grid)
    print(f"[grid] {n} cells ({len(cfg.targets)} targets x {len(cfg.shots)} shots x {seeds} seeds x "
          f"{len(cfg.strategies)} strategies), {cfg.episodes} test + {cfg.feature_val_episodes} validation episodes each")

    import torch

    torch.set_num_threads(1)  # as in a trial (tl.grid._trial): one core each
    t0 = time.perf_counter()
    for c in grid:  # (a) the plain loop
        run_cell(c.spec, **shared)
    plain = time.perf_counter() - t0
    print(f"[grid] plain loop: {plain:.1f} s ({1000 * plain / n:.1f} ms a cell)")

    root = Path(tempfile.mkdtemp(prefix="tl-bench-grid-"))
    try:
        store = CellStore(root / "cells")
        t0 = time.perf_counter()
        res = run_cells(grid, store, run_cell, shared=shared, what="grid", storage=root, log=quiet,
                        experiment="bench-grid")
        engine = time.perf_counter() - t0
        assert len(res.done) == n and not res.failed, (len(res.done), res.failed[:3])
        cell_seconds = float(res.rows(store).groupby(["target", "shots", "seed", "strategy"])["cell_seconds"]
                             .first().sum())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    trials = len(bundles(grid, args.cpus))
    per_cell = (engine - plain) / n
    print(f"[grid] engine: {engine:.1f} s in {trials} trials; {1000 * per_cell:.1f} ms a cell beyond the plain loop")

    rows = _table.Rows()
    note = f"{n} cells, {seeds} seeds, {args.cpus} CPU(s) of Ray"
    rows.record("grid", "cells", n, "cells", note)
    rows.record("grid", "trials (cheap cells dealt, at most CELLS_PER_TRIAL each)", trials, "trials",
                f"CELLS_PER_TRIAL = {CELLS_PER_TRIAL}")
    rows.record("grid", "(a) plain loop, one process", plain, "s", f"{1000 * plain / n:.1f} ms a cell")
    rows.record("grid", "(b) the engine: run_cells on Ray Tune", engine, "s",
                f"the cells' own time in it {cell_seconds:.1f} s")
    rows.record("grid", "engine time per cell beyond the plain loop, (b - a) / cells", per_cell, "s",
                "target <= 0.05 s")
    rows.record("grid", "engine time per cell beyond the cells' own time in it, (b - own) / cells",
                (engine - cell_seconds) / n, "s", "trial starts, writing each cell, reporting it to Tune")
    cmd = "python -m benchmarks.grid" + (" --smoke-test" if args.smoke_test else "")
    _table.save(rows, Path(args.output or "results/bench"), "grid", args.smoke_test,
                ["# The grid engine on a large comparison of cheap cells", "",
                 f"Command: `{cmd}` on this machine ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}; "
                 f"each cell: {cfg.episodes} test and {cfg.feature_val_episodes} validation episodes of a "
                 "feature strategy on cached embeddings of the default backbone."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
