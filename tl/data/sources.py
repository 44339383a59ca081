"""User data sources through Ray Data: an image folder, a Parquet file of image bytes, a CSV manifest.

Each becomes the one ImageSet schema. Images are read as bytes (``read_binary_files``) and decoded in
a function that records a per-row error instead of failing the whole dataset, so one corrupt file
stops the load with the list of bad files, by name (DESIGN section 5). Every image is decoded to what
a viewer shows (``decode_image``: EXIF orientation, 16-bit scaled, transparency over white, first
frame) as RGB and resized to ``size``. Folders, manifests and Parquet files may be local or at a URI.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from tl.data.imageset import ImageSet
from tl.errors import DataError
from tl.storage import Location, is_uri

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_LISTED = 10


def decode_image(data: bytes, size: tuple[int, int], shape: list | None = None, uint8: bool = False) -> np.ndarray:
    """Bytes of any common image format -> float32 3 x H x W in [0, 1], as an image viewer shows the
    file: the camera's EXIF orientation applied, 16-bit and float images scaled (not clipped) to
    8 bits, transparency composited over white, the first frame of an animation, CMYK and palettes
    converted to RGB; then resized to ``size``. ``shape``, when given, receives the size the viewer
    shows (width, height) before the resize. ``uint8``: the 0..255 bytes instead (a quarter of the
    memory, for images that stream through Ray Data)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        if shape is not None:
            shape[:] = rgb.size
        if rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
        if uint8:
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
        return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def _to_rgb(img):
    """One PIL image in any mode -> mode RGB, without clipping deep images or blackening transparency."""
    from PIL import Image

    # 16-bit grey (PNG, TIFF) holds 0..65535, a float image is taken to hold 0..1: both scaled to 0..255
    scale = {"I;16": 1 / 257, "I;16L": 1 / 257, "I;16B": 1 / 257, "I;16N": 1 / 257, "I": 1 / 257, "F": 255.0}
    if img.mode in scale:
        a = np.asarray(img, dtype=np.float64) * scale[img.mode]
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class _Decode:
    """Ray Data batch function: decode the ``bytes`` column, one error string per row, and the
    file's own size (``shape``, ``WxH``) for the mixed-size rule."""

    def __init__(self, size: tuple[int, int], uint8: bool = False, images: bool = True):
        self.size = tuple(size)
        self.uint8 = uint8
        self.images = images  # False: only the checks' columns come back (a scan of the files)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images, errors, shapes = [], [], []
        blank = np.zeros((3, *self.size), dtype=np.uint8 if self.uint8 else np.float32)
        for data in batch["bytes"]:
            shape: list = []
            try:
                images.append(decode_image(data, self.size, shape, self.uint8))
                errors.append("")
            except Exception as exc:  # any decoder failure is that file's error, reported by name
                images.append(blank)
                errors.append(f"{type(exc).__name__}: {exc}")
            shapes.append("x".join(map(str, shape)))
        out = batch.drop(columns=["bytes"])
        if self.images:
            out["image"] = images
        out["error"] = errors
        out["shape"] = shapes
        return out


#: input rows per Ray Data block of a listed folder or manifest (the listing is the driver's; the
#: files are read inside the blocks' tasks)
LISTING_BLOCK = 512


