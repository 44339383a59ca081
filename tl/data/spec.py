"""One data spec for every workflow: where a dataset is named, any of these may stand.

- an embedded name: ``mnist``, ``optdigits``, ``mnistm`` (``:base``/``:novel`` for class halves);
- a path or URI (``/data/pets``, ``s3://bucket/pets``, ``gs://…``, any pyarrow filesystem): a folder
  with one subfolder per class, a ``.csv`` manifest (``path,label``), a ``.parquet`` file or folder
  (image bytes + label), or IDX files (MNIST's and Fashion-MNIST's format: an images file or a folder
  of them, ``tl.data.idx``); the kind comes from the suffix (``path``), or is named (``folder``,
  ``csv``, ``parquet``, ``idx``);
- a mapping with one of those and the options: ``name`` (its label in tables; default the last path
  component), ``size`` (default the backbone's input), ``classes`` (their order; a label outside them
  is an error), ``split``, ``seed`` and ``mixed_sizes``.

``split`` names the parts a workflow reads: ``none`` (one part, ``all``), ``halves`` (``adapt`` and
``test``, stratified by class), or fractions by name (``{train: 0.9, val: 0.1}``, stratified). Unset,
each workflow takes the rule it needs (``default_split``): a comparison ``none``, a search and a
fine-tuning or adaptation target ``halves``, a pretraining or adaptation source ``train``/``val``.

The same spelling works on every command line (``--set target=s3://bucket/pets``) and in every
config file. A string equal to an embedded name is the embedded set: write ``./mnist`` for a folder
of that name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from tl.data.imageset import ImageSet
from tl.errors import ConfigError, DataError

SPLIT_RULES = ("none", "halves")
KINDS = ("folder", "csv", "parquet", "idx")
#: the rule for a labelled source a model is trained on (pretraining, an adaptation source)
TRAIN_VAL = {"train": 0.9, "val": 0.1}


@dataclass(frozen=True)
class DataSpec:
    """A user's dataset and how to read it (the module docstring lists the fields)."""

    path: str | None = None
    folder: str | None = None
    csv: str | None = None
    parquet: str | None = None
    idx: str | None = None
    name: str | None = None
    size: tuple[int, int] | None = None
    classes: tuple[str, ...] | None = None
    split: str | dict[str, float] | None = None
    seed: int = 0
    mixed_sizes: str = "error"

    def check(self, key: str) -> None:
        """Errors name the config key the spec came from."""
        from tl.data.decode import MIXED_SIZES

        given = [k for k in ("path", *KINDS) if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"config key '{key}': give exactly one of path, folder, csv, parquet or idx "
                              f"(got {given or 'none'})")
        if isinstance(self.split, str) and self.split not in SPLIT_RULES:
            raise ConfigError(f"config key '{key}.split': '{self.split}' is not one of {', '.join(SPLIT_RULES)} "
                              f"or a mapping of split names to fractions")
        if isinstance(self.split, dict):
            bad = {k: v for k, v in self.split.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                   or v <= 0}
            if bad or not self.split or abs(sum(self.split.values()) - 1) > 1e-6:
                raise ConfigError(f"config key '{key}.split': fractions must be positive numbers that add up to 1, "
                                  f"got {self.split}")
        if self.mixed_sizes not in MIXED_SIZES:
            raise ConfigError(f"config key '{key}.mixed_sizes': '{self.mixed_sizes}' is not one of "
                              f"{', '.join(MIXED_SIZES)}")

    @property
    def where(self) -> str:
        """The path or URI as given."""
        return str(self.path or self.folder or self.csv or self.parquet or self.idx)

    def kind(self) -> str:
        """``folder``, ``csv``, ``parquet`` or ``idx``: named, or from the path's suffix (a folder of
        ``.parquet`` files is Parquet, an IDX images file or a folder holding one is IDX; a URI's query
        is not its suffix)."""
        for k in KINDS:
            if getattr(self, k):
                return k
        from tl.storage import Location

        loc = Location.of(self.path)
        suffix = os.path.splitext(loc.name)[1].lower()
        if suffix == ".csv":
            return "csv"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        from tl.data.idx import is_idx

        if is_idx(loc):
            return "idx"
        if loc.is_local and loc.is_dir():
            names = [p.name for p in loc.iterdir()]
            if names and all(n.endswith(".parquet") or n.startswith((".", "_")) for n in names):
                return "parquet"
        return "folder"

    def label(self) -> str:
        """Its name in tables and cell keys: ``name``, or the last component of its path."""
        if self.name:
            return self.name
        from tl.storage import Location

        stem = os.path.splitext(Location.of(self.where).name)[0]
        return stem or "data"

    def with_defaults(self, size: tuple[int, int], split: str | dict[str, float]) -> "DataSpec":
        """The spec with a workflow's defaults filled in (the backbone's input size, its split rule)."""
        return replace(self, size=tuple(self.size or size), split=self.split if self.split is not None else split)

    def identity(self) -> dict[str, Any]:
        """What changes the images read: part of cache and cell keys. The fields of the former
        target-only spec keep their old spelling, so finished cells keep their keys."""
        out = {k: v for k, v in asdict(self).items() if k not in ("path", "name", "mixed_sizes")}
        out["size"] = list(self.size) if self.size else None
        out["classes"] = list(self.classes) if self.classes else None
        if self.path:
            out["path"] = self.path
        if self.mixed_sizes != "error":
            out["mixed_sizes"] = self.mixed_sizes
        if self.idx is None:  # a field added later: absent, it leaves the keys of every other spec as they were
            out.pop("idx")
        return out


