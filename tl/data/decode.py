"""Decoding images inside Ray Data: one image's bytes as a viewer shows them (``decode_image``), a
batch of bytes (``_Decode``, the loads and the file check) or of listed files read in the task
(``ReadDecode``, over ``listing_dataset``: training streams, extraction, prediction). A file that
fails is that row's error, by name, never a failed dataset (docs/architecture.md, "Ray in this project")."""

from __future__ import annotations

import io
import re
from typing import Callable

import numpy as np
import pandas as pd

from tl.errors import DataError

#: bad files listed by name in one error (all of a dataset's splits together); past it, a count
MAX_LISTED = 1000


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


_STREAM = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def why_not_decoded(data: bytes, exc: Exception, unit: str = "file") -> str:
    """A readable reason why ``data`` (a file's bytes) is not an image: ``empty file (0 bytes)``,
    ``not an image: ...`` (no image format recognised), or the decoder's own words (a truncated or
    damaged image), never the in-memory stream PIL names (``<_io.BytesIO object at 0x...>``). The
    caller puts the file's path beside it."""
    from PIL import UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        return f"not an image: the {unit} holds {type(data).__name__}, not bytes"
    if not len(data):
        return f"empty {unit} (0 bytes)"
    if isinstance(exc, UnidentifiedImageError):
        return (f"not an image: no image format recognised in its {len(data):,} bytes (they start with "
                f"{bytes(data[:12])!r})")
    text = _STREAM.sub(f"the {unit}", str(exc)).strip()
    return f"a damaged image, it cannot be decoded: {type(exc).__name__}" + (f": {text}" if text else "")


def _decode_row(read: Callable[[], bytes], size: tuple[int, int], uint8: bool,
                unit: str = "file") -> tuple[np.ndarray | None, str, str]:
    """One file read (``read``) and decoded: ``(image, "", "WxH")``, or ``(None, error, "")`` when the
    read or the decoder fails (that file's error, reported by name by the caller: the read's own
    error, or ``why_not_decoded``)."""
    shape: list = []
    try:
        data = read()
    except Exception as exc:  # a read failure (missing, unreadable, an empty Parquet cell) is that file's error
        return None, f"{type(exc).__name__}: {exc}", ""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)) and not len(data):
            return None, why_not_decoded(data, ValueError(), unit), ""
        return decode_image(data, size, shape, uint8), "", "x".join(map(str, shape))
    except Exception as exc:  # any decoder failure is that file's error
        return None, why_not_decoded(data, exc, unit), ""


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
            image, err, shape = _decode_row(lambda: data, self.size, self.uint8)
            images.append(blank if err else image)
            errors.append(err)
            shapes.append(shape)
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

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_file(path) as f:
            return f.readall()

    def __call__(self, batch: pd.DataFrame) -> dict:
        images = np.zeros((len(batch), 3, *self.size), dtype=np.uint8 if self.uint8 else np.float32)
        errors, shapes = [], []
        listed = batch["error"] if "error" in batch else [""] * len(batch)
        for j, (path, err) in enumerate(zip(batch["path"], listed)):
            shape = ""
            if not err:
                image, err, shape = _decode_row(lambda: self._read(path), self.size, self.uint8)
                if not err:
                    images[j] = image
            if err and self.strict:
                raise DataError(f"image '{path}' cannot be read: {err}")
            errors.append(err)
            shapes.append(shape)
        out = {c: batch[c].to_numpy() for c in batch.columns if c != "error"}
        out.update(image=images, error=np.array(errors, dtype=object), shape=np.array(shapes, dtype=object))
        return out


def listing_dataset(listing: pd.DataFrame):
    """A listing (one row per file) as a Ray Dataset in blocks of about ``LISTING_BLOCK`` rows: the
    driver puts paths, labels and ids in the object store; the blocks' tasks read the files.
    ``from_items`` computes the blocks' metadata in the driver, where ``from_pandas`` runs a Ray
    task per block and waits for them: 2.4 s on 2 cores for 10,000 files when no worker process
    was warm, before the extraction could start."""
    import ray.data

    blocks = max(1, -(-len(listing) // LISTING_BLOCK))
    return ray.data.from_items(listing.to_dict("records"), override_num_blocks=blocks)


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
    """One error listing every bad file of ``rows`` (up to ``MAX_LISTED``), each with its path and
    reason, so that they are all fixed in one round."""
    bad = rows[rows["error"] != ""]
    if len(bad):
        lines = [f"  {r[key]}: {r['error']}" for _, r in bad.head(MAX_LISTED).iterrows()]
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        first = bad.iloc[0]
        raise DataError(f"{len(bad)} unreadable {what}, first '{first[key]}':\n" + "\n".join(lines) + more)
