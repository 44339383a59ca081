"""The few-shot workflow on the local Ray: outputs, skipping finished cells, failures, bad config."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tl.config import load_config
from tl.errors import ConfigError
from tl.fewshot import FewShotConfig, run_fewshot

REPO = Path(__file__).resolve().parent.parent

SMALL = {"targets": ["optdigits"], "shots": [1, 3], "episodes": 4, "queries": 5,
         "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                        {"strategy": "finetune", "params": {"frozen": 3, "steps": 3}}]}


def test_smoke_run_writes_outputs_and_skips_finished_cells(ray_local, pretrained, tmp_path):
    cfg = load_config(FewShotConfig, overrides=[f"weights={pretrained}"], base=SMALL)
    logs = []
    out = run_fewshot(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    for f in ("rows.parquet", "summary.md", "summary.csv", "accuracy_vs_shots.png"):
        assert (tmp_path / "out" / f).is_file(), f
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert len(rows) == out["rows"] == 2 * 3 * 4
    assert rows.groupby(["shots", "strategy"]).size().eq(4).all()
    assert {"config", "git_commit", "versions", "hardware", "node"} <= set(rows.columns)
    # the same episodes for every strategy: the support sets are the same, so the rows pair up
    assert rows.groupby(["shots", "episode"]).size().eq(3).all()

    logs.clear()
    again = run_fewshot(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    assert "6 already finished" in logs[0]
    assert not any("/6 " in line for line in logs[1:]), "no cell may run again"
    rows2 = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    cols = ["strategy", "shots", "episode", "accuracy"]
    pd.testing.assert_frame_equal(rows[cols], rows2[cols])
    assert again["rows"] == out["rows"]


def test_failed_cell_is_listed_and_the_rest_completes(ray_local, pretrained, tmp_path):
    cfg = load_config(FewShotConfig, overrides=[f"weights={pretrained}"], base={
        **SMALL, "shots": [1], "strategies": [
            {"strategy": "prototype"},
            {"strategy": "finetune", "label": "absurd", "params": {"lr": 1e30, "clip_grad": 0.0, "steps": 3}}]})
    out = run_fewshot(cfg, tmp_path / "home", tmp_path / "out", lambda _: None)
    assert len(out["failures"]) == 1 and "absurd" in out["failures"][0] and "non-finite loss" in out["failures"][0]
    assert "FAILED" in (tmp_path / "out" / "summary.md").read_text()
    assert set(pd.read_parquet(tmp_path / "out" / "rows.parquet")["strategy"]) == {"prototype"}


@pytest.mark.parametrize("override,message", [
    ("strategies=[{strategy: maml}]", "unknown strategy 'maml'"),
    ("backbone=vgg", "unknown backbone 'vgg'"),
    ("shot=[1]", "unknown config key 'shot'"),
    ("shots=[-1]", "at least 1"),
    ("strategies=[{strategy: finetune, params: {frozen: 9}}]", "frozen depth 9 is out of range"),
    ("episodes=many", "'episodes'"),
])
def test_bad_config_is_an_error_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FewShotConfig, overrides=[override])


def test_workflow_exits_2_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workflows.fewshot", "--storage", str(tmp_path),
                          "--set", "strategies=[{strategy: nope}]"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[0]]
    assert "unknown strategy 'nope'" in out.stderr