def is_embedded(value: str) -> bool:
    from tl.data.suite import EMBEDDED

    return "/" not in value and "://" not in value and value.partition(":")[0] in EMBEDDED


def resolve(value: "str | DataSpec | Mapping | None", key: str, options: Mapping[str, DataSpec] | None = None
            ) -> tuple[str, DataSpec | None]:
    """``(name, spec)`` of a data value: an embedded name gives ``(name, None)``; a key of
    ``options`` (a comparison's ``data``) its entry; a path or URI a spec of it."""
    options = options or {}
    if value is None:
        raise ConfigError(f"config key '{key}' is required: an embedded dataset name, or a folder, CSV or Parquet "
                          f"path or URI")
    if isinstance(value, Mapping):  # a config built in code rather than loaded
        from tl.config import from_dict

        value = from_dict(DataSpec, dict(value), key)
    if isinstance(value, DataSpec):
        value.check(key)
        return value.label(), value
    if value in options:
        return value, options[value]
    if is_embedded(value):
        return value, None
    if "/" in value or "\\" in value or os.path.splitext(value)[1].lower() in (".csv", ".parquet", ".pq") \
            or os.path.exists(value):
        spec = DataSpec(path=value)
        return spec.label(), spec
    from tl.data.suite import EMBEDDED

    raise ConfigError(f"config key '{key}': '{value}' is neither an embedded dataset ({', '.join(EMBEDDED)}), nor a "
                      f"path or URI of a folder, .csv or .parquet (write ./{value} for a folder here)"
                      + (f", nor a key of 'data' ({', '.join(options)})" if options else ""))


