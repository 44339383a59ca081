"""One table schema for every data source: image, label, class name, domain, split, id.

Images are float32 in one layout, N x 3 x H x W with values in [0, 1]; the backbone's preprocessing
later states the size and normalisation, so any backbone can take any dataset. They are held either
as one array (the embedded suite, small user data) or as files decoded only when rows are asked for
(``lazy``: a user's folder or CSV manifest, ``tl.data.sources.FileImages``; a Parquet file's rows,
``tl.data.parquet.ParquetImages``), so a driver that
samples episodes or launches Ray Train holds labels and paths, never the pixels of a large set.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from tl.errors import DataError

COLUMNS = ("image", "label", "class_name", "domain", "split", "id")


@dataclass
class ImageSet:
    """A labelled (or unlabelled: label -1) image table; ``images`` an N x 3 x H x W float32 array,
    or a lazy file-backed stand-in (``lazy``) with ``shape``, ``size``, ``mixed_sizes``, ``take(rows)``
    (a lazy subset), ``load(rows)`` (the decoded array), ``fingerprint()`` (from the listing), and
    for Ray Data ``dataset(labels, ids)`` (the listing), ``reader()`` (its batch decoder, taking
    ``batch_rows`` listing rows), ``to_ray`` and ``scan`` (the check's pass)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    domain: str
    splits: np.ndarray
    ids: np.ndarray
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lazy:
            self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.splits = np.asarray(self.splits, dtype=object)
        self.ids = np.asarray(self.ids, dtype=object)
        n = len(self.images)
        if len(self.images.shape) != 4 or self.images.shape[1] != 3:
            raise DataError(f"dataset '{self.name}': images must be N x 3 x H x W, got {self.images.shape}")
        for what, arr in (("labels", self.labels), ("splits", self.splits), ("ids", self.ids)):
            if len(arr) != n:
                raise DataError(f"dataset '{self.name}': {len(arr)} {what} for {n} images")
        bad = self.labels[(self.labels < -1) | (self.labels >= len(self.classes))]
        if len(bad):
            raise DataError(f"dataset '{self.name}': label {int(bad[0])} is not in the class list {list(self.classes)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lazy(self) -> bool:
        """The images are files, decoded when ``pixels`` asks for rows."""
        return not isinstance(self.images, np.ndarray) and hasattr(self.images, "take")

    def pixels(self, index: np.ndarray | Sequence[int]) -> np.ndarray:
        """The float32 images of the given rows (integer index), decoded now when the set is lazy:
        an episode asks for its n_way x (K + Q) images, never for the whole set."""
        idx = np.asarray(index, dtype=np.int64)
        return self.images.load(idx) if self.lazy else self.images[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray | Sequence[int], name: str | None = None) -> "ImageSet":
        """Rows by integer index or boolean mask, keeping classes and domain."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return ImageSet(
            name=name or self.name,
            images=self.images.take(idx) if self.lazy else self.images[idx],
            labels=self.labels[idx],
            classes=self.classes,
            domain=self.domain,
            splits=self.splits[idx],
            ids=self.ids[idx],
        )

    def split(self, split: str) -> "ImageSet":
        """Rows of one split (for example ``adapt`` or ``test``); an unknown split is an error."""
        mask = self.splits == split
        if not mask.any():
            raise DataError(f"dataset '{self.name}' has no split '{split}' (has: {sorted(set(self.splits))})")
        return self.subset(mask, name=f"{self.name}/{split}")

    def with_classes(self, keep: Sequence[int], name: str | None = None) -> "ImageSet":
        """Only rows of the given class indices, relabelled 0..len(keep)-1 (the novel-class split)."""
        keep = list(keep)
        for c in keep:
            if not 0 <= c < len(self.classes):
                raise DataError(f"dataset '{self.name}' has no class index {c}")
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        mask = np.isin(self.labels, keep)
        sub = self.subset(mask, name=name)
        sub.labels = remap[sub.labels]
        sub.classes = tuple(self.classes[c] for c in keep)
        return sub

    def fingerprint(self) -> str:
        """Content digest of images, labels and ids: part of every cache key built on this data."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(str(self.images.shape).encode())
            # a lazy set hashes its files' listing (relative path, size, mtime), not their bytes
            h.update(self.images.fingerprint().encode() if self.lazy else self.images.tobytes())
            h.update(self.labels.tobytes())
            h.update("\0".join(map(str, self.ids)).encode())
            h.update("\0".join(self.classes).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def to_pandas(self) -> pd.DataFrame:
        """The table schema as a DataFrame (image column holds 3 x H x W arrays)."""
        self._in_memory("a DataFrame")
        names = np.array(list(self.classes) + [""], dtype=object)
        return pd.DataFrame(
            {
                "image": list(self.images),
                "label": self.labels,
                "class_name": names[self.labels],
                "domain": self.domain,
                "split": self.splits,
                "id": self.ids,
            }
        )

    def to_arrow(self, columns=COLUMNS, start: int = 0, stop: int | None = None):
        """The table schema as a pyarrow Table; images become a fixed-shape tensor column (no copy
        through Python objects, which is what makes large extractions fast)."""
        import pyarrow as pa
        from ray.data.extensions import ArrowTensorArray

        if self.lazy and "image" in columns:
            raise DataError(f"dataset '{self.name}' is held as files: its images stream through Ray Data "
                            f"(tl.embeddings.extract reads them there), not through a table built in the driver")
        sl = slice(start, stop)
        names = np.array(list(self.classes) + [""], dtype=object)
        make = {
            "image": lambda: ArrowTensorArray.from_numpy(self.images[sl]),
            "label": lambda: pa.array(self.labels[sl]),
            "class_name": lambda: pa.array(names[self.labels[sl]].tolist(), pa.string()),
            "domain": lambda: pa.array([self.domain] * len(self.labels[sl]), pa.string()),
            "split": lambda: pa.array(self.splits[sl].tolist(), pa.string()),
            "id": lambda: pa.array(self.ids[sl].tolist(), pa.string()),
            "row": lambda: pa.array(np.arange(len(self))[sl]),
        }
        return pa.table({c: make[c]() for c in columns})

    def to_ray(self, columns=COLUMNS, block_rows: int = 1024):
        """The table as a Ray Dataset, in blocks of ``block_rows`` so work streams through it. A lazy
        set's images are read and decoded (uint8) inside Ray Data from its files, never here; its
        columns are those of ``columns`` among image, label, id and row."""
        import ray.data

        if self.lazy:
            return self.images.to_ray(self.labels, self.ids, columns)
        blocks = [self.to_arrow(columns, i, i + block_rows) for i in range(0, max(1, len(self)), block_rows)]
        return ray.data.from_arrow(blocks)

    def _in_memory(self, what: str) -> None:
        if self.lazy:
            raise DataError(f"dataset '{self.name}' is held as files, decoded per episode: it cannot become {what} "
                            f"in the driver")

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


def concat(sets: Sequence[ImageSet], name: str) -> ImageSet:
    """Stack image sets that share classes and image shape."""
    first = sets[0]
    for s in sets:
        s._in_memory("a joined set")
    for s in sets[1:]:
        if s.classes != first.classes:
            raise DataError(f"cannot join '{s.name}' and '{first.name}': their class lists differ")
        if s.image_shape != first.image_shape:
            raise DataError(f"cannot join '{s.name}' and '{first.name}': image shapes differ")
    return ImageSet(
        name=name,
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        classes=first.classes,
        domain=first.domain,
        splits=np.concatenate([s.splits for s in sets]),
        ids=np.concatenate([s.ids for s in sets]),
    )


def class_list(found: Sequence[str], classes: Sequence[str] | None, where: str) -> tuple[str, ...]:
    """The classes in natural order ('2' before '10'), or the given list after checking every found label is in it."""
    if classes is None:
        return tuple(sorted(set(found), key=natural_key))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{where}: label '{unknown[0]}' is not in the class list {list(classes)}")
    return tuple(classes)


def natural_key(name: str):
    """Sort key: digit names by value, then other names alphabetically."""
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def build_set(name: str, domain: str, images, label_names: Sequence[str], classes: tuple[str, ...], ids) -> ImageSet:
    """An in-memory ImageSet from decoded images and their class names (one split, 'all')."""
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet(
        name=name, images=np.stack(list(images)) if len(images) else np.zeros((0, 3, 1, 1), np.float32),
        labels=np.array([index[c] for c in label_names] if len(label_names) else np.full(len(ids), -1), dtype=np.int64),
        classes=classes, domain=domain, splits=np.full(len(ids), "all", dtype=object), ids=np.asarray(ids, dtype=object),
    )
