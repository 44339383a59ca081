"""Benchmark: a comparison whose target is a user's folder of N image files (N = 10,000 and 100,000
synthetic 64x64 PNGs, ``benchmarks.files.make_files``), with the driver's peak RSS: the driver holds
the folder's labels and paths, the embeddings stream from the files through Ray Data, and each
trained cell's episodes decode their own images inside the trial. Target: under 2 GB at 100k. Then
prediction over the same files (an exported model; Ray Data reads, scores and writes the table),
whose driver peak RSS may grow by at most 10% from the smallest N to the largest.
Writes results/bench/compare_files.md and compare_files.csv.

    python -m benchmarks.compare_files                  # 10k and 100k files (about 15 minutes on 2 cores)
    python -m benchmarks.compare_files --smoke-test     # 500 and 2,000 files

Each comparison runs in its own process (its own local Ray), so its peak RSS (``ru_maxrss``) is the
driver's alone; the embedding cache and the cells live in a fresh temporary folder each time.
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
from benchmarks.files import argparse_suppress, file_options, make_files
from workflows import _cli

STRATEGIES = [{"strategy": "prototype"}, {"strategy": "logistic"}, {"strategy": "finetune", "params": {"steps": 20}}]


def child(root: str, n: int, weights_home: str) -> dict:
    from tl.compare import CompareConfig, run_compare
    from tl.config import load_config
    from tl.pretrain import resolve_weights

    t0 = time.perf_counter()
    _cli.init_ray(None)
    start_s = time.perf_counter() - t0
    weights = resolve_weights("pretrained", "digits_cnn", weights_home, lambda _: None)  # made by child_setup
    home = tempfile.mkdtemp(prefix="tl-bench-cmp-")
    try:
        cfg = load_config(CompareConfig, base={
            "experiment": f"files-{n}", "targets": [{"path": root, "name": "files", "split": "none"}],
            "weights": weights, "shots": [1, 5], "episodes": 5, "queries": 15, "strategies": STRATEGIES})
        t0 = time.perf_counter()
        res = run_compare(cfg, home, Path(home) / "out", log=lambda _: None)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"rows": res.rows, "exit": res.exit_status, "seconds": seconds, "ray_start_s": start_s,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_setup(root: str, n: int, weights_home: str) -> dict:
    """Once, before any measurement: the pretrained backbone and a model to predict with (a logistic
    head on mnistm; the folder's class names are not the model's, so prediction measures throughput
    and memory only)."""
    from tl.export import ExportConfig, export
    from tl.pretrain import resolve_weights

    _cli.init_ray(None)
    model = Path(weights_home) / "model-logistic"
    weights = resolve_weights("pretrained", "digits_cnn", weights_home, lambda _: None)
    if not (model / "model.json").is_file():
        export(ExportConfig(strategy="logistic", target="mnistm", weights=weights), weights_home, model, lambda _: None)
    return {"weights": weights}


def child_predict(root: str, n: int, weights_home: str) -> dict:
    """Prediction over the files with the model ``child_setup`` exported."""
    from tl.predict import predict

    _cli.init_ray(None)
    model = Path(weights_home) / "model-logistic"
    out = tempfile.mkdtemp(prefix="tl-bench-pred-")
    try:
        t0 = time.perf_counter()
        summary = predict(model, root, out, log=lambda _: None)
        seconds = time.perf_counter() - t0
        import pyarrow.parquet as pq

        rows = pq.read_metadata(Path(out) / "predictions.parquet").num_rows
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "predicted": summary["predicted"], "seconds": seconds,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = _cli.parser("compare_files", "Benchmark the driver's memory in a comparison on a folder of image files.",
                    package="benchmarks")
    file_options(p)
    p.add_argument("--child", choices=["setup", "compare", "predict"], help=argparse_suppress())
    p.add_argument("--n", type=int, help=argparse_suppress())
    p.add_argument("--weights-home", help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        run = {"setup": child_setup, "compare": child, "predict": child_predict}[args.child]
        print("RESULT " + json.dumps(run(args.root, args.n, args.weights_home)))
        return 0
    sizes = [500, 2000] if args.smoke_test else sorted(args.sizes)
    work = Path(args.work or tempfile.mkdtemp(prefix="tl-bench-cmp-files-"))
    rows = _table.Rows()
    record = rows.record

    def run_child(kind: str, root: Path, n: int) -> dict:
        return _table.child("benchmarks.compare_files", "--child", kind, "--root", str(root), "--n", str(n),
                            "--weights-home", str(work / "home"))

    results: dict[int, dict] = {}
    try:
        run_child("setup", work, 0)
        previous = None
        for n in sizes:
            root = work / f"n{n}"
            make_files(root, n, args.image, previous)
            previous = root
            got = run_child("compare", root, n)
            part = f"{n // 1000}k" if n >= 1000 else str(n)
            record(part, f"comparison on {n} files: driver peak RSS", got["rss_mb"], "MB",
                   "ru_maxrss of the driver process; target < 2048 at 100k")
            record(part, f"comparison on {n} files: wall time", got["seconds"], "s",
                   f"{got['rows']} rows, exit {got['exit']}; Ray start {got['ray_start_s']:.1f} s not included")
            float32_mb = n * 3 * 28 * 28 * 4 / 2**20
            record(part, "the target's images at float32 (what the driver no longer holds)", float32_mb, "MB",
                   "N x 3 x 28 x 28 x 4 bytes at digits_cnn's input")
            pred = run_child("predict", root, n)
            results[n] = pred
            record(part, f"prediction over {n} files: driver peak RSS", pred["rss_mb"], "MB", "ru_maxrss")
            record(part, f"prediction over {n} files: throughput", n / pred["seconds"], "images/s",
                   f"{pred['seconds']:.1f} s; {pred['rows']} rows in predictions.parquet, written by Ray Data's "
                   "write_parquet and joined in the driver a part at a time")
        lo, hi = sizes[0], sizes[-1]
        record("all", f"prediction: driver peak RSS growth {lo} -> {hi} files",
               100 * (results[hi]["rss_mb"] / results[lo]["rss_mb"] - 1), "%", "target <= 10")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    cmd = p.prog + (" --smoke-test" if args.smoke_test else "")
    _table.save(rows, Path(args.output or "results/bench"), "compare_files", args.smoke_test, [
        "# A comparison on a folder of image files", "", f"Command: `{cmd}` on {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d')}: digits_cnn (default pretrained weights), {args.image}x{args.image} synthetic "
        f"PNGs in 10 class folders on local disk (split none), strategies "
        f"{', '.join(s['strategy'] for s in STRATEGIES)} (finetune 20 steps), 1 and 5 shots, 5 test episodes of "
        "10 ways x 15 queries; each comparison and each prediction in its own process with its own local Ray and a "
        "fresh cache and output folder."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
