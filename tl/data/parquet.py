"""A Parquet file (or folder of files) of encoded images, held by the driver as row locations.

The driver reads each file's metadata and its label column, never the image column: a row is
where it lies (file, row group, row in the group), its label and its id. Its image bytes are read
inside Ray Data (``ReadGroups``: every block of the listing is a run of whole row groups, read in
chunks and decoded to uint8) or, for an episode's few rows, read from their row groups and decoded
in the trial (``ParquetImages.load``). A row group is Parquet's unit of reading: an episode reads
each group it draws from, so files written with small groups (about 1,000 rows) serve episodes
fastest, and a warning says so for files with very large groups.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from tl.data.decode import LISTING_BLOCK, _check_sizes, _decode_row, _raise_bad, decode_image, why_not_decoded
from tl.data.imageset import ImageSet, build_set, class_list
from tl.errors import DataError
from tl.storage import Location

#: a row group larger than this makes episodes slow (each one reads whole groups): warned about
LARGE_GROUP = 10_000
#: rows per read of a row group's image column (the memory of one read)
CHUNK = 256


def _cell_bytes(value) -> bytes:
    """One image cell: bytes, or a struct with a ``bytes`` field (Hugging Face ``datasets`` writes
    its Image feature so); an empty cell is that row's error."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        raise ValueError("the image cell is empty (null)")
    return value