class ReadDecode:
    """Ray Data batch function over listed files (a pandas batch with a ``path`` column): each row's
    file read from ``fs`` inside the task and decoded as a viewer shows it (``decode_image``;
    ``uint8``: the bytes, a quarter of float32's memory). Returns the batch's columns as arrays with
    ``image`` (stacked), ``error`` and ``shape`` (the file's own ``WxH``, for the mixed-size rule).
    A failure is that row's ``error`` (a row listed with an error is not read), or, where
    ``strict``, one error naming the file (a training stream, whose files were checked before)."""

    def __init__(self, size: tuple[int, int], fs, uint8: bool = False, strict: bool = False):
        self.size, self.fs, self.uint8, self.strict = tuple(size), fs, uint8, strict

    def __call__(self, batch: pd.DataFrame) -> dict:
        images = np.zeros((len(batch), 3, *self.size), dtype=np.uint8 if self.uint8 else np.float32)
        errors, shapes = [], []
        listed = batch["error"] if "error" in batch else [""] * len(batch)
        for j, (path, err) in enumerate(zip(batch["path"], listed)):
            shape: list = []
            if not err:
                try:
                    with self.fs.open_input_file(path) as f:
                        images[j] = decode_image(f.readall(), self.size, shape, uint8=self.uint8)
                except Exception as exc:  # any read or decode failure is that file's error
                    err = f"{type(exc).__name__}: {exc}"
            if err and self.strict:
                raise DataError(f"image '{path}' cannot be read: {err}")
            errors.append(err)
            shapes.append("x".join(map(str, shape)))
        out = {c: batch[c].to_numpy() for c in batch.columns if c != "error"}
        out.update(image=images, error=np.array(errors, dtype=object), shape=np.array(shapes, dtype=object))
        return out


def listing_dataset(listing: pd.DataFrame):
    """A listing (one row per file) as a Ray Dataset in blocks of ``LISTING_BLOCK`` rows: the driver
    puts paths, labels and ids in the object store; the blocks' tasks read the files."""
    import ray.data

    return ray.data.from_pandas([listing.iloc[i:i + LISTING_BLOCK] for i in range(0, max(1, len(listing)),
                                                                                    LISTING_BLOCK)])


MIXED_SIZES = ("error", "resize")


def _check_sizes(rows: pd.DataFrame, key: str, what: str, mixed_sizes: str) -> None:
    """Images of different sizes in one set are an error unless the spec says ``mixed_sizes: resize``
    (then each is resized to the backbone's input, as every image is): a folder that mixes sizes is
    often a folder that mixes things, and a silent resize would hide it."""
    if mixed_sizes == "resize" or rows.empty:
        return
    counts = rows["shape"].value_counts()
    if len(counts) > 1:
        common, other = counts.index[0], counts.index[-1]
        first = rows[rows["shape"] == other].iloc[0]
        example = rows[rows["shape"] == common].iloc[0]
        raise DataError(f"{what} have {len(counts)} different sizes: '{first[key]}' is {other} (width x height), "
                        f"'{example[key]}' is {common} ({counts.iloc[0]} images): give the data spec "
                        f"'mixed_sizes: resize' to resize every image to the backbone's input")


def _raise_bad(rows: pd.DataFrame, key: str, what: str) -> None:
    bad = rows[rows["error"] != ""]
    if len(bad):
        lines = [f"  {r[key]}: {r['error']}" for _, r in bad.head(MAX_LISTED).iterrows()]
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        first = bad.iloc[0]
        raise DataError(f"{len(bad)} unreadable {what}, first '{first[key]}':\n" + "\n".join(lines) + more)


