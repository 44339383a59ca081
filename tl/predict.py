"""Batch inference with an exported model, on Ray Data: an image folder, a CSV manifest, a Parquet file
of encoded images, or a split of the embedded suite (``mnistm:test``).

The driver holds a folder's or manifest's listing (ids, paths, labels), never an image: Ray Data
tasks read and decode the files (or a Parquet input's row groups), recording an error per row
rather than failing the whole dataset on one corrupt file (docs/architecture.md, "Ray in this project"); the model runs in
``map_batches`` with a callable class over an ``ActorPoolStrategy`` (fractional CPUs per actor; one
GPU per actor when the cluster has GPUs), and ``write_parquet`` writes the table's parts, which the
driver joins in input order into one Parquet file and one CSV, a part at a time. The model travels
to the actors through the object store, so they need no access to the model folder. Every input
row gets one output row: the predicted class and per-class probabilities, or the reason it could
not be read. Rule: a run that predicts at least one image succeeds (the unreadable ones are listed
by path); a run that predicts none is an error.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tl.data.decode import ReadDecode, listing_dataset
from tl.errors import ConfigError, DataError
from tl.runtime import assigned_threads, data_progress
from tl.storage import Location, check_writable, is_uri

SPLITS = ("adapt", "test", "train", "val", "heldout", "all")
MAX_LISTED = 20


@dataclass(frozen=True)
class PredictConfig:
    """``actors``: size of the actor pool (0: one per GPU when the cluster has GPUs, else 1);
    ``cpus_per_actor``: a fraction leaves CPUs for the read and decode tasks around the pool;
    ``use_gpu``: None = when the cluster has GPUs; ``threads_per_actor``: torch threads of each (0: one
    per CPU Ray assigned it, at least one); ``image_column``/``id_column``/``label_column``:
    columns of a Parquet file (the id column defaults to ``id`` when there is one) or CSV manifest."""

    actors: int = 0
    cpus_per_actor: float = 0.5
    batch_size: int = 128
    use_gpu: bool | None = None
    threads_per_actor: int = 0
    image_column: str = "image"
    id_column: str | None = None
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.actors < 0 or self.cpus_per_actor <= 0 or self.batch_size < 1:
            raise ConfigError("config keys 'actors' (>= 0), 'cpus_per_actor' (> 0) and 'batch_size' (>= 1) are out of range")


class Predictor:
    """Ray Data actor: builds the model once from the object store, then scores batches. Rows that
    failed to decode pass through with their error and no prediction. ``trained`` marks each row
    whose image is one the model trained on (1), not (0), or unknown (-1: the model records no
    training images, or the row failed), by the digests in ``model.json`` (``tl.model_file.image_digest``)."""

    def __init__(self, blob: list, threads: int = 0):
        import ray
        import torch
        from safetensors.torch import load as load_bytes

        from tl.model_file import model_from_parts, training_digests

        if threads:
            torch.set_num_threads(threads)
        else:  # one per CPU Ray assigned this actor, on its node
            assigned_threads()
        manifest, weights = ray.get(blob[0])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model_from_parts(manifest, load_bytes(weights), "model").to(self.device).eval()
        self.n = len(manifest["classes"])
        self.seen = training_digests(manifest)

    def __call__(self, batch: dict) -> dict:
        import torch

        from tl.model_file import image_digest

        images = batch.pop("image")
        n = len(images)
        errors = np.asarray(batch.pop("error"), dtype=object) if "error" in batch else np.full(n, "", dtype=object)
        good = np.flatnonzero(errors == "")
        trained = np.full(n, -1, dtype=np.int8)
        if self.seen is not None:
            trained[good] = [image_digest(images[i]) in self.seen for i in good]
        probs = np.full((n, self.n), np.nan, dtype=np.float32)
        pred = np.full(n, -1, dtype=np.int64)
        if len(good):
            x = torch.from_numpy(np.require(np.stack([images[i] for i in good]), np.float32, ["C"])).to(self.device)
            with torch.inference_mode():
                scores = self.model(x)
                probs[good] = self.model.probabilities(scores).cpu().numpy()
                pred[good] = scores.argmax(1).cpu().numpy()
        return {**batch, "predicted_index": pred, "probabilities": probs, "error": errors, "trained": trained}


def parse_embedded(spec: str):
    """``mnistm:test``, ``optdigits:novel:test``, ``mnistm`` (every split) -> an ImageSet."""
    from tl.data import load_embedded

    name, _, split = spec.rpartition(":")
    if name and split in SPLITS:
        data = load_embedded(name)
        return data if split == "all" else data.split(split)
    return load_embedded(spec)


def _file_rows(source: str, cfg: PredictConfig, classes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Rows (id, path, label, error) of an image folder or a CSV manifest, local or at a URI (paths on
    its filesystem); notes on skipped files. One listing finds a folder's files."""
    import pyarrow.fs as pafs

    from tl.data.sources import is_image_name, list_folder

    loc = Location.of(source)
    notes: list[str] = []
    if loc.is_dir():
        # symbolic links to folders checked: a loop, or a link into another class folder, is an error
        files = [Location(loc.fs, i.path, loc.scheme, loc.query) for i in sorted(list_folder(loc), key=lambda i: i.path)
                 if i.type == pafs.FileType.File]
        files = [f for f in files if not any(s.startswith(".") for s in loc.relative(f).split("/"))]
        images = [f for f in files if is_image_name(f.name)]
        others = [f for f in files if not is_image_name(f.name)]
        if others:
            notes.append(f"skipped {len(others)} file(s) without an image suffix, e.g. {loc.relative(others[0])}")
        rel = [loc.relative(f) for f in images]
        rows = pd.DataFrame({"id": rel, "path": [f.path for f in images],
                             "label": [r.split("/")[0] if "/" in r else None for r in rel], "error": ""})
    else:
        try:
            table = pd.read_csv(io.BytesIO(loc.read_bytes()), dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"CSV manifest '{source}' cannot be read: {exc}") from exc
        if "path" not in table.columns:
            raise DataError(f"CSV manifest '{source}' has no column 'path' (columns: {list(table.columns)})")
        base = loc.parent
        paths = [os.path.normpath(q) if q.startswith("/") else (base / q).path for q in table["path"]]
        id_col = cfg.id_column or ("id" if "id" in table.columns else "path")
        if id_col not in table.columns:
            raise DataError(f"CSV manifest '{source}' has no column '{id_col}' (config key 'id_column')")
        labels = table[cfg.label_column].tolist() if cfg.label_column in table.columns else [None] * len(table)
        found = {i.path for i in loc.fs.get_file_info(paths) if i.type == pafs.FileType.File} if paths else set()
        rows = pd.DataFrame({"id": table[id_col].tolist(), "path": paths, "label": labels,
                             "error": ["" if q in found else "FileNotFoundError: the file does not exist" for q in paths]})
    rows["label"] = [lab if lab in classes else None for lab in rows["label"]]
    return rows, notes


