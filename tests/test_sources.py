"""User data through Ray Data: an image folder, a CSV manifest, a Parquet file, and their errors."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tl.data import load_csv_manifest, load_image_folder, load_parquet
from tl.errors import DataError

SIZE = (16, 16)


def png(mode="RGB", size=(20, 12), value=128) -> bytes:
    buf = io.BytesIO()
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = np.full((size[1], size[0], channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pets"
    for cls, mode in (("cat", "RGB"), ("dog", "L"), ("fox", "RGBA")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(png(mode, value=40 * i + 10))
    return root


def test_image_folder_loads_and_converts_channels(ray_local, folder):
    s = load_image_folder(folder, SIZE)
    assert s.classes == ("cat", "dog", "fox")
    assert s.images.shape == (9, 3, 16, 16)
    assert s.class_counts() == {"cat": 3, "dog": 3, "fox": 3}
    grey = s.images[s.labels == 1][1]
    assert np.allclose(grey[0], grey[1]) and np.allclose(grey[0], 50 / 255, atol=1e-3)
    assert sorted(s.ids)[0] == "cat/0.png"


def test_corrupt_image_is_named(ray_local, folder):
    (folder / "dog" / "broken.png").write_bytes(png()[:40])
    (folder / "cat" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"2 unreadable images") as err:
        load_image_folder(folder, SIZE)
    assert "broken.png" in str(err.value) and "notes.jpg" in str(err.value)


def test_empty_class_folder_is_named(ray_local, folder):
    (folder / "owl").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*owl' is empty"):
        load_image_folder(folder, SIZE)


def test_missing_folder_and_class_list(ray_local, folder, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", SIZE)
    with pytest.raises(DataError, match="label 'fox' is not in the class list"):
        load_image_folder(folder, SIZE, classes=["cat", "dog"])


def manifest(tmp_path, folder, rows=None, columns=("path", "label")):
    rows = rows or [(f"pets/{c}/{i}.png", c) for c in ("cat", "dog") for i in range(3)]
    f = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(f, index=False)
    return f


def test_csv_manifest(ray_local, tmp_path, folder):
    s = load_csv_manifest(manifest(tmp_path, folder), SIZE)
    assert s.classes == ("cat", "dog") and len(s) == 6
    assert list(s.ids[:2]) == ["pets/cat/0.png", "pets/cat/1.png"], "rows keep the manifest's order"


def test_csv_errors(ray_local, tmp_path, folder):
    with pytest.raises(DataError, match="has no column 'label'"):
        load_csv_manifest(manifest(tmp_path, folder, columns=("path", "class")), SIZE)
    with pytest.raises(DataError, match=r"row 2: image 'pets/cat/missing.png' does not exist"):
        load_csv_manifest(manifest(tmp_path, folder, rows=[("pets/cat/missing.png", "cat")]), SIZE)
    with pytest.raises(DataError, match="label 'dog' is not in the class list"):
        load_csv_manifest(manifest(tmp_path, folder), SIZE, classes=["cat"])


def test_parquet(ray_local, tmp_path):
    f = tmp_path / "imgs.parquet"
    pd.DataFrame({"image": [png(value=v) for v in (10, 20, 30, 40)], "label": ["a", "b", "a", "b"]}).to_parquet(f)
    s = load_parquet(f, SIZE)
    assert s.classes == ("a", "b") and len(s) == 4
    means = {round(float(img.mean()) * 255) for img in s.images}
    assert means == {10, 20, 30, 40}


def test_parquet_errors(ray_local, tmp_path):
    good = tmp_path / "good.parquet"
    pd.DataFrame({"image": [png(), png()[:30]], "label": ["a", "b"]}).to_parquet(good)
    with pytest.raises(DataError, match=r"(?s)1 unreadable images in '.*good.parquet'.*good.parquet#row1"):
        load_parquet(good, SIZE)
    trunc = tmp_path / "trunc.parquet"
    trunc.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="trunc.parquet' is not readable Parquet"):
        load_parquet(trunc, SIZE)
    nolabel = tmp_path / "nolabel.parquet"
    pd.DataFrame({"image": [png()]}).to_parquet(nolabel)
    with pytest.raises(DataError, match="has no column 'label'"):
        load_parquet(nolabel, SIZE)


def test_a_lazy_parquet_holds_row_locations_and_reads_only_the_groups_it_needs(ray_local, tmp_path, monkeypatch):
    """A folder of two Parquet files in row groups of 3: the driver holds (file, group, row) per row
    and the labels, never the image column; the pixels of any rows, the Ray Data stream and the
    check are those of the in-memory load; a bad cell is named by its row; a Hugging Face style
    struct column (bytes, path) decodes; very large row groups are warned about."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tl.data.parquet as tp
    from tl.data.sources import check_files

    root = tmp_path / "shards"
    root.mkdir()
    values = [10 * i for i in range(14)]
    for j, chunk in enumerate((values[:8], values[8:])):
        table = pa.table({"image": [png(value=v) for v in chunk], "label": [f"c{v % 3}" for v in chunk]})
        pq.write_table(table, root / f"part-{j}.parquet", row_group_size=3)
    full, lazy = load_parquet(root, SIZE), load_parquet(root, SIZE, lazy=True)
    assert lazy.lazy and not full.lazy and isinstance(lazy.images, tp.ParquetImages)
    assert lazy.images.where[:, 1].max() == 2 and lazy.images.where[9].tolist() == [1, 0, 1, 9]
    assert list(lazy.ids) == list(full.ids) == [f"shards#row{i}" for i in range(14)]
    assert (lazy.labels == full.labels).all() and lazy.classes == ("c0", "c1", "c2")
    assert [round(float(im.mean()) * 255) for im in full.images] == values
    np.testing.assert_array_equal(lazy.pixels([13, 0, 7, 4, 8]), full.images[[13, 0, 7, 4, 8]])
    sub = lazy.subset(lazy.labels == 1)
    np.testing.assert_array_equal(sub.pixels(np.arange(len(sub))), full.images[full.labels == 1])
    streamed = sub.to_ray(("image", "label", "row")).to_pandas().sort_values("row")
    assert streamed["row"].tolist() == list(range(len(sub))) and (streamed["label"] == 1).all()
    np.testing.assert_array_equal(np.stack(streamed["image"].tolist()), np.round(sub.pixels(range(len(sub))) * 255))
    check_files(lazy)
    assert lazy.fingerprint() != sub.fingerprint()

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [png(), png()[:30], None], "label": ["a", "b", "a"]}), bad, row_group_size=2)
    with pytest.raises(DataError, match=r"(?s)2 unreadable images in 'bad'.*bad.parquet#row1.*bad.parquet#row2: "
                                        r"ValueError: the image cell is empty"):
        check_files(load_parquet(bad, SIZE, lazy=True))
    with pytest.raises(DataError, match=r"image 'bad.parquet#row1' cannot be read"):
        load_parquet(bad, SIZE, lazy=True).pixels([0, 1])

    hf = tmp_path / "hf.parquet"
    cells = pa.array([{"bytes": png(value=60), "path": "a.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": cells, "label": ["x"]}), hf)
    assert round(float(load_parquet(hf, SIZE, lazy=True).pixels([0]).mean()) * 255) == 60
    monkeypatch.setattr(tp, "LARGE_GROUP", 5)
    with pytest.warns(UserWarning, match="row groups of up to 8 rows"):
        pq.write_table(pa.table({"image": [png()] * 8, "label": ["a"] * 8}), tmp_path / "big.parquet")
        load_parquet(tmp_path / "big.parquet", SIZE, lazy=True)


