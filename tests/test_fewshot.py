"""The fixed-hyper-parameter table (workflows.fewshot) is a preset of the comparison: one engine."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fewshot_preset_runs_the_comparison_with_fixed_depths(ray_local, pretrained, tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "workflows.fewshot", "--smoke-test", "--storage", str(home),
                        "--output", str(out), "--set", f"weights={pretrained}", "--set", "shots=[1]",
                        "--set", "episodes=2"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = pd.read_parquet(out / "rows.parquet")
    assert set(rows["strategy"]) == {"prototype", "logistic", "finetune_k2"}
    assert (rows["chosen"] == "{}").all(), "the preset searches nothing"
    assert len(list((home / "runs" / "fewshot-smoke" / "cells").glob("*.parquet"))) == 3
    assert (out / "command.txt").read_text().startswith("python -m workflows.fewshot ")

    # workflows.report rebuilds the tables from rows.parquet alone
    before = pd.read_csv(out / "summary.csv")
    (out / "summary.csv").unlink()
    r = subprocess.run([sys.executable, "-m", "workflows.report", str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), before)


def test_workflow_exits_2_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workflows.fewshot", "--storage", str(tmp_path),
                          "--set", "strategies=[{strategy: nope}]"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[0]]
    assert "unknown strategy 'nope'" in out.stderr