def stratified_fractions(labels: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Split marks by ``fractions``, within each class: a seeded shuffle cut at the cumulative
    fractions (so every split holds about its share of every class)."""
    names = list(fractions)
    cuts = np.cumsum([fractions[n] for n in names])
    marks = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        ends = np.round(cuts * len(idx)).astype(int)
        start = 0
        for n, end in zip(names, ends):
            marks[idx[start:end]] = n
            start = end
    return marks


def load_data(name: str, spec: DataSpec | None, size: tuple[int, int] | None = None,
              default_split: str | dict[str, float] = "none", classes: tuple[str, ...] | None = None,
              unlabelled: bool = False, lazy: bool = False) -> ImageSet:
    """The whole dataset, its rows marked with their split: an embedded set with its own splits, or
    the user's data read through Ray Data and split by its rule (``default_split`` when unset).
    ``classes`` (a source's) fixes the label order; ``unlabelled`` allows a folder without classes;
    ``lazy``: a user's images stay in their files or Parquet rows (``ImageSet.lazy``), only listed here.
    A labelled dataset that brings its own classes (no ``classes`` given, not ``unlabelled``) must have
    images of two classes at least (``check_classes``)."""
    if spec is None:
        from tl.data.suite import load_embedded

        return load_embedded(name)
    spec = spec.with_defaults(tuple(size or (28, 28)), default_split)
    if classes is not None and spec.classes is None:
        spec = replace(spec, classes=tuple(classes))
    blob = json.dumps({**asdict(spec), "kind": spec.kind()}, sort_keys=True)
    full = _load(blob, unlabelled, lazy)
    if classes is None and not unlabelled:
        check_classes(full, spec)
    out = full.subset(np.arange(len(full)), name=name)
    return out


KIND_NAMES = {"folder": "image folder", "csv": "CSV manifest", "parquet": "Parquet file", "idx": "IDX data"}


def check_classes(data: ImageSet, spec: DataSpec) -> None:
    """A dataset to classify has images of two classes at least: a one-class folder would pass every
    other check and fail in the middle of a run ("1-way episodes need between 2 and 1 classes"), or
    export a model that can only answer its one class. The error names the data and its class."""
    present = [c for c, n in data.class_counts().items() if n]
    if len(present) >= 2 or (data.labels < 0).all():
        return
    kind = spec.kind()
    what = f"{KIND_NAMES[kind]} '{spec.where}'"
    if not present:
        raise DataError(f"{what} has no labelled image: at least two classes are needed")
    has = (f"one class subfolder with images, '{present[0]}'" if kind == "folder"
           else f"images of one class only, '{present[0]}'")
    hint = ("put each class's images in its own subfolder, two subfolders or more" if kind == "folder"
            else "label images of two classes or more")
    raise DataError(f"{what} has {has}: at least two classes are needed to classify ({hint})")


def check_listing(name: str, spec: DataSpec | None, key: str, size: tuple[int, int] | None = None,
                  default_split: str | dict[str, float] = "none") -> "ImageSet | str | None":
    """What ``--check`` can say about a user's data without running anything: the data listed (a
    folder's files, a manifest's rows, a Parquet file's labels; no image decoded, no Ray), its classes
    (two at least) and its split rule checked; the listed set is returned. A path that is not here
    (data that lives on a cluster) or a URI (a bucket is listed when the run starts) is not listed:
    the note saying so is returned instead. An embedded name gives None."""
    if spec is None:
        return None
    from tl.storage import Location, is_uri

    if is_uri(spec.where):
        return f"data '{key}' ({spec.where}) is in a bucket: listed when the run starts, not by --check"
    if not Location.of(spec.where).exists():
        return f"data '{key}' ({spec.where}) is not on this machine: not checked here"
    return load_data(name, spec, size, default_split, lazy=True)


@lru_cache(maxsize=8)
def _load(blob: str, unlabelled: bool, lazy: bool = False) -> ImageSet:
    from tl.data.sources import load_source
    from tl.data.suite import stratified_halves

    s = json.loads(blob)
    kind = s["kind"]
    full = load_source(**{kind: s["path"] or s[kind]}, size=tuple(s["size"]), classes=s["classes"],
                       mixed_sizes=s["mixed_sizes"], unlabelled=unlabelled, lazy=lazy)
    split = s["split"]
    if split == "halves":
        _enough(full, 2, "halves", s)
        full.splits = stratified_halves(full.labels, s["seed"])
    elif isinstance(split, dict):
        _enough(full, len(split), str(split), s)
        full.splits = stratified_fractions(full.labels, split, s["seed"])
    return full


def _enough(full: ImageSet, parts: int, rule: str, s: dict) -> None:
    counts = np.bincount(full.labels[full.labels >= 0]) if (full.labels >= 0).any() else np.array([len(full)])
    small = [full.classes[c] if full.classes else "(unlabelled)" for c, n in enumerate(counts) if 0 < n < parts]
    if small:
        raise DataError(f"data '{s['path'] or s['folder'] or s['csv'] or s['parquet'] or s['idx']}': class '{small[0]}' has fewer "
                        f"images than the {parts} parts of split {rule}")


def part(data: ImageSet, split: str, spec: DataSpec | None, key: str) -> ImageSet:
    """One split of a dataset, or an error that says how the user's split rule names its parts."""
    if not (data.splits == split).any():
        has = sorted(set(data.splits))
        hint = "" if spec is None else (f": the data spec's split rule makes {has}; give '{key}.split' "
                                        f"(none, halves, or fractions such as {{{split}: 0.8, other: 0.2}})")
        raise DataError(f"dataset '{data.name}' has no split '{split}' (has: {has}){hint}")
    return data.split(split)


def load_target(name: str, source: DataSpec | None, test_split: str = "test",
                val_split: str = "adapt", size: tuple[int, int] | None = None, lazy: bool = False
                ) -> dict[str, ImageSet | None]:
    """A comparison's or an export's target: ``{"test": ImageSet, "val": ImageSet | None}``; ``val``
    is None for a user's ``split: none`` (every image a test image: small data). ``lazy``: a user's
    folder, manifest or Parquet stays files (a comparison's episodes decode only their own images)."""
    full = load_data(name, source, size, "none", lazy=lazy)
    if source is not None and not (full.splits == test_split).any() and (full.splits == "all").all():
        return {"test": full, "val": None}
    return {"test": part(full, test_split, source, f"data.{name}"), "val": part(full, val_split, source, f"data.{name}")}


def check_target(parts: dict[str, ImageSet | None], name: str, max_shots: int) -> None:
    """Every class of the target has enough images for the largest shot count (one query at least)."""
    for split, data in parts.items():
        if data is None:
            continue
        for cls, n in data.class_counts().items():
            if n < max_shots + 1:
                raise DataError(f"target '{name}' ({split} images): class '{cls}' has {n} images, fewer than "
                                f"shots + one query = {max_shots} + 1")


def check_files_of(parts: dict[str, ImageSet | None]) -> None:
    """The files of every part held as files (``lazy``: a target's halves, a run's sets, a source)
    decode and share one size: one pass of Ray Data per part (``tl.data.sources.check_files``), no
    pixel back in the driver, before anything trains; every bad file of all the parts is listed in
    one error (not one split at a time). An in-memory part was checked as it loaded."""
    from tl.data.sources import check_files

    check_files(*[part for part in parts.values() if part is not None and part.lazy])