class _ReadGroups:
    """Ray Data batch function over a Parquet input's row groups (file, group, first row): the image
    bytes, id and label columns of each group, with the input's row numbers."""

    def __init__(self, fs, keep: dict[str, str], name: str):
        self.fs, self.keep, self.name = fs, keep, name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import pyarrow.parquet as pq

        parts = []
        for file, group, first in zip(batch["file"], batch["group"], batch["first"]):
            with self.fs.open_input_file(file) as f:
                df = pq.ParquetFile(f).read_row_group(int(group), columns=list(self.keep)).to_pandas()
            df = df.rename(columns=self.keep)
            df["row"] = np.arange(int(first), int(first) + len(df))
            if "id" not in df:
                df["id"] = [f"{self.name}#row{i}" for i in df["row"]]
            parts.append(df)
        return pd.concat(parts, ignore_index=True)


class _Rows:
    """Ray Data batch function after the model: the output table's columns (row, id, path, label,
    predicted, confidence, prob_<class>, error), one row per input row."""

    def __init__(self, classes: list[str]):
        self.classes = list(classes)

    def __call__(self, batch: dict) -> pd.DataFrame:
        idx, probs = np.asarray(batch["predicted_index"]), np.asarray(batch["probabilities"], dtype=np.float32)
        n, ok = len(idx), idx >= 0
        names = np.array(self.classes + [None], dtype=object)

        def text(values):
            return pd.array([None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                            dtype="string")

        out = pd.DataFrame({"row": np.asarray(batch["row"], dtype=np.int64), "id": text(batch["id"]),
                            "path": text(batch["path"] if "path" in batch else [None] * n),
                            "label": text(batch["label"] if "label" in batch else [None] * n),
                            "predicted": text(names[np.where(ok, idx, len(self.classes))]),
                            "confidence": np.where(ok, np.nan_to_num(probs).max(1, initial=0.0), np.nan).astype(np.float32)})
        for j, c in enumerate(self.classes):
            out[f"prob_{c}"] = probs[:, j]
        out["error"] = text(batch["error"])
        out["trained"] = np.asarray(batch["trained"], dtype=np.int8)  # counted by _write, not an output column
        return out


def _dataset(source: str, cfg: PredictConfig, size: tuple[int, int], classes: list[str]):
    """(Ray Dataset of every input row decoded, with its input row number and id; notes). The driver
    holds a folder's or manifest's listing, never an image."""
    import ray.data

    from tl.data.decode import _Decode

    loc = Location.of(source)
    p = Path(loc.name)  # for the suffix: a URI's query (endpoint options) is not part of it
    if p.suffix.lower() != ".parquet" and (p.suffix.lower() == ".csv" or loc.is_dir()):
        if not loc.exists():
            raise DataError(f"input '{source}' does not exist")
        rows, notes = _file_rows(source, cfg, classes)
        if rows.empty:
            raise DataError(f"input '{source}' holds no image files")
        rows.insert(0, "row", np.arange(len(rows)))
        return listing_dataset(rows).map_batches(ReadDecode(size, loc.fs), batch_format="pandas", batch_size=64), notes
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if not loc.exists():
            raise DataError(f"input '{source}' does not exist")
        try:
            files = [loc.path] if loc.is_file() else sorted(pq.ParquetDataset(loc.path, filesystem=loc.fs).files)
            metas = []
            for f in files:
                with loc.fs.open_input_file(f) as fh:  # the footer only
                    metas.append(pq.ParquetFile(fh).metadata)
        except Exception as exc:
            raise DataError(f"Parquet file '{source}' is not readable Parquet: {exc}") from exc
        names = metas[0].schema.to_arrow_schema().names if metas else []
        if cfg.image_column not in names:
            raise DataError(f"Parquet file '{source}' has no column '{cfg.image_column}' (columns: {names}; config key "
                            f"'image_column')")
        id_col = cfg.id_column or ("id" if "id" in names else None)
        if id_col and id_col not in names:
            raise DataError(f"Parquet file '{source}' has no column '{id_col}' (config key 'id_column')")
        keep = {cfg.image_column: "bytes", **({id_col: "id"} if id_col else {}),
                **({cfg.label_column: "label"} if cfg.label_column in names else {})}
        groups, first = [], 0
        for f, meta in zip(files, metas):
            for g in range(meta.num_row_groups):
                groups.append({"file": f, "group": g, "first": first})
                first += meta.row_group(g).num_rows
        if not groups:
            raise DataError(f"Parquet file '{source}' has no rows")
        ds = ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
            _ReadGroups(loc.fs, keep, p.name), batch_format="pandas", batch_size=1)
        return ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64), []
    if loc.exists() or os.sep in source or is_uri(source):
        raise DataError(f"input '{source}' is not an image folder, a .csv manifest or a .parquet file"
                        + ("" if loc.exists() else " (it does not exist)"))
    data = parse_embedded(source)
    names = np.array(list(data.classes), dtype=object)
    ds = data.to_ray(("row", "image", "label", "id")).map_batches(
        lambda b: {**b, "label": names[b["label"]]}, batch_format="numpy")
    return ds, []


