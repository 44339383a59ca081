"""What a running Ray cluster gives tl's work, checked on its nodes (run from a node of the cluster):

    python cluster/probe.py --address HOST:PORT --storage /shared/tl [--trial-cpus 2] [--images 4096]

- a Tune trial asking for ``--trial-cpus`` CPUs: what Ray assigned it and the torch threads it runs;
- a one-worker Ray Train run: the same for its worker;
- an extraction of ``--images`` random images (blocks of 1,024) with ``EmbedConfig.on_cluster``:
  how many of its tasks ran at once (Ray's State API) and on how many nodes;
- the storage check every comparison makes first (``tl.runtime.check_shared_storage``).

Prints one JSON line and exits 0 when each thread count is what was assigned (one per CPU, at
least one) and, with more images than one block, more than one extraction task ran at once; 1
otherwise. docs/cluster.md says when to run it; tests/test_cluster.py runs it on the local cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def _trial(config: dict) -> None:
    import torch
    from ray import tune

    from tl.runtime import assigned_cpus, assigned_threads

    threads = assigned_threads()
    tune.report({"cpus": assigned_cpus(), "threads": threads, "torch_threads": torch.get_num_threads()})


def _train_worker(config: dict) -> None:
    import torch

    from tl.runtime import assigned_cpus
    from tl.train import ray_train

    _, _, threads = ray_train.start(0)
    got = {"cpus": assigned_cpus(), "threads": threads, "torch_threads": torch.get_num_threads()}
    ray_train.report(got, dict(got))  # with a checkpoint: Train V2 keeps the metrics that come with one


def _most_at_once(tasks: list) -> int:
    """The largest number of ``tasks`` (State API task states) running at one moment."""
    edges = []
    for t in tasks:
        start, end = getattr(t, "start_time_ms", None), getattr(t, "end_time_ms", None)
        if start and end:
            edges += [(start, 1), (end, -1)]
    most = now = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most


def probe(storage: str, trial_cpus: float, images: int, address: str = "auto") -> dict:
    """The checks, on the Ray this process is connected to (``address``: its GCS, for the State API: with
    another Ray on this machine, "auto" would not know which to ask)."""
    import numpy as np
    import ray
    from ray import tune
    from ray.util.state import list_tasks

    from tl.data.imageset import ImageSet
    from tl.embeddings import EmbedConfig, extract
    from tl.runtime import check_shared_storage, threads_for
    from tl.train import ray_train

    out: dict = {"nodes": len([n for n in ray.nodes() if n.get("Alive")])}
    check_shared_storage(storage)
    out["storage_shared"] = True
    grid = tune.Tuner(tune.with_resources(_trial, {"cpu": trial_cpus}),
                      run_config=tune.RunConfig(name=f"probe-trial-{int(time.time())}", storage_path=storage,
                                                verbose=0)).fit()
    out["trial"] = grid[0].metrics and {k: grid[0].metrics[k] for k in ("cpus", "threads", "torch_threads")}
    result = ray_train.fit(_train_worker, {}, {}, name=f"probe-train-{int(time.time())}", storage=storage,
                           workers=1, split=())
    out["train_worker"] = {k: result.metrics[k] for k in ("cpus", "threads", "torch_threads")}
    rng = np.random.default_rng(0)
    data = ImageSet("probe", rng.random((images, 3, 28, 28), dtype=np.float32), rng.integers(0, 10, images),
                    tuple(str(i) for i in range(10)), "probe", np.full(images, "train", object),
                    np.array([f"p{i}" for i in range(images)], object))
    t0 = time.time() * 1000
    extract(data, EmbedConfig.on_cluster(batch_size=256), storage, log=lambda line: None)
    listed = list_tasks(address=address, filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000)
    tasks = [t for t in listed if "embed_batch" in (t.name or "") and (t.start_time_ms or 0) >= t0]
    out["extraction"] = {"tasks": len(tasks), "most_at_once": _most_at_once(tasks),
                         "nodes": len({t.node_id for t in tasks})}
    ok = all(out[k]["threads"] == out[k]["torch_threads"] == threads_for(out[k]["cpus"])
             for k in ("trial", "train_worker"))
    ok &= images <= 1024 or out["extraction"]["most_at_once"] > 1
    out["ok"] = bool(ok)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python cluster/probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the cluster's GCS address (HOST:PORT) or 'auto'")
    p.add_argument("--storage", default=None, help="a folder every node sees, or a URI (default: a temporary folder)")
    p.add_argument("--trial-cpus", type=float, default=2.0, help="CPUs the probe's Tune trial asks for (default 2)")
    p.add_argument("--images", type=int, default=4096, help="images the probe's extraction embeds (default 4096)")
    a = p.parse_args(argv)
    import ray

    storage = a.storage or tempfile.mkdtemp(prefix="tl-probe-")
    ray.init(address=a.address, log_to_driver=False)
    try:
        out = probe(storage, a.trial_cpus, a.images, a.address)
    finally:
        ray.shutdown()
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
