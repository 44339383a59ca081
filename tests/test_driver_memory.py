"""A comparison's driver, and a many-shot fine-tuning run's on Ray Train, hold a user folder's labels
and paths, never its pixel array: the target here is 586 MiB at float32, and the driver process (real
runs on the session's Ray) must grow by a third of that at most in each, while reading the same folder
into memory (decoded and stacked at float32, as the old driver did) grows it by more than the array.
Peak RSS is the kernel's own high-water mark (``VmHWM``), reset after the imports and between the
measurements."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
N, SIDE, CLASSES, EXT = 2000, 160, 5, "bmp"
FLOAT32_MB = N * 3 * SIDE * SIDE * 4 / 2**20

CHILD = r"""
import json, sys
from pathlib import Path

# every module the run imports, before the baseline (torchvision alone is about 150 MB)
import matplotlib, ray, ray.data, ray.train, ray.tune, torch, torchvision  # noqa: F401,E401
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401,E402
import numpy as np  # noqa: E402
import tl.compare, tl.embeddings, tl.evaluate, tl.report, tl.runs  # noqa: F401,E401,E402
from PIL import Image  # noqa: E402
from tl.compare import CompareConfig, run_compare
from tl.config import load_config
from tl.runs import RunConfig, run


def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


address, base_cfg, run_cfg, home, out, folder = sys.argv[1:7]
ray.init(address=address)
cfg = load_config(CompareConfig, base=json.loads(base_cfg))
base = status("VmRSS:")
reset_peak()
res = run_compare(cfg, home, Path(out), log=lambda _: None)
compare_peak = status("VmHWM:")
base1 = status("VmRSS:")
reset_peak()
record = run(load_config(RunConfig, base=json.loads(run_cfg)), home, log=lambda _: None)
run_peak = status("VmHWM:")
base2 = status("VmRSS:")
reset_peak()
# the old driver's way: every file decoded and stacked at float32 in this process
paths = sorted(Path(folder).glob("*/*.*"))
held = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255 for p in paths])
print("RESULT " + json.dumps({"compare_growth": compare_peak - base, "rows": res.rows, "exit": res.exit_status,
                              "run_growth": run_peak - base1, "run_sizes": record["sizes"],
                              "run_accuracy": record["history"][-1]["target_test_accuracy"],
                              "in_memory_growth": status("VmHWM:") - base2, "held": held.nbytes / 2**20}))
"""


@pytest.mark.slow
def test_comparison_and_fine_tuning_drivers_never_hold_the_pixel_array(ray_local, pretrained, tmp_path):
    import ray

    folder = tmp_path / "big"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    # one pattern per class, each image its own integer noise on it; BMP files, which write and decode
    # several times faster than PNG (the loader reads any common format; the driver's memory is the point)
    bases = [np.clip(127 + 100 * np.sin(2 * np.pi * ((c + 1) * xx + (c % 3) * yy)), 0, 255).astype(np.int16)[..., None]
             for c in range(CLASSES)]
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True)
    for i in range(N):
        c = i % CLASSES
        img = np.clip(bases[c] + rng.integers(-17, 18, (SIDE, SIDE, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"c{c}" / f"{i:05d}.{EXT}")
    cfg = {"experiment": "driver-memory", "weights": str(pretrained), "shots": [1], "episodes": 2, "queries": 5,
           "n_way": 5, "targets": [{"path": str(folder), "name": "big", "size": [SIDE, SIDE], "split": "none"}],
           "strategies": [{"strategy": "prototype"}, {"strategy": "finetune", "params": {"steps": 2}}]}
    # many-shot fine-tuning on Ray Train: the folder's halves stream through Ray Data to one worker
    run_cfg = {"target": cfg["targets"][0] | {"split": "halves"}, "weights": str(pretrained), "strategy": "finetune",
               "params": {"steps": 2, "batch_size": 32}, "workers": 1, "checkpoint_every": 2}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", CHILD, address, json.dumps(cfg), json.dumps(run_cfg),
                           str(tmp_path / "home"),
                           str(tmp_path / "out"), str(folder)], cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert got["exit"] == 0 and got["rows"] == 2 * 2
    assert abs(got["held"] - FLOAT32_MB) < 1  # the array the old driver held: 2000 x 3 x 160 x 160 float32
    assert got["in_memory_growth"] > FLOAT32_MB, got  # the measurement sees an array of that size
    # the comparison's driver held no such array (measured: about 120 MB, Ray Data's and Tune's own)
    assert got["compare_growth"] < FLOAT32_MB / 3, got
    # nor the fine-tuning run's, which trained on one half and scored every image of the other
    assert got["run_sizes"] == {"target": N // 2, "target_test": N // 2}, got
    assert 0.0 <= got["run_accuracy"] <= 1.0, got
    assert got["run_growth"] < FLOAT32_MB / 3, got