def is_image_name(path: str) -> bool:
    """The rule for what counts as an image file: its suffix (torchvision's ``ImageFolder`` rule)."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def path_key(path: str) -> str:
    """One spelling of a file's path for matching Ray Data's ``path`` column back to the input
    (Ray gives local paths without their leading slash, bucket paths as ``bucket/key``)."""
    return os.path.normpath("/" + path.lstrip("/"))


def _decode_files(paths: list[str], size: tuple[int, int], fs=None, images: bool = True) -> pd.DataFrame:
    """Read and decode files with Ray Data (``paths`` on ``fs``, a pyarrow filesystem; local when
    None); returns columns path, image (unless not ``images``: a scan), error, shape (input order)."""
    import ray.data

    try:
        ds = ray.data.read_binary_files(paths, include_paths=True, shuffle=None, filesystem=fs)
        rows = ds.map_batches(_Decode(size, images=images), batch_format="pandas", batch_size=64).to_pandas()
    except Exception as exc:  # a file that vanished or cannot be opened fails the whole read
        raise DataError(f"could not read the {len(paths)} image files (first '{paths[0]}'): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    order = {path_key(p): i for i, p in enumerate(paths)}
    index = [order.get(path_key(p), -1) for p in rows["path"]]
    missing = sorted(set(range(len(paths))) - set(index))
    if missing:
        raise DataError(f"could not read {len(missing)} files, for example '{paths[missing[0]]}'")
    rows["path"] = [paths[i] for i in index]
    return rows.assign(_o=index).sort_values("_o").drop(columns="_o").reset_index(drop=True)


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
        labels=np.array([index[c] for c in label_names] if len(label_names) else np.full(len(ids), -1), dtype=np.int64),
        classes=classes, domain=domain, splits=np.full(len(ids), "all", dtype=object), ids=np.asarray(ids, dtype=object),
    )


@dataclass
class FileIndex:
    """A user's image files as the driver holds them: paths on ``fs``, labels (-1: unlabelled),
    class names and ids, never pixels. ``fingerprint`` hashes the listing's metadata (relative path,
    size, modification time), so a cache keyed on it changes when a file does, without the driver
    reading a byte of any image."""

    name: str
    paths: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    ids: list[str]
    fs: Any
    fingerprint: str
    stamps: list[str] = field(default_factory=list)  # per file "size:mtime_ns", from the listing

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(eq=False)
class FileImages:
    """The images of a set as files on a pyarrow filesystem, decoded (``decode_image``, float32,
    ``size``) only for the rows asked for: what a driver holds of a user's folder in a comparison
    is its paths and each file's listed size and mtime, never its pixels. An episode decodes its
    n_way x (K + Q) images inside the trial that runs it."""

    paths: np.ndarray
    stamps: np.ndarray
    fs: Any
    size: tuple[int, int]
    mixed_sizes: str = "error"

    def __post_init__(self) -> None:
        self.paths = np.asarray(self.paths, dtype=object)
        self.stamps = np.asarray(self.stamps, dtype=object)
        self.size = (int(self.size[0]), int(self.size[1]))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, *self.size)

    def take(self, rows: np.ndarray) -> "FileImages":
        return FileImages(self.paths[rows], self.stamps[rows], self.fs, self.size, self.mixed_sizes)

    def load(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), 3, *self.size), dtype=np.float32)
        for j, i in enumerate(rows):
            path = self.paths[i]
            try:
                with self.fs.open_input_file(path) as f:
                    out[j] = decode_image(f.readall(), self.size)
            except Exception as exc:  # one file's failure, by name
                raise DataError(f"image '{path}' cannot be read: {type(exc).__name__}: {exc}") from exc
        return out

    def to_ray(self, labels: np.ndarray, ids: np.ndarray, columns: Sequence[str]):
        """A Ray Dataset of these files (``columns`` of the ImageSet schema, plus ``row``): the listing
        goes to the object store in blocks of ``LISTING_BLOCK`` rows, and each block's task reads and
        decodes its files to uint8 (``ReadDecode``, strict), so the pixels exist only inside Ray Data,
        block by block, as the dataset streams. Nothing is materialised."""
        listing = pd.DataFrame({"path": self.paths, "label": np.asarray(labels, dtype=np.int64),
                                "id": np.asarray(ids, dtype=object).astype(str), "row": np.arange(len(self.paths))})
        keep = [c for c in columns if c in ("image", "label", "id", "row")]
        return listing_dataset(listing).map_batches(ReadDecode(self.size, self.fs, uint8=True, strict=True),
                                                    batch_format="pandas", batch_size=64).select_columns(keep)

    def fingerprint(self) -> str:
        """The listing's sizes and mtimes with the decode size (the set adds the relative paths)."""
        h = hashlib.sha256(f"{self.size}".encode())
        h.update("\0".join(self.stamps).encode())
        return h.hexdigest()


def lazy_set(name: str, paths: Sequence[str], stamps: Sequence[str], fs, size: tuple[int, int], label_names,
             classes: tuple[str, ...], ids: Sequence[str], mixed_sizes: str) -> ImageSet:
    """An ImageSet whose images are ``FileImages`` (labels, ids and paths in memory)."""
    index = {c: i for i, c in enumerate(classes)}
    return ImageSet(name=name, images=FileImages(paths, stamps, fs, size, mixed_sizes),
                    labels=np.array([index[c] for c in label_names] if len(label_names) else np.full(len(ids), -1),
                                    dtype=np.int64),
                    classes=classes, domain=name, splits=np.full(len(ids), "all", dtype=object),
                    ids=np.asarray(ids, dtype=object))


