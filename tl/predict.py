"""Batch inference with an exported model, on Ray Data: an image folder, a CSV manifest, a Parquet file
of encoded images, or a split of the embedded suite (``mnistm:test``).

Files are read as bytes (``read_binary_files``) and decoded by a function that records an error per
row (DESIGN section 5: ``read_images`` would fail the whole dataset on one corrupt file); the model
runs in ``map_batches`` with a callable class over an ``ActorPoolStrategy`` (fractional CPUs per
actor; one GPU per actor when the cluster has GPUs). The model travels to the actors through the
object store, so they need no access to the model folder. Every input row gets one output row: the
predicted class and per-class probabilities, or the reason it could not be read. Rule: a run that
predicts at least one image succeeds (the unreadable ones are listed by path); a run that predicts
none is an error.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tl.data.sources import path_key
from tl.errors import ConfigError, DataError
from tl.storage import Location, check_writable, is_uri

SPLITS = ("adapt", "test", "train", "val", "heldout", "all")
MAX_LISTED = 20


@dataclass(frozen=True)
class PredictConfig:
    """``actors``: size of the actor pool (0: one per GPU when the cluster has GPUs, else 1);
    ``cpus_per_actor``: a fraction leaves CPUs for the read and decode tasks around the pool;
    ``use_gpu``: None = when the cluster has GPUs; ``image_column``/``id_column``/``label_column``:
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
    failed to decode pass through with their error and no prediction."""

    def __init__(self, blob: list, threads: int = 0):
        import ray
        import torch
        from safetensors.torch import load as load_bytes

        from tl.model_file import model_from_parts

        if threads:
            torch.set_num_threads(threads)
        manifest, weights = ray.get(blob[0])
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model_from_parts(manifest, load_bytes(weights), "model").to(self.device).eval()
        self.n = len(manifest["classes"])

    def __call__(self, batch: dict) -> dict:
        import torch

        images = batch.pop("image")
        n = len(images)
        errors = np.asarray(batch.pop("error"), dtype=object) if "error" in batch else np.full(n, "", dtype=object)
        good = np.flatnonzero(errors == "")
        probs = np.full((n, self.n), np.nan, dtype=np.float32)
        pred = np.full(n, -1, dtype=np.int64)
        if len(good):
            x = torch.from_numpy(np.require(np.stack([images[i] for i in good]), np.float32, ["C"])).to(self.device)
            with torch.inference_mode():
                scores = self.model(x)
                probs[good] = self.model.probabilities(scores).cpu().numpy()
                pred[good] = scores.argmax(1).cpu().numpy()
        return {**batch, "predicted_index": pred, "probabilities": probs, "error": errors}


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

    from tl.data.sources import is_image_name

    loc = Location.of(source)
    notes: list[str] = []
    if loc.is_dir():
        files = [f for f in loc.files() if not any(s.startswith(".") for s in loc.relative(f).split("/"))]
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


def _dataset(source: str, cfg: PredictConfig, size: tuple[int, int], classes: list[str]):
    """(Ray Dataset of rows to score, driver-side rows in input order or None, notes)."""
    import ray.data

    from tl.data.sources import _Decode

    loc = Location.of(source)
    p = Path(loc.name)  # for the suffix: a URI's query (endpoint options) is not part of it
    if p.suffix.lower() != ".parquet" and (p.suffix.lower() == ".csv" or loc.is_dir()):
        if not loc.exists():
            raise DataError(f"input '{source}' does not exist")
        rows, notes = _file_rows(source, cfg, classes)
        if rows.empty:
            raise DataError(f"input '{source}' holds no image files")
        readable = sorted(set(rows.loc[rows["error"] == "", "path"]))
        if not readable:
            return None, rows, notes
        ds = ray.data.read_binary_files(readable, include_paths=True, shuffle=None, filesystem=loc.fs)
        return ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64), rows, notes
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if not loc.exists():
            raise DataError(f"input '{source}' does not exist")
        try:
            names = pq.read_schema(loc.path, filesystem=loc.fs).names if loc.is_file() else \
                pq.ParquetDataset(loc.path, filesystem=loc.fs).schema.names
        except Exception as exc:
            raise DataError(f"Parquet file '{source}' is not readable Parquet: {exc}") from exc
        if cfg.image_column not in names:
            raise DataError(f"Parquet file '{source}' has no column '{cfg.image_column}' (columns: {names}; config key "
                            f"'image_column')")
        id_col = cfg.id_column or ("id" if "id" in names else None)
        if id_col and id_col not in names:
            raise DataError(f"Parquet file '{source}' has no column '{id_col}' (config key 'id_column')")
        keep = {cfg.image_column: "bytes", **({id_col: "id"} if id_col else {}),
                **({cfg.label_column: "label"} if cfg.label_column in names else {})}
        ds = ray.data.read_parquet(loc.path, columns=list(keep), filesystem=loc.fs).map_batches(
            lambda b: b.rename(columns=keep), batch_format="pandas")
        return ds.map_batches(_Decode(size), batch_format="pandas", batch_size=64), None, []
    if loc.exists() or os.sep in source or is_uri(source):
        raise DataError(f"input '{source}' is not an image folder, a .csv manifest or a .parquet file"
                        + ("" if loc.exists() else " (it does not exist)"))
    data = parse_embedded(source)
    names = np.array(list(data.classes), dtype=object)
    ds = data.to_ray(("row", "image", "label", "id")).map_batches(
        lambda b: {**b, "label": names[b["label"]]}, batch_format="numpy")
    return ds, None, []


def predict(model_dir: "str | Path | Location", source: str, output: "str | Path | Location",
            cfg: PredictConfig = PredictConfig(), log: Callable[[str], None] = print) -> dict:
    """Predict every image of ``source`` with the model in ``model_dir``; write ``predictions.parquet``,
    ``predictions.csv`` and ``summary.json`` to ``output``. Returns the summary (with the failed rows).
    Each of the three may be local or a URI (``s3://…``)."""
    import ray
    import ray.data

    from tl.model_file import MODEL_FILE, load_model

    t0 = time.time()
    model_loc = Location.of(model_dir)
    model_dir = model_loc.fetch()  # a model in a bucket: a local copy (it is small)
    _, classes, manifest = load_model(model_dir)  # checks the folder here, before any actor starts
    size = tuple(manifest.get("decode_size") or manifest["preprocessing"]["size"])
    ds, rows, notes = _dataset(source, cfg, size, classes)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus >= 1 if cfg.use_gpu is None else cfg.use_gpu
    actors = cfg.actors or (max(1, int(gpus)) if use_gpu else 1)
    for note in notes:
        log(f"[predict] {note}")
    out = pd.DataFrame()
    if ds is not None:
        blob = ray.put((manifest, (Path(model_dir) / MODEL_FILE).read_bytes()))
        log(f"[predict] {source}: scoring with {actors} actor(s), {cfg.cpus_per_actor} CPU"
            f"{' and 1 GPU' if use_gpu else ''} each, batch {cfg.batch_size}")
        ds = ds.map_batches(
            Predictor, fn_constructor_kwargs={"blob": [blob], "threads": cfg.threads_per_actor},
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=cfg.batch_size, batch_format="numpy",
            num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0)
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = sys.stderr.isatty()  # rows done, on a terminal (tl.embeddings)
        out = ds.to_pandas()
    table = _table(out, rows, classes, source)
    return _write(table, classes, manifest, str(model_loc), source, Location.of(output), time.time() - t0, log)


def _table(out: pd.DataFrame, rows: pd.DataFrame | None, classes: list[str], source: str) -> pd.DataFrame:
    """One row per input row, in input order: id, path, label, predicted, confidence, prob_<class>, error."""
    n = len(classes)
    probs = np.stack(out["probabilities"].to_numpy()) if len(out) else np.zeros((0, n), np.float32)
    pred = out["predicted_index"].to_numpy() if len(out) else np.zeros(0, np.int64)
    scored = pd.DataFrame({"predicted_index": pred, "error": out["error"].astype(str).to_numpy() if len(out) else []})
    for j, c in enumerate(classes):
        scored[f"prob_{c}"] = probs[:, j]
    if rows is not None:  # files: join the scored rows back onto the input rows by path
        table = rows.copy()
        read = (table["error"] == "").to_numpy()
        if len(out):
            scored["path"] = [path_key(q) for q in out["path"]]
            hit = scored.drop_duplicates("path").set_index("path").reindex([path_key(q) for q in table["path"]]) \
                .reset_index(drop=True)
        else:
            hit = pd.DataFrame(np.nan, index=range(len(table)), columns=scored.columns)
        for col in hit.columns:
            if col not in ("error", "path"):
                table[col] = hit[col].to_numpy()
        lost = read & hit["predicted_index"].isna().to_numpy() & hit["error"].isna().to_numpy()
        table["error"] = np.where(read, hit["error"].fillna("").to_numpy(), table["error"].to_numpy())
        table.loc[lost, "error"] = "OSError: the file could not be read"
    else:
        table = scored
        if len(out) and "id" in out.columns:
            table.insert(0, "id", out["id"].astype(str).to_numpy())
        else:
            table.insert(0, "id", [f"{Path(source).name}#row{i}" for i in range(len(table))])
        table.insert(1, "path", None)
        table.insert(2, "label", out["label"].astype(str).to_numpy() if len(out) and "label" in out.columns else None)
    idx = table["predicted_index"].fillna(-1).astype(int).to_numpy()
    ok = idx >= 0
    names = np.array(list(classes) + [None], dtype=object)
    table["predicted"] = names[np.where(ok, idx, n)]
    prob_cols = [f"prob_{c}" for c in classes]
    table["confidence"] = np.where(ok, table[prob_cols].to_numpy(dtype=np.float32).max(1, initial=-np.inf),
                                   np.nan).astype(np.float32)
    return table[["id", "path", "label", "predicted", "confidence", *prob_cols, "error"]].reset_index(drop=True)


def _write(table: pd.DataFrame, classes: list[str], manifest: dict, model: str, source: str, output: Location,
           seconds: float, log: Callable[[str], None]) -> dict:
    check_writable(output, "output")
    failed = table[table["predicted"].isna()]
    labelled = table[table["label"].notna() & table["predicted"].notna()]
    accuracy = float((labelled["label"] == labelled["predicted"]).mean()) if len(labelled) else None
    summary: dict[str, Any] = {
        "model": model, "input": source, "images": int(len(table)),
        "predicted": int(len(table) - len(failed)), "failed": [{"id": r.id, "path": r.path, "error": r.error}
                                                                for r in failed.itertuples()],
        "accuracy": accuracy, "labelled": int(len(labelled)), "classes": classes,
        "model_accuracy": (manifest.get("evaluation") or {}).get("accuracy"), "seconds": round(seconds, 2),
    }
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    for name, data in (("predictions.parquet", parquet.getvalue()), ("predictions.csv", table.to_csv(index=False).encode()),
                       ("summary.json", json.dumps(summary, indent=2).encode())):  # each whole or not at all
        (output / name).write_bytes(data)
    acc = f"; accuracy on {len(labelled)} labelled images: {100 * accuracy:.2f}%" if accuracy is not None else ""
    log(f"[predict] {summary['predicted']} of {len(table)} images predicted in {seconds:.1f} s{acc}; "
        f"{output / 'predictions.parquet'}")
    if len(failed):
        lines = [f"  {r.path or r.id}: {r.error}" for r in failed.head(MAX_LISTED).itertuples()]
        more = f"\n  ... and {len(failed) - MAX_LISTED} more (summary.json lists them all)" if len(failed) > MAX_LISTED else ""
        msg = f"{len(failed)} image(s) could not be read:\n" + "\n".join(lines) + more
        if summary["predicted"] == 0:
            raise DataError(f"no image of '{source}' could be predicted; " + msg)
        summary["failed_message"] = msg
    return summary
