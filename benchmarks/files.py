"""Benchmark: embedding extraction streamed from image files on disk (Ray Data: read -> decode to
uint8 -> embed -> write Parquet, ``tl.embeddings.extract_files``) against a plain PyTorch loop over
the same files on the same threads, at N = 10,000 and 100,000 synthetic PNGs, with the driver's peak
RSS at each N. Writes results/bench/files.md and files.csv.

    python -m benchmarks.files                       # 10k and 100k files of 64x64 (about 15 minutes on 2 cores)
    python -m benchmarks.files --backbone resnet18 --input-size 64   # a backbone whose compute outweighs the start
    python -m benchmarks.files --smoke-test          # 500 and 2,000 files

``digits_cnn`` (the default) embeds a 28x28 image in well under a millisecond, so at 10,000 files
the fixed start of the Ray Data path (its first execution in a fresh Ray and the worker processes
importing torch; tasks up to ``tl.embeddings.TASK_MAX_ROWS`` images, an actor pool above) weighs
against a loop whose model was built before its clock started; another backbone writes its own
table (``files_<backbone><size>``) beside the default one.

Each measurement runs in its own process, so a peak RSS is that process's own (``ru_maxrss``):
the driver of the Ray Data run holds the file listing, never the pixels.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import _table
from workflows import _cli

CLASSES = 10
BACKBONE = "digits_cnn"  # the default; --backbone another


def make_files(root: Path, n: int, size: int, reuse: Path | None = None) -> None:
    """``n`` PNGs of ``size`` x ``size`` in ``CLASSES`` class folders: a smooth pattern per class plus
    noise, so files compress like photos rather than like blank squares. Files of ``reuse`` (a
    smaller set made before) are hard-linked rather than written again; a folder that already holds
    ``n`` of them (an earlier run's ``--work``) is kept."""
    import numpy as np
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.glob("c*/*.png")) == n:
        return
    shutil.rmtree(root, ignore_errors=True)

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    done = 0
    if reuse is not None:
        for f in sorted(reuse.glob("c*/*.png")):
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(f, root / f.parent.name / f.name)
            done += 1
    for i in range(done, n):
        c = i % CLASSES
        base = 127 + 100 * np.sin(2 * np.pi * ((c + 1) * xx + (c % 3) * yy))
        img = np.clip(base[..., None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{c}" / f"{i:07d}.png")


def child_tl(root: str, backbone: str, input_size: int | None) -> dict:
    """The Ray Data path, as ``workflows.embed`` runs it on a folder (local Ray, cache in a temp dir);
    then the same extraction once more in the same Ray, into another cache folder: its time leaves out
    what only a Ray session's first Ray Data execution pays, and, on tasks, the worker processes' torch
    import (an actor pool starts fresh processes again)."""
    from tl.data.sources import index_image_folder
    from tl.embeddings import EmbedConfig, extract_files
    from tl.models import input_size_of

    t0 = time.perf_counter()
    _cli.init_ray(None)
    start_s = time.perf_counter() - t0
    # as many one-thread tasks at a time (or actors) as the plain loop has torch threads: the same threads
    cfg = EmbedConfig(backbone=backbone, input_size=input_size, batch_size=256, actors=os.cpu_count() or 1,
                      threads_per_actor=1)
    seconds, rss = [], 0.0
    for _ in range(2):
        cache = tempfile.mkdtemp(prefix="tl-bench-files-")
        try:
            t0 = time.perf_counter()
            index = index_image_folder(root)
            emb = extract_files(index, input_size_of(backbone, input_size), cfg, cache, log=lambda _: None, load=False)
            seconds.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rss = rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the first extraction's peak
    return {"images": emb.info["rows"], "seconds": seconds[0], "seconds_again": seconds[1], "ray_start_s": start_s,
            "rss_mb": rss}


def child_torch(root: str, backbone: str, input_size: int | None) -> dict:
    """The plain loop: list, read, decode (the same ``decode_image``), stack, embed; every core a
    torch thread."""
    import numpy as np
    import torch

    from tl.data.decode import decode_image
    from tl.models import input_size_of, make_backbone

    torch.set_num_threads(os.cpu_count() or 1)
    model = make_backbone(backbone, None, input_size).eval()
    size = input_size_of(backbone, input_size)
    t0 = time.perf_counter()
    files = sorted(str(p) for p in Path(root).glob("*/*.png"))
    n = 0
    with torch.inference_mode():
        for i in range(0, len(files), 256):
            batch = np.stack([decode_image(Path(f).read_bytes(), size, uint8=True) for f in files[i:i + 256]])
            x = torch.from_numpy(batch).float().div_(255.0)
            model(model.preprocessing(x))
            n += len(batch)
    return {"images": n, "seconds": time.perf_counter() - t0,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = _cli.parser("files", "Benchmark streamed extraction from image files against a plain PyTorch loop.",
                    package="benchmarks")
    file_options(p)
    p.add_argument("--backbone", default=BACKBONE, help=f"the backbone that embeds them (default {BACKBONE})")
    p.add_argument("--input-size", type=int, default=None, help="its input side (default: the backbone's own)")
    p.add_argument("--child", choices=["tl", "torch"], help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        out = (child_tl if args.child == "tl" else child_torch)(args.root, args.backbone, args.input_size)
        print("RESULT " + json.dumps(out))
        return 0
    sizes = [500, 2000] if args.smoke_test else sorted(args.sizes)
    work = Path(args.work or tempfile.mkdtemp(prefix="tl-bench-files-"))
    rows = _table.Rows()
    record = rows.record

    from tl.embeddings import TASK_MAX_ROWS
    from tl.models import input_size_of

    backbone_args = ["--backbone", args.backbone] + (["--input-size", str(args.input_size)] if args.input_size else [])

    def run_child(kind: str, root: Path) -> dict:
        return _table.child("benchmarks.files", "--child", kind, "--root", str(root), "--image", str(args.image),
                            *backbone_args)

    try:
        previous = None
        results = {}
        for n in sizes:
            root = work / f"n{n}"
            t0 = time.perf_counter()
            make_files(root, n, args.image, previous)
            previous = root
            mb = sum(f.stat().st_size for f in root.glob("*/*.png")) / 1e6
            print(f"made {n} files ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
            ray_r, plain_r = run_child("tl", root), run_child("torch", root)
            results[n] = (ray_r, plain_r)
            part = f"{n // 1000}k"
            on_tasks = n <= TASK_MAX_ROWS  # as tl.embeddings chooses on CPUs
            how = (f"{os.cpu_count()} tasks at a time of 1 torch thread, each reading, decoding, embedding and "
                   "writing a block" if on_tasks else
                   f"{os.cpu_count()} actors of 1 torch thread, each reading, decoding and embedding its blocks")
            record(part, f"Ray Data read->decode->embed->Parquet, {n} files", n / ray_r["seconds"], "images/s",
                   f"{ray_r['seconds']:.1f} s, {how}; Ray start {ray_r['ray_start_s']:.1f} s not included; "
                   f"{mb:.0f} MB of PNG")
            record(part, "plain PyTorch loop over the same files", n / plain_r["seconds"], "images/s",
                   f"{plain_r['seconds']:.1f} s, {os.cpu_count()} torch threads")
            record(part, "ratio Ray Data / plain loop (throughput)", plain_r["seconds"] / ray_r["seconds"], "x",
                   "target >= 0.9")
            record(part, "the same extraction again in the same Ray", n / ray_r["seconds_again"], "images/s",
                   f"{ray_r['seconds_again']:.1f} s, ratio {plain_r['seconds'] / ray_r['seconds_again']:.2f} x the plain "
                   "loop: Ray Data's first execution in a Ray session paid; "
                   + ("tasks in the worker processes the first run warmed" if on_tasks else "fresh actors again"))
            record(part, "driver peak RSS (Ray Data run)", ray_r["rss_mb"], "MB", "ru_maxrss of the driver process")
            record(part, "peak RSS of the plain loop", plain_r["rss_mb"], "MB", "")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:  # the rows across sizes
        lo, hi = min(results), max(results)
        growth = results[hi][0]["rss_mb"] / results[lo][0]["rss_mb"] - 1
        record("all", f"driver peak RSS growth {lo} -> {hi} files", 100 * growth, "%", "target <= 10")
        # the rate at scale: the extra images over the extra seconds, without each run's fixed start
        # (Ray Data's first execution, the worker processes importing torch and building the backbone;
        # the plain loop's model is built before its clock starts)
        marginal = [(hi - lo) / (results[hi][k]["seconds"] - results[lo][k]["seconds"]) for k in (0, 1)]
        record("all", f"Ray Data marginal throughput {lo} -> {hi} files", marginal[0], "images/s",
               f"fixed start {results[lo][0]['seconds'] - lo / marginal[0]:.1f} s")
        record("all", f"plain loop marginal throughput {lo} -> {hi} files", marginal[1], "images/s", "")
        record("all", "ratio of marginal throughputs", marginal[0] / marginal[1], "x", "")
    default = args.backbone == BACKBONE and not args.input_size
    cmd = " ".join([p.prog, *([] if default else backbone_args), *(["--smoke-test"] if args.smoke_test else [])])
    h, w = input_size_of(args.backbone, args.input_size)
    stem = "files" if default else f"files_{args.backbone}{args.input_size or ''}"
    _table.save(rows, Path(args.output or "results/bench"), stem, args.smoke_test, [
        "# Extraction from image files", "", f"Command: `{cmd}` on {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d')}: {args.backbone} (random weights, decoded to its {h}x{w} input), {args.image}x{args.image} synthetic PNGs in {CLASSES} class "
        "folders on local disk, each measurement in its own process (the page cache warm after the files were made)."])
    return 0


def file_options(p) -> None:
    """The options of a benchmark over synthetic image files (and the child's folder, hidden)."""
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="numbers of files")
    p.add_argument("--image", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--work", default=None, help="where the files are made (default: a temporary folder; files "
                   "already there are reused)")
    p.add_argument("--root", help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    _cli.run(main)
