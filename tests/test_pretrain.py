"""Source pretraining on real Ray Train: 2-worker DDP on CPU, saved weights, reuse, resume after a kill,
the same weights, to the byte, from the same command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tl.data import load_embedded
from tl.models import Classifier, make_backbone
from tl.models.weights import MODEL_FILE, file_sha256
from tl.pretrain import HEAD_FILE, PretrainConfig, pretrain

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


#: the DDP run (two workers, the digits recipe with label smoothing) that the checkpoint test scores and
#: the same-bytes test makes again in a fresh home: one run for both (``ddp_digits``)
DDP_DIGITS_FIELDS = dict(epochs=3, limit=1200, batch_size=64, workers=2, lr=0.05, augment="digits", label_smoothing=0.1)
DDP_DIGITS = PretrainConfig(**DDP_DIGITS_FIELDS)


@pytest.fixture(scope="module")
def ddp_digits(ray_local, tmp_path_factory):
    """``DDP_DIGITS`` pretrained once into a fresh home of its own: (home, result)."""
    home = tmp_path_factory.mktemp("ddp-digits-home")
    return home, pretrain(DDP_DIGITS, home)


def test_ddp_pretraining_checkpoint_scores_well_above_chance(ddp_digits):
    storage, res = ddp_digits
    assert not res.reused and res.epochs_run == 3
    assert res.val_accuracy > 0.6, f"10-way chance is 0.1, got {res.val_accuracy}"
    meta = json.loads((res.path / "meta.json").read_text())
    assert meta["backbone"] == "digits_cnn" and meta["config"]["workers"] == 2 and "git_commit" in meta

    # the saved weights are the model that scored: evaluate them here, outside Ray
    from safetensors.torch import load_file

    model = Classifier(make_backbone("digits_cnn", str(res.path)), 10)
    model.head.load_state_dict(load_file(str(res.path / HEAD_FILE)))
    model.eval()
    val = load_embedded("mnist").split("val")
    with torch.no_grad():
        pred = model(model.backbone.preprocessing(torch.from_numpy(val.images))).argmax(1).numpy()
    assert abs(float(np.mean(pred == val.labels)) - res.val_accuracy) < 1e-6

    again = pretrain(DDP_DIGITS, storage)
    assert again.reused and again.val_accuracy == res.val_accuracy


#: the ``pretrained`` fixture's config (tests/conftest.py): one worker, the shift recipe; the killed
#: run below pretrains it, so the fixture is the run never killed that it must equal
FIXTURE_CONFIG = dict(epochs=3, limit=1800, batch_size=64, lr=0.05, workers=1, augment="shift")


def _pretrain_args(storage: Path) -> list[str]:
    """The arguments of ``python -m workflows.pretrain`` for ``FIXTURE_CONFIG`` into ``storage``."""
    sets = [a for k, v in FIXTURE_CONFIG.items() if k != "workers" for a in ("--set", f"{k}={v}")]
    return ["--storage", str(storage), "--workers", str(FIXTURE_CONFIG["workers"]), *sets]


def _run_pretrain(address: str, storage: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "workflows.pretrain", *_pretrain_args(storage)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _digests(folder: Path) -> tuple[str, str]:
    return file_sha256(folder / MODEL_FILE), file_sha256(folder / HEAD_FILE)


def test_the_same_config_pretrains_to_the_same_bytes(ddp_digits, tmp_path):
    """Same command, same numbers (docs/finetuning.md): two runs of one config into two fresh homes
    write byte-identical weights on two DDP workers with the digits recipe, although Ray Data
    finishes its blocks in any order (the first: ``ddp_digits``, which the checkpoint test scores).
    The second is what ``weights: pretrained`` does on a fresh storage: the missing backbone is
    pretrained first, then found by its key.
    (One worker and the ``pretrained`` fixture's shift recipe: the killed-and-resumed run below, two
    processes, writes the bytes of a run never killed.)"""
    from tl.pretrain import META_FILE, ensure_pretrained, pretrained_path

    _, first = ddp_digits
    where = pretrained_path(tmp_path, **DDP_DIGITS_FIELDS)
    assert not (where / META_FILE).is_file()
    made = ensure_pretrained(tmp_path, log=lambda _: None, **DDP_DIGITS_FIELDS)
    assert str(made) == str(where) and (where / META_FILE).is_file()
    second = pretrain(DDP_DIGITS, tmp_path, log=lambda _: None)
    assert not first.reused and second.reused and str(second.path) == str(where) and first.path != second.path
    assert _digests(first.path) == _digests(second.path)
    assert first.val_accuracy == second.val_accuracy


def test_the_train_set_streams_in_its_own_order(ray_local):
    """The cause of the runs' differences: Ray Data hands a materialised (or streamed) dataset's blocks
    on as their tasks finish. ``ordered`` keeps the set's own (seeded) order, which the workers' split
    and the seeded local shuffle then follow."""
    from tl.models import build_backbone
    from tl.pretrain import _source_sets
    from tl.train import ray_train

    train, _ = _source_sets(PretrainConfig(limit=3000))
    ds = ray_train.preprocessed_dataset(train, build_backbone("digits_cnn").preprocessing, ordered=True)
    assert ds.context.execution_options.preserve_order and ds.num_blocks() > 1
    labels = np.concatenate([b["label"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    assert np.array_equal(labels, train.labels)


def test_killed_pretraining_resumes_from_its_last_checkpoint(ray_local, pretrained, storage, monkeypatch):
    """The driver (a job on the session's Ray) killed after the first registered checkpoint: Ray ends
    the job's Train workers with it, and the same command again resumes from that checkpoint, to the
    weights a run that was never killed writes (every epoch's draws are seeded by its number), on one
    worker with the shift recipe: the ``pretrained`` fixture's config, so the fixture is that run."""
    whole = Path(pretrained)
    assert whole.name == PretrainConfig(**FIXTURE_CONFIG).key(), "FIXTURE_CONFIG is not the pretrained fixture's"
    epochs = FIXTURE_CONFIG["epochs"]
    assert epochs >= 2  # room for a kill after the first checkpoint and before the end
    address = ray_local.get_runtime_context().gcs_address
    proc = _run_pretrain(address, storage)
    deadline = time.time() + 240
    # a checkpoint counts once Ray Train has registered it (its snapshot file is written after the files)
    while time.time() < deadline and not list(storage.glob("ray/pretrain-*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    assert list(storage.glob("ray/pretrain-*/checkpoint_manager_snapshot.json")), "no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list(storage.glob("backbones/*/meta.json")), "a killed run must not look finished"

    # the same command again: its main, run here (a driver of the session's Ray other than the killed one's
    # job, with nothing of it in memory; no second interpreter to start)
    from workflows.pretrain import main

    monkeypatch.setattr(sys, "argv", ["workflows.pretrain", *_pretrain_args(storage)])
    assert main() == 0
    (meta_file,) = storage.glob("backbones/*/meta.json")
    meta = json.loads(meta_file.read_text())
    assert meta_file.parent.name == whole.name and meta["epochs"] == epochs
    # the second run started from the killed one's checkpoint (an epoch after the first), not from the start
    assert len(meta["resumed_at_epochs"]) == 1 and 1 <= meta["resumed_at_epochs"][0] <= epochs, meta["resumed_at_epochs"]
    assert _digests(meta_file.parent) == _digests(whole)


def test_each_recipe_has_one_key_and_the_former_recipe_keeps_its_own(storage):
    """The default (``auto``) is the digits recipe on an embedded source and ``shift`` on a user's own
    images; each recipe has one key, whichever way it is spelled (``shift``, the former default, and
    ``pretrained:digits``), and a bad value is named. (``augment: digits`` with label smoothing trains on
    Ray Train in ``ddp_digits``.)"""
    from tl.errors import ConfigError

    assert PretrainConfig().augment == "digits" and PretrainConfig(data="mnist:base").augment == "digits"
    # the keys of pretraining protocol 2 (tl.pretrain.PROTOCOL, seeded order and draws); those of the
    # backbones made before were digits_cnn-mnist-2a3c2e2dacab (digits) and -2bb031ea069d (shift)
    assert PretrainConfig().key() == "digits_cnn-mnist-09b5074c101a"
    assert PretrainConfig(augment="digits", label_smoothing=0.0).key() == PretrainConfig().key()
    assert PretrainConfig(augment="shift").key() == "digits_cnn-mnist-24f6de7bf7c5"  # the former default's
    assert PretrainConfig(data=str(storage)).augment == "shift"  # a user's folder
    overrides = dict(epochs=3, limit=1200, batch_size=64, workers=1, lr=0.05, augment="digits", label_smoothing=0.1)
    cfg = PretrainConfig(**overrides)
    assert cfg.key() != PretrainConfig(**{**overrides, "augment": "shift", "label_smoothing": 0.0}).key()
    assert cfg.key() != PretrainConfig(**{**overrides, "label_smoothing": 0.0}).key()
    with pytest.raises(ConfigError, match="config key 'augment' must be one of"):
        PretrainConfig(augment="colour")
    with pytest.raises(ConfigError, match="config key 'label_smoothing'"):
        PretrainConfig(label_smoothing=1.0)
    from tl.pretrain import _recipe, resolve_weights

    assert PretrainConfig(**_recipe("pretrained:digits")).augment == "digits" and _recipe("pretrained") == {}
    assert PretrainConfig(**_recipe("pretrained:shift")).key() == PretrainConfig(augment="shift").key()
    with pytest.raises(ConfigError, match="weights 'pretrained:colour': the pretraining recipe must be one of"):
        resolve_weights("pretrained:colour", "digits_cnn", storage, print)


@pytest.mark.slow
def test_a_diverging_pretraining_stops_naming_its_first_non_finite_step(ray_local, tmp_path):
    """Losses are read once an epoch (no device read per step); the first non-finite one still stops the
    run with its step and rate, and no backbone is written."""
    from tl.errors import TrainingError

    cfg = PretrainConfig(epochs=1, limit=256, batch_size=32, lr=1e30, workers=1)
    with pytest.raises(TrainingError, match=r"non-finite loss \S+ in 'pretrain' at step \d+ with learning rate"):
        pretrain(cfg, tmp_path, log=lambda _: None)
    assert not (tmp_path / "backbones" / cfg.key() / "meta.json").exists()
