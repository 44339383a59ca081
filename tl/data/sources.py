"""User data sources through Ray Data: an image folder, a Parquet file of image bytes, a CSV manifest.

Each becomes the one ImageSet schema. Images are read as bytes (``read_binary_files``) and decoded in
a function that records a per-row error instead of failing the whole dataset, so one corrupt file
stops the load with the list of bad files, by name (DESIGN section 5). Images of any channel count
(grey, grey+alpha, RGBA, palette, CMYK) are converted to RGB; every image is resized to ``size``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tl.data.imageset import ImageSet
from tl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_LISTED = 10


def decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Bytes of any common image format -> float32 3 x H x W in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
        if rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


class _Decode:
    """Ray Data batch function: decode the ``bytes`` column, one error string per row."""

    def __init__(self, size: tuple[int, int]):
        self.size = tuple(size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images, errors = [], []
        blank = np.zeros((3, *self.size), dtype=np.float32)
        for data in batch["bytes"]:
            try:
                images.append(decode_image(data, self.size))
                errors.append("")
            except Exception as exc:  # any decoder failure is that file's error, reported by name
                images.append(blank)
                errors.append(f"{type(exc).__name__}: {exc}")
        out = batch.drop(columns=["bytes"])
        out["image"] = images
        out["error"] = errors
        return out


def _raise_bad(rows: pd.DataFrame, key: str, what: str) -> None:
    bad = rows[rows["error"] != ""]
    if len(bad):
        lines = [f"  {r[key]}: {r['error']}" for _, r in bad.head(MAX_LISTED).iterrows()]
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        first = bad.iloc[0]
        raise DataError(f"{len(bad)} unreadable {what}, first '{first[key]}':\n" + "\n".join(lines) + more)


def _decode_files(paths: list[str], size: tuple[int, int]) -> pd.DataFrame:
    """Read and decode files with Ray Data; returns columns path, image, error (in input order)."""
    import ray.data

    ds = ray.data.read_binary_files(paths, include_paths=True, shuffle=None)
    rows = ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64).to_pandas()
    rows["path"] = [os.path.normpath(p if p.startswith("/") else "/" + p) for p in rows["path"]]
    order = {p: i for i, p in enumerate(paths)}
    missing = set(paths) - set(rows["path"])
    if missing:
        raise DataError(f"could not read {len(missing)} files, for example '{sorted(missing)[0]}'")
    return rows.assign(_o=rows["path"].map(order)).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def _class_list(found: Sequence[str], classes: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if classes is None:
        return tuple(sorted(set(found), key=_natural))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{where}: label '{unknown[0]}' is not in the class list {list(classes)}")
    return tuple(classes)


def _natural(name: str):
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _build(name: str, domain: str, images, label_names: Sequence[str], classes: tuple[str, ...], ids) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet(
        name=name, images=np.stack(list(images)) if len(images) else np.zeros((0, 3, 1, 1), np.float32),
        labels=np.array([index[c] for c in label_names], dtype=np.int64), classes=classes,
        domain=domain, splits=np.full(len(label_names), "all", dtype=object), ids=np.asarray(ids, dtype=object),
    )


def load_image_folder(root: str | Path, size: tuple[int, int], classes: Sequence[str] | None = None) -> ImageSet:
    """One subfolder per class under ``root``; every image file in it is one labelled image."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist")
    if not root.is_dir():
        raise DataError(f"image folder '{root}' is not a folder")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural(p.name))
    if not folders:
        raise DataError(f"image folder '{root}' has no class subfolders")
    paths, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"class folder '{folder}' is empty")
        for f in files:
            paths.append(os.path.normpath(str(f.resolve())))
            labels.append(folder.name)
    class_tuple = _class_list(labels, classes, f"image folder '{root}'")
    rows = _decode_files(paths, size)
    _raise_bad(rows, "path", f"images in '{root}'")
    ids = [os.path.relpath(p, root.resolve()) for p in paths]
    return _build(root.name, root.name, rows["image"].tolist(), labels, class_tuple, ids)


def load_csv_manifest(path: str | Path, size: tuple[int, int], classes: Sequence[str] | None = None) -> ImageSet:
    """A CSV with columns ``path`` and ``label``; relative paths are relative to the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV manifest '{path}' does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"CSV manifest '{path}' cannot be read: {exc}") from exc
    for col in ("path", "label"):
        if col not in table.columns:
            raise DataError(f"CSV manifest '{path}' has no column '{col}' (columns: {list(table.columns)})")
    if table.empty:
        raise DataError(f"CSV manifest '{path}' lists no images")
    base = path.resolve().parent
    paths = []
    for i, p in enumerate(table["path"]):
        full = Path(p) if os.path.isabs(p) else base / p
        if not full.is_file():
            raise DataError(f"CSV manifest '{path}', row {i + 2}: image '{p}' does not exist")
        paths.append(os.path.normpath(str(full.resolve())))
    labels = table["label"].tolist()
    class_tuple = _class_list(labels, classes, f"CSV manifest '{path}'")
    rows = _decode_files(paths, size)
    _raise_bad(rows, "path", f"images listed in '{path}'")
    return _build(path.stem, path.stem, rows["image"].tolist(), labels, class_tuple, table["path"].tolist())


def load_parquet(
    path: str | Path,
    size: tuple[int, int],
    classes: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> ImageSet:
    """A Parquet file (or folder of files) with encoded image bytes and a label per row."""
    import pyarrow.parquet as pq
    import ray.data

    path = Path(path)
    if not path.exists():
        raise DataError(f"Parquet file '{path}' does not exist")
    try:
        schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(str(path)).schema
    except Exception as exc:
        raise DataError(f"Parquet file '{path}' is not readable Parquet: {exc}") from exc
    for col in (image_column, label_column):
        if col not in schema.names:
            raise DataError(f"Parquet file '{path}' has no column '{col}' (columns: {schema.names})")
    try:
        ds = ray.data.read_parquet(str(path), columns=[image_column, label_column])
        ds = ds.map_batches(
            lambda b: b.rename(columns={image_column: "bytes", label_column: "label"}), batch_format="pandas"
        )
        rows = ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64).to_pandas()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Parquet file '{path}' could not be read: {str(exc).splitlines()[0]}") from exc
    if rows.empty:
        raise DataError(f"Parquet file '{path}' has no rows")
    rows["row"] = [f"{path.name}#row{i}" for i in range(len(rows))]
    _raise_bad(rows, "row", f"images in '{path}'")
    labels = [str(v) for v in rows["label"]]
    class_tuple = _class_list(labels, classes, f"Parquet file '{path}'")
    return _build(path.stem, path.stem, rows["image"].tolist(), labels, class_tuple, rows["row"].tolist())


def load_source(
    dataset: str | None = None,
    folder: str | None = None,
    csv: str | None = None,
    parquet: str | None = None,
    size: tuple[int, int] = (28, 28),
    classes: Sequence[str] | None = None,
) -> ImageSet:
    """Exactly one of: an embedded dataset name, an image folder, a CSV manifest or a Parquet file."""
    given = {k: v for k, v in (("dataset", dataset), ("folder", folder), ("csv", csv), ("parquet", parquet)) if v}
    if len(given) != 1:
        raise DataError(f"give exactly one data source (dataset, folder, csv or parquet); got {sorted(given) or 'none'}")
    if dataset:
        from tl.data.suite import load_embedded

        return load_embedded(dataset)
    if folder:
        return load_image_folder(folder, size, classes)
    if csv:
        return load_csv_manifest(csv, size, classes)
    return load_parquet(parquet, size, classes)
