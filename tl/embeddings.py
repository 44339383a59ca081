"""Embedding extraction with Ray Data, cached by content.

The backbone runs in ``map_batches``: for a set of up to ``TASK_MAX_ROWS`` images on CPUs as tasks
whose worker processes keep it built between blocks and extractions (the Parquet write fused into
them), otherwise on an actor pool (one GPU per actor on GPUs). The output is Parquet under
``<cache>/embeddings/<key>/``; the key hashes the backbone name, a digest of its weights, the stage
read, the preprocessing and the dataset's fingerprint, so anything that changes the embeddings
changes the key. ``manifest.json`` is written last: a folder without it is not a cache and is
rebuilt. The cache root may be a local path or a URI that pyarrow
filesystems understand (``s3://``, ``gs://``, ``hdfs://``), so every node of a cluster sees it.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tl.data import ImageSet
from tl.errors import DataError
from tl.models import make_backbone, weights_digest
from tl.models.embedder import Embedder, FileEmbedder, embed_batch
from tl.runtime import cluster_gpus, data_progress
from tl.storage import Location

if TYPE_CHECKING:
    from tl.data.sources import FileIndex

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EmbedConfig:
    """How to extract: which backbone, weights and stage; how big the batches (an array's; files are
    read, decoded and embedded a listing block of ``LISTING_BLOCK`` files at a time), and how many
    run at once: ``actors`` (CPU tasks, an actor pool for a large set; GPU actors when ``use_gpu``;
    None: as many as Ray Data fits on the cluster's CPUs) of ``cpus_per_actor`` CPUs and
    ``threads_per_actor`` torch threads (0: one per CPU Ray assigned the task or actor)."""

    backbone: str = "digits_cnn"
    weights: str | None = None
    stage: int | None = None
    input_size: int | None = None
    batch_size: int = 256
    actors: int | None = 1
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0
    use_gpu: bool = False

    @staticmethod
    def on_cluster(**fields) -> "EmbedConfig":
        """``fields`` with what the running cluster offers: one Ray Data GPU actor per GPU where it
        has GPUs (extraction is the big axis); on CPUs, Ray Data's own choice of how many tasks (or
        actors, for a large set) run at once, as many as the cluster's CPUs hold."""
        gpus = int(cluster_gpus())
        return EmbedConfig(**fields, use_gpu=gpus > 0, actors=gpus if gpus > 0 else None)


