"""The embedded digits suite: sizes, determinism and split disjointness (docs/architecture.md, "The embedded suite")."""

import numpy as np
import pytest

from tl.data import load_embedded
from tl.data.suite import load_mnist, load_mnistm
from tl.errors import DataError


def test_source_split_sizes_and_strata():
    m = load_embedded("mnist")
    assert len(m) == 5000 and m.image_shape == (3, 28, 28)
    for split, n in (("train", 3600), ("val", 400), ("heldout", 1000)):
        part = m.split(split)
        assert len(part) == n
        assert set(part.class_counts().values()) == {n // 10}, "splits are stratified by class"


def test_no_source_training_digit_in_mnistm():
    src, mm = load_mnist(), load_mnistm()
    used = {i.removeprefix("mnistm-") for i in mm.ids}
    train_val = set(src.ids[np.isin(src.splits, ["train", "val"])])
    assert len(used) == 1000
    assert not used & train_val
    assert used == set(src.ids[src.splits == "heldout"])
    # the labels travel with the digit they were built from
    by_id = dict(zip(src.ids, src.labels))
    assert all(by_id[i.removeprefix("mnistm-")] == y for i, y in zip(mm.ids, mm.labels))


def test_mnistm_is_the_blend_of_its_digit():
    src, mm = load_mnist(), load_mnistm()
    row = {i: k for k, i in enumerate(src.ids)}
    for j in (0, 17, 999):
        digit = src.images[row[mm.ids[j].removeprefix("mnistm-")], 0]
        img = mm.images[j]
        # where the digit is fully on, the blend is 1 - patch: the channels differ (colour),
        # and where it is off, the blend is the patch itself: never the plain grey digit.
        assert img.shape == (3, 28, 28) and 0 <= img.min() and img.max() <= 1
        assert not np.allclose(img, digit[None])
        assert img.std(axis=0).mean() > 0.005, "an MNIST-M image is coloured"


def test_targets_split_in_stratified_halves_and_deterministic():
    for name in ("optdigits", "mnistm"):
        a, b = load_embedded(name), load_embedded(name)
        assert a.fingerprint() == b.fingerprint()
        assert set(a.splits) == {"adapt", "test"}
        adapt, test = a.split("adapt"), a.split("test")
        assert not set(adapt.ids) & set(test.ids)
        assert abs(len(adapt) - len(test)) <= 1
    assert len(load_embedded("optdigits")) == 1797


def test_novel_and_base_class_splits():
    base = load_embedded("mnist:base")
    novel = load_embedded("mnistm:novel")
    assert base.classes == ("0", "1", "2", "3", "4")
    assert novel.classes == ("5", "6", "7", "8", "9")
    assert set(novel.labels) == set(range(5)) and len(novel) == 500
    with pytest.raises(DataError, match="unknown embedded dataset 'cifar'"):
        load_embedded("cifar")
    with pytest.raises(DataError, match=":odd"):
        load_embedded("mnist:odd")


def test_table_schema():
    df = load_embedded("optdigits").to_pandas()
    assert list(df.columns) == ["image", "label", "class_name", "domain", "split", "id"]
    assert df["class_name"].iloc[0] == str(df["label"].iloc[0])


def test_faces_is_lfw_subset_in_two_stratified_halves():
    """``faces``: scikit-image's lfw_subset, faces (its first 100) against non-face patches, split into
    halves of 50 + 50; :base/:novel belong to the digit sets only."""
    from skimage.data import lfw_subset

    f = load_embedded("faces")
    assert len(f) == 200 and f.image_shape == (3, 25, 25) and f.classes == ("background", "face")
    raw = lfw_subset()
    assert np.allclose(f.images[:, 0], raw) and (f.labels[:100] == 1).all() and (f.labels[100:] == 0).all()
    for split in ("adapt", "test"):
        assert f.split(split).class_counts() == {"background": 50, "face": 50}
    assert not set(f.split("adapt").ids) & set(f.split("test").ids)
    with pytest.raises(DataError, match="not those of 'faces'"):
        load_embedded("faces:base")