def predict(model_dir: "str | Path | Location", source: str, output: "str | Path | Location",
            cfg: PredictConfig = PredictConfig(), log: Callable[[str], None] = print) -> dict:
    """Predict every image of ``source`` with the model in ``model_dir``; write ``predictions.parquet``,
    ``predictions.csv`` and ``summary.json`` to ``output``. Returns the summary (with the failed rows).
    Each of the three may be local or a URI (``s3://…``). Ray Data reads, decodes, scores and writes
    the table's parts; the driver joins the parts into the two files one part at a time."""
    import uuid

    import ray
    import ray.data

    from tl.model_file import MODEL_FILE, load_model

    t0 = time.time()
    model_loc = Location.of(model_dir)
    model_dir = model_loc.fetch()  # a model in a bucket: a local copy (it is small)
    _, classes, manifest = load_model(model_dir)  # checks the folder here, before any actor starts
    size = tuple(manifest.get("decode_size") or manifest["preprocessing"]["size"])
    ds, notes = _dataset(source, cfg, size, classes)  # the input is checked before the output folder is made
    out_loc = Location.of(output)
    check_writable(out_loc, "output")
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus >= 1 if cfg.use_gpu is None else cfg.use_gpu
    actors = cfg.actors or (max(1, int(gpus)) if use_gpu else 1)
    for note in notes:
        log(f"[predict] {note}")
    blob = ray.put((manifest, (Path(model_dir) / MODEL_FILE).read_bytes()))
    log(f"[predict] {source}: scoring with {actors} actor(s), {cfg.cpus_per_actor} CPU"
        f"{' and 1 GPU' if use_gpu else ''} each, batch {cfg.batch_size}")
    ds = ds.map_batches(
        Predictor, fn_constructor_kwargs={"blob": [blob], "threads": cfg.threads_per_actor},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=cfg.batch_size, batch_format="numpy",
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0)
    ds = ds.map_batches(_Rows(classes), batch_format="numpy")
    ds.context.execution_options.preserve_order = True
    data_progress(ds.context)
    parts = out_loc / f".predictions-{uuid.uuid4().hex[:8]}"
    try:
        ds.write_parquet(parts.path, filesystem=parts.fs)
        return _write(parts, classes, manifest, str(model_loc), source, out_loc, t0, log)
    finally:
        parts.delete_dir()