def files_of(data: ImageSet) -> FileIndex:
    """A lazy set as the file listing that streamed extraction reads (``extract_files``)."""
    im = data.images
    return FileIndex(data.name, list(im.paths), data.labels, data.classes, list(data.ids), im.fs, data.fingerprint(),
                     list(im.stamps))


def check_files(data: ImageSet) -> None:
    """Every file of a lazy set decodes, and its images share one size (unless the spec says
    ``mixed_sizes: resize``): one pass of Ray Data over the files, before any trial; what comes back
    to the driver is one short row per file (path, error, size), no pixel."""
    im = data.images
    rows = _decode_files(list(im.paths), im.size, im.fs, images=False)
    _raise_bad(rows, "path", f"images in '{data.name}'")
    _check_sizes(rows, "path", f"the images in '{data.name}'", im.mixed_sizes)


def _fingerprint(infos, root: str, classes: Sequence[str]) -> str:
    h = hashlib.sha256()
    for info in infos:
        h.update(f"{info.path[len(root):]}\0{info.size}\0{info.mtime_ns}\n".encode())
    h.update("\0".join(classes).encode())
    return h.hexdigest()


def index_image_folder(root: str | Path, classes: Sequence[str] | None = None, unlabelled: bool = False) -> FileIndex:
    """List an image folder (one listing, local or at a URI): one subfolder per class, every file
    in it with an image suffix at any depth one image; other files are skipped with a warning, as
    torchvision's ``ImageFolder`` skips them. A folder with images but no class subfolders is
    unlabelled: allowed where ``unlabelled`` (labels -1), an error naming the folder elsewhere."""
    import pyarrow.fs as pafs

    loc = Location.of(root)
    kind = loc.kind()
    if kind == pafs.FileType.NotFound:
        raise DataError(f"image folder '{root}' does not exist")
    if kind != pafs.FileType.Directory:
        raise DataError(f"image folder '{root}' is not a folder")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    by_class: dict[str, list] = {}
    loose: list = []
    for info in infos:
        rel = info.path[len(loc.path):].strip("/").split("/")
        if any(part.startswith(".") for part in rel):
            continue
        if info.type == pafs.FileType.Directory and len(rel) == 1:
            by_class.setdefault(rel[0], [])
        elif info.type == pafs.FileType.File and len(rel) > 1:
            by_class.setdefault(rel[0], []).append(info)
        elif info.type == pafs.FileType.File and is_image_name(info.path):
            loose.append(info)
    if not by_class and loose:
        if not unlabelled:
            raise DataError(f"image folder '{root}' holds {len(loose)} images but no class subfolders, so they have "
                            f"no labels, and labels are needed here: put each class's images in a subfolder named "
                            f"after the class")
        files = sorted(loose, key=lambda i: i.path)
        class_tuple, labels = tuple(classes or ()), np.full(len(files), -1, dtype=np.int64)
    else:
        files, class_tuple, labels = _class_files(root, loc, by_class, classes)
    return FileIndex(loc.name, [i.path for i in files], labels, class_tuple,
                     [i.path[len(loc.path):].strip("/") for i in files], loc.fs, _fingerprint(files, loc.path, class_tuple),
                     [f"{i.size}:{i.mtime_ns}" for i in files])


