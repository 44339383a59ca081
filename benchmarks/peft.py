"""Benchmark: the parameter-efficient and meta-learning strategies against the best frozen depth.

Reads the comparison of workflows/configs/peft.yaml (results/peft/rows.parquet: every strategy on the
same test episodes), and for each target and shot count sets each new strategy beside the best of
``finetune_k0..k4`` on those episodes (chosen on the test episodes themselves: an optimistic baseline,
so a new strategy that beats it beats every frozen depth), as a paired difference with its 95% CI.
Adds what each strategy trains (trainable parameters of digits_cnn with a 10-way head) and its peak
memory for one 10-way 10-shot episode of training (the resident-set high-water mark of a fresh process,
``VmHWM``, above the same process after loading the data and the backbone). Writes
results/bench/peft.md and .csv.

    python -m workflows.compare --config workflows/configs/peft.yaml   # the comparison (about 15 minutes)
    python -m benchmarks.peft                                          # this table (about a minute)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks import _table
from workflows import _cli

NEW = ("bitfit", "norm_tuning", "lora", "protonet_ft", "mlp_probe")
DEPTHS = tuple(f"finetune_k{k}" for k in range(5))

EPISODE = r"""
import json, sys, copy
import numpy as np, torch
from tl.data import load_embedded, sample_episodes
from tl.models import build_backbone
from tl.strategies import EpisodeTask, make_strategy

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024

name, params = sys.argv[1], json.loads(sys.argv[2])
d = load_embedded("optdigits").split("adapt")
bb = build_backbone("digits_cnn")
images = bb.preprocessing(torch.from_numpy(d.images))
ep = sample_episodes(d.labels, 10, 10, 15, 1, seed=0)[0]
s = make_strategy(name, params)
with torch.no_grad():
    emb = bb(images).numpy() if s.uses_embeddings else None
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
task = EpisodeTask(n_way=10, support_y=ep.support_labels, seed=0)
if s.uses_embeddings:
    task.support_emb, task.query_emb = emb[ep.support], emb[ep.query]
else:
    task.support_x, task.query_x, task.backbone = images[ep.support], images[ep.query], lambda: copy.deepcopy(bb)
s.predict_episode(task)
print(json.dumps({"peak_mb": status("VmHWM:") - base}))
"""


def peak_memory(name: str, params: dict) -> float:
    """MB above the loaded process that one episode of ``name`` adds at its peak (a fresh process each)."""
    r = subprocess.run([sys.executable, "-c", EPISODE, name, json.dumps(params)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"episode of {name} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


def trainable(name: str, params: dict) -> int:
    from tl.models import build_backbone, count_trainable
    from tl.strategies import make_strategy

    s = make_strategy(name, params)
    if s.uses_embeddings:  # mlp_probe: its head's parameters
        from tl.nn.heads import MLPHead

        return count_trainable(MLPHead(256, 10, s.hidden, s.dropout))
    return count_trainable(s.prepare(build_backbone("digits_cnn"), 10))


def main() -> int:
    p = _cli.parser("peft", "Parameter-efficient strategies against the best frozen depth.", package="benchmarks")
    p.add_argument("--rows", default="results/peft/rows.parquet", help="the comparison's rows.parquet")
    args = p.parse_args()

    from tl.stats import paired

    rows = pd.read_parquet(args.rows)
    rows = rows[rows["seed"] == rows["seed"].min()]
    entries = {r["strategy"]: (r["method"], json.loads(r["params"])) for _, r in rows.drop_duplicates("strategy").iterrows()}
    out = _table.Rows()
    wins = []
    for (target, shots), g in rows.groupby(["target", "shots"]):
        acc = g.pivot_table(index="episode", columns="strategy", values="accuracy")
        depth = max(DEPTHS, key=lambda s: acc[s].mean())
        part = f"{target} {shots}-shot"
        out.record(part, f"best frozen depth: {depth}", round(100 * acc[depth].mean(), 1), "%",
                   f"{len(acc)} test episodes; " + ", ".join(f"{s[-2:]} {100 * acc[s].mean():.1f}" for s in DEPTHS))
        for name in NEW:
            d = paired(acc[name], acc[depth])
            sign = "above" if d.mean - d.ci > 0 else ("below" if d.mean + d.ci < 0 else "tied with")
            wins.append(sign == "above")
            out.record(part, f"{name} - {depth}", round(100 * d.mean, 1), "points",
                       f"± {100 * d.ci:.1f} (95% CI, paired), p {d.p_value:.3g}: {sign} the best frozen depth; "
                       f"{name} {100 * acc[name].mean():.1f}%")
    for name in (*NEW, *DEPTHS):
        strat, params = entries[name]
        clean = {k: v for k, v in params.items() if k in ("frozen",)}
        out.record("cost", f"{name}: trainable parameters", trainable(strat, clean), "",
                   "digits_cnn and a 10-way head")
        out.record("cost", f"{name}: peak memory of one episode", round(peak_memory(strat, clean), 1), "MB",
                   "10-way 10-shot, 15 queries, default hyper-parameters; VmHWM above the loaded process")
    out.record("all", "settings where a new strategy beats the best frozen depth", sum(wins), "",
               f"of {len(wins)} (strategy, target, shots), paired 95% CI above 0")
    _table.save(out, Path(args.output or "results/bench"), "peft", False, [
        "# Parameter-efficient strategies against the best frozen depth", "",
        f"Commands: `python -m workflows.compare --config workflows/configs/peft.yaml` (results/peft), then "
        f"`{p.prog}`, on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. The best frozen depth is chosen "
        "on the same test episodes (optimistic for the baseline)."])
    return 0


if __name__ == "__main__":
    _cli.run(main)
