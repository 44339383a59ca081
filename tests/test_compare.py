"""The comparison workflow on the local Ray: outputs, rerun runs nothing, failures (a killed
comparison resumed: tests/test_storage.py, on a bucket, against a clean run of the same grid)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tl.compare import CompareConfig, run_compare
from tl.config import load_config
from tl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

SMALL = {"experiment": "cmp-test", "targets": ["optdigits"], "shots": [1, 2], "episodes": 3, "val_episodes": 1,
         "feature_val_episodes": 1, "queries": 5,
         "strategies": [{"strategy": "prototype"}, {"strategy": "logistic"},
                        {"strategy": "finetune", "params": {"steps": 3}, "search": {"frozen": [3, 4]}}]}
KEYS = ["target", "shots", "seed", "strategy", "episode"]


@pytest.mark.slow
def test_comparison_writes_four_outputs_and_a_rerun_runs_nothing(ray_local, pretrained, tmp_path):
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base=SMALL)
    logs = []
    out = run_compare(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    for f in ("rows.parquet", "summary.md", "accuracy_vs_shots.png", "accuracy_vs_cost.png", "best.yaml",
              "config.yaml"):
        assert (tmp_path / "out" / f).is_file(), f
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert len(rows) == out.rows == 2 * 3 * 3 and not rows.duplicated(KEYS).any()
    assert (out.grid.ran, out.grid.skipped, out.grid.failed, out.grid.unfinished) == (6, 0, [], [])
    assert {"config", "git_commit", "versions", "hardware", "node", "chosen", "val_accuracy"} <= set(rows.columns)
    ft = rows[rows["strategy"] == "finetune"]
    # the feature cells' answers come first: every one finished before any trained cell started
    assert rows[rows["strategy"] != "finetune"]["cell_finished"].max() <= ft["cell_started"].min()
    assert ft["chosen"].isin(['{"frozen": 3}', '{"frozen": 4}']).all() and ft["val_accuracy"].notna().all()
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())["best"]["optdigits"]
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    # every cell was also scored on its validation episode; best.yaml's pick is made there, not on test
    assert all(len(json.loads(v)) == 1 for v in rows["val_episodes"])
    for shots in (1, 2):
        b = best[shots]
        mine = summary[(summary["shots"] == shots) & (summary["strategy"] == b["label"])].iloc[0]
        assert b["accuracy"] == pytest.approx(mine["mean"], abs=1e-4) and b["label"] in b["tied_on_validation"]
        val = {s: json.loads(g["val_episodes"].iloc[0])[0][1] for s, g in rows[rows["shots"] == shots].groupby("strategy")}
        assert val[b["validation_winner"]] == max(val.values())
    assert load_config(CompareConfig, str(tmp_path / "out" / "config.yaml")) == cfg
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "Δ to best" in text and "validation episodes of the `adapt` split" in text
    # the recommendation made before the cells ran, on the validation split's shots, beside the outcome
    recs = yaml.safe_load((tmp_path / "out" / "recommend.yaml").read_text())
    assert [(r["target"], r["shots"], r["split"]) for r in recs] == [("optdigits", 1, "adapt"), ("optdigits", 2, "adapt")]
    assert all(len(r["rows"]) == 4 and r["recommended"]["family"] in ("feature", "finetune") for r in recs)
    section = text.split("## Predicted before the run, against the outcome")[1]
    table = [line for line in section.splitlines() if line.startswith("| optdigits |")]
    assert len(table) == 2
    for line, shots in zip(table, (1, 2)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        fam = "feature" if best[shots]["strategy"] != "finetune" else "finetune"
        predicted = recs[shots - 1]["recommended"]["family"]
        assert cells[6].endswith(f"({fam})") and cells[7] == ("yes" if fam == predicted else "no")

    tune_dir = tmp_path / "home" / "tune"
    before = sorted(os.listdir(tune_dir))
    again = run_compare(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    assert (again.grid.ran, again.grid.skipped) == (0, 6)
    assert sorted(os.listdir(tune_dir)) == before, "no Tune experiment may start when nothing is left"
    rows2 = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    pd.testing.assert_frame_equal(rows[KEYS + ["accuracy"]], rows2[KEYS + ["accuracy"]])


@pytest.mark.slow
def test_failing_cell_is_listed_and_the_rest_complete(ray_local, pretrained, tmp_path):
    base = {**SMALL, "shots": [1], "strategies": [
        {"strategy": "prototype"},
        {"strategy": "finetune", "label": "absurd_lr", "params": {"frozen": 3, "steps": 5, "lr": 1e30,
                                                                  "clip_grad": 0.0}}]}
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base=base)
    out = run_compare(cfg, tmp_path / "home", tmp_path / "out", lambda s: None)
    assert out.rows == 3 and len(out.failures) == 1 and out.grid.ran == 2
    (cell, msg), = out.grid.failed
    assert cell.spec["label"] == "absurd_lr" and "non-finite loss" in msg
    assert "FAILED cells" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("strategies=[{strategy: dino}]", "unknown strategy 'dino'"),
    ("backbone=vgg99", "unknown backbone 'vgg99'"),
    ("epsiodes=3", "unknown config key 'epsiodes'"),
    ("episodes=three", "'episodes'"),
    ("shots=[-1]", "'shots'"),
    ("strategies=[{strategy: finetune, search: {frozen: []}}]", "'search.frozen' needs a non-empty list"),
    ("strategies=[{strategy: finetune, params: {frozen: 7}}]", "frozen depth 7 is out of range"),
])
def test_bad_config_is_a_clear_error_before_any_trial(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CompareConfig, overrides=[override])


def test_workflow_bad_config_exits_2_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workflows.compare", "--storage", str(tmp_path / "h"),
                        "--output", str(tmp_path / "o"), "--set", "strategies=[{strategy: dino}]"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown strategy 'dino'" in r.stderr
    assert not (tmp_path / "o").exists()


def _crash_one(spec: dict, **shared):
    """The real cell function, except that the cell labelled ``bug`` raises a plain RuntimeError."""
    from tl.evaluate import run_cell

    if spec["label"] == "bug":
        raise RuntimeError("index 7 is out of bounds in the bug strategy")
    return run_cell(spec, **shared)


@pytest.mark.slow
def test_a_crashed_cell_reaches_the_summary_the_exit_status_and_mlflow_gets_the_runs(ray_local, pretrained, tmp_path):
    import ray.cloudpickle
    from mlflow.tracking import MlflowClient

    from tl.compare import cells, prepare, write_outputs
    from tl.errors import EXIT_FAILED_CELLS
    from tl.grid import CellStore, run_cells

    base = {**SMALL, "shots": [1], "mlflow": str(tmp_path / "mlruns"),
            "strategies": [{"strategy": "prototype"}, {"strategy": "logistic", "label": "bug"}]}
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base=base)
    store = CellStore(cfg.cells_dir(tmp_path / "home"))
    grid = cells(cfg)
    shared = prepare(cfg, grid, str(pretrained), tmp_path / "home", lambda s: None)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trials need not import tests/
    try:
        result = run_cells(grid, store, _crash_one, shared=shared, what="compare", storage=tmp_path / "home",
                           log=lambda s: None, max_failures=0, experiment=cfg.experiment, mlflow=cfg.mlflow)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (tmp_path / "out").mkdir()
    out = write_outputs(cfg, result, store, tmp_path / "out", str(pretrained), lambda s: None)
    assert out.exit_status == EXIT_FAILED_CELLS and out.rows == 3
    (cell, msg), = out.grid.failed
    assert cell.spec["label"] == "bug" and msg.startswith("crashed: RuntimeError") and "out of bounds" in msg
    assert "RuntimeError: index 7 is out of bounds" in (tmp_path / "out" / "summary.md").read_text()

    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    finished = [r for r in runs if "accuracy" in r.data.metrics]
    assert len(runs) == 2 and len(finished) == 1
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert finished[0].data.metrics["accuracy"] == pytest.approx(rows["accuracy"].mean())


def test_a_cell_whose_weights_change_bytes_under_the_same_name_is_a_new_cell(tmp_path):
    """Cells are keyed by the weights' content, not their name: a finished cell is reused while the file
    is the same, and run again once the file is rewritten with other weights under the same path."""
    import torch

    from tl.compare import _present_content, cells, dry_run
    from tl.grid import CellStore
    from tl.models import build_backbone, save_weights

    path = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(build_backbone("digits_cnn"), path)
    cfg = load_config(CompareConfig, overrides=[f"weights={path}"], base={
        "targets": ["optdigits"], "shots": [1], "episodes": 1, "strategies": [{"strategy": "prototype"}]})
    home = tmp_path / "home"
    assert len(dry_run(cfg, home, lambda _: None)["plan"]["todo"]) == 1
    (cell,) = cells(cfg, content=_present_content(cfg, home))
    CellStore(cfg.cells_dir(home)).save(cell, pd.DataFrame({"accuracy": [0.5]}))  # as if it had run
    assert len(dry_run(cfg, home, lambda _: None)["plan"]["todo"]) == 0  # same bytes: finished
    torch.manual_seed(1)
    save_weights(build_backbone("digits_cnn"), path)  # other weights, the same name
    assert len(dry_run(cfg, home, lambda _: None)["plan"]["todo"]) == 1  # a new cell
