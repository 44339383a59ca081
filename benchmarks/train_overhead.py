"""Benchmark: what a Ray Train run costs before and after its own steps (the fixed cost of a run).

Every fine-tuning, adaptation and pretraining run of tl is a Ray Train run (Train V2): a controller
actor, a worker group, the datasets' ingest, reports and checkpoints. On a small run that fixed cost
is most of the wall time (the test suite is made of such runs). This measures it on a local Ray of
``--cpus`` logical CPUs, each figure the median of ``--repeats`` runs, the settings alternated:

- a bare run (the train function reports once), with Train's controller polling its workers every
  2 s (Ray's default) and every 0.5 s (``tl.cluster.WORKER_ENV``);
- a one-worker run reading a 64-row dataset, split over the workers (a split coordinator actor)
  and not split (what ``tl.train.ray_train.fit`` does for one worker);
- tl's own smallest run (``tl.runs.run``: AdaBN, 2 steps of 16 images, 64 of each set), at both
  polling intervals.

Writes results/bench/train_overhead.md and .csv.

    python -m benchmarks.train_overhead                 # 3 repeats, about 8 minutes on 2 cores
    python -m benchmarks.train_overhead --smoke-test    # 1 repeat
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _table
from workflows import _cli

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _bare(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def _reads(config: dict) -> None:
    import ray.train

    rows = sum(len(b["x"]) for b in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=16))
    ray.train.report({"rows": rows})


def _trainer_fit(fn, root: Path, datasets: dict, split: list[str]) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    TorchTrainer(fn, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"r{time.time_ns()}", storage_path=str(root)),
                 datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=split)).fit()
    return time.perf_counter() - t0


def main() -> int:
    p = _cli.parser("train_overhead", "Benchmark the fixed cost of a Ray Train run.", package="benchmarks")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting (the median is reported)")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4, as the tests')")
    args = p.parse_args()
    repeats = 1 if args.smoke_test else args.repeats

    import numpy as np
    import ray

    from tl.runs import RunConfig, run

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its execution plans, one per dataset
    root = Path(tempfile.mkdtemp(prefix="tl-bench-train-"))
    times: dict[str, list[float]] = {}

    def timed(name: str, interval: str, fn) -> None:
        os.environ[INTERVAL] = interval  # read by Train's controller when a run starts
        seconds = fn()
        times.setdefault(name, []).append(seconds)
        print(f"[train_overhead] {name}: {seconds:.1f} s", flush=True)

    small = RunConfig(weights="random", source="mnist", target="mnistm", strategy="adabn", limit=64, workers=1,
                      checkpoint_every=2, params={"steps": 2, "batch_size": 16})
    try:
        _trainer_fit(_bare, root, {}, [])  # warm-up: the first run of a Ray pays its imports and pools
        run(small, root / "warm-up", None, log=lambda _line: None)
        for i in range(repeats):
            data = {"train": ray.data.from_numpy(np.zeros((64, 3), np.float32)).rename_columns({"data": "x"})}
            order = 1 if i % 2 == 0 else -1  # each setting first in every other repeat
            for interval in ("2.0", "0.5")[::order]:
                timed(f"bare run, controller polls every {interval} s", interval,
                      lambda: _trainer_fit(_bare, root, {}, []))
            for split in (["train"], [])[::order]:
                how = "split over the workers" if split else "not split"
                timed(f"one worker reads 64 rows, {how}", "0.5", lambda: _trainer_fit(_reads, root, data, split))
            for interval in ("2.0", "0.5")[::order]:
                def tl_run() -> float:
                    t0 = time.perf_counter()
                    run(small, root / f"tl-{interval}-{i}", None, log=lambda _line: None)
                    return time.perf_counter() - t0
                timed(f"tl.runs.run, AdaBN 2 steps, controller polls every {interval} s", interval, tl_run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()

    rows = _table.Rows()
    for name, values in times.items():
        rows.record("train", name, statistics.median(values), "s",
                    f"median of {len(values)}: " + ", ".join(f"{v:.1f}" for v in values))
    cmd = "python -m benchmarks.train_overhead" + (" --smoke-test" if args.smoke_test else "")
    _table.save(rows, Path(args.output or "results/bench"), "train_overhead", args.smoke_test,
                ["# The fixed cost of a Ray Train run", "",
                 f"Command: `{cmd}` on this machine ({os.cpu_count()} cores, a local Ray of {args.cpus} logical "
                 f"CPUs), {time.strftime('%Y-%m-%d')}; one worker, each run from a fresh controller and worker group."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
