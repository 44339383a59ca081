"""IDX files: the format MNIST and Fashion-MNIST are published in (LeCun et al., "The MNIST database of
handwritten digits"; Xiao et al. 2017, "Fashion-MNIST"), as Debian's ``dataset-fashion-mnist`` installs
them: ``<prefix>-images-idx3-ubyte[.gz]`` (N x H x W unsigned bytes) beside
``<prefix>-labels-idx1-ubyte[.gz]`` (N labels).

A data spec's ``idx`` (or a ``path`` that is such a file, or a folder of them) names either one images
file, read with its labels file, or a folder whose every pair is read (``train`` and ``t10k`` of the
canonical release, in name order). Labels are integers; their class names are ``classes`` in label
order when given (Fashion-MNIST's ``T-shirt/top``, ``Trouser``, ...), else the numbers themselves.
The images are small and few enough to be held in memory, as the embedded sets are.
"""

from __future__ import annotations

import gzip
import re
import struct
from typing import Sequence

import numpy as np

from tl.data.imageset import ImageSet
from tl.errors import DataError
from tl.storage import Location

#: Fashion-MNIST's class names in label order (Xiao et al. 2017), for a data spec's ``classes``
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
#: the header's type byte -> the element type (big-endian, as the format says)
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")


def is_idx(loc: Location) -> bool:
    """An IDX images file, or a folder holding one."""
    if IMAGES.match(loc.name):
        return True
    return loc.is_local and loc.is_dir() and any(IMAGES.match(p.name) for p in loc.iterdir())


def read_idx(loc: "Location | str") -> np.ndarray:
    """One IDX file (gzipped when its name ends in ``.gz``) as an array of the shape its header says;
    a file that is not IDX, or holds more or fewer bytes than its header says, is an error naming it."""
    loc = Location.of(loc)
    try:
        raw = loc.read_bytes()
    except (OSError, FileNotFoundError) as exc:
        raise DataError(f"IDX file '{loc}' cannot be read: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":  # gzip (a reader that decompresses by the name's suffix has done it already)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"IDX file '{loc}' is not gzip data: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise DataError(f"'{loc}' is not an IDX file: it must start with two zero bytes, a type byte "
                        f"({', '.join(f'0x{t:02X}' for t in IDX_TYPES)}) and the number of dimensions")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"IDX file '{loc}' ends inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != want:
        raise DataError(f"IDX file '{loc}': its header says {' x '.join(map(str, dims))} "
                        f"{dtype.name} values ({want} bytes), the file holds {len(raw) - head}")
    return np.frombuffer(raw, dtype, offset=head).reshape(dims)


def idx_pairs(where: str) -> list[tuple[Location, Location]]:
    """(images, labels) files: the one images file ``where`` names, or every pair in the folder."""
    loc = Location.of(where)
    if IMAGES.match(loc.name):
        images = [loc]
    elif loc.exists() and loc.is_dir():
        images = sorted((p for p in loc.iterdir() if IMAGES.match(p.name)), key=lambda p: p.name)
        if not images:
            raise DataError(f"IDX folder '{loc}' holds no '<prefix>-images-idx3-ubyte[.gz]' file")
    else:
        raise DataError(f"IDX data '{loc}' is neither an images file ('<prefix>-images-idx3-ubyte[.gz]') nor a "
                        f"folder of them")
    out = []
    for img in images:
        m = IMAGES.match(img.name)
        stem = f"{m['prefix']}-labels{img.name[len(m['prefix']) + 7]}idx1-ubyte"
        found = [img.parent / (stem + gz) for gz in ((m["gz"] or ""), ("" if m["gz"] else ".gz"))]
        labels = next((f for f in found if f.exists()), None)
        if labels is None:
            raise DataError(f"IDX images '{img}' has no labels file beside it ('{found[0].name}')")
        out.append((img, labels))
    return out


def load_idx(where: str, size: tuple[int, int] | None = None, classes: Sequence[str] | None = None,
             name: str | None = None) -> ImageSet:
    """The images and labels of ``where`` (``idx_pairs``) as one ImageSet at float32 in [0, 1], grey
    repeated to 3 channels (as the embedded digits), resized to ``size`` when it differs (bilinear,
    antialiased). Rows are marked ``all``: the data spec's ``split`` rule cuts them."""
    import torch
    import torch.nn.functional as F

    parts, labels, ids = [], [], []
    for img_loc, lab_loc in idx_pairs(where):
        images, labs = read_idx(img_loc), read_idx(lab_loc)
        if images.ndim != 3 or labs.ndim != 1:
            raise DataError(f"IDX images '{img_loc}' must be N x H x W and its labels '{lab_loc}' N values; got "
                            f"{images.shape} and {labs.shape}")
        if len(images) != len(labs):
            raise DataError(f"IDX images '{img_loc}' hold {len(images)} images, its labels '{lab_loc}' {len(labs)}")
        if parts and images.shape[1:] != parts[0].shape[1:]:
            raise DataError(f"IDX images '{img_loc}' are {images.shape[1]}x{images.shape[2]}, the first file's "
                            f"{parts[0].shape[1]}x{parts[0].shape[2]}")
        parts.append(images)
        labels.append(labs.astype(np.int64))
        ids += [f"{img_loc.name}:{i}" for i in range(len(images))]
    images = np.concatenate(parts)
    y = np.concatenate(labels)
    if (y < 0).any():
        raise DataError(f"IDX labels of '{where}' must be 0 or more; found {int(y.min())}")
    values = np.unique(y)
    if classes is not None:
        names = tuple(classes)
        if values.max() >= len(names):
            raise DataError(f"IDX labels of '{where}' go up to {int(values.max())}, but 'classes' names only "
                            f"{len(names)} (one name per label value, in label order)")
    else:
        names = tuple(str(v) for v in range(int(values.max()) + 1))
    if images.dtype != np.uint8:
        raise DataError(f"IDX images of '{where}' are {images.dtype}: unsigned bytes (type 0x08) are expected")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    if size is not None and tuple(size) != tuple(images.shape[1:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1).contiguous().numpy()
    label = name or Location.of(where).name.split("-images")[0] or "idx"
    return ImageSet(label, x, y, names, label, np.full(len(y), "all", dtype=object), np.asarray(ids, dtype=object))