def _training_warning(seen: int, labelled: int, seen_labelled: int, new_labelled: int, new_correct: int) -> str | None:
    """What a prediction says when some of its images are the model's training images (``model.json``
    records their digests): an accuracy on them is how well the model fits what it was trained on,
    not how it does on new images."""
    if not seen:
        return None
    if not seen_labelled:
        return f"{seen} of the predicted images are images the model was trained on"
    share = f"all {labelled}" if seen_labelled == labelled else f"{seen_labelled} of the {labelled}"
    return (f"{share} labelled images are images the model was trained on: the accuracy on them measures how well "
            f"it fits its training images, not how it does on new images"
            + (f"; accuracy on the {new_labelled} labelled images it did not train on: "
               f"{100 * new_correct / new_labelled:.2f}%" if new_labelled else
               "; none is new to it, so this input says nothing of its accuracy on new images"))


def _schema(classes: list[str]):
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("path", pa.string()), ("label", pa.string()), ("predicted", pa.string()),
                      ("confidence", pa.float32()), *[(f"prob_{c}", pa.float32()) for c in classes],
                      ("error", pa.string())])


def _write(parts: Location, classes: list[str], manifest: dict, model: str, source: str, output: Location,
           t0: float, log: Callable[[str], None]) -> dict:
    """Join Ray Data's parts, in input order, into predictions.parquet and predictions.csv (each
    written whole or not at all, one part in memory at a time), then summary.json."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from tl.model_file import training_digests

    schema = _schema(classes)
    files = [f for f in parts.files() if f.name.endswith(".parquet")]
    firsts = [pc.min(pq.read_table(f.path, columns=["row"], filesystem=f.fs).column("row")).as_py() for f in files]
    ordered = [f for first, f in sorted(zip(firsts, files), key=lambda x: -1 if x[0] is None else x[0])]
    images = predicted = labelled = correct = 0
    seen = seen_labelled = new_labelled = new_correct = 0  # the model's own training images, and the others
    failed: list[dict] = []
    with (output / "predictions.parquet").writer() as pq_out, (output / "predictions.csv").writer() as csv_out:
        pq_writer, csv_writer = pq.ParquetWriter(pq_out, schema), pacsv.CSVWriter(csv_out, schema)
        for f in ordered:
            whole = pq.read_table(f.path, filesystem=f.fs).sort_by("row")
            table = whole.select(schema.names).cast(schema)
            pq_writer.write_table(table)
            csv_writer.write_table(table)
            part = table.select(["id", "path", "label", "predicted", "error"]).to_pandas()
            part["trained"] = whole.column("trained").to_numpy()
            ok = part["predicted"].notna()
            images, predicted = images + len(part), predicted + int(ok.sum())
            lab = part[ok & part["label"].notna()]
            labelled, correct = labelled + len(lab), correct + int((lab["label"] == lab["predicted"]).sum())
            seen += int((ok & (part["trained"] == 1)).sum())
            seen_labelled += int((lab["trained"] == 1).sum())
            new = lab[lab["trained"] != 1]
            new_labelled, new_correct = new_labelled + len(new), new_correct + int((new["label"] == new["predicted"]).sum())
            failed += [{"id": r.id, "path": None if pd.isna(r.path) else r.path, "error": r.error}
                       for r in part[~ok].itertuples()]
        pq_writer.close()
        csv_writer.close()
    seconds = time.time() - t0
    accuracy = correct / labelled if labelled else None
    known = training_digests(manifest) is not None
    warning = _training_warning(seen, labelled, seen_labelled, new_labelled, new_correct) if known else None
    summary: dict[str, Any] = {
        "model": model, "input": source, "images": images, "predicted": predicted, "failed": failed,
        "accuracy": accuracy, "labelled": labelled, "classes": classes,
        "model_accuracy": (manifest.get("evaluation") or {}).get("accuracy"),
        # the model's own training images among these (None: the model does not record them)
        "training_images": seen if known else None, "labelled_training_images": seen_labelled if known else None,
        "labelled_new_images": new_labelled if known else None,
        "accuracy_new_images": new_correct / new_labelled if known and new_labelled else None,
        "warning": warning, "seconds": round(seconds, 2),
    }
    (output / "summary.json").write_bytes(json.dumps(summary, indent=2).encode())
    acc = f"; accuracy on {labelled} labelled images: {100 * accuracy:.2f}%" if accuracy is not None else ""
    if accuracy is not None and seen_labelled:
        acc += (f" ({'all' if seen_labelled == labelled else seen_labelled} of them the model's own training images"
                + (f"; on the {new_labelled} others: {100 * new_correct / new_labelled:.2f}%)" if new_labelled else ")"))
    log(f"[predict] {predicted} of {images} images predicted in {seconds:.1f} s{acc}; "
        f"{output / 'predictions.parquet'}")
    if warning:
        log(f"[predict] WARNING: {warning}")
    if failed:
        lines = [f"  {r['path'] or r['id']}: {r['error']}" for r in failed[:MAX_LISTED]]
        more = f"\n  ... and {len(failed) - MAX_LISTED} more (summary.json lists them all)" if len(failed) > MAX_LISTED else ""
        msg = f"{len(failed)} image(s) could not be read:\n" + "\n".join(lines) + more
        if predicted == 0:
            raise DataError(f"no image of '{source}' could be predicted; " + msg)
        summary["failed_message"] = msg
    return summary
