"""Real faults on real Ray: a Ray Train worker killed mid-run (fine-tuning and adaptation), extraction killed while writing the
embedding cache. A comparison's driver killed (resumed rows equal a clean run's rows): tests/test_storage.py, with its
storage and output in a bucket."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _stream(proc, lines: list[str]) -> threading.Thread:
    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


STEPS, EVERY, KILL_AFTER = 20, 5, 10  # a worker run's steps, a checkpoint every EVERY, and the step it is killed after
WORKER_RUNS = {
    # workflow, its log prefix, its arguments: STEPS steps, a checkpoint every EVERY, 2 retries on failure
    "finetune": ("finetune", ["--workers", "1", "--set", "weights=random", "--set", "target=optdigits",
                              "--set", "limit=256", "--set", f"checkpoint_every={EVERY}", "--set", f"params.steps={STEPS}",
                              "--set", "params.batch_size=32", "--set", "max_failures=2"]),
    "adapt": ("adapt", ["--workers", "1", "--set", "weights=random", "--set", "targets=[optdigits]",
                        "--set", "seeds=[0]", "--set", "methods=[{strategy: dann}]", "--set", "limit=256",
                        "--set", f"checkpoint_every={EVERY}", "--set", f"params.steps={STEPS}", "--set", "params.batch_size=32",
                        "--set", "max_failures=2"]),
}


@pytest.mark.parametrize("workflow", sorted(WORKER_RUNS))
def test_killed_train_worker_restarts_from_its_last_checkpoint(workflow, ray_local, storage, tmp_path):
    """SIGKILL the Ray Train worker after its second checkpoint: the run restarts (FailureConfig),
    resumes from the last registered checkpoint, and finishes all its steps."""
    prefix, args = WORKER_RUNS[workflow]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", f"workflows.{workflow}", "--storage", str(storage), "--output", str(tmp_path / "out"),
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = _stream(proc, lines)

    def steps_seen() -> list[int]:
        return [int(ln.split(" step ", 1)[1].split("/")[0]) for ln in list(lines)
                if f"[{prefix}]" in ln and " step " in ln and f"/{STEPS}" in ln]

    deadline, killed, last_before = time.time() + 400, None, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        steps = steps_seen()
        pids = [int(ln.split(" pid ", 1)[1].split()[0]) for ln in list(lines) if "worker rank 0 pid" in ln]
        if steps and max(steps) >= KILL_AFTER and pids:
            last_before = max(steps)
            os.kill(pids[-1], signal.SIGKILL)
            killed = pids[-1]
        time.sleep(0.1)
    assert killed, "\n".join(lines[-40:])
    proc.wait(timeout=600)
    reader.join(timeout=10)
    text = "\n".join(lines)
    assert proc.returncode == 0, text[-4000:]
    starts = [ln for ln in lines if "worker rank 0 pid" in ln]
    assert len(starts) >= 2, text[-4000:]
    new_pid = int(starts[-1].split(" pid ", 1)[1].split()[0])
    assert new_pid != killed
    # what the run wrote: each checkpoint's entry says how many resumes came before it
    if workflow == "finetune":
        record = json.loads((tmp_path / "out" / "run.json").read_text())
        assert record["steps"] == STEPS
        history = pd.DataFrame(record["history"])
    else:
        history = pd.read_csv(tmp_path / "out" / "runs.csv").sort_values("step")
    assert history["step"].tolist() == list(range(EVERY, STEPS + 1, EVERY)), history[["step", "attempt"]].to_string()
    assert set(history["attempt"]) == {0, 1}, history[["step", "attempt"]].to_string()
    resumed = int(history[history["attempt"] == 0]["step"].max())
    assert int(history[history["attempt"] == 1]["step"].min()) == resumed + EVERY
    if workflow == "finetune":
        assert record["resumed_at_steps"] == [resumed]
    print(f"{workflow}: worker pid {killed} killed after step {last_before}; pid {new_pid} resumed at step {resumed}")
    # a step line is printed once its checkpoint is handed to Ray Train, whose one-slot result queue
    # means the previous checkpoint is registered: at most one interval of reported progress is redone
    assert last_before - EVERY <= resumed <= last_before + EVERY and resumed > 0, (last_before, resumed)


def test_extraction_killed_while_writing_is_rebuilt(ray_local, tmp_path):
    from tl.data import load_embedded
    from tl.embeddings import EmbedConfig, extract

    home = tmp_path / "home"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "workflows.embed", "--storage", str(home), "--set", "data=optdigits",
           "--set", "weights=random", "--set", "input_size=64", "--set", "batch_size=64"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    emb_root = home / "cache" / "embeddings"
    deadline = time.time() + 400
    while time.time() < deadline and not list(emb_root.glob("*/data-*/*.parquet")):
        assert proc.poll() is None, "the extraction ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    folders = list(emb_root.iterdir())
    assert len(folders) == 1 and not (folders[0] / "manifest.json").exists(), "the kill should land mid-write"

    interrupted = {p.name for p in folders[0].glob("data-*")}
    data = load_embedded("optdigits")
    emb = extract(data, EmbedConfig(weights=None, input_size=64, batch_size=64), str(home / "cache"), lambda _: None)
    assert not emb.hit and emb.vectors.shape == (len(data), 256) and (folders[0] / "manifest.json").exists()
    parts = {p.name for p in folders[0].glob("data-*")}
    assert len(parts) == 1 and not parts & interrupted, "the interrupted write's part is removed, not kept beside"
    assert np.array_equal(emb.ids, data.ids)