def _class_files(root, loc: Location, by_class: dict[str, list], classes: Sequence[str] | None):
    """The image files of the class folders in order, their class list and label indices."""
    if not by_class:
        raise DataError(f"image folder '{root}' has no class subfolders")
    files, names, skipped = [], [], []
    for name in sorted(by_class, key=_natural):
        if not by_class[name]:
            raise DataError(f"class folder '{loc / name}' is empty")
        images = sorted((i for i in by_class[name] if is_image_name(i.path)), key=lambda i: i.path)
        skipped += [i.path for i in by_class[name] if not is_image_name(i.path)]
        if not images:
            raise DataError(f"class folder '{loc / name}' has no image files (only {len(by_class[name])} other "
                            f"file(s), for example '{by_class[name][0].path.rsplit('/', 1)[-1]}')")
        files += images
        names += [name] * len(images)
    if skipped:  # the rule of torchvision's ImageFolder: a file without an image suffix is not an image
        warnings.warn(f"image folder '{root}': skipped {len(skipped)} file(s) without an image suffix "
                      f"({', '.join(sorted(IMAGE_SUFFIXES))}), for example '{skipped[0][len(loc.path):].strip('/')}'",
                      stacklevel=4)
    class_tuple = _class_list(names, classes, f"image folder '{root}'")
    index = {c: i for i, c in enumerate(class_tuple)}
    return files, class_tuple, np.array([index[c] for c in names], dtype=np.int64)


def load_image_folder(root: str | Path, size: tuple[int, int], classes: Sequence[str] | None = None,
                      mixed_sizes: str = "error", unlabelled: bool = False, lazy: bool = False) -> ImageSet:
    """The images of an image folder (``index_image_folder``: one subfolder per class, local or at a
    URI), decoded through Ray Data; a file with an image suffix that does not decode is an error
    naming it. ``lazy``: the listing only, decoded per row when asked (``FileImages``; its files are
    checked by ``check_files`` or by the extraction that reads them)."""
    idx = index_image_folder(root, classes, unlabelled)
    names = [idx.classes[c] for c in idx.labels] if (idx.labels >= 0).all() else []
    if lazy:
        return lazy_set(idx.name, idx.paths, idx.stamps, idx.fs, size, names, idx.classes, idx.ids, mixed_sizes)
    rows = _decode_files(idx.paths, size, idx.fs)
    _raise_bad(rows, "path", f"images in '{root}'")
    _check_sizes(rows, "path", f"the images in '{root}'", mixed_sizes)
    return _build(idx.name, idx.name, rows["image"].tolist(), names, idx.classes, idx.ids)


def load_csv_manifest(path: str | Path, size: tuple[int, int], classes: Sequence[str] | None = None,
                      mixed_sizes: str = "error", lazy: bool = False) -> ImageSet:
    """A CSV with columns ``path`` and ``label``; relative paths are relative to the CSV's folder
    (the CSV and its images may be local or at a URI; the images on the CSV's filesystem).
    ``lazy``: paths and labels only, as ``load_image_folder``."""
    loc = Location.of(path)
    if not loc.is_file():
        raise DataError(f"CSV manifest '{path}' does not exist")
    try:
        table = pd.read_csv(io.BytesIO(loc.read_bytes()), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"CSV manifest '{path}' cannot be read: {exc}") from exc
    for col in ("path", "label"):
        if col not in table.columns:
            raise DataError(f"CSV manifest '{path}' has no column '{col}' (columns: {list(table.columns)})")
    if table.empty:
        raise DataError(f"CSV manifest '{path}' lists no images")
    base = loc.parent
    paths = []
    for i, p in enumerate(table["path"]):
        if is_uri(p):
            full = Location.of(p)
        else:
            full = Location(loc.fs, os.path.normpath(p), loc.scheme, loc.query) if p.startswith("/") else base / p
        # one listing per row is cheap here, not on an object store; a lazy manifest lists them all at once below
        if loc.is_local and not lazy and not full.is_file():
            raise DataError(f"CSV manifest '{path}', row {i + 2}: image '{p}' does not exist")
        paths.append(os.path.normpath(full.path) if loc.is_local else full.path)
    labels = table["label"].tolist()
    class_tuple = _class_list(labels, classes, f"CSV manifest '{path}'")
    stem = loc.name.rsplit(".", 1)[0]
    if lazy:
        import pyarrow.fs as pafs

        infos = loc.fs.get_file_info(paths)  # one call: the stamps of the cache key, and missing files
        gone = [i for i, info in enumerate(infos) if info.type != pafs.FileType.File]
        if gone:
            raise DataError(f"CSV manifest '{path}', row {gone[0] + 2}: image '{table['path'].iloc[gone[0]]}' does "
                            f"not exist ({len(gone)} listed images are missing)")
        return lazy_set(stem, paths, [f"{i.size}:{i.mtime_ns}" for i in infos], loc.fs, size, labels, class_tuple,
                        table["path"].tolist(), mixed_sizes)
    rows = _decode_files(paths, size, loc.fs)
    _raise_bad(rows, "path", f"images listed in '{path}'")
    _check_sizes(rows, "path", f"the images listed in '{path}'", mixed_sizes)
    return _build(stem, stem, rows["image"].tolist(), labels, class_tuple, table["path"].tolist())


