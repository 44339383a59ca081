"""Ray Tune search: space parsing, milestones, staged training == straight training, a real ASHA run."""

import numpy as np
import pandas as pd
import pytest
import yaml

from tl.config import load_config
from tl.data import load_embedded
from tl.errors import ConfigError
from tl.evaluate import run_episodes, staged_accuracy
from tl.models import make_backbone
from tl.search import GRID_KEY, SearchConfig, candidate, check_space, report_steps, run_search, tune_space
from tl.strategies import make_strategy


@pytest.mark.parametrize("space, message", [
    ({"lr": {"choice": []}}, "'space.lr': 'choice' has an empty list"),
    ({"lr": {"gird": [0.1]}}, "'space.lr': unknown kind 'gird'"),
    ({"lr": {"loguniform": [0.0, 0.1]}}, "'space.lr': 'loguniform' needs low > 0"),
    ({"lr": {"uniform": [0.1, 0.01]}}, "low < high"),
    ({"learning_rate": [0.1]}, "learning_rate"),
    ({"frozen": {"grid": [0, 9]}}, "frozen depth 9 is out of range"),
    ({}, "search space is empty"),
])
def test_bad_search_space_is_one_clear_error(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_space(space, "finetune", {}, "digits_cnn")


def test_optuna_refuses_grid_keys_and_spaces_become_tune_domains():
    with pytest.raises(ConfigError, match="'grid' cannot be used with search_alg optuna"):
        SearchConfig(search_alg="optuna")
    dom = tune_space({"frozen": {"grid": [1, 2]}, "lr": {"loguniform": [1e-3, 1e-1]}, "m": [0.5, 0.9]})
    assert dom["frozen"] == {"grid_search": [1, 2]}
    assert 1e-3 <= dom["lr"].sample() <= 1e-1 and dom["m"].sample() in (0.5, 0.9)


def test_shuffled_grid_holds_every_point_once_in_a_seeded_order():
    space = {"frozen": {"grid": [0, 1, 2, 3, 4]}, "lr": {"grid": [0.003, 0.01, 0.03, 0.1]}, "m": [0.5, 0.9]}
    points = tune_space(space, 0)[GRID_KEY]["grid_search"]
    assert sorted((p["frozen"], p["lr"]) for p in points) == [(k, lr) for k in range(5) for lr in space["lr"]["grid"]]
    assert points == tune_space(space, 0)[GRID_KEY]["grid_search"]
    assert points != tune_space(space, 1)[GRID_KEY]["grid_search"]
    # the given order is lr-ascending within each depth; a shuffled one is not
    assert [(p["frozen"], p["lr"]) for p in points] != sorted((p["frozen"], p["lr"]) for p in points)
    assert "frozen" not in tune_space(space, 0) and tune_space(space)["frozen"] == {"grid_search": [0, 1, 2, 3, 4]}
    assert candidate({GRID_KEY: points[0], "m": 0.9}, ["frozen", "lr", "m"]) == {**points[0], "m": 0.9}
    assert candidate({"frozen": 2, "lr": 0.1}, ["frozen", "lr"]) == {"frozen": 2, "lr": 0.1}
    with pytest.raises(ConfigError, match="'grid_order'"):
        SearchConfig(grid_order="random")


def test_report_steps_are_asha_rungs():
    assert report_steps(60, 7, 3) == [7, 21, 60]
    assert report_steps(9, 1, 3) == [1, 3, 9]
    assert SearchConfig(max_steps=64, reduction_factor=4).milestones() == [4, 16, 64]


def test_staged_training_equals_one_straight_run(pretrained):
    """Advancing an episode to 4 steps, then to 10, is the 10-step run: ASHA's budget is honest."""
    data = load_embedded("optdigits").split("adapt")
    backbone = make_backbone("digits_cnn", pretrained)
    strat = make_strategy("finetune", {"frozen": 2, "steps": 10, "lr": 0.05})
    staged = staged_accuracy(strat, data, shots=2, queries=5, episodes=3, seed=1, report_steps=[4, 10],
                             backbone=backbone)
    straight = run_episodes({"ft": strat}, data, shots=2, queries=5, episodes=3, seed=1, backbone=backbone,
                            stream="validation")
    assert [s for s, _ in staged] == [4, 10]
    assert staged[-1][1] == pytest.approx(np.mean([r["accuracy"] for r in straight]))


@pytest.mark.slow
def test_asha_search_on_validation_then_test(ray_local, pretrained, tmp_path):
    cfg = load_config(SearchConfig, overrides=[f"weights={pretrained}"], base={
        "target": "optdigits", "shots": 1, "queries": 5, "val_episodes": 2, "test_episodes": 3, "max_steps": 9,
        "space": {"frozen": {"grid": [3, 4]}, "lr": {"grid": [0.01, 0.1]}}})
    logs = []
    out = run_search(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 4 and set(trials["frozen"]) == {3, 4} and set(trials["lr"]) == {0.01, 0.1}
    assert trials["steps"].max() == 9 and (trials["steps"] >= 1).all()
    assert (trials["pool"] == 0).all()  # a strategy that uses no unlabelled pool gets none
    assert trials["trial_steps"].sum() == out.trial_steps <= 4 * 9 * 2
    doc = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    best = doc["best"]["optdigits"][1]  # the comparison's schema: best -> target -> shots
    full = trials[trials["steps"] == 9]
    assert best["val_accuracy"] == pytest.approx(full["val_accuracy"].max(), abs=1e-4)
    assert best["params"]["frozen"] in (3, 4) and best["params"]["steps"] == 9
    assert best["label"] == f"finetune_k{best['params']['frozen']}" and doc["backbone"] == "digits_cnn"
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert len(rows) == 3 and best["accuracy"] == pytest.approx(rows["accuracy"].mean(), abs=1e-4)
    assert "chosen by a Ray Tune search on 2 validation episodes of the `adapt` split" in \
        (tmp_path / "out" / "summary.md").read_text()

    # the same search again restores the finished experiment: no candidate runs twice
    again = run_search(cfg, tmp_path / "home", tmp_path / "out", logs.append)
    assert again.resumed and again.trial_steps == out.trial_steps and again.params == out.params
    keys = ["frozen", "lr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "trials.csv").sort_values(keys).reset_index(drop=True),
                                  trials.sort_values(keys).reset_index(drop=True))
    rows2 = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert rows2["cell_seconds"].equals(rows["cell_seconds"]), "the test cell is reused, not run again"

    # search -> export: the export reads the search's best.yaml as it reads a comparison's
    from tl.export import ExportConfig, export

    m = export(ExportConfig(best=str(tmp_path / "out" / "best.yaml")), tmp_path / "home", tmp_path / "model",
               lambda s: None)
    assert m["comparison"]["target"] == "optdigits" and m["comparison"]["shots"] == 1
    assert m["strategy"]["name"] == "finetune" and m["strategy"]["params"]["frozen"] == best["params"]["frozen"]
    assert m["backbone"]["frozen_stages"] == best["params"]["frozen"] and (tmp_path / "model" / "model.json").is_file()


@pytest.mark.slow
def test_optuna_search_of_a_feature_strategy_uses_fractional_cpus(ray_local, pretrained, tmp_path):
    pytest.importorskip("optuna")
    cfg = load_config(SearchConfig, overrides=[f"weights={pretrained}"], base={
        "target": "optdigits", "shots": 1, "queries": 5, "val_episodes": 4, "test_episodes": 4,
        "strategy": "logistic", "search_alg": "optuna", "scheduler": "none", "num_samples": 3,
        "space": {"C": {"loguniform": [0.01, 100.0]}}})
    out = run_search(cfg, tmp_path / "home", tmp_path / "out", lambda s: None)
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 3 and trials["C"].between(0.01, 100.0).all() and trials["C"].nunique() == 3
    assert out.params["C"] == pytest.approx(trials.sort_values("val_accuracy").iloc[-1]["C"])
    assert 0.0 < out.test_accuracy <= 1.0


def test_validation_selection_rules(pretrained):
    """``full`` scores every candidate as staged_accuracy does; ``halving`` trains all to a third of
    the budget and chooses among the survivors, trained to the full budget; a diverging one loses."""
    from tl.evaluate import select_on_validation

    data = load_embedded("optdigits").split("adapt")
    backbone = make_backbone("digits_cnn", pretrained)
    cands = [make_strategy("finetune", {"frozen": k, "steps": 9}) for k in (2, 3, 4)]
    cands.append(make_strategy("finetune", {"frozen": 3, "steps": 9, "lr": 1e30, "clip_grad": 0.0}))
    kw = dict(shots=1, queries=5, episodes=2, seed=0, n_way=None, backbone=backbone, embeddings=None, unlabelled=None)
    full = select_on_validation(cands, data, rule="full", **kw)
    for s, score in zip(cands[:3], full.scores):
        assert score == pytest.approx(staged_accuracy(s, data, report_steps=[9], stream="selection", **kw)[-1][1])
    assert full.scores[3] == float("-inf") and full.steps == [9, 9, 9, 9] and full.best != 3
    halving = select_on_validation(cands, data, rule="halving", **kw)
    assert sorted(halving.steps) == [3, 3, 9, 9] and halving.steps[halving.best] == 9 and halving.best != 3
    assert halving.scores[3] == float("-inf")


@pytest.mark.slow
def test_a_search_of_an_adaptation_strategy_hands_its_trials_the_pool(ray_local, pretrained, tmp_path):
    """DANN's candidates train on the target's unlabelled pool (the validation split less each episode's
    queries), as its test phase does (a strategy that uses no pool gets none: the ASHA search above)."""
    cfg = load_config(SearchConfig, overrides=[f"weights={pretrained}"], base={
        "target": "optdigits", "shots": 1, "queries": 5, "val_episodes": 1, "test_episodes": 1, "max_steps": 2,
        "strategy": "dann", "scheduler": "none", "space": {"lr": {"grid": [0.03]}}})
    run_search(cfg, tmp_path / "home", tmp_path / "out", lambda s: None)
    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    adapt = len(load_embedded("optdigits").split("adapt"))
    assert len(trials) == 1 and (trials["pool"] == adapt - 10 * 5).all()  # less one episode's 10 x 5 queries
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    assert (rows["pool"] == adapt).all()  # the test episodes' pool: the whole validation split
