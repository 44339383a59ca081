"""Benchmark: (a) the same fine-tuning cells run by the comparison workflow (Ray Tune trials), by a
plain sequential loop (torch's default threads) and by a bare multiprocessing pool (one
single-threaded process per core); (b) ASHA against the full grid on the same search space:
compute used (episode-steps) and the best validation accuracy each finds. Writes
results/bench/compare.md and compare.csv.

    python -m benchmarks.compare                  # both parts (about 15 minutes on 2 quiet cores)
    python -m benchmarks.compare --part b
    python -m benchmarks.compare --smoke-test
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import _table
from workflows import _cli

_POOL_STATE: dict = {}


def _pool_init(state: dict) -> None:
    import torch

    torch.set_num_threads(1)
    _POOL_STATE.update(state)


def _pool_cell(spec: dict):
    from tl.evaluate import run_cell

    s = _POOL_STATE
    return run_cell(spec, s["inputs"])[0]


def main() -> int:
    p = _cli.parser("compare", "Benchmark the comparison's scheduling and ASHA against the full grid.",
                    package="benchmarks")
    p.add_argument("--part", choices=["a", "b", "all"], default="all",
                   help="run one part; its rows replace that part's rows in the existing table")
    args = p.parse_args()

    import multiprocessing as mp

    import pandas as pd
    import torch

    from tl.compare import CompareConfig, cells, prepare, run_compare
    from tl.config import load_config
    from tl.evaluate import run_cell
    from tl.pretrain import resolve_weights
    from tl.runtime import resolve_storage
    from tl.search import SearchConfig, run_search

    storage = resolve_storage(args.storage)
    out_dir = Path(args.output or "results/bench")
    cores = os.cpu_count() or 1
    rows: list[dict] = []

    run = " ".join([p.prog, *_cli.shlex_args()]) + f" ({time.strftime('%Y-%m-%d %H:%M')})"

    def record(part: str, measure: str, value, unit: str, note: str = "") -> None:
        rows.append({"part": part, "measure": measure, "value": value, "unit": unit, "note": note, "run": run})
        print(f"[bench] {part} | {measure}: {value} {unit} {note}")

    t_ray = time.time()
    _cli.init_ray(args.address)
    ray_start = time.time() - t_ray
    weights = resolve_weights("pretrained", "digits_cnn", storage, print)
    scratch = Path(tempfile.mkdtemp(prefix="tl-bench-compare-"))
    try:
        if args.part in ("a", "all"):
            episodes = 2 if args.smoke_test else 16
            base = {"experiment": "bench-a", "weights": weights, "targets": ["optdigits", "mnistm"],
                    "shots": [5, 10], "episodes": episodes, "seeds": [0],
                    "strategies": [{"strategy": "finetune", "label": f"ft{k}", "params": {"frozen": k}}
                                   for k in (1, 2)]}
            cfg = load_config(CompareConfig, base=base)
            todo = [c.spec for c in sorted(cells(cfg), key=lambda c: c.cost, reverse=True)]
            shared = prepare(cfg, cells(cfg), weights, storage)
            inputs = shared["inputs"]
            n = len(todo)
            what = f"{n} cells: finetune k=1,2 x optdigits, mnistm x 5, 10 shots, {episodes} episodes each"

            # how well one cell uses torch's threads bounds what one single-threaded process per core can gain
            one = todo[-1]
            per = {}
            for threads in (1, cores):
                torch.set_num_threads(threads)
                t0 = time.time()
                run_cell(one, inputs)
                per[threads] = time.time() - t0
            scaling = per[1] / per[cores]
            record("a", f"one cell with {cores} threads vs 1 thread", round(scaling, 2), "x",
                   f"{per[1]:.1f} s vs {per[cores]:.1f} s ({one['target']} {one['shots']}-shot {one['label']})")
            record("a", "ceiling of one single-threaded process per core over the sequential loop",
                   round(cores / scaling, 2), "x", f"{cores} cores / the thread speed-up above")

            torch.set_num_threads(cores)
            t0 = time.time()
            seq = [run_cell(c, inputs)[0] for c in todo]
            t_seq = time.time() - t0
            record("a", "sequential loop (torch default threads)", round(t_seq, 1), "s", f"{what}; {cores} threads")

            ctx = mp.get_context("spawn")
            t0 = time.time()
            with ctx.Pool(cores, initializer=_pool_init, initargs=({"inputs": inputs},)) as pool:
                pooled = pool.map(_pool_cell, todo, chunksize=1)
            t_pool = time.time() - t0
            record("a", f"multiprocessing pool ({cores} single-threaded processes)", round(t_pool, 1), "s",
                   "pool start included")

            logical = float(__import__("ray").cluster_resources().get("CPU", 1))
            # Ray's default here (more logical CPUs than cores, docs/architecture.md, "Ray in this project"), then one trial per core
            for cpus, limit in ((1.0, 0), (1.0, cores)):
                tag = f"cpus_per_trial={cpus:g}, max_concurrent={limit or 'none'}"
                home = scratch / f"home-{limit}"
                t0 = time.time()
                run_compare(load_config(CompareConfig, base={**base, "cpus_per_trial": cpus, "max_concurrent": limit}),
                            resolve_storage(home), scratch / f"out-{limit}", lambda s: None)
                t_tune = time.time() - t0
                concurrent = min(int(logical // cpus), limit or n)
                record("a", f"comparison workflow, {tag} ({concurrent} trials at once)",
                       round(t_tune, 1), "s", "Tune set-up, trial start-up and report writing included")
                record("a", f"ratio comparison({tag}) / pool", round(t_tune / t_pool, 2), "x", "target <= 1.15")
                record("a", f"speed-up of comparison({tag}) over sequential", round(t_seq / t_tune, 2), "x",
                       "target >= 1.3")
                keys = ["target", "shots", "strategy", "episode"]
                tuned = pd.read_parquet(scratch / f"out-{limit}" / "rows.parquet").sort_values(keys)["accuracy"].to_numpy()
                for what_ref, ref_rows in (("the pool (1 thread per process, as each trial)", pooled),
                                           (f"the sequential loop ({cores} threads)", seq)):
                    ref = pd.concat(ref_rows).sort_values(keys)["accuracy"].to_numpy()
                    diff = abs(tuned - ref)
                    record("a", f"episodes with the same accuracy as {what_ref}",
                           f"{int((diff < 1e-9).sum())}/{len(diff)}", "",
                           f"mean abs Δ {100 * diff.mean():.2f} points, mean Δ {100 * (tuned - ref).mean():+.2f}")
            record("a", "pool ratio over sequential", round(t_seq / t_pool, 2), "x", "")
            record("a", "local Ray start (not in the figures above)", round(ray_start, 1), "s", "")
            assert len(pooled) == n

        if args.part in ("b", "all"):
            space = {"frozen": {"grid": [0, 1, 2, 3, 4]}, "lr": {"grid": [0.003, 0.01, 0.03, 0.1]}}
            base = {"weights": weights, "target": "mnistm", "shots": 5, "val_episodes": 2 if args.smoke_test else 6,
                    "test_episodes": 3 if args.smoke_test else 30, "max_steps": 9 if args.smoke_test else 60,
                    "reduction_factor": 4, "space": space}
            found = {}
            for sched in ("none", "asha"):
                home = resolve_storage(scratch / f"search-{sched}")
                t0 = time.time()
                res = run_search(load_config(SearchConfig, base={**base, "experiment": f"bench-b-{sched}",
                                                                  "scheduler": sched}),
                                 home, scratch / f"search-out-{sched}", lambda s: None)
                wall = time.time() - t0
                found[sched] = res
                label = "full grid" if sched == "none" else "ASHA"
                record("b", f"{label}: compute", int(res.trial_steps), "episode-steps",
                       f"20 candidates x {base['val_episodes']} validation episodes, up to {base['max_steps']} steps; "
                       f"ASHA rungs {load_config(SearchConfig, base=base).milestones()} (reduction factor 4)")
                record("b", f"{label}: best validation accuracy", round(100 * res.val_accuracy, 1), "%",
                       f"chose {({k: res.params[k] for k in space})}")
                record("b", f"{label}: test accuracy of its choice", round(100 * res.test_accuracy, 1), "%",
                       f"{base['test_episodes']} test episodes")
                record("b", f"{label}: wall time", round(wall, 1), "s", "")
            record("b", "ASHA compute / full grid", round(found["asha"].trial_steps / found["none"].trial_steps, 3),
                   "x", "target <= 0.40")
            record("b", "full grid best - ASHA best (validation)",
                   round(100 * (found["none"].val_accuracy - found["asha"].val_accuracy), 1), "points",
                   "target <= 1")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "compare-smoke" if args.smoke_test else "compare"
    table = _table.merged(rows, out_dir / f"{stem}.csv", args.part)
    table["run"] = table["run"].fillna("") if "run" in table else ""
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    runs = [f"- part {part}: `{r.split(' (')[0]}` ({r.split(' (')[-1]}" if r else f"- part {part}: an earlier run"
            for part, r in table[["part", "run"]].drop_duplicates().itertuples(index=False)]
    _table.write_markdown(table, out_dir / f"{stem}.md", ["# Comparison benchmark", "", f"On {cores} CPU cores. "
                          "Commands (a `--part` run replaces that part's rows):", *runs])
    return 0


if __name__ == "__main__":
    _cli.run(main)