def load_parquet(
    path: str | Path,
    size: tuple[int, int],
    classes: Sequence[str] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    mixed_sizes: str = "error",
) -> ImageSet:
    """A Parquet file (or folder of files) with encoded image bytes and a label per row."""
    import pyarrow.parquet as pq
    import ray.data

    shown = str(path)
    loc = Location.of(path)
    if not loc.exists():
        raise DataError(f"Parquet file '{path}' does not exist")
    path = Path(loc.path)
    try:
        schema = pq.read_schema(loc.path, filesystem=loc.fs) if loc.is_file() else \
            pq.ParquetDataset(loc.path, filesystem=loc.fs).schema
    except Exception as exc:
        raise DataError(f"Parquet file '{shown}' is not readable Parquet: {exc}") from exc
    for col in (image_column, label_column):
        if col not in schema.names:
            raise DataError(f"Parquet file '{shown}' has no column '{col}' (columns: {schema.names})")
    try:
        ds = ray.data.read_parquet(loc.path, columns=[image_column, label_column], filesystem=loc.fs)
        ds = ds.map_batches(
            lambda b: b.rename(columns={image_column: "bytes", label_column: "label"}), batch_format="pandas"
        )
        rows = ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64).to_pandas()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"Parquet file '{shown}' could not be read: {str(exc).splitlines()[0]}") from exc
    if rows.empty:
        raise DataError(f"Parquet file '{shown}' has no rows")
    rows["row"] = [f"{path.name}#row{i}" for i in range(len(rows))]
    _raise_bad(rows, "row", f"images in '{shown}'")
    _check_sizes(rows, "row", f"the images in '{shown}'", mixed_sizes)
    labels = [str(v) for v in rows["label"]]
    class_tuple = _class_list(labels, classes, f"Parquet file '{shown}'")
    return _build(path.stem, path.stem, rows["image"].tolist(), labels, class_tuple, rows["row"].tolist())


def load_source(
    dataset: str | None = None,
    folder: str | None = None,
    csv: str | None = None,
    parquet: str | None = None,
    size: tuple[int, int] = (28, 28),
    classes: Sequence[str] | None = None,
    mixed_sizes: str = "error",
    unlabelled: bool = False,
    lazy: bool = False,
) -> ImageSet:
    """Exactly one of: an embedded dataset name, an image folder, a CSV manifest or a Parquet file
    (``unlabelled``: a folder without class subfolders is allowed, its labels -1; ``lazy``: a folder's
    or a manifest's images stay files, decoded when rows are asked for; a Parquet file holds its
    images' bytes and is always read whole)."""
    given = {k: v for k, v in (("dataset", dataset), ("folder", folder), ("csv", csv), ("parquet", parquet)) if v}
    if len(given) != 1:
        raise DataError(f"give exactly one data source (dataset, folder, csv or parquet); got {sorted(given) or 'none'}")
    if dataset:
        from tl.data.suite import load_embedded

        return load_embedded(dataset)
    if folder:
        return load_image_folder(folder, size, classes, mixed_sizes, unlabelled, lazy)
    if csv:
        return load_csv_manifest(csv, size, classes, mixed_sizes, lazy)
    return load_parquet(parquet, size, classes, mixed_sizes=mixed_sizes)
