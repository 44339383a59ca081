"""Embedding cache (Ray Data extraction), feature strategies and the CI arithmetic."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tl.data import load_embedded
from tl.embeddings import MANIFEST, EmbedConfig, cache_key, extract
from tl.evaluate import run_episodes
from tl.report import summarize
from tl.models import build_backbone, save_weights
from tl.strategies import make_strategy, registered

REPO = Path(__file__).resolve().parent.parent


def small(n=64, offset=0):
    d = load_embedded("optdigits").split("test")
    return d.subset(np.arange(offset, offset + n))


def write_folder(data, root: Path) -> None:
    """``data``'s images as PNGs in one folder per class under ``root``."""
    from PIL import Image

    for i, (img, y) in enumerate(zip(data.images, data.labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(root / str(y) / f"{i}.png")


def quiet(_):
    pass


def test_cache_key_changes_with_each_input_and_only_then():
    base = dict(backbone="digits_cnn", digest="w1", stage=None, preprocessing={"size": [28, 28]}, fingerprint="d1")
    k = cache_key(**base)
    assert cache_key(**base) == k
    for field, value in (("backbone", "resnet18"), ("digest", "w2"), ("stage", 2),
                         ("preprocessing", {"size": [32, 32]}), ("fingerprint", "d2")):
        assert cache_key(**{**base, field: value}) != k, field


@pytest.mark.slow
def test_extraction_hits_and_misses(ray_local, tmp_path):
    w1, w2 = tmp_path / "w1.safetensors", tmp_path / "w2.safetensors"
    save_weights(build_backbone("digits_cnn"), w1)
    save_weights(build_backbone("digits_cnn"), w2)
    cache = str(tmp_path / "cache")
    data = small()
    first = extract(data, EmbedConfig(weights=str(w1)), cache, quiet)
    assert not first.hit and first.vectors.shape == (64, 256)
    assert list(first.ids) == list(data.ids) and np.array_equal(first.labels, data.labels)

    written = _mtimes(first.path)
    again = extract(data, EmbedConfig(weights=str(w1)), cache, quiet)
    assert again.hit and again.key == first.key and np.array_equal(again.vectors, first.vectors)
    assert _mtimes(again.path) == written, "a cache hit must run no model and write nothing"

    variants = {
        "weights": (data, EmbedConfig(weights=str(w2))),
        "stage": (data, EmbedConfig(weights=str(w1), stage=2)),
        "preprocessing": (data, EmbedConfig(weights=str(w1), input_size=32)),
        "data": (small(offset=1), EmbedConfig(weights=str(w1))),
    }
    keys = {first.key}
    for what, (d, cfg) in variants.items():
        res = extract(d, cfg, cache, quiet)
        assert not res.hit and res.key not in keys, what
        keys.add(res.key)
    assert extract(data, EmbedConfig(weights=str(w1), stage=2), cache, quiet).vectors.shape == (64, 64)


def _mtimes(folder: str) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_folder_without_manifest_is_rebuilt(ray_local, tmp_path):
    cache = str(tmp_path / "cache")
    w = tmp_path / "w.safetensors"
    save_weights(build_backbone("digits_cnn"), w)
    first = extract(small(32), EmbedConfig(weights=str(w)), cache, quiet)
    os.remove(os.path.join(first.path, MANIFEST))
    again = extract(small(32), EmbedConfig(weights=str(w)), cache, quiet)
    assert not again.hit and again.path == first.path
    assert np.allclose(again.vectors, first.vectors, atol=1e-6)
    assert os.path.exists(os.path.join(again.path, MANIFEST))


@pytest.mark.slow
def test_corrupt_image_stops_extraction_with_its_name(ray_local, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 50 * i, np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    storage = tmp_path / "home"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    out = subprocess.run([sys.executable, "-m", "workflows.embed", "--storage", str(storage),
                          "--set", f"data={root}", "--set", "weights=random"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "bad.png" in out.stderr and "error:" in out.stderr
    assert not list(storage.glob(f"cache/embeddings/*/{MANIFEST}")), "no cache may look complete"


@pytest.mark.slow
def test_image_files_stream_to_the_cache_and_match_the_in_memory_path(ray_local, tmp_path):
    """A folder read -> decoded to uint8 -> embedded -> written by Ray Data gives the embeddings the
    in-memory path gives; the key follows the files' listing (a rewritten file is a new key)."""
    from PIL import Image

    from tl.data import load_image_folder
    from tl.data.sources import index_image_folder
    from tl.embeddings import extract_files

    data = small(30)
    root = tmp_path / "imgs"
    write_folder(data, root)
    cfg = EmbedConfig(weights=None, batch_size=8)
    index = index_image_folder(root)
    streamed = extract_files(index, (28, 28), cfg, tmp_path / "cache", quiet)
    assert not streamed.hit and streamed.vectors.shape == (30, build_backbone("digits_cnn").feature_dim)
    loaded = extract(load_image_folder(root, (28, 28)), cfg, tmp_path / "cache2", quiet)
    assert list(loaded.ids) == list(streamed.ids) and (loaded.labels == streamed.labels).all()
    np.testing.assert_allclose(streamed.vectors, loaded.vectors, rtol=1e-4, atol=1e-5)
    again = extract_files(index_image_folder(root), (28, 28), cfg, tmp_path / "cache", quiet)
    assert again.hit and again.key == streamed.key and np.array_equal(again.vectors, streamed.vectors)
    first = sorted(root.glob("*/*.png"))[0]
    Image.new("RGB", Image.open(first).size, (255, 0, 0)).save(first)
    os.utime(first, (1, 1))
    changed = extract_files(index_image_folder(root), (28, 28), cfg, tmp_path / "cache", quiet, load=False)
    assert not changed.hit and changed.key != streamed.key


@pytest.mark.slow
def test_the_actor_pool_path_gives_the_task_paths_embeddings(ray_local, tmp_path, monkeypatch):
    """A set over ``TASK_MAX_ROWS`` images (and every set on GPUs) runs on an actor pool
    (``FileEmbedder`` over files, ``Embedder`` over arrays): forced here on a small set, both give
    the embeddings the CPU tasks give, row-aligned."""
    import tl.embeddings
    from tl.data.sources import index_image_folder
    from tl.embeddings import extract_files

    data = small(20)
    root = tmp_path / "imgs"
    write_folder(data, root)
    cfg = EmbedConfig(weights=None, batch_size=8)
    on_tasks = extract_files(index_image_folder(root), (28, 28), cfg, tmp_path / "tasks", quiet)
    arrays_on_tasks = extract(data, cfg, tmp_path / "tasks", quiet)
    monkeypatch.setattr(tl.embeddings, "TASK_MAX_ROWS", 0)
    assert tl.embeddings._on_actors(cfg, len(data))
    on_actors = extract_files(index_image_folder(root), (28, 28), cfg, tmp_path / "actors", quiet)
    arrays_on_actors = extract(data, cfg, tmp_path / "actors", quiet)
    assert not on_actors.hit and list(on_actors.ids) == list(on_tasks.ids)
    np.testing.assert_allclose(on_actors.vectors, on_tasks.vectors, rtol=1e-5, atol=1e-6)
    assert not arrays_on_actors.hit and list(arrays_on_actors.ids) == list(arrays_on_tasks.ids)
    np.testing.assert_allclose(arrays_on_actors.vectors, arrays_on_tasks.vectors, rtol=1e-5, atol=1e-6)


def test_parquet_rows_stream_to_the_cache_and_match_the_in_memory_path(ray_local, tmp_path):
    """A Parquet file in row groups of 7: its rows read -> decoded -> embedded inside Ray Data give
    the in-memory path's embeddings, row-aligned; the second call is a cache hit."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from tl.data import load_parquet

    data = small(30)
    cells = []
    for img in data.images:
        buf = io.BytesIO()
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, format="PNG")
        cells.append(buf.getvalue())
    f = tmp_path / "digits.parquet"
    pq.write_table(pa.table({"image": cells, "label": [str(y) for y in data.labels]}), f, row_group_size=7)
    cfg = EmbedConfig(weights=None, batch_size=8)
    lazy = load_parquet(f, (28, 28), lazy=True)
    streamed = extract(lazy.subset(np.arange(29, -1, -1)), cfg, tmp_path / "cache", quiet)
    loaded = extract(load_parquet(f, (28, 28)), cfg, tmp_path / "cache2", quiet)
    assert not streamed.hit and list(streamed.ids) == list(loaded.ids)[::-1]
    np.testing.assert_allclose(streamed.vectors, loaded.vectors[::-1], rtol=1e-4, atol=1e-5)
    again = extract(lazy.subset(np.arange(29, -1, -1)), cfg, tmp_path / "cache", quiet)
    assert again.hit and np.array_equal(again.vectors, streamed.vectors)


@pytest.fixture(scope="module")
def optdigits_embeddings(pretrained, tmp_path_factory):
    data = load_embedded("optdigits").split("test")
    emb = extract(data, EmbedConfig(weights=pretrained), str(tmp_path_factory.mktemp("cache")), quiet)
    return data, emb.vectors


@pytest.mark.slow
def test_feature_strategies_beat_chance_on_optdigits_5shot(optdigits_embeddings):
    data, vectors = optdigits_embeddings
    strategies = {n: make_strategy(n) for n in registered("feature")}
    assert set(strategies) == {"linear_probe", "prototype", "logistic", "mlp_probe", "bd_cspn", "soft_kmeans"}
    rows = pd.DataFrame(run_episodes(strategies, data, shots=5, queries=15, episodes=20, seed=0,
                                     embeddings=vectors))
    means = rows.groupby("strategy")["accuracy"].mean()
    assert (means > 0.5).all(), means  # chance is 0.10


def test_ci_shrinks_as_episodes_grow(optdigits_embeddings):
    data, vectors = optdigits_embeddings
    proto = {"prototype": make_strategy("prototype")}
    cis = []
    for n in (10, 40, 160):
        rows = pd.DataFrame(run_episodes(proto, data, shots=1, queries=15, episodes=n, seed=1, embeddings=vectors))
        cis.append(summarize(rows).iloc[0]["ci95"])
    assert cis[0] > cis[1] > cis[2], cis


def test_extraction_runs_cpu_tasks_that_keep_the_backbone_and_gpu_actors(ray_local):
    """On CPUs a set of up to ``TASK_MAX_ROWS`` images runs in Ray Data tasks (``embed_batch``), at
    most ``actors`` at a time, whose worker process keeps the backbone built for the next block and
    extraction; a larger one on an actor pool of CPU actors; on GPUs an actor per GPU. Read from the
    dataset's plan (the GPU one is never executed here: this cluster has no GPU)."""
    import ray.data

    from tl.embeddings import TASK_MAX_ROWS, _embed
    from tl.models.embedder import Embedder, embed_batch

    def plan(use_gpu, rows=4):
        cfg = EmbedConfig(actors=2, cpus_per_actor=0.5, use_gpu=use_gpu)
        op = _embed(ray.data.range(4), cfg, None, "d", 2, "numpy", rows)._logical_plan.dag
        return op.fn, op.compute, op.ray_remote_args

    fn, compute, remote = plan(False)
    assert fn is embed_batch and isinstance(compute, ray.data.TaskPoolStrategy) and compute.size == 2
    assert remote.get("num_cpus") == 0.5 and not remote.get("num_gpus")
    fn, compute, remote = plan(False, TASK_MAX_ROWS + 1)
    assert fn is Embedder and isinstance(compute, ray.data.ActorPoolStrategy) and not remote.get("num_gpus")
    assert remote.get("num_cpus") == 0.5
    fn, compute, remote = plan(True)
    assert fn is Embedder and isinstance(compute, ray.data.ActorPoolStrategy) and remote.get("num_gpus") == 1


def test_cpu_extraction_writes_parquet_in_the_embedding_tasks(ray_local, tmp_path):
    """On CPUs the write asks for the embedding tasks' CPUs and concurrency, so Ray Data fuses the
    two: each task embeds and writes its block (no worker process started for writes alone). Read
    from the executed dataset's operators, and the Parquet it wrote."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import ray.data

    from tl.embeddings import _embed, _to_matrix, _write

    images = np.random.default_rng(0).random((6, 3, 28, 28), dtype=np.float32)
    ds = ray.data.from_items([{"row": i, "image": images[i]} for i in range(6)], override_num_blocks=2)
    cfg = EmbedConfig(actors=2, cpus_per_actor=0.5)
    done = _write(_embed(ds, cfg, None, "d", 3, "numpy", 6), cfg, 6, str(tmp_path / "out"), pafs.LocalFileSystem())
    assert "MapBatches(embed_batch)->Write" in done.stats()
    table = pq.read_table(tmp_path / "out")
    assert sorted(table.column("row").to_pylist()) == list(range(6))
    assert _to_matrix(table.column("embedding").combine_chunks()).shape == (6, 256)


def test_a_worker_builds_the_backbone_once_per_weights_and_restores_its_threads():
    import torch

    from tl.models import embedder

    batch = {"image": np.random.default_rng(0).random((3, 3, 28, 28), dtype=np.float32), "row": np.arange(3)}
    args = dict(backbone="digits_cnn", weights=None, stage=None, input_size=None, threads=1)
    embedder._BUILT.clear()
    threads = torch.get_num_threads()
    first = list(embedder.embed_batch(batch, digest="a", **args))
    built = next(iter(embedder._BUILT.values()))
    assert torch.get_num_threads() == 1
    again = list(embedder.embed_batch(batch, digest="a", **{**args, "stage": 2, "threads": 0}))
    assert next(iter(embedder._BUILT.values())) is built, "the same weights: the same built model"
    assert torch.get_num_threads() == (os.cpu_count() or 1), "threads 0 outside a Ray worker: the machine's cores"
    assert first[0]["embedding"].shape == (3, 256) and again[0]["embedding"].shape[0] == 3
    assert np.array_equal(first[0]["row"], batch["row"]) and "image" not in first[0]
    list(embedder.embed_batch(batch, digest="b", **args))
    assert len(embedder._BUILT) == embedder._KEEP and next(iter(embedder._BUILT.values())) is not built
    torch.set_num_threads(threads)
    embedder._BUILT.clear()
