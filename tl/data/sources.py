"""User data sources through Ray Data: an image folder, a CSV manifest (and ``load_source``, which
also takes a Parquet file of image bytes: ``tl.data.parquet``).

Each becomes the one ImageSet schema: listed (``FileIndex``), held as files (``FileImages``, decoded
per row or streamed through Ray Data), or read into memory. Images are read as bytes
(``read_binary_files``) and decoded by ``tl.data.decode``, which records a per-row error instead of
failing the whole dataset, so one corrupt file stops the load with the list of bad files, by name
(docs/architecture.md, "Ray in this project"). Folders, manifests and Parquet files may be local or at a URI.
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

from tl.data.decode import (LISTING_BLOCK, ReadDecode, _check_sizes, _Decode, _raise_bad, decode_image, listing_dataset,
                             why_not_decoded)
from tl.data.imageset import ImageSet, build_set, class_list, natural_key
from tl.errors import DataError
from tl.storage import Location, is_uri

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
    batch_rows = LISTING_BLOCK  # rows of the listing per batch of ``reader`` (one block)

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
                    data = f.readall()
            except Exception as exc:  # one file's failure, by name
                raise DataError(f"image '{path}' cannot be read: {type(exc).__name__}: {exc}") from exc
            try:
                out[j] = decode_image(data, self.size)
            except Exception as exc:
                raise DataError(f"image '{path}' cannot be read: {why_not_decoded(data, exc)}") from exc
        return out

    def dataset(self, labels: np.ndarray, ids: np.ndarray):
        """The listing (path, label, id, row) as a Ray Dataset in blocks of ``LISTING_BLOCK`` rows."""
        return listing_dataset(pd.DataFrame({"path": self.paths, "label": np.asarray(labels, dtype=np.int64),
                                             "id": np.asarray(ids, dtype=object).astype(str),
                                             "row": np.arange(len(self.paths))}))

    def reader(self, uint8: bool = False, strict: bool = False) -> ReadDecode:
        return ReadDecode(self.size, self.fs, uint8, strict)

    def to_ray(self, labels: np.ndarray, ids: np.ndarray, columns: Sequence[str]):
        """A Ray Dataset of these files (``columns`` of the ImageSet schema, plus ``row``): the listing
        goes to the object store in blocks of ``LISTING_BLOCK`` rows, and each block's task reads and
        decodes its files to uint8 (``ReadDecode``, strict), so the pixels exist only inside Ray Data,
        block by block, as the dataset streams. Nothing is materialised."""
        keep = [c for c in columns if c in ("image", "label", "id", "row")]
        return self.dataset(labels, ids).map_batches(self.reader(uint8=True, strict=True), batch_format="pandas",
                                                     batch_size=64).select_columns(keep)

    def scan(self, labels: np.ndarray, ids: np.ndarray) -> pd.DataFrame:
        """One pass of Ray Data over the files: path, error and shape per file, no pixel."""
        return _decode_files(list(self.paths), self.size, self.fs, images=False)

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


def check_files(*sets: ImageSet) -> None:
    """Every image of the lazy sets decodes, and each dataset's share one size (unless its spec says
    ``mixed_sizes: resize``): one pass of Ray Data over each set's files or rows (``scan``), before
    any trial; what comes back to the driver is one short row per image (path, error, size), no
    pixel. The sets are checked together: one error lists every bad file of all of them (a
    dataset's splits, ``name/split``, count as the dataset), so a user fixes them in one round."""
    scans, modes = [], {}
    for data in sets:
        base = data.name.split("/")[0] if "/" in data.name else data.name
        scans.append(data.images.scan(data.labels, data.ids).assign(_set=base))
        modes.setdefault(base, data.images.mixed_sizes)
    if not scans:
        return
    rows = pd.concat(scans, ignore_index=True).drop_duplicates("path")
    names = ", ".join(f"'{n}'" for n in modes)
    _raise_bad(rows, "path", f"images in {names}" + (" (all its splits)" if len(sets) > len(modes) else ""))
    for base, mode in modes.items():
        _check_sizes(rows[rows["_set"] == base], "path", f"the images in '{base}'", mode)


def _fingerprint(infos, root: str, classes: Sequence[str]) -> str:
    h = hashlib.sha256()
    for info in infos:
        h.update(f"{info.path[len(root):]}\0{info.size}\0{info.mtime_ns}\n".encode())
    h.update("\0".join(classes).encode())
    return h.hexdigest()


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it (real paths)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def list_folder(loc: Location) -> list:
    """Every file and folder below ``loc``, at any depth, as pyarrow ``FileInfo`` (path, type, size,
    mtime_ns); names starting with '.' are left out (no caller counts them). A bucket is listed by
    pyarrow. A local folder is walked here, because pyarrow's recursive listing follows every
    symbolic link to a folder: a link in a class folder to the folder above it (a loop) listed the
    tree again at every level, until the path was too long (6 files became 246 images), and a link
    in class folder 'a' to class folder 'b' listed b's images as class 'a'. Here a link to a folder
    is followed when it points elsewhere on the disk, or to a folder inside its own top-level
    (class) folder that is not above it; a link that makes a loop, or that leads into another top-
    level folder of ``loc`` (another class), is an error naming the link and where it points. A
    link whose target is missing is skipped with a warning (as pyarrow skips it)."""
    import pyarrow.fs as pafs

    if not loc.is_local:
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    root = loc.path
    real_root = os.path.realpath(root)
    files: list[str] = []
    folders: list = []
    tops: list[tuple[str, str]] = []  # (real path, name) of each top-level folder (a class folder's classes)
    # (folder, its real path, real paths of the folders walked down to it, its top-level folder's real path)
    stack: list[tuple[str, str, tuple[str, ...], str | None]] = [(root, real_root, (real_root,), None)]
    while stack:
        path, real, above, top = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            raise DataError(f"folder '{path}' cannot be listed: {exc.strerror or exc}") from exc
        later = []
        for e in entries:
            if e.name.startswith("."):
                continue
            child = f"{path}/{e.name}"
            if not e.is_dir():  # through a link; no system call for a plain entry
                files.append(child)
                continue
            link = e.is_symlink()
            child_real = os.path.realpath(child) if link else f"{real}/{e.name}"
            if top is None:
                tops.append((child_real, e.name))
            folders.append(pafs.FileInfo(child, type=pafs.FileType.Directory))
            later.append((child, child_real, link))
        for child, child_real, link in later:
            if link:
                _check_folder_link(loc, child, child_real, above, top, tops, real_root)
            stack.append((child, child_real, above + (child_real,), top if top is not None else child_real))
    infos = loc.fs.get_file_info(files) if files else []  # sizes and mtimes, as pyarrow's own listing has them
    broken = [i.path for i in infos if i.type == pafs.FileType.NotFound]
    if broken:
        warnings.warn(f"folder '{root}': skipped {len(broken)} symbolic link(s) whose target does not exist, for "
                      f"example '{broken[0][len(root):].strip('/')}' -> '{os.readlink(broken[0])}'", stacklevel=3)
    return folders + [i for i in infos if i.type != pafs.FileType.NotFound]


def _check_folder_link(loc: Location, link: str, target: str, above: tuple[str, ...], top: str | None,
                       tops: list[tuple[str, str]], real_root: str) -> None:
    """A symbolic link to a folder, found below ``loc``: an error when following it makes a loop (it
    points to a folder it lies in) or takes images of one top-level (class) folder into another."""
    rel = link[len(loc.path):].strip("/")
    if any(_inside(a, target) for a in above):
        raise DataError(f"folder '{loc}': '{rel}' is a symbolic link to '{target}', a folder that contains the link "
                        f"itself: a loop, which would list the same images again at every level; it is not followed: "
                        f"remove the link")
    inside_root = _inside(target, real_root)
    if top is None:  # a top-level folder: a link into the same folder, or to where another top-level folder is
        twin = next((name for real, name in tops if name != rel and (_inside(target, real) or _inside(real, target))),
                    None)
        if inside_root or twin is not None:
            raise DataError(f"folder '{loc}': '{rel}' is a symbolic link to '{target}'"
                            + (f", where folder '{twin}' is too" if twin else ", inside the same folder")
                            + f": its images would be counted twice, once as '{rel}'; remove the link")
        return
    other = next((name for real, name in tops if real != top and _inside(target, real)), None)
    if other is not None or (inside_root and not _inside(target, top)):
        cls = rel.split("/")[0]
        where = f"folder '{other}'" if other is not None else f"'{target}'"
        raise DataError(f"folder '{loc}': '{rel}' is a symbolic link to {where} of the same folder: its images would "
                        f"be counted as '{cls}' images; it is not followed: remove the link, or copy the images that "
                        f"belong to '{cls}'")


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
    infos = list_folder(loc)  # symbolic links to folders checked (loops, links into another class folder)
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
    for name in sorted(by_class, key=natural_key):
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
    class_tuple = class_list(names, classes, f"image folder '{root}'")
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
    return build_set(idx.name, idx.name, rows["image"].tolist(), names, idx.classes, idx.ids)


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
    class_tuple = class_list(labels, classes, f"CSV manifest '{path}'")
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
    return build_set(stem, stem, rows["image"].tolist(), labels, class_tuple, table["path"].tolist())


def load_source(
    dataset: str | None = None,
    folder: str | None = None,
    csv: str | None = None,
    parquet: str | None = None,
    idx: str | None = None,
    size: tuple[int, int] = (28, 28),
    classes: Sequence[str] | None = None,
    mixed_sizes: str = "error",
    unlabelled: bool = False,
    lazy: bool = False,
) -> ImageSet:
    """Exactly one of: an embedded dataset name, an image folder, a CSV manifest, a Parquet file or IDX
    files (``tl.data.idx``; held in memory) (``unlabelled``: a folder without class subfolders, or a Parquet file without labels, is allowed,
    its labels -1; ``lazy``: the images stay in their files, decoded when rows are asked for)."""
    given = {k: v for k, v in (("dataset", dataset), ("folder", folder), ("csv", csv), ("parquet", parquet),
                                ("idx", idx)) if v}
    if len(given) != 1:
        raise DataError(f"give exactly one data source (dataset, folder, csv, parquet or idx); got "
                        f"{sorted(given) or 'none'}")
    if dataset:
        from tl.data.suite import load_embedded

        return load_embedded(dataset)
    if folder:
        return load_image_folder(folder, size, classes, mixed_sizes, unlabelled, lazy)
    if csv:
        return load_csv_manifest(csv, size, classes, mixed_sizes, lazy)
    if idx:  # small enough to hold: read whole, never lazily
        from tl.data.idx import load_idx

        return load_idx(idx, size, classes)
    from tl.data.parquet import load_parquet

    return load_parquet(parquet, size, classes, mixed_sizes=mixed_sizes, unlabelled=unlabelled, lazy=lazy)
