"""A user's own folders through every workflow that trains or searches (smoke sizes, real Ray): the
data spec is the same string everywhere (an embedded name, or a path), and the same mapping."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tl.data import load_embedded
from tl.errors import DataError

CLASSES = ("c0", "c1", "c2")


def _digits(root: Path, name: str, per_class: int, classes=CLASSES, flat: bool = False) -> Path:
    """``per_class`` PNGs of each digit class from an embedded set, one subfolder per class (or, with
    ``flat``, all in the folder itself: unlabelled images)."""
    data = load_embedded(name)
    for c, cls in enumerate(classes):
        folder = root if flat else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(data.labels == c)[:per_class]):
            img = (data.images[i].transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{cls}_{j}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-data")
    return {"source": _digits(root / "source", "mnist", 40), "target": _digits(root / "target", "optdigits", 16),
            "unlabelled": _digits(root / "unlabelled", "optdigits", 16, flat=True),
            "test": _digits(root / "test", "mnistm", 10)}


@pytest.fixture(scope="module")
def user_backbone(ray_local, folders, tmp_path_factory):
    """Pretraining on the user's labelled folder: split train/val 0.9/0.1 by the source rule."""
    from tl.pretrain import PretrainConfig, pretrain

    home = tmp_path_factory.mktemp("user-home")
    res = pretrain(PretrainConfig(data=str(folders["source"]), epochs=1, batch_size=32, workers=1), home)
    return res, home


