"""The one many-shot run on Ray Train (``tl.runs``): fine-tuning (no source) and unsupervised
adaptation (a source and an unlabelled pool) share its config, key, worker, checkpoints and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tl.config import from_dict
from tl.errors import ConfigError, DataError
from tl.runs import RunConfig, run

REPO = Path(__file__).resolve().parent.parent


def test_a_limited_run_scores_every_class():
    """``limit`` cuts the evaluation sets to a seeded sample, not to their first rows: the embedded
    sets are sorted by class, and a run scored on the first 64 rows of one would see a class or two."""
    import numpy as np

    from tl.runs import _sets

    cfg = RunConfig(weights="random", source="mnist", target="mnistm", strategy="dann", limit=64)
    sets = _sets(cfg)
    assert {k: len(v) for k, v in sets.items()} == {"source": 64, "source_val": 64, "target": 64, "target_test": 64}
    for k in ("source_val", "target_test"):
        assert len(set(sets[k].labels.tolist())) == 10, (k, np.bincount(sets[k].labels))
    again = _sets(cfg)
    assert all(np.array_equal(sets[k].ids, again[k].ids) for k in sets)  # the same sample every time


# --- config and key ------------------------------------------------------------------------------


def test_keys_of_finished_adaptation_runs_are_stable():
    """The committed benchmark's runs keep their keys (and so are skipped when it runs again). They
    were made when ``pretrained`` meant the shift recipe, which is ``pretrained:shift`` now (its
    config pins that): the same keys; under plain ``pretrained`` (the digits recipe) they differ."""
    records = [json.loads(p.read_text()) for p in sorted((REPO / "results" / "adapt" / "runs").glob("*.json"))]
    assert records
    for rec in records:
        assert rec["config"]["weights"] == "pretrained"
        assert from_dict(RunConfig, {**rec["config"], "weights": "pretrained:shift"}).key() == rec["key"]
        assert from_dict(RunConfig, rec["config"]).key() != rec["key"]
    cfg = RunConfig(weights="random", source="mnist", target="optdigits", strategy="dann", limit=64, workers=1,
                    checkpoint_every=2, params={"steps": 4, "batch_size": 16, "target_batch_size": 16})
    assert cfg.key() == "adapt-dann-mnist-optdigits-seed0-11aad54a8188"  # as the older tl.adapt.run keyed it


def test_a_key_holds_what_a_run_computes_and_nothing_else():
    ft = RunConfig(target="optdigits", params={"steps": 4})
    assert ft.kind == "finetune" and ft.key().startswith("finetune-finetune-optdigits-seed0-")
    assert RunConfig(target="optdigits", params={"steps": 4}, workers=1, use_gpu=True, max_failures=3).key() == ft.key()
    assert RunConfig(target="optdigits", params={"steps": 4}, init_head=False, source_split="x").key() == ft.key()
    assert RunConfig(target="optdigits", params={"steps": 5}).key() != ft.key()
    ad = RunConfig(source="mnist", target="optdigits", strategy="source_only")
    assert ad.kind == "adapt" and ad.resolved_params()["steps"] == 600
    assert RunConfig(source="mnist", target="optdigits", strategy="source_only", init_head=False).key() != ad.key()


def test_bad_run_configs_are_named(storage):
    with pytest.raises(ConfigError, match="'finetune' is not an adaptation strategy"):
        RunConfig(source="mnist", strategy="finetune")
    with pytest.raises(ConfigError, match="'logistic' is not a trained strategy"):
        RunConfig(strategy="logistic")
    with pytest.raises(ConfigError, match="must not be the test set"):
        RunConfig(source="mnist", strategy="dann", target_split="test")
    with pytest.raises(ConfigError, match="must not be the test set"):
        RunConfig(target_split="test")
    with pytest.raises(ConfigError, match="unknown config key 'strategies.dann.wieght'"):
        RunConfig(source="mnist", strategy="dann", params={"wieght": 1.0})
    with pytest.raises(ConfigError, match="'workers'"):
        RunConfig(workers=0)
    with pytest.raises(DataError, match="different classes"):  # before any Ray Train work
        run(RunConfig(weights="random", source="mnist:base", target="optdigits", strategy="dann"), storage,
            log=lambda _: None)


# --- Ray Train -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_adabn_run_scores_and_exports_the_model_with_target_statistics(ray_local, storage, tmp_path):
    """AdaBN on Ray Train: trained as source-only, scored (and exported) with BatchNorm statistics
    re-estimated on the unlabelled pool: every weight equals the trained model's, the statistics not."""
    import torch
    from safetensors.torch import load_file

    cfg = RunConfig(weights="random", source="mnist", target="mnistm", strategy="adabn", limit=64, workers=1,
                    checkpoint_every=2, params={"steps": 2, "batch_size": 16})
    rec = run(cfg, storage, tmp_path / "out", log=lambda _: None)
    assert rec["steps"] == 2 and 0 <= rec["history"][-1]["target_test_accuracy"] <= 1
    ckpt = sorted(p for p in (storage / "ray" / cfg.key()).glob("checkpoint_*") if p.is_dir())[-1]
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    trained, scored = state["model"], state["scored_model"]
    stats = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(trained[k], scored[k]) for k in stats)
    assert all(torch.equal(trained[k], scored[k]) for k in trained if k not in stats and "num_batches" not in k)
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    common = [k for k in stats if k in exported]
    assert len(common) == len(stats) and all(torch.equal(exported[k], scored[k]) for k in common)


