"""GPU checks: what tl runs on a GPU, each run once and checked, one row each (issue 45, "Right on a
real cluster"). Written to run in one call on a lent machine (one GPU, no internet: the digits backbone
is pretrained here by tl on its embedded data):

- ``device``: a Ray task holding one GPU sees it, computes on it, and which mixed precision it gets
  (``tl.train.loop.amp_dtype``: bf16 where the GPU has it, else fp16 with a loss scaler);
- ``pretrain``: a short pretraining of digits_cnn on Ray Train (``use_gpu``), the backbone of the rest;
- ``compare``: a smoke comparison whose trained cells take a GPU fraction (``gpu_per_trial``), with the
  GPU each trained row says its trial saw;
- ``finetune_ddp``: lp_ft on Ray Train workers with ``use_gpu`` (DDP; lp_ft's probe sees model and
  first batch on one device). Two workers where Ray has two GPUs; a Train worker takes a whole GPU
  (``tl.train.ray_train.fit``) and NCCL refuses two ranks on one device, so one worker on one GPU;
- ``dann``: an unsupervised adaptation run (mnist -> mnistm) on Ray Train;
- ``embed``: extraction on one GPU actor (``EmbedConfig(use_gpu=True, actors=1)``), the embeddings
  against the same backbone's in the driver on the CPU;
- ``amp``: fine-tuning with ``amp``: the precision the run's record names must be ``amp_dtype``'s.

A run's record says where its workers trained (``device``, ``precision``). ``--device cpu`` (what
``--smoke-test`` gets on a machine without a GPU) runs the same checks on the CPU with tiny sizes, so
the placement logic runs (``use_gpu`` False, no GPU fraction). Exits 1 when a check fails.
Writes ``<output>/gpu.md`` and ``.csv`` (``gpu-smoke`` for a smoke test).

    python -m benchmarks.gpu --output results/bench/gpu     # on a GPU machine (a few minutes)
    python -m benchmarks.gpu --smoke-test                    # tiny sizes (on the CPU here)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

from workflows import _cli


def _device_facts(device: str) -> dict:
    """In a Ray task (holding one GPU when ``device`` is cuda): what torch sees there."""
    import torch

    from tl.train.loop import amp_dtype, precision_name

    facts = {"cuda_available": torch.cuda.is_available(), "precision": precision_name(amp_dtype(device))}
    if device == "cuda" and torch.cuda.is_available():
        x = torch.randn(256, 256, device="cuda")
        facts.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                     matmul_ok=bool(torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-2, atol=1e-2)),
                     tensor_device=str(x.device))
    return facts


def main() -> int:
    p = _cli.parser("gpu", "Check tl's GPU paths (Ray Train, Tune GPU fractions, GPU actors, mixed precision).",
                    package="benchmarks")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where the checks run (auto: cuda when the Ray cluster has a GPU, else cpu)")
    args = p.parse_args()

    import numpy as np
    import pandas as pd
    import ray
    import torch

    from tl.errors import ConfigError
    from tl.runtime import cluster_gpus

    _cli.init_ray(args.address)
    gpus = cluster_gpus()
    device = args.device if args.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda" and gpus < 1:
        raise ConfigError("--device cuda: the Ray cluster has no GPU")
    on_gpu = device == "cuda"
    smoke = args.smoke_test
    storage = Path(args.storage) if args.storage else Path(tempfile.mkdtemp(prefix="tl-bench-gpu-"))
    rows: list[dict] = []
    print(f"[gpu] checks on {device} ({gpus:g} GPUs in Ray){', smoke sizes' if smoke else ''}; storage {storage}",
          flush=True)

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        t0 = time.perf_counter()
        try:
            ok, measured = fn()
        except Exception as exc:  # a failed check is a row, and the others still run
            traceback.print_exc()
            ok, measured = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        secs = time.perf_counter() - t0
        rows.append({"check": name, "device": device, "seconds": round(secs, 1), "result": "pass" if ok else "fail",
                     "measured": measured.replace("|", "/")})
        print(f"[gpu] {name:<13} {device:<5} {secs:7.1f} s  {'pass' if ok else 'FAIL'}  {measured}", flush=True)

    def quiet(_line: str) -> None:  # each check prints its own row
        pass

    state: dict = {}

    def device_check() -> tuple[bool, str]:
        facts = ray.get(ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=0.5)(_device_facts).remote(device))
        state["precision"] = facts["precision"]
        if not on_gpu:  # Ray hides every GPU from a task that asked for none
            return not facts["cuda_available"], f"a task without a GPU sees none; amp would be {facts['precision']}"
        ok = facts["cuda_available"] and facts.get("matmul_ok", False)
        return ok, (f"{facts.get('name')} (compute capability {facts.get('capability')}), a matmul on "
                    f"{facts.get('tensor_device')} matches the CPU's; amp precision {facts['precision']}")

    def pretrain_check() -> tuple[bool, str]:
        from tl.pretrain import PretrainConfig, pretrain

        cfg = PretrainConfig(epochs=1 if smoke else 3, limit=256 if smoke else 1800, batch_size=64, lr=0.05, workers=1,
                             augment="shift", use_gpu=on_gpu)
        res = pretrain(cfg, storage, quiet)
        state["weights"] = str(res.path)
        # a smoke test's four steps learn next to nothing: it only has to finish
        floor = 0.0 if smoke else 0.8
        ok = math.isfinite(res.val_accuracy) and res.val_accuracy >= floor
        return ok, (f"source val accuracy {res.val_accuracy:.3f} (at least {floor}) after {cfg.epochs} epoch(s) of "
                    f"{cfg.limit} mnist images, 1 worker, use_gpu {on_gpu}")

    def weights() -> str:
        if "weights" not in state:
            raise RuntimeError("no backbone: the pretrain check failed")
        return state["weights"]

    def compare_check() -> tuple[bool, str]:
        from tl.compare import CompareConfig, run_compare
        from tl.config import load_config

        steps = 5 if smoke else 50
        cfg = load_config(CompareConfig, base={
            "experiment": "gpu-check", "weights": weights(), "targets": ["optdigits"], "shots": [5],
            "episodes": 2 if smoke else 5, "val_episodes": 1 if smoke else 2, "feature_val_episodes": 5,
            "gpu_per_trial": 0.25 if on_gpu else 0.0, "recommend": False,
            "strategies": [{"strategy": "prototype"}, {"strategy": "finetune", "params": {"steps": steps}},
                           {"strategy": "lp_ft", "params": {"steps": steps}}]})
        res = run_compare(cfg, storage, storage / "compare-out", log=quiet)
        table = pd.read_parquet(storage / "compare-out" / "rows.parquet")
        trained = table[table["family"] != "feature"]
        seen = {json.loads(h).get("gpu") for h in trained["hardware"]}
        placed = seen == {None} if not on_gpu else (None not in seen and len(seen) > 0)
        acc = table.groupby("strategy")["accuracy"].mean()
        ok = res.exit_status == 0 and placed and len(trained) > 0 and bool(np.isfinite(acc).all())
        return ok, (f"{res.rows} rows, exit {res.exit_status}; trained cells at {cfg.gpu_per_trial:g} GPU, their "
                    f"trials saw GPU {sorted(map(str, seen))}; mean accuracy "
                    + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))

    def run_check(params: dict, **fields) -> tuple[bool, dict, str]:
        from tl.runs import RunConfig, run

        cfg = RunConfig(weights=weights(), use_gpu=on_gpu, params=params, checkpoint_every=params["steps"],
                        limit=fields.pop("limit", 256 if smoke else 0), **fields)
        rec = run(cfg, storage, storage / "runs" / cfg.key(), log=quiet)
        last = rec["history"][-1]
        placed = rec["device"] == device
        finite = all(math.isfinite(last[k]) for k in ("loss", "target_test_accuracy"))
        text = (f"{cfg.workers} worker(s), {rec['steps']} steps on {rec['device']} in {rec['precision']}; target test "
                f"accuracy {last['target_test_accuracy']:.3f}, loss {last['loss']:.3f}")
        return placed and finite and rec["steps"] == params["steps"], rec, text

    def finetune_check() -> tuple[bool, str]:
        workers = min(2, int(gpus)) if on_gpu else 2
        ok, _, text = run_check({"steps": 10 if smoke else 200, "batch_size": 32 if smoke else 128, "probe_steps": 20},
                                target="optdigits", strategy="lp_ft", workers=workers)
        if workers < 2:
            text += " (one GPU: one worker; DDP over two ranks needs two GPUs)"
        return ok, text

    def dann_check() -> tuple[bool, str]:
        ok, rec, text = run_check({"steps": 10 if smoke else 300, "batch_size": 32, "target_batch_size": 32},
                                  source="mnist", target="mnistm", strategy="dann", workers=1)
        return ok, text + f", source val accuracy {rec['history'][-1]['source_val_accuracy']:.3f}"

    def embed_check() -> tuple[bool, str]:
        from tl.data import load_embedded
        from tl.embeddings import EmbedConfig, extract
        from tl.models import make_backbone

        data = load_embedded("mnist")
        data = data.subset(np.arange(256 if smoke else len(data)))
        cfg = EmbedConfig(backbone="digits_cnn", weights=weights(), use_gpu=on_gpu, actors=1, batch_size=256)
        emb = extract(data, cfg, storage / "cache", log=quiet)
        model = make_backbone("digits_cnn", weights(), None).eval()
        with torch.inference_mode():
            ref = torch.cat([model(model.preprocessing(torch.from_numpy(data.images[i:i + 256])))
                             for i in range(0, len(data), 256)]).numpy()
        diff = float(np.abs(emb.vectors - ref).max() / max(1e-12, np.abs(ref).max()))
        ok = emb.vectors.shape == ref.shape and diff < 1e-2 and np.array_equal(emb.ids, data.ids)
        how = "1 GPU actor" if on_gpu else "CPU tasks"
        return ok, (f"{len(data)} x {emb.vectors.shape[1]} embeddings on {how} in {emb.seconds:.1f} s; largest "
                    f"difference from the driver's CPU embeddings {diff:.1e} of their largest value (< 1e-2)")

    def amp_check() -> tuple[bool, str]:
        ok, rec, text = run_check({"steps": 10 if smoke else 200, "batch_size": 32 if smoke else 128},
                                  target="mnistm", strategy="finetune", workers=1, amp=True)
        want = state.get("precision", "fp32" if not on_gpu else "?")
        return ok and rec["precision"] == want, text + f" (amp asked for: {want} expected)"

    t0 = time.perf_counter()
    try:
        for name, fn in (("device", device_check), ("pretrain", pretrain_check), ("compare", compare_check),
                         ("finetune_ddp", finetune_check), ("dann", dann_check), ("embed", embed_check),
                         ("amp", amp_check)):
            check(name, fn)
    finally:
        if not args.storage:
            shutil.rmtree(storage, ignore_errors=True)
    wall = time.perf_counter() - t0
    failed = [r["check"] for r in rows if r["result"] != "pass"]

    out_dir = Path(args.output or "results/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu-smoke" if smoke else "gpu"
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    cmd = "python -m benchmarks.gpu" + (" --smoke-test" if smoke else "") + (
        f" --device {args.device}" if args.device != "auto" else "")
    md = ["# GPU checks", "", f"Command: `{cmd}` on {os.cpu_count()} CPU cores and {gpus:g} GPUs, checks on "
          f"{device}, {time.strftime('%Y-%m-%d')}; {wall:.0f} s in all, {len(rows) - len(failed)} of {len(rows)} "
          f"passed.", "", "| check | device | seconds | result | measured |", "|---|---|---|---|---|"]
    md += [f"| {r['check']} | {r['device']} | {r['seconds']} | {r['result']} | {r['measured']} |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"table: {out_dir / f'{stem}.md'}")
    print(f"[gpu] {len(rows) - len(failed)} of {len(rows)} checks passed in {wall:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    _cli.run(main)
