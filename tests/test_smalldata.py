"""A user's small image folder end to end, --dry-run, and augmentation of support batches."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tl.compare import CompareConfig, dry_run, run_compare
from tl.config import load_config
from tl.data import load_embedded
from tl.errors import ConfigError
from tl.strategies import make_strategy
from tl.strategies.base import EpisodeTask
from tl.train.augment import augment_batch

REPO = Path(__file__).resolve().parent.parent


def _folder(root: Path, per_class: int) -> Path:
    """A user's folder: one subfolder per class, ``per_class`` PNGs each (digits from optdigits)."""
    data = load_embedded("optdigits")
    for c, name in enumerate(data.classes):
        (root / f"digit_{name}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(data.labels == c)[:per_class]):
            img = (data.images[i].transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"digit_{name}" / f"{j}.png")
    return root


@pytest.mark.slow
def test_small_folder_at_5_shots_states_2_queries_per_class(ray_local, pretrained, tmp_path):
    folder = _folder(tmp_path / "mine", 7)
    base = {"targets": ["mine"], "shots": [5], "episodes": 3,
            "strategies": [{"strategy": "prototype"}, {"strategy": "finetune", "params": {"frozen": 3, "steps": 5}}]}
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base={
        **base, "experiment": "small", "data": {"mine": {"folder": str(folder), "size": [28, 28]}}})
    out = run_compare(cfg, tmp_path / "home", tmp_path / "out", lambda s: None)
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert out.rows == len(rows) == 2 * 3
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "Small-data mode, mine 5-shot" in text and "digit_0: 2" in text and "digit_9: 2" in text
    # the folder has no split (every image for test episodes): the summary does not claim a validation split
    assert "**No validation episodes** in these rows" in text and "Chosen on validation episodes" not in text
    assert (tmp_path / "out" / "confusion_mine_5shot.png").is_file()
    # every query of an episode is one of the 2 images left per class: 20 queries, accuracy in twentieths
    assert np.allclose((rows["accuracy"] * 20) % 1, 0)

    # the same images as one Parquet file (rows in the folder's order, row groups of 8): the driver
    # holds row locations, episodes read their row groups, and every cell scores as the folder's did
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*/*.png"), key=lambda f: (f.parent.name, int(f.stem)))
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [f.parent.name for f in files]}),
                   tmp_path / "mine.parquet", row_group_size=8)
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base={
        **base, "experiment": "small-pq", "data": {"mine": {"parquet": str(tmp_path / "mine.parquet"), "size": [28, 28]}}})
    run_compare(cfg, tmp_path / "home", tmp_path / "out-pq", lambda s: None)
    pq_rows = pd.read_parquet(tmp_path / "out-pq" / "rows.parquet")
    key = ["strategy", "episode"]
    assert np.allclose(pq_rows.sort_values(key)["accuracy"].to_numpy(), rows.sort_values(key)["accuracy"].to_numpy())


def test_small_folder_refuses_a_search_without_validation_images(tmp_path):
    with pytest.raises(ConfigError, match="data.mine.split' is none.*no validation images"):
        load_config(CompareConfig, base={"targets": ["mine"], "data": {"mine": {"folder": str(tmp_path),
                                                                                "split": "none"}}})
    # unset, the rule follows the strategies: halves when one searches, every image for test otherwise
    cfg = load_config(CompareConfig, base={"targets": [str(tmp_path / "mine")]})
    assert cfg.targets == ("mine",) and cfg.spec("mine").split == "halves" and cfg.spec("mine").size == (28, 28)
    cfg = load_config(CompareConfig, base={"targets": [str(tmp_path / "mine")], "strategies": [{"strategy": "prototype"}]})
    assert cfg.spec("mine").split == "none"
    # target statistics come from images the test episodes never see: halves by default, and none is refused
    tbn = [{"strategy": "prototype", "params": {"bn_stats": "target"}}]
    cfg = load_config(CompareConfig, base={"targets": [str(tmp_path / "mine")], "strategies": tbn})
    assert cfg.spec("mine").split == "halves"
    with pytest.raises(ConfigError, match="data.mine.split' is none.*bn_stats: target"):
        load_config(CompareConfig, base={"targets": ["mine"], "strategies": tbn,
                                         "data": {"mine": {"folder": str(tmp_path), "split": "none"}}})


@pytest.mark.slow
def test_dry_run_runs_no_trial(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workflows.compare", "--dry-run", "--storage", str(tmp_path / "home"),
                        "--output", str(tmp_path / "out"), "--set", "targets=[optdigits]", "--set", "shots=[1,5]"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # what the dry run counts, as tl.compare.dry_run returns it for the same config
    est = dry_run(load_config(CompareConfig, overrides=["targets=[optdigits]", "shots=[1,5]"]), tmp_path / "home",
                  log=lambda _: None)
    # the 7 default strategies (every family: dann and the two that use unlabelled target images included) x 2
    # shot counts
    assert len(est["plan"]["todo"]) == 14 and not est["plan"]["done"] and not est["plan"]["failed"]
    # per shot count: the 4 feature cells are scored on 100 validation episodes, the 3 trained ones on 4, and
    # finetune first chooses its depth on 4 selection episodes for each of its 3 depths
    assert est["test_episodes"] == 140 and est["val_episodes"] == 2 * (4 * 100 + 3 * 4 + 3 * 4) and est["wall_s"] > 0
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "tune").exists()
    assert not (tmp_path / "home" / "backbones").exists(), "a dry run pretrains nothing"
    # a user's folder without a split rule (nothing searches or takes target statistics): every image is for
    # test episodes, and no validation episode is counted
    folder = _folder(tmp_path / "mine", 7)
    cfg = load_config(CompareConfig, base={
        "targets": ["mine"], "shots": [5], "episodes": 3, "data": {"mine": {"folder": str(folder), "size": [28, 28]}},
        "strategies": [{"strategy": "prototype"}, {"strategy": "finetune", "params": {"frozen": 3, "steps": 5}}]})
    assert cfg.spec("mine").split == "none"
    est = dry_run(cfg, tmp_path / "home", log=lambda _: None)
    assert est["test_episodes"] == 2 * 3 and est["val_episodes"] == 0


def test_augmentation_is_seeded_keeps_shapes_and_trains():
    x = torch.rand(6, 3, 28, 28)
    assert augment_batch(x, "none", torch.Generator()) is x
    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ConfigError, match="augment must be one of"):
        make_strategy("finetune", {"augment": "mixup"})
    from tl.models import make_backbone

    data = load_embedded("optdigits").split("adapt")
    bb = make_backbone("digits_cnn", None)
    x = bb.preprocessing(torch.tensor(data.images[:20]))
    task = EpisodeTask(n_way=10, support_y=data.labels[:20] % 10, seed=0, support_x=x, query_x=x[:5],
                       backbone=lambda: bb)
    run = make_strategy("finetune", {"frozen": 2, "augment": "crop", "steps": 3}).start_episode(task)
    assert run.model.start == 0, "with augmentation the frozen stages run on each augmented batch"
    run.advance(3)
    assert run.predict().shape == (5,)
