"""A comparison's or an export's target: an embedded name or a user's ``DataSource``, as the
``test`` images and the ``val`` images (the ``adapt`` half: validation episodes and the unlabelled
pool), loaded once per process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from tl.data.imageset import ImageSet
from tl.errors import ConfigError, DataError


@dataclass(frozen=True)
class DataSource:
    """A user's target data: exactly one of ``folder`` (one subfolder per class), ``csv`` (a manifest
    ``path,label``) or ``parquet`` (image bytes + label), brought to ``size``. ``split: halves`` splits
    it stratified into ``adapt`` (validation episodes) and ``test``; ``split: none`` keeps every image
    for test episodes (small data: no search is possible then, since nothing is left to validate on)."""

    folder: str | None = None
    csv: str | None = None
    parquet: str | None = None
    size: tuple[int, int] = (28, 28)
    classes: tuple[str, ...] | None = None
    split: str = "none"
    seed: int = 0

    def check(self, key: str) -> None:
        if sum(bool(v) for v in (self.folder, self.csv, self.parquet)) != 1:
            raise ConfigError(f"config key '{key}': give exactly one of folder, csv or parquet")
        if self.split not in ("none", "halves"):
            raise ConfigError(f"config key '{key}.split': '{self.split}' is not one of none, halves")


def load_target(name: str, source: DataSource | None, test_split: str = "test",
                val_split: str = "adapt") -> dict[str, ImageSet | None]:
    """``{"test": ImageSet, "val": ImageSet | None}``; ``val`` is None for a user's ``split: none``."""
    return _load(name, json.dumps(asdict(source), sort_keys=True) if source else "", test_split, val_split)


@lru_cache(maxsize=8)
def _load(name: str, source: str, test_split: str, val_split: str) -> dict[str, ImageSet | None]:
    from tl.data.sources import load_source
    from tl.data.suite import load_embedded, stratified_halves

    if not source:
        full = load_embedded(name)
        return {"test": full.split(test_split), "val": full.split(val_split)}
    src = json.loads(source)
    full = load_source(folder=src["folder"], csv=src["csv"], parquet=src["parquet"], size=tuple(src["size"]),
                       classes=src["classes"])
    full.name = name
    if src["split"] == "halves":
        full.splits = stratified_halves(full.labels, src["seed"])
        return {"test": full.split("test"), "val": full.split("adapt")}
    return {"test": full, "val": None}


def check_target(parts: dict[str, ImageSet | None], name: str, max_shots: int) -> None:
    """Every class of the target has enough images for the largest shot count (one query at least)."""
    for split, data in parts.items():
        if data is None:
            continue
        for cls, n in data.class_counts().items():
            if n < max_shots + 1:
                raise DataError(f"target '{name}' ({split} images): class '{cls}' has {n} images, fewer than "
                                f"shots + one query = {max_shots} + 1")