@dataclass
class Embeddings:
    """Embeddings of an ImageSet, row-aligned with it."""

    key: str
    vectors: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    hit: bool
    path: str
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def cache_key(backbone: str, digest: str, stage: int | None, preprocessing: dict, fingerprint: str) -> str:
    blob = json.dumps({"backbone": backbone, "weights": digest, "stage": stage, "preprocessing": preprocessing,
                       "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _place(cfg: EmbedConfig, fingerprint: str, cache_root: "str | Location"):
    """The backbone, the stage read (None: the last), the preprocessing, the cache key and folder,
    and the weights' digest."""
    model = make_backbone(cfg.backbone, cfg.weights, cfg.input_size)
    stage = cfg.stage if cfg.stage != model.num_stages else None
    pp = model.preprocessing.describe()
    digest = weights_digest(model)
    key = cache_key(cfg.backbone, digest, stage, pp, fingerprint)
    return model, stage, pp, key, Location.of(cache_root) / "embeddings" / key, digest


#: at most this many images are embedded by CPU tasks; more by an actor pool (``_embed``)
TASK_MAX_ROWS = 50_000
#: an extraction of this many images says when it starts (a shorter one prints one line when done)
ANNOUNCE_ROWS = 10_000


def _embed(ds, cfg: EmbedConfig, stage: int | None, digest: str, batch_size: int, batch_format: str, rows: int,
           decode=None):
    """``ds`` (``rows`` images) mapped through the backbone by Ray Data. On CPUs, up to
    ``TASK_MAX_ROWS`` images: tasks (``embed_batch``), at most ``cfg.actors`` at a time, in worker
    processes that keep the backbone built for the next block and the next extraction (an actor
    pool starts fresh processes, each importing torch, every time); ``_write`` fuses the Parquet
    write into them. More images, or GPUs: an actor pool (``Embedder``, ``FileEmbedder`` where
    ``decode`` reads files; one GPU per actor), whose start is paid once and which keeps several
    blocks in flight per actor, where a task pool leaves each process idle between its tasks.
    Measured on 2 cores, 2026-12-05 (digits_cnn, 64x64 PNGs; an experiment beside
    ``python -m benchmarks.files``, whose table has the committed figures): 10,000 files, an actor
    pool 13.0-14.5 s the first time in a Ray session and 10.5-11.6 s again, fused tasks 11.8-13.8 s
    and 7.4-8.1 s (the plain loop 6.7-7.8 s); 100,000 files, actors 72.8 s and 72.0 s, fused tasks
    78.0 s and 74.5 s (the loop 75.2 s). The actors' fixed start (about 3.5 s) equals the tasks' idle
    share (about 9 %) near 40 seconds of work, 50,000 of these images."""
    import ray.data

    build = dict(backbone=cfg.backbone, weights=cfg.weights, stage=stage, input_size=cfg.input_size,
                 threads=cfg.threads_per_actor)
    if _on_actors(cfg, rows):
        cls, kwargs = (Embedder, build) if decode is None else (FileEmbedder, dict(build, decode=decode))
        # no size: Ray Data grows the pool as far as the cluster's resources let it
        pool = ray.data.ActorPoolStrategy(size=cfg.actors) if cfg.actors else ray.data.ActorPoolStrategy(min_size=1)
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, compute=pool,
                              batch_size=batch_size, batch_format=batch_format, num_cpus=cfg.cpus_per_actor,
                              num_gpus=1 if cfg.use_gpu else 0)
    return ds.map_batches(embed_batch, fn_kwargs=dict(build, digest=digest, decode=decode),
                          compute=ray.data.TaskPoolStrategy(size=cfg.actors), batch_size=batch_size,
                          batch_format=batch_format, num_cpus=cfg.cpus_per_actor)


def _on_actors(cfg: EmbedConfig, rows: int) -> bool:
    """Whether ``_embed`` maps ``rows`` images on an actor pool (else CPU tasks)."""
    return cfg.use_gpu or rows > TASK_MAX_ROWS


def _at_once(cfg: EmbedConfig) -> str:
    return "as many at a time as Ray Data fits" if cfg.actors is None else f"{cfg.actors} at a time"


def _write(ds, cfg: EmbedConfig, rows: int, path: str, fs: pafs.FileSystem):
    """``ds`` (``_embed``'s, of ``rows`` images) written as Parquet under ``path``; returns ``ds``,
    whose ``stats()`` name the operators that ran. On tasks the write asks for what the embedding
    tasks ask for (their CPUs and concurrency), which is Ray Data's condition for fusing two task
    operators: one task reads, decodes, embeds and writes a block, and no worker process starts for
    the writes alone."""
    data_progress(ds.context)  # bars on a terminal; in a log file tl's own lines say it
    same = {} if _on_actors(cfg, rows) else dict(concurrency=cfg.actors,
                                                  ray_remote_args={"num_cpus": cfg.cpus_per_actor})
    ds.write_parquet(path, filesystem=fs, **same)
    return ds


def extract(data: ImageSet, cfg: EmbedConfig, cache_root: "str | Location", log: Callable[[str], None] = print,
            load: bool = True) -> Embeddings:
    """Embeddings of ``data`` from the cache, or extracted with Ray Data and cached (a lazy set, held
    as files or Parquet rows, streams from them: ``extract_stream``; ``load``: False leaves its
    vectors in the cache, for a job that only fills it)."""
    if data.lazy:
        return extract_stream(data.name, data.fingerprint(), data.images, data.labels, data.ids, cfg, cache_root, log,
                              load)
    t0 = time.time()
    model, stage, pp, key, where, digest = _place(cfg, data.fingerprint(), cache_root)
    fs, folder = where.fs, where.path
    cached = _read(fs, folder, len(data))
    if cached is not None:
        vectors, ids, labels, info = cached
        log(f"[embed] cache hit {key[:12]}: {len(ids)} x {vectors.shape[1]} from {where}")
        return Embeddings(key, vectors, ids, labels, True, str(where), time.time() - t0, info)
    if fs.get_file_info(folder).type != pafs.FileType.NotFound:
        log(f"[embed] {where} has no manifest (an interrupted write): rebuilding it")
        fs.delete_dir(folder)
    if len(data) >= ANNOUNCE_ROWS:  # long work says it starts; a short one has its one line when done
        log(f"[embed] extracting {len(data)} images of '{data.name}' with {cfg.backbone} (stage {cfg.stage or 'last'}) "
            f"{_at_once(cfg)}, batch {cfg.batch_size}")
    ds = _embed(data.to_ray(("row", "image", "label", "id")), cfg, stage, digest, cfg.batch_size, "numpy", len(data))
    part = f"data-{uuid.uuid4().hex[:8]}"
    _write(ds, cfg, len(data), f"{folder}/{part}", fs)
    info = {"key": key, "data": part, "backbone": cfg.backbone, "weights": cfg.weights, "stage": cfg.stage,
            "preprocessing": pp, "dataset": data.name, "fingerprint": data.fingerprint(), "rows": len(data),
            "dim": model.stage_dim(stage), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with fs.open_output_stream(f"{folder}/{MANIFEST}") as out:
        out.write(json.dumps(info, indent=2).encode())
    vectors, ids, labels, _ = _read(fs, folder, len(data))
    secs = time.time() - t0
    log(f"[embed] extracted {len(ids)} x {vectors.shape[1]} embeddings of '{data.name}' with {cfg.backbone} (stage "
        f"{cfg.stage or 'last'}) in {secs:.1f} s -> {where}")
    return Embeddings(key, vectors, ids, labels, False, str(where), secs, info)


def extract_files(index: "FileIndex", size: tuple[int, int], cfg: EmbedConfig, cache_root: "str | Location",
                  log: Callable[[str], None] = print, load: bool = True, mixed_sizes: str = "error") -> Embeddings:
    """Embeddings of a listed folder's image files (``index``), streamed from storage to the cache
    (``extract_stream``); the key hashes the listing's metadata (``index.fingerprint``)."""
    from tl.data.sources import FileImages

    images = FileImages(index.paths, index.stamps, index.fs, size, mixed_sizes)
    return extract_stream(index.name, index.fingerprint, images, index.labels, index.ids, cfg, cache_root, log, load)


def extract_stream(name: str, fingerprint: str, images, labels: np.ndarray, ids, cfg: EmbedConfig,
                   cache_root: "str | Location", log: Callable[[str], None] = print, load: bool = True) -> Embeddings:
    """Embeddings of images held as files or Parquet rows (``images``: ``tl.data.sources.FileImages``
    or ``tl.data.parquet.ParquetImages``), streamed by Ray Data from storage to the cache: read,
    decode to uint8, embed (``_embed``), ``write_parquet``. The driver holds the listing and,
    when ``load``, the finished vectors (row-aligned with ``labels`` and ``ids``); never a pixel.
    The key hashes ``fingerprint`` (the listing's metadata) and the decode size. An image that does
    not decode, or images of mixed sizes (unless ``mixed_sizes: resize``), fail the extraction with
    their names, and no cache is committed."""
    import pyarrow.compute as pc

    from tl.data.decode import LISTING_BLOCK, _check_sizes

    t0 = time.time()
    size = images.size
    model, stage, pp, key, where, digest = _place(cfg, f"stream:{fingerprint}:{list(size)}", cache_root)
    fs, folder = where.fs, where.path
    info = _manifest(fs, folder)
    table = None
    if info is None:
        if fs.get_file_info(folder).type != pafs.FileType.NotFound:
            log(f"[embed] {where} has no manifest (an interrupted write): rebuilding it")
            fs.delete_dir(folder)
        log(f"[embed] extracting {len(images)} images of '{name}' with {cfg.backbone} (stage {cfg.stage or 'last'}), "
            f"streamed read -> decode -> embed -> Parquet, {_at_once(cfg)}, blocks of about {LISTING_BLOCK} "
            f"images")
        # the driver's listing goes to the object store in blocks; each task (actor on GPUs) reads,
        # decodes (uint8) and embeds a block's images in one process (read_binary_files and a
        # decoding step before instead: 0.28x the plain loop at 10k files, results/bench/files.md of
        # 2026-12-01; decoding in tasks of their own beside the model's: about 1.5x slower per image)
        ds = _embed(images.dataset(labels, ids), cfg, stage, digest, images.batch_rows, "pandas", len(images),
                    decode=images.reader(uint8=True))
        part = f"data-{uuid.uuid4().hex[:8]}"
        _write(ds, cfg, len(images), f"{folder}/{part}", fs)
        # one read: the checks' columns, and the vectors when they are wanted
        table = pq.read_table(f"{folder}/{part}", columns=["row", "path", "error", "shape"]
                              + (["embedding"] if load else []), filesystem=fs, partitioning=None)
        errors = table.filter(pc.not_equal(table.column("error"), ""))
        try:
            if errors.num_rows:
                first = errors.slice(0, 5).to_pylist()
                raise DataError(f"{errors.num_rows} unreadable images in '{name}', first '{first[0]['path']}':\n"
                                + "\n".join(f"  {r['path']}: {r['error']}" for r in first))
            if table.num_rows != len(images):
                raise DataError(f"the extraction of '{name}' wrote {table.num_rows} rows for {len(images)} images")
            _check_sizes(table.select(["path", "shape"]).to_pandas(), "path", f"the images in '{name}'",
                         images.mixed_sizes)
        except DataError:
            fs.delete_dir(folder)  # nothing that looks like a cache is left behind
            raise
        info = {"key": key, "data": part, "backbone": cfg.backbone, "weights": cfg.weights, "stage": cfg.stage,
                "preprocessing": pp, "dataset": name, "fingerprint": fingerprint, "rows": len(images),
                "size": list(size), "dim": model.stage_dim(stage), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with fs.open_output_stream(f"{folder}/{MANIFEST}") as out:
            out.write(json.dumps(info, indent=2).encode())
        hit = False
        log(f"[embed] wrote {len(images)} x {info['dim']} embeddings of '{name}' to {where} in {time.time() - t0:.1f} s")
    else:
        hit = True
        log(f"[embed] cache hit {key[:12]}: {info['rows']} x {info['dim']} from {where}")
    ids = np.asarray(ids, dtype=object)
    if not load:
        return Embeddings(key, np.zeros((0, info["dim"]), np.float32), ids, labels, hit, str(where), time.time() - t0,
                          info)
    if table is None:
        table = pq.read_table(f"{folder}/{info['data']}", columns=["row", "embedding"], filesystem=fs,
                              partitioning=None)
    vectors = np.empty((len(images), info["dim"]), np.float32)
    vectors[table.column("row").to_numpy()] = _to_matrix(table.column("embedding").combine_chunks())
    return Embeddings(key, vectors, ids, labels, hit, str(where), time.time() - t0, info)


def _manifest(fs: pafs.FileSystem, folder: str) -> dict | None:
    if fs.get_file_info(f"{folder}/{MANIFEST}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
        return json.loads(f.read())


def _read(fs: pafs.FileSystem, folder: str, rows: int):
    """The cached table, or None when there is no complete cache (no manifest, or wrong size)."""
    info = _manifest(fs, folder)
    if info is None:
        return None
    try:
        table = pq.read_table(f"{folder}/{info['data']}", filesystem=fs, partitioning=None)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise DataError(f"embedding cache '{folder}' is damaged ({exc}); delete the folder to rebuild it") from exc
    table = table.sort_by("row")
    if table.num_rows != rows or info.get("rows") != rows:
        raise DataError(f"embedding cache '{folder}' holds {table.num_rows} rows, expected {rows}; delete it to rebuild")
    col = table.column("embedding").combine_chunks()
    vectors = _to_matrix(col)
    return vectors, np.asarray(table.column("id").to_pylist(), dtype=object), table.column("label").to_numpy(), info


def _to_matrix(col) -> np.ndarray:
    if hasattr(col, "to_numpy_ndarray"):
        return np.asarray(col.to_numpy_ndarray(), dtype=np.float32)
    return np.asarray(col.to_pylist(), dtype=np.float32)


#: at most this many pool images estimate target statistics (a seeded sample of a larger pool)
MAX_STATS_IMAGES = 2048


def target_bn_stats(backbone: str, weights: str | None, input_size: int | None, pool: ImageSet,
                    cache_root: "str | Location", log: Callable[[str], None] = print,
                    max_images: int = MAX_STATS_IMAGES) -> str | None:
    """Weights of ``backbone`` whose BatchNorm running statistics are re-estimated on the unlabelled
    images of ``pool`` (AdaBN, Li et al. 2016; ``tl.nn.reestimate_batchnorm``): what a strategy with
    ``bn_stats: target`` embeds with or starts from. Only labels-free pixels are read: at most
    ``max_images`` of them, a seeded sample, decoded once and held during the exact estimate. The file
    is cached under ``<cache>/bn_stats/<key>.safetensors``, keyed by the source weights' digest, the
    input size and the pool's fingerprint, so the embedding cache keyed on these weights is
    content-addressed too. A backbone without BatchNorm gets its own weights back."""
    import os
    import tempfile

    from tl.models import save_weights
    from tl.nn import batchnorm_layers

    model = make_backbone(backbone, weights, input_size)
    if not batchnorm_layers(model):
        log(f"[bn_stats] {backbone} has no BatchNorm layer: target statistics are its own")
        return weights
    rows = pool_rows(pool, max_images)
    blob = json.dumps({"backbone": backbone, "weights": weights_digest(model), "input_size": input_size,
                       "pool": pool.fingerprint(), "rows": len(rows)}, sort_keys=True)
    where = Location.of(cache_root) / "bn_stats" / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"
    if where.is_file():
        log(f"[bn_stats] target statistics of '{pool.name}' from the cache ({where})")
        return str(where)
    t0 = time.time()
    seen = reestimate_on(model, pool, rows)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_weights(model, tmp)
        with open(tmp, "rb") as f:
            where.write_bytes(f.read())
    finally:
        os.unlink(tmp)
    log(f"[bn_stats] BatchNorm statistics of {backbone} re-estimated on {seen} unlabelled images of '{pool.name}' "
        f"in {time.time() - t0:.1f} s -> {where}")
    return str(where)


def fold_bn_stats(backbone: str, weights: str | None, input_size: int | None, pool: ImageSet,
                  cache_root: "str | Location", log: Callable[[str], None] = print) -> dict[int, str | None]:
    """``target_bn_stats`` estimated without each validation fold of ``pool``
    (``tl.data.episodes.query_folds``), ``{fold: weights}``: they score the validation episodes whose
    queries come from that fold, so no query is among the images its statistics came from."""
    from tl.data.episodes import query_folds

    folds = query_folds(pool.labels)
    return {int(f): target_bn_stats(backbone, weights, input_size,
                                    pool.subset(folds != f, name=f"{pool.name} without fold {f}"), cache_root, log)
            for f in np.unique(folds[folds >= 0])}


def pool_rows(pool: ImageSet, max_images: int = MAX_STATS_IMAGES) -> np.ndarray:
    """The rows of an unlabelled pool that estimate its statistics: all, or a seeded sample."""
    rows = np.arange(len(pool))
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(7919).choice(rows, max_images, replace=False))
    return rows


def reestimate_on(model, pool: ImageSet, rows: np.ndarray, batch: int = 256) -> int:
    """Re-estimate ``model``'s BatchNorm statistics on ``pool[rows]`` (``tl.nn.reestimate_batchnorm``,
    which reads the images more than once): decoded once, ``batch`` images at a time, and kept at
    their decoded size (at most ``MAX_STATS_IMAGES`` of them from ``pool_rows``), preprocessed again
    on each pass; returns the number of images seen."""
    import torch

    from tl.nn.batchnorm import ReplayBatches, reestimate_batchnorm

    decoded = [torch.from_numpy(pool.pixels(rows[i:i + batch])) for i in range(0, len(rows), batch)]
    with torch.no_grad():
        return reestimate_batchnorm(model, ReplayBatches(lambda: (model.preprocessing(x) for x in decoded)))
