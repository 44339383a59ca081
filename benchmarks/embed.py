"""Benchmark: (a) Ray Data embedding extraction against a plain PyTorch loop (same backbone, images and
threads); (b) evaluating the three feature strategies over 600 episodes from a warm embedding cache
against recomputing the embeddings of each episode. Writes results/bench/embed.md and embed.csv.

    python -m benchmarks.embed                # the full benchmark (several minutes on 2 cores)
    python -m benchmarks.embed --smoke-test
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
    p = _cli.parser("embed", "Benchmark Ray Data extraction and the warm embedding cache.", package="benchmarks")
    p.add_argument("--size", type=int, default=128, help="input size for part (a) (default 128: the plain loop runs over a minute)")
    p.add_argument("--eval-size", type=int, default=96, help="input size for part (b) (default 96)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--part", choices=["a", "b", "all"], default="all",
                   help="run one part; its rows replace that part's rows in the existing table")
    args = p.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from tl.data import ImageSet, load_embedded, sample_episodes
    from tl.data.imageset import concat
    from tl.embeddings import EmbedConfig, extract
    from tl.evaluate import run_episodes
    from tl.models import make_backbone
    from tl.strategies import make_strategy, registered

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    out_dir = Path(args.output or "results/bench")
    episodes = 20 if args.smoke_test else args.episodes

    # the whole suite, optdigits brought to 28x28 so the sets stack (the same for both paths)
    parts = []
    for name in ("mnist", "optdigits", "mnistm"):
        s = load_embedded(name)
        if s.image_shape[1:] != (28, 28):
            img = F.interpolate(torch.from_numpy(s.images), size=(28, 28), mode="bilinear", antialias=True).numpy()
            s = ImageSet(s.name, img, s.labels, s.classes, s.domain, s.splits, s.ids)
        parts.append(s)
    suite = concat(parts, "suite")
    if args.smoke_test:
        suite = suite.subset(np.arange(0, len(suite), 40))
        args.size = args.eval_size = 32

    rows = []

    def record(part: str, what: str, value: float, unit: str, note: str = "") -> None:
        rows.append({"part": part, "measure": what, "value": round(value, 3), "unit": unit, "note": note})
        print(f"{part:>2} {what:<58} {value:10.2f} {unit:<10} {note}")

    cache = tempfile.mkdtemp(prefix="tl-bench-cache-")
    try:
        if args.part in ("a", "all"):
            # (a) the same backbone, images and threads: a plain loop, then Ray Data
            model = make_backbone("resnet18", None, args.size).eval()
            x_all = torch.from_numpy(suite.images)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(x_all), 256):
                    model(model.preprocessing(x_all[i : i + 256]))
            plain_s = time.perf_counter() - t0
            record("a", f"plain PyTorch loop, resnet18 @{args.size}px, {len(suite)} images", len(suite) / plain_s,
                   "images/s", f"{plain_s:.1f} s, {threads} threads")
            t0 = time.perf_counter()
            _cli.init_ray(args.address)
            record("a", "Ray start-up (ray.init, local)", time.perf_counter() - t0, "s", "reported on its own")
            cfg = EmbedConfig(backbone="resnet18", input_size=args.size, batch_size=256, actors=1,
                              cpus_per_actor=1.0, threads_per_actor=threads)
            t0 = time.perf_counter()
            extract(suite, cfg, cache, log=lambda _: None)
            ray_s = time.perf_counter() - t0
            record("a", "Ray Data extraction (actor pool of 1, writes the Parquet cache)", len(suite) / ray_s,
                   "images/s", f"{ray_s:.1f} s, {threads} threads in the actor, actor start included")
            record("a", "ratio Ray Data / plain loop (throughput)", plain_s / ray_s, "x", "target >= 0.8")

        if args.part in ("b", "all"):
            # (b) warm cache against recomputing per episode, three feature strategies
            _cli.init_ray(args.address)
            data = load_embedded("optdigits").split("test")
            strategies = {n: make_strategy(n) for n in registered("feature")}
            ecfg = EmbedConfig(backbone="resnet18", input_size=args.eval_size, batch_size=256, actors=1,
                               threads_per_actor=threads)
            extract(data, ecfg, cache, log=lambda _: None)  # fill the cache
            t0 = time.perf_counter()
            warm = extract(data, ecfg, cache, log=lambda _: None)
            rows_warm = run_episodes(strategies, data, shots=5, queries=15, episodes=episodes, seed=0,
                                     embeddings=warm.vectors)
            warm_s = time.perf_counter() - t0
            record("b", f"warm cache: 3 feature strategies x {episodes} episodes (5-shot)", warm_s, "s",
                   f"resnet18 @{args.eval_size}px, cache read included")
            bb = make_backbone("resnet18", None, args.eval_size).eval()
            images = torch.from_numpy(data.images)
            t0 = time.perf_counter()
            acc_re = []
            for ep in sample_episodes(data.labels, None, 5, 15, episodes, 0, data.classes):
                with torch.inference_mode():
                    s_emb = bb(bb.preprocessing(images[ep.support])).numpy()
                    q_emb = bb(bb.preprocessing(images[ep.query])).numpy()
                for strat in strategies.values():
                    pred = strat.fit_predict(s_emb, ep.support_labels, q_emb, 10)
                    acc_re.append(float(np.mean(pred == ep.query_labels)))
            re_s = time.perf_counter() - t0
            record("b", f"recompute embeddings per episode: same {episodes} episodes", re_s, "s",
                   f"{threads} threads")
            record("b", "ratio recompute / warm cache (wall time)", re_s / warm_s, "x", "target >= 20")
            same = np.allclose(np.mean(acc_re), pd.DataFrame(rows_warm)["accuracy"].mean(), atol=0.01)
            record("b", "mean accuracy agrees between the two paths", float(same), "bool", "")
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "embed-smoke" if args.smoke_test else "embed"
    table = _table.merged(rows, out_dir / f"{stem}.csv", args.part)
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "")
    if args.part != "all":
        cmd += f" (part {args.part} rerun with --part {args.part}; the other part from the previous run)"
    _table.write_markdown(table, out_dir / f"{stem}.md", ["# Embedding benchmark", "", f"Command: `{cmd}` on "
                          f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