def test_a_lazy_folder_holds_paths_and_decodes_only_the_rows_asked_for(ray_local, folder, tmp_path):
    """What a comparison's driver holds of a user folder: labels, ids and paths; the pixels of rows
    asked for are the ones the in-memory load gives, a subset stays lazy, and the fingerprint follows
    the listing (a rewritten file changes it) without reading the images."""
    import os

    from tl.data.sources import check_files

    full, lazy = load_image_folder(folder, SIZE), load_image_folder(folder, SIZE, lazy=True)
    assert lazy.lazy and not full.lazy and lazy.images.shape == full.images.shape
    assert list(lazy.ids) == list(full.ids) and (lazy.labels == full.labels).all()
    np.testing.assert_array_equal(lazy.pixels(np.arange(len(lazy))), full.images)
    dogs = lazy.subset(lazy.labels == 1)
    assert dogs.lazy and len(dogs) == 3
    np.testing.assert_array_equal(dogs.pixels([2, 0]), full.images[full.labels == 1][[2, 0]])
    with pytest.raises(DataError, match="held as files"):
        lazy.to_arrow()
    assert dogs.fingerprint() != lazy.fingerprint()
    before = lazy.fingerprint()
    target = folder / "cat" / "0.png"
    target.write_bytes(png("RGB", value=200))
    os.utime(target, ns=(1, 1))
    assert load_image_folder(folder, SIZE, lazy=True).fingerprint() != before
    check_files(lazy)  # every file decodes
    (folder / "cat" / "1.png").write_bytes(png()[:40])
    with pytest.raises(DataError, match=r"1 unreadable images.*1\.png"):
        check_files(load_image_folder(folder, SIZE, lazy=True))
    with pytest.raises(DataError, match=r"image '.*cat/1\.png' cannot be read"):
        load_image_folder(folder, SIZE, lazy=True).pixels([1])


def test_a_lazy_manifest_names_a_missing_file(ray_local, tmp_path, folder):
    pd.DataFrame({"path": ["cat/0.png", "dog/9.png"], "label": ["cat", "dog"]}).to_csv(folder / "m.csv", index=False)
    with pytest.raises(DataError, match=r"row 3: image 'dog/9.png' does not exist"):
        load_csv_manifest(folder / "m.csv", SIZE, lazy=True)
    pd.DataFrame({"path": ["cat/0.png", "dog/1.png"], "label": ["cat", "dog"]}).to_csv(folder / "m.csv", index=False)
    lazy = load_csv_manifest(folder / "m.csv", SIZE, lazy=True)
    np.testing.assert_array_equal(lazy.pixels([0, 1]), load_csv_manifest(folder / "m.csv", SIZE).images)
