"""IDX data (MNIST's and Fashion-MNIST's format, tl.data.idx) read through a data spec, on small files
this test writes: gzipped and plain, a folder of pairs and one images file; bad files named in the error."""

import gzip
import struct

import numpy as np
import pytest

from tl.data.idx import FASHION_MNIST_CLASSES, read_idx
from tl.data.spec import DataSpec, load_data, load_target, resolve
from tl.errors import DataError


def _write(path, array: np.ndarray, type_byte: int = 0x08, gz: bool = False):
    raw = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _pair(folder, prefix: str, n: int, classes: int, side: int = 8, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write(folder / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
    _write(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)
    return images, labels


def test_a_folder_of_idx_pairs_is_one_labelled_set_in_the_specs_size_and_split(tmp_path):
    train, train_y = _pair(tmp_path, "train", 30, 3, gz=True, seed=1)
    test, test_y = _pair(tmp_path, "t10k", 12, 3, gz=False, seed=2)
    name, spec = resolve(str(tmp_path), "target")
    assert spec.kind() == "idx"
    data = load_data(name, spec, size=(8, 8))
    assert data.images.shape == (42, 3, 8, 8) and data.images.dtype == np.float32
    assert np.array_equal(data.labels, np.concatenate([test_y, train_y])), "pairs in name order: t10k, then train"
    assert data.classes == ("0", "1", "2") and set(data.splits) == {"all"}
    assert np.allclose(data.images[0, 0], test[0] / 255) and np.array_equal(data.images[:, 0], data.images[:, 2])
    assert data.ids[0] == "t10k-images-idx3-ubyte:0" and data.ids[-1] == "train-images-idx3-ubyte.gz:29"
    # one images file (its labels beside it), class names in label order, resized, cut in stratified halves
    one = DataSpec(idx=str(tmp_path / "train-images-idx3-ubyte.gz"), classes=("a", "b", "c"), split="halves")
    parts = load_target("fash", one, size=(28, 28))
    assert parts["test"].images.shape[1:] == (3, 28, 28) and len(parts["test"]) + len(parts["val"]) == 30
    assert parts["test"].classes == ("a", "b", "c") and set(parts["test"].class_counts().values()) == {5}
    assert DataSpec(idx="x").identity()["idx"] == "x" and "idx" not in DataSpec(folder="x").identity(), \
        "a spec without idx keeps the keys it had before idx existed"
    assert len(FASHION_MNIST_CLASSES) == 10


def test_bad_idx_files_are_named_in_one_error(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    _write(tmp_path / "a-images-idx3-ubyte", images)
    with pytest.raises(DataError, match=r"IDX images '.*a-images-idx3-ubyte' has no labels file beside it "
                                        r"\('a-labels-idx1-ubyte'\)"):
        load_data("a", DataSpec(idx=str(tmp_path / "a-images-idx3-ubyte")))
    _write(tmp_path / "a-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"hold 4 images, its labels '.*a-labels-idx1-ubyte' 3"):
        load_data("a", DataSpec(idx=str(tmp_path / "a-images-idx3-ubyte")))
    (tmp_path / "b-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match=r"'.*b-images-idx3-ubyte' is not an IDX file"):
        read_idx(str(tmp_path / "b-images-idx3-ubyte"))
    short = bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 8, 8) + bytes(100)
    (tmp_path / "c-images-idx3-ubyte").write_bytes(short)
    with pytest.raises(DataError, match=r"header says 5 x 8 x 8 uint8 values \(320 bytes\), the file holds 100"):
        read_idx(str(tmp_path / "c-images-idx3-ubyte"))
    _write(tmp_path / "a-labels-idx1-ubyte", np.array([0, 1, 2, 7], np.uint8))
    with pytest.raises(DataError, match=r"go up to 7, but 'classes' names only 3"):
        load_data("a", DataSpec(idx=str(tmp_path / "a-images-idx3-ubyte"), classes=("x", "y", "z")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no '<prefix>-images-idx3-ubyte\[\.gz\]' file"):
        load_data("e", DataSpec(idx=str(tmp_path / "empty")))