def group_values(fs, file: str, group: int, column: str, wanted: np.ndarray,
                 chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, list]]:
    """The cells of ``column`` at rows ``wanted`` (indices within row group ``group`` of ``file``),
    read ``chunk`` rows at a time and stopping after the last one wanted: yields (positions into
    ``wanted``, their cells)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.argsort(wanted, kind="stable")
    sorted_rows = np.asarray(wanted)[order]
    done = start = 0
    with fs.open_input_file(file) as f:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=chunk, row_groups=[int(group)], columns=[column]):
            end = start + rb.num_rows
            upto = int(np.searchsorted(sorted_rows, end, "left"))
            if upto > done:
                cells = rb.column(0).take(pa.array(sorted_rows[done:upto] - start)).to_pylist()
                yield order[done:upto], cells
                done = upto
            start = end
            if done == len(sorted_rows):
                return
    if done < len(sorted_rows):
        raise DataError(f"Parquet file '{file}', row group {group}: has no row {int(sorted_rows[done])} (it changed "
                        f"after it was listed)")


class ReadGroups:
    """Ray Data batch function (a generator) over a Parquet set's listing: for each run of rows of
    one row group, read their image cells in chunks and decode them (``uint8``: the 0..255 bytes);
    yields the listing's columns (path, label, id, row) with ``image``, ``error`` and ``shape``. A
    failure is that row's ``error``, or, where ``strict`` (a training stream, checked before), one
    error naming the row."""

    def __init__(self, fs, column: str, size: tuple[int, int], uint8: bool = False, strict: bool = False):
        self.fs, self.column, self.size, self.uint8, self.strict = fs, column, tuple(size), uint8, strict

    def __call__(self, batch: pd.DataFrame) -> Iterator[dict]:
        keep = [c for c in batch.columns if c not in ("file", "group", "index")]
        for (file, group), rows in batch.groupby(["file", "group"], sort=False):
            for pos, cells in group_values(self.fs, file, int(group), self.column, rows["index"].to_numpy()):
                part = rows.iloc[pos]
                images = np.zeros((len(part), 3, *self.size), dtype=np.uint8 if self.uint8 else np.float32)
                errors, shapes = [], []
                for j, (cell, name) in enumerate(zip(cells, part["path"])):
                    image, err, shape = _decode_row(lambda: _cell_bytes(cell), self.size, self.uint8, "cell")
                    if err and self.strict:
                        raise DataError(f"image '{name}' cannot be read: {err}")
                    if not err:
                        images[j] = image
                    errors.append(err)
                    shapes.append(shape)
                out = {c: part[c].to_numpy() for c in keep}
                out.update(image=images, error=np.array(errors, dtype=object), shape=np.array(shapes, dtype=object))
                yield out


@dataclass(eq=False)
class ParquetImages:
    """The images of a set as rows of Parquet files on a pyarrow filesystem: ``where`` holds per row
    (file index, row group, row in group, row in the dataset); decoded (float32, ``size``) only for
    the rows asked for. The lazy-images interface of ``tl.data.sources.FileImages``."""

    name: str
    files: tuple[str, ...]
    stamps: tuple[str, ...]  # per file "size:mtime_ns", from the listing
    where: np.ndarray
    fs: Any
    size: tuple[int, int]
    column: str = "image"
    mixed_sizes: str = "error"
    batch_rows = None  # a listing block is whole row groups: one batch

    def __post_init__(self) -> None:
        self.where = np.asarray(self.where, dtype=np.int64).reshape(-1, 4)
        self.size = (int(self.size[0]), int(self.size[1]))

    def __len__(self) -> int:
        return len(self.where)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.where), 3, *self.size)

    def take(self, rows: np.ndarray) -> "ParquetImages":
        return ParquetImages(self.name, self.files, self.stamps, self.where[rows], self.fs, self.size, self.column,
                             self.mixed_sizes)

    def row_name(self, i: int) -> str:
        return f"{self.name}#row{int(self.where[i, 3])}"

    def load(self, rows: np.ndarray) -> np.ndarray:
        """The decoded images of ``rows``, each row group they lie in read once (``group_values``)."""
        out = np.empty((len(rows), 3, *self.size), dtype=np.float32)
        loc = self.where[np.asarray(rows, dtype=np.int64)]
        keys = loc[:, 0] * (1 << 32) + loc[:, 1]
        for key in np.unique(keys):
            sel = np.flatnonzero(keys == key)
            f, g = int(loc[sel[0], 0]), int(loc[sel[0], 1])
            for pos, cells in group_values(self.fs, self.files[f], g, self.column, loc[sel, 2]):
                for p, cell in zip(sel[pos], cells):
                    data = None
                    try:
                        data = _cell_bytes(cell)
                        out[p] = decode_image(data, self.size)
                    except Exception as exc:  # one row's failure, by name
                        why = f"{type(exc).__name__}: {exc}" if data is None else why_not_decoded(data, exc, "cell")
                        raise DataError(f"image '{self.name}#row{int(loc[p, 3])}' cannot be read: {why}") from exc
        return out

    def dataset(self, labels: np.ndarray, ids: np.ndarray):
        """The listing as a Ray Dataset (file, group, index, path, label, id, row; ``path`` names the
        row in errors), sorted by location and cut into blocks of whole row groups of about
        ``LISTING_BLOCK`` rows, so no group is read by two tasks."""
        import ray.data

        listing = pd.DataFrame({"file": [self.files[i] for i in self.where[:, 0]], "group": self.where[:, 1],
                                "index": self.where[:, 2], "path": [self.row_name(i) for i in range(len(self))],
                                "label": np.asarray(labels, dtype=np.int64),
                                "id": np.asarray(ids, dtype=object).astype(str), "row": np.arange(len(self))})
        listing = listing.iloc[np.lexsort((self.where[:, 2], self.where[:, 1], self.where[:, 0]))]
        key = self.where[listing["row"].to_numpy(), 0] * (1 << 32) + listing["group"].to_numpy()
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # first listing row of each group run
        blocks, first = [], 0
        for s in list(starts[1:]) + [len(listing)]:
            if s - first >= LISTING_BLOCK or s == len(listing):
                blocks.append(listing.iloc[first:s])
                first = s
        return ray.data.from_pandas(blocks or [listing])

    def reader(self, uint8: bool = False, strict: bool = False) -> ReadGroups:
        return ReadGroups(self.fs, self.column, self.size, uint8, strict)

    def to_ray(self, labels: np.ndarray, ids: np.ndarray, columns: Sequence[str]):
        """A Ray Dataset of these rows (``columns`` among image, label, id, row), read and decoded to
        uint8 inside Ray Data, block by block; nothing materialised."""
        keep = [c for c in columns if c in ("image", "label", "id", "row")]
        return self.dataset(labels, ids).map_batches(self.reader(uint8=True, strict=True), batch_format="pandas",
                                                     batch_size=None).select_columns(keep)

    def scan(self, labels: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
        """One pass of Ray Data over the rows: path (the row's name), error and shape per row."""
        return self.dataset(labels, ids).map_batches(self.reader(uint8=True), batch_format="pandas", batch_size=None) \
            .select_columns(["path", "error", "shape"]).to_pandas()

    def fingerprint(self) -> str:
        """The files' names, sizes and mtimes, the column, the decode size and the rows' locations."""
        h = hashlib.sha256(f"{self.size}\0{self.column}".encode())
        h.update("\0".join(f"{Path(f).name}:{s}" for f, s in zip(self.files, self.stamps)).encode())
        h.update(self.where.tobytes())
        return h.hexdigest()


def load_parquet(path: str | Path, size: tuple[int, int], classes: Sequence[str] | None = None,
                 image_column: str = "image", label_column: str = "label", mixed_sizes: str = "error",
                 unlabelled: bool = False, lazy: bool = False) -> ImageSet:
    """A Parquet file (or folder of files) with encoded image bytes and a label per row. The driver
    reads the metadata and the label column; the images are decoded through Ray Data (``lazy``: not
    now, as rows are asked for; their bytes are checked by ``check_files`` or by the extraction that
    reads them). ``unlabelled``: a file without the label column is allowed (labels -1)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    shown = str(path)
    loc = Location.of(path)
    if not loc.exists():
        raise DataError(f"Parquet file '{path}' does not exist")
    stem = Path(loc.path).stem
    try:
        files = [loc.path] if loc.is_file() else sorted(pq.ParquetDataset(loc.path, filesystem=loc.fs).files)
    except Exception as exc:
        raise DataError(f"Parquet file '{shown}' is not readable Parquet: {exc}") from exc
    where, labels, biggest = [], [], 0
    for fi, file in enumerate(files):
        try:
            with loc.fs.open_input_file(file) as fh:
                pf = pq.ParquetFile(fh)
                names = pf.schema_arrow.names
                for col in (image_column,) + (() if unlabelled and label_column not in names else (label_column,)):
                    if col not in names:
                        raise DataError(f"Parquet file '{shown}' has no column '{col}' (columns: {names})")
                if label_column in names:
                    labels += [None if v is None else str(v) for v in pf.read(columns=[label_column]).column(0).to_pylist()]
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    biggest = max(biggest, n)
                    where.append(np.column_stack([np.full(n, fi), np.full(n, g), np.arange(n), np.zeros(n)]))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"Parquet file '{shown}' is not readable Parquet ({file}): {exc}") from exc
    rows = np.concatenate(where).astype(np.int64) if where else np.zeros((0, 4), np.int64)
    if not len(rows):
        raise DataError(f"Parquet file '{shown}' has no rows")
    rows[:, 3] = np.arange(len(rows))
    if labels and None in labels:
        raise DataError(f"Parquet file '{shown}': row {labels.index(None)} has no label (column '{label_column}')")
    if labels and len(labels) != len(rows):
        raise DataError(f"Parquet file '{shown}': {len(labels)} labels for {len(rows)} rows (some files lack column "
                        f"'{label_column}')")
    if biggest > LARGE_GROUP:
        warnings.warn(f"Parquet file '{shown}' has row groups of up to {biggest} rows: an episode reads every row "
                      f"group it draws from, so write it with groups of about 1,000 rows (pyarrow: "
                      f"row_group_size=1000) for fast episodes", stacklevel=3)
    infos = loc.fs.get_file_info(files)
    images = ParquetImages(Path(loc.path).name, tuple(files), tuple(f"{i.size}:{i.mtime_ns}" for i in infos
                                                      if i.type == pafs.FileType.File),
                           rows, loc.fs, size, image_column, mixed_sizes)
    class_tuple = class_list(labels, classes, f"Parquet file '{shown}'") if labels else tuple(classes or ())
    ids = [images.row_name(i) for i in range(len(rows))]
    if lazy:
        index = {c: i for i, c in enumerate(class_tuple)}
        return ImageSet(name=stem, images=images, classes=class_tuple, domain=stem,
                        labels=np.array([index[c] for c in labels] if labels else np.full(len(rows), -1), np.int64),
                        splits=np.full(len(rows), "all", dtype=object), ids=np.asarray(ids, dtype=object))
    try:
        decoded = images.dataset(np.full(len(rows), -1), ids).map_batches(
            images.reader(), batch_format="pandas", batch_size=None).to_pandas()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Parquet file '{shown}' could not be read: {str(exc).splitlines()[0]}") from exc
    decoded = decoded.sort_values("row").reset_index(drop=True)
    _raise_bad(decoded, "path", f"images in '{shown}'")
    _check_sizes(decoded, "path", f"the images in '{shown}'", mixed_sizes)
    return build_set(stem, stem, decoded["image"].tolist(), labels, class_tuple, ids)