@pytest.mark.slow
def test_pretrain_on_a_user_folder(user_backbone, folders):
    import json

    res, home = user_backbone
    meta = json.loads((Path(res.path) / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["data"] == str(folders["source"])
    assert Path(res.path).name.startswith("digits_cnn-source-")
    assert 0.0 <= res.val_accuracy <= 1.0
    from tl.pretrain import PretrainConfig, _source_sets

    train, val = _source_sets(PretrainConfig(data=str(folders["source"])))
    assert len(train) == 108 and len(val) == 12 and val.class_counts() == {c: 4 for c in CLASSES}


@pytest.mark.slow
def test_user_source_to_user_unlabelled_target(user_backbone, folders, tmp_path):
    """Adaptation from the user's labelled folder to an unlabelled folder, scored on labelled test
    images given beside it; the workflow's config spells the data as paths."""
    from tl.adapt_bench import AdaptExperimentConfig, run_experiment
    from tl.config import load_config

    res, home = user_backbone
    cfg = load_config(AdaptExperimentConfig, base={
        "experiment": "user-adapt", "source": str(folders["source"]), "targets": [str(folders["unlabelled"])],
        "test": {"unlabelled": str(folders["test"])}, "weights": str(res.path), "seeds": [0], "workers": 1,
        "checkpoint_every": 2, "methods": [{"strategy": "dann"}],
        "params": {"steps": 2, "batch_size": 16, "target_batch_size": 16}})
    out = run_experiment(cfg, home, tmp_path / "out")
    assert out.exit_status == 0
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert set(runs["target"]) == {"unlabelled"} and set(runs["source"]) == {"source"}
    assert (runs["target_images"] == 48).all() and (runs["source_images"] == 108).all()
    assert runs["target_test_accuracy"].between(0, 1).all() and runs["target_im"].notna().all()


@pytest.mark.slow
def test_unlabelled_target_without_test_images_has_label_free_scores_only(user_backbone, folders):
    from tl.runs import RunConfig, run

    res, home = user_backbone
    record = run(RunConfig(source=str(folders["source"]), target=str(folders["unlabelled"]), strategy="dann",
                           weights=str(res.path), workers=1, checkpoint_every=2,
                           params={"steps": 2, "batch_size": 16, "target_batch_size": 16}), home)
    last = record["history"][-1]
    assert np.isnan(last["target_test_accuracy"]) and np.isfinite(last["target_im"])
    assert record["sizes"] == {"source": 108, "source_val": 12, "target": 48}


@pytest.mark.slow
def test_finetune_on_a_user_folder(ray_local, folders, storage):
    """Many-shot fine-tuning on the user's labelled folder: halves by default (adapt trains, test scores)."""
    from tl.runs import RunConfig, check_data, run

    record = run(RunConfig(target=str(folders["target"]), weights="random", workers=1, checkpoint_every=3,
                           params={"steps": 3, "batch_size": 8, "lr": 0.01}), storage)
    assert record["target"] == "target" and record["sizes"] == {"target": 24, "target_test": 24}
    assert 0 <= record["history"][-1]["target_test_accuracy"] <= 1
    # the mapping form: other split fractions, named as the config asks for them
    spec = {"path": str(folders["target"]), "split": {"adapt": 0.75, "test": 0.25}}
    assert check_data(RunConfig(target=spec)) == {"target": 36, "target_test": 12}
    # the same images as Parquet rows: the run's sets stream from their row groups through Ray Train
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(folders["target"]).glob("*/*.png"))
    f = Path(folders["target"]).parent / "target.parquet"
    pq.write_table(pa.table({"image": [p.read_bytes() for p in files], "label": [p.parent.name for p in files]}), f,
                   row_group_size=10)
    record = run(RunConfig(target=str(f), weights="random", workers=1, checkpoint_every=3,
                           params={"steps": 3, "batch_size": 8, "lr": 0.01}), storage)
    assert record["sizes"] == {"target": 24, "target_test": 24} and 0 <= record["history"][-1]["target_test_accuracy"] <= 1


@pytest.mark.slow
def test_search_on_a_user_folder(ray_local, folders, storage, tmp_path):
    from tl.config import load_config
    from tl.search import SearchConfig, run_search

    cfg = load_config(SearchConfig, base={
        "experiment": "user-search", "target": str(folders["target"]), "shots": 1, "val_episodes": 2,
        "test_episodes": 2, "weights": "random", "max_steps": 3, "scheduler": "none", "queries": 2,
        "space": {"frozen": {"grid": [4]}}, "params": {"lr": 0.01}})
    out = run_search(cfg, storage, tmp_path / "out")
    assert len(out.trials) == 1 and 0 <= out.test_accuracy <= 1
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert set(rows["target"]) == {"target"}


def test_user_target_label_missing_from_source_is_an_error(ray_local, folders, tmp_path):
    from tl.runs import RunConfig, check_data

    other = _digits(tmp_path / "other", "optdigits", 4, classes=("c0", "c1", "c7"))
    with pytest.raises(DataError, match=r"target 'other' has a label that source 'source' does not have.*'c7'"):
        check_data(RunConfig(source=str(folders["source"]), target=str(other), strategy="dann"))


def test_unlabelled_folder_where_labels_are_needed(ray_local, folders):
    from tl.runs import RunConfig, check_data

    with pytest.raises(DataError, match=r"holds 48 images but no class subfolders, so they have no labels"):
        check_data(RunConfig(target=str(folders["unlabelled"]), strategy="finetune"))


def test_a_one_class_folder_is_refused_before_anything_runs(tmp_path, storage):
    """A folder with one class subfolder cannot be classified: refused when it is listed (a dry run,
    a comparison's or an export's data), naming the folder and its class; so is a folder with a class
    list whose other classes have no images. Unlabelled folders (embedding) are not concerned."""
    from tl.compare import CompareConfig, dry_run
    from tl.config import load_config
    from tl.data.spec import DataSpec, load_data

    one = _digits(tmp_path / "one", "optdigits", 12, classes=("c0",))
    expected = rf"image folder '{one}' has one class subfolder with images, 'c0': at least two classes are needed"
    cfg = load_config(CompareConfig, base={"targets": [str(one)], "shots": [1], "episodes": 1, "weights": "random",
                                            "strategies": [{"strategy": "prototype"}]})
    with pytest.raises(DataError, match=expected):
        dry_run(cfg, storage, log=lambda _: None)
    with pytest.raises(DataError, match=expected):
        load_data("one", DataSpec(path=str(one)), (28, 28), lazy=True)
    with pytest.raises(DataError, match=expected):
        load_data("one", DataSpec(path=str(one), classes=("c0", "c1")), (28, 28), lazy=True)
    unlabelled = load_data("one", DataSpec(path=str(one)), (28, 28), unlabelled=True, lazy=True)
    assert len(unlabelled) == 12


def _loop_folder(root: Path) -> Path:
    """Classes a and b, three images each; b's images differ from a's."""
    for cls, value in (("a", 40), ("b", 200)):
        (root / cls).mkdir(parents=True)
        for j in range(3):
            Image.new("L", (8, 8), value + j).save(root / cls / f"{j}.png")
    return root


def test_symbolic_links_to_folders_never_relabel_or_repeat_images(tmp_path):
    """A link in a class folder to a folder above it (a loop) is refused, not listed again at every
    level; a link in class folder 'a' to class folder 'b' is refused, so b's images never count as
    a's (in the listing, a workflow's data, or a prediction's input); a link to a folder elsewhere on
    the disk is followed, its images of the class the link is in."""
    from tl.data.sources import index_image_folder
    from tl.data.spec import DataSpec, load_data
    from tl.predict import PredictConfig, _file_rows

    root = _loop_folder(tmp_path / "imgs")
    (root / "a" / "loop").symlink_to("..")
    with pytest.raises(DataError, match=r"'a/loop' is a symbolic link to '.*imgs', a folder that contains the link "
                                        r"itself: a loop"):
        index_image_folder(root)
    with pytest.raises(DataError, match="a loop"):
        load_data("imgs", DataSpec(path=str(root)), (8, 8), lazy=True)
    with pytest.raises(DataError, match="a loop"):
        _file_rows(str(root), PredictConfig(), ["a", "b"])
    (root / "a" / "loop").unlink()

    (root / "a" / "more").symlink_to(root / "b")
    with pytest.raises(DataError, match=r"'a/more' is a symbolic link to folder 'b' of the same folder: its images "
                                        r"would be counted as 'a' images"):
        index_image_folder(root)
    with pytest.raises(DataError, match="counted as 'a' images"):
        _file_rows(str(root), PredictConfig(), ["a", "b"])
    (root / "a" / "more").unlink()
    (root / "b2").symlink_to("b")  # a second class name for the same images
    with pytest.raises(DataError, match=r"'b2' is a symbolic link to '.*imgs/b'.*counted twice"):
        index_image_folder(root)
    (root / "b2").unlink()

    elsewhere = _loop_folder(tmp_path / "elsewhere")
    (root / "a" / "extra").symlink_to(elsewhere / "a")
    index = index_image_folder(root)
    assert len(index) == 9 and index.classes == ("a", "b")
    assert [i for i, c in zip(index.ids, index.labels) if c == 0] == ["a/0.png", "a/1.png", "a/2.png", "a/extra/0.png",
                                                                      "a/extra/1.png", "a/extra/2.png"]
    rows, _ = _file_rows(str(root), PredictConfig(), ["a", "b"])
    assert len(rows) == 9 and list(rows[rows["label"] == "b"]["id"]) == ["b/0.png", "b/1.png", "b/2.png"]


@pytest.mark.slow
def test_comparison_on_a_user_folder_sets_its_prediction_beside_the_outcome(ray_local, folders, storage, tmp_path):
    """The recommendation made before the run is keyed by the target's name (not its folder's path),
    so summary.md's "Predicted before the run" section has the user's target's rows."""
    import yaml

    from tl.compare import CompareConfig, run_compare
    from tl.config import load_config

    cfg = load_config(CompareConfig, base={
        "experiment": "user-outcome", "targets": [{"path": str(folders["target"]), "split": "halves"}],
        "shots": [1], "episodes": 2, "val_episodes": 1, "queries": 2, "weights": "random",
        "strategies": [{"strategy": "prototype"}]})
    out = run_compare(cfg, storage, tmp_path / "out", log=lambda _: None)
    assert out.exit_status == 0
    recs = yaml.safe_load((tmp_path / "out" / "recommend.yaml").read_text())
    assert [(r["target"], r["data"], r["shots"]) for r in recs] == [("target", str(folders["target"]), 1)]
    section = (tmp_path / "out" / "summary.md").read_text().split("## Predicted before the run, against the outcome")[1]
    rows = [line for line in section.splitlines() if line.startswith("| target | 1 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[4].startswith("prototype ") and cells[6] == "prototype (feature)"
