"""Storage anywhere pyarrow reaches, against a real S3 API served locally (moto's server mode): the
same code as a local folder, clear errors before any trial, and a comparison, an export and a
prediction with storage, data and outputs in a bucket, a killed comparison resumed from it."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tl.errors import ConfigError
from tl.runtime import resolve_storage
from tl.storage import Location

REPO = Path(__file__).resolve().parent.parent
BUCKET = "tl-test"


@pytest.fixture(scope="session")
def s3():
    """A local S3 server on a loopback port and one bucket; returns ``uri(key)`` for a key in it
    (the endpoint travels in the URI, so Ray workers and subprocesses reach the same server)."""
    import logging

    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)

    def uri(key: str) -> str:
        return f"s3://{BUCKET}/{key}?endpoint_override={endpoint}"

    uri.endpoint = endpoint
    yield uri
    server.stop()


def test_a_location_in_a_bucket_reads_writes_lists_and_stages_like_a_folder(s3, tmp_path):
    for root in (Location.of(tmp_path / "local"), Location.of(s3("unit"))):
        f = root / "a" / "b.txt"
        assert not f.exists()
        f.write_text("hello")
        assert f.is_file() and f.read_text() == "hello" and (root / "a").is_dir()
        assert [x.name for x in (root / "a").iterdir()] == ["b.txt"]
        assert root.relative(root.files()[0]) == "a/b.txt"
        assert Location.of(str(f)) == f, "the string form names the same place, endpoint included"
        assert Location.of(str(root / "a")).fetch().joinpath("b.txt").read_text() == "hello"
        with pytest.raises(RuntimeError):
            with (root / "out").staged() as folder:
                (folder / "half.txt").write_text("x")
                raise RuntimeError("the workflow failed")
        assert root.is_local or not (root / "out").exists(), "nothing is uploaded from a failed block"
        with (root / "out2").staged(last=("manifest.json",)) as folder:
            (folder / "x.bin").write_bytes(b"\x00\x01")
            (folder / "manifest.json").write_text("{}")
        assert (root / "out2" / "x.bin").read_bytes() == b"\x00\x01" and (root / "out2" / "manifest.json").is_file()
        f.unlink()
        assert not f.exists()


@pytest.mark.parametrize("spec, message", [
    ("s3:///nobucket", "Missing bucket name"),
    ("foo://x/y", "Unrecognized filesystem"),
    ("s3://a b/c", "Cannot parse URI"),
])
def test_a_malformed_uri_is_one_clear_error_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        resolve_storage(spec)
    assert spec in str(err.value)


@pytest.mark.slow
def test_a_missing_bucket_or_an_unreachable_endpoint_fails_before_anything_runs(s3):
    missing = s3("x").replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    with pytest.raises(ConfigError, match="not writable.*no-such-bucket. not found") as err:
        resolve_storage(missing)
    assert "s3://no-such-bucket/x" in str(err.value)
    t0 = time.time()
    with pytest.raises(ConfigError, match="not writable.*(connect|NETWORK)") as err:
        resolve_storage("s3://b/tl?endpoint_override=http://127.0.0.1:1")
    assert "s3://b/tl" in str(err.value) and time.time() - t0 < 60
    assert str(resolve_storage(s3("home"))) == s3("home")


def _digits_folder(root: Path, per_class: int = 16) -> Path:
    from PIL import Image

    from tl.data import load_embedded

    data = load_embedded("optdigits").split("test")
    for c, name in enumerate(data.classes):
        folder = root / f"digit_{name}"
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(data.labels == c)[:per_class]):
            Image.fromarray((data.images[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(folder / f"{j}.png")
    return root


def _read_parquet(loc: Location) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(loc.read_bytes()))


@pytest.mark.slow
def test_compare_export_and_predict_with_storage_data_and_outputs_in_a_bucket(ray_local, s3, tmp_path):
    from tl.compare import CompareConfig, run_compare
    from tl.config import load_config
    from tl.export import ExportConfig, export
    from tl.predict import predict
    from tl.pretrain import PretrainConfig, pretrain

    home = resolve_storage(s3("e2e/home"))
    data = Location.of(s3("e2e/data/mine"))
    data.upload(_digits_folder(tmp_path / "mine"))
    backbone = pretrain(PretrainConfig(epochs=1, limit=512, batch_size=64, lr=0.05, workers=1, augment="shift"), home)
    assert str(backbone.path).startswith(f"s3://{BUCKET}/e2e/home/backbones/")  # Ray Train wrote to the bucket too
    assert (Location.of(s3("e2e/home/ray")).files()), "Ray Train's checkpoints are in the bucket"
    cfg = load_config(CompareConfig, base={
        "experiment": "s3-cmp", "targets": ["mine"], "weights": str(backbone.path), "shots": [1], "episodes": 2, "val_episodes": 1, "queries": 3,
        "data": {"mine": {"folder": str(data), "split": "halves"}},
        "strategies": [{"strategy": "prototype"}, {"strategy": "finetune", "params": {"frozen": 3, "steps": 3}}]})
    out = Location.of(s3("e2e/results/cmp"))
    with out.staged() as folder:
        res = run_compare(cfg, home, folder)
    assert res.exit_status == 0 and res.grid.ran == 2
    rows = _read_parquet(out / "rows.parquet")
    assert len(rows) == 2 * 2 and set(rows["strategy"]) == {"prototype", "finetune_k3"}
    assert sorted(f.name.rsplit(".", 1)[-1] for f in cfg.cells_dir(home).files()) == ["parquet", "parquet"]
    assert (Location.of(s3("e2e/home/cache")).files()), "the embedding cache is in the bucket"
    assert (Location.of(s3("e2e/home/tune")).files()), "Tune's experiment state is in the bucket"
    again = run_compare(cfg, home, tmp_path / "again")
    assert again.grid.ran == 0 and again.grid.skipped == 2, "a rerun from the bucket runs nothing"

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["weights_key"] == Location.of(str(backbone.path)).name
    model = Location.of(s3("e2e/models/mine"))
    m = export(ExportConfig(best=str(out / "best.yaml"), target="mine", shots=1), home, model)
    assert m["training"]["data"] == str(data) and (model / "model.json").is_file()
    assert json.loads((model / "model.json").read_text())["classes"] == m["classes"]

    pred = Location.of(s3("e2e/predictions"))
    summary = predict(str(model), str(data), pred)
    table = _read_parquet(pred / "predictions.parquet")
    assert summary["images"] == len(table) == 160 and summary["predicted"] == 160 and not summary["failed"]
    assert set(table["label"]) == set(m["classes"]) and summary["accuracy"] is not None
    assert json.loads((pred / "summary.json").read_text())["model"] == str(model)


def _kill_grid(pretrained, experiment: str) -> list[str]:
    """The killed comparison's overrides: 6 cells, 2 feature cells (the first phase) and 4 trained ones, which run
    one at a time (each takes every logical CPU), so a kill after the first trained cell lands mid-run; no
    recommendation (it predicts, it does not change a row)."""
    return [f"weights={pretrained}", f"experiment={experiment}", "targets=[optdigits]", "shots=[1,2]",
            "episodes=2", "val_episodes=1", "feature_val_episodes=5", "queries=5", "recommend=false",
            "cpus_per_trial=4",
            'strategies=[{strategy: logistic}, {strategy: finetune, label: ft3, params: {frozen: 3, steps: 20}}, '
            '{strategy: finetune, label: ft2, params: {frozen: 2, steps: 20}}]']


@pytest.mark.slow
def test_a_killed_comparison_resumes_from_the_bucket_to_a_clean_runs_rows(ray_local, s3, pretrained, tmp_path):
    """A comparison with its storage and output in the bucket, its driver killed mid-run (SIGKILL), then run again
    with --resume: the cells finished before the kill are kept, not run again, the others run, and the rows equal a
    clean run's, with no duplicate row; the killed run left nothing complete-looking."""
    from tl.compare import CompareConfig, run_compare
    from tl.config import load_config

    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    home, out = s3("kill/home"), s3("kill/out")
    # the clean run, in this process, in the same tl home under another experiment: its cells are its own, and the
    # killed run below finds the embeddings it extracted in the bucket's cache (extraction's faults: test_faults.py)
    clean = run_compare(load_config(CompareConfig, overrides=_kill_grid(pretrained, "s3-kill-clean")), home,
                        tmp_path / "clean-out", log=lambda _: None)
    assert clean.exit_status == 0 and clean.rows == 6 * 2

    cells = Location.of(home) / "runs" / "s3-kill" / "cells"
    sets = [a for o in _kill_grid(pretrained, "s3-kill") for a in ("--set", o)]
    cmd = [sys.executable, "-m", "workflows.compare", "--storage", home, "--output", out, *sets]
    # the output is staged in a local temporary folder (uploaded when the run ends): here, to see what it showed
    staging = tmp_path / "tmp"
    staging.mkdir()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "TMPDIR": str(staging)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_cells() -> list[str]:
        return [f.name for f in cells.files() if f.name.endswith(".parquet")]

    deadline = time.time() + 300
    while time.time() < deadline and len(finished_cells()) < 3 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # a trial already running in the cluster may still write its cell (atomically) before Ray reaps
    # the dead job's actors: count once the folder has been still for a few seconds
    finished, still_since = finished_cells(), time.time()
    while time.time() - still_since < 8:
        time.sleep(0.5)
        now = finished_cells()
        if len(now) != len(finished):
            finished, still_since = now, time.time()
    assert 3 <= len(finished) < 6, f"the kill should land mid-run ({len(finished)} of 6 cells finished)"
    assert not (Location.of(out) / "rows.parquet").exists(), "no complete-looking result from a killed run"
    assert not Location.of(out).files(), "nothing is uploaded from a killed run"
    # what it showed while its trained cells ran: the feature cells' summary, incomplete at its top
    (shown,) = staging.glob("tl-out-*")
    assert (shown / "summary.md").read_text().startswith("**INCOMPLETE: ")
    assert not (shown / "rows.parquet").exists() and not (shown / "best.yaml").exists()
    kept = {name: (cells / name).read_bytes() for name in finished}

    t_resume = time.time()
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(finished_cells()) == 6
    assert {name: (cells / name).read_bytes() for name in finished} == kept, "finished cells are kept, not rerun"
    keys = ["target", "shots", "seed", "strategy", "episode"]
    a = pd.read_parquet(tmp_path / "clean-out" / "rows.parquet").sort_values(keys).reset_index(drop=True)
    b = _read_parquet(Location.of(out) / "rows.parquet").sort_values(keys).reset_index(drop=True)
    assert len(b) == 6 * 2 and not b.duplicated(keys).any()
    pd.testing.assert_frame_equal(a[keys + ["accuracy", "params", "confusion"]], b[keys + ["accuracy", "params", "confusion"]])
    # the resumed run ran exactly the cells that had not finished (each row says when its cell ran)
    ran = b.groupby(keys[:-1])["cell_started"].first()
    assert (ran >= t_resume).sum() == 6 - len(finished) and (ran < t_resume).sum() == len(finished)
    # its outputs are in the bucket, complete
    summary = (Location.of(out) / "summary.md").read_text()
    assert summary and not summary.startswith("**INCOMPLETE") and (Location.of(out) / "best.yaml").is_file()


def test_a_bucket_without_class_folders_is_one_clear_error_naming_the_uri(s3):
    from tl.data.sources import load_image_folder
    from tl.errors import DataError

    with pytest.raises(DataError, match="does not exist") as err:
        load_image_folder(s3("nothing/here"), (28, 28))
    assert f"s3://{BUCKET}/nothing/here" in str(err.value)
    flat = Location.of(s3("flat"))
    (flat / "a.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match="holds 1 images but no class subfolders") as err:
        load_image_folder(str(flat), (28, 28))
    assert f"s3://{BUCKET}/flat" in str(err.value)