@pytest.mark.slow
def test_fine_tuning_on_two_ddp_workers_matches_one_worker(ray_local, storage, tmp_path):
    losses = {}
    for workers in (1, 2):
        cfg = RunConfig(weights="random", target="optdigits", limit=64, workers=workers, checkpoint_every=4,
                        params={"steps": 4, "batch_size": 64, "lr": 0.05, "batch_norm": "frozen"})
        rec = run(cfg, storage / f"w{workers}", tmp_path / f"out{workers}", log=lambda _: None)
        assert rec["steps"] == 4 and rec["source"] is None
        (last,) = rec["history"]
        assert set(last) == {"step", "loss", "lr", "train_s", "attempt", "target_test_accuracy"}  # no source, no pool
        assert last["attempt"] == 0 and rec["resumed_at_steps"] == []  # never resumed
        assert json.loads((tmp_path / f"out{workers}" / "run.json").read_text())["steps"] == 4
        losses[workers] = last["loss"]
    assert losses[1] == pytest.approx(losses[2], abs=1e-4), losses


@pytest.mark.slow
def test_two_worker_ddp_adaptation_run_completes_checkpoints_and_is_reused(ray_local, storage, tmp_path):
    cfg = RunConfig(weights="random", source="mnist", target="optdigits", strategy="dann", limit=64, workers=2,
                    checkpoint_every=2, params={"steps": 4, "batch_size": 16, "target_batch_size": 16})
    rec = run(cfg, storage, tmp_path / "out", log=lambda _: None)
    assert rec["steps"] == 4 and [h["step"] for h in rec["history"]] == [2, 4]
    assert rec["sizes"] == {"source": 64, "source_val": 64, "target": 64, "target_test": 64}
    for h in rec["history"]:
        assert 0 <= h["target_test_accuracy"] <= 1 and math.isfinite(h["target_im"]) and math.isfinite(h["loss"])
        assert 0 <= h["source_val_accuracy"] <= 1 and math.isfinite(h["target_snd"]) and h["coeff"] > 0
    ckpts = sorted(p for p in (storage / "ray" / cfg.key()).glob("checkpoint_*") if p.is_dir())
    assert ckpts and (ckpts[-1] / "state.pt").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["steps"] == 4
    # the same config again: the finished run hands its last checkpoint back, nothing is retrained, and no
    # Ray Train run starts (one would register the checkpoint again: Train's snapshot would change)
    snapshot = storage / "ray" / cfg.key() / "checkpoint_manager_snapshot.json"
    before = snapshot.read_bytes()
    again = run(cfg, storage, None, log=lambda _: None)
    assert again["history"] == rec["history"] and again["steps"] == rec["steps"]
    assert snapshot.read_bytes() == before


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(ray_local, storage, tmp_path, monkeypatch):
    """The driver killed mid-run; the same command again resumes from the last registered checkpoint
    (the benchmark's run of the one worker: what holds for it holds for fine-tuning). The driver is a
    job on the session's Ray, which ends the killed job's Train workers with it."""
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    args = ["--smoke-test", "--workers", "1", "--storage", str(storage), "--output", str(out),
            "--set", "weights=random", "--set", "methods=[{strategy: dann}]",
            "--set", "checkpoint_every=10", "--set", "params.steps=30"]
    first = subprocess.Popen([sys.executable, "-m", "workflows.adapt", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(storage.glob("ray/adapt-*/checkpoint_manager_snapshot.json")):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    cells = storage / "runs" / "adapt-smoke" / "cells"
    assert not list(cells.glob("*.parquet")), "a killed run is not a finished cell"
    # the same command again: its main, run here (a driver of the session's Ray other than the killed one's
    # job, with nothing of it in memory; no second interpreter to start)
    from workflows.adapt import main

    monkeypatch.setattr(sys, "argv", ["workflows.adapt", *args])
    assert main() == 0
    (cell,) = cells.glob("*.parquet")
    history = pd.read_parquet(cell)
    assert history["step"].tolist() == list(range(10, 31, 10))
    # each checkpoint records how many resumes came before it: the first run's checkpoints (at least the one
    # the kill waited for) were kept, and the second run started after them, redoing none of their steps
    before, after = history[history["attempt"] == 0], history[history["attempt"] == 1]
    assert len(before) >= 1 and len(after) >= 1 and len(before) + len(after) == 3, history[["step", "attempt"]]
    assert before["step"].max() < after["step"].min()
    assert (out / "summary.md").is_file() and (out / "command.txt").is_file()
