"""The statistics and the recommendation against values worked out by hand (docs/architecture.md, "Evaluation protocol")."""

import json

import numpy as np
import pandas as pd
import pytest

from tl.choice import choose, winners_curse
from tl.report import summarize, summary_markdown
from tl.stats import ci_half_width, holm, paired, t_quantile

# two-sided 95% t quantiles from a printed table: df = 4, 9, 599
T4, T9, T599 = 2.776445, 2.262157, 1.9639  # the last to the four decimals tables print


def test_t_quantiles_and_confidence_intervals_by_hand():
    assert t_quantile(5) == pytest.approx(T4, rel=1e-6)
    assert t_quantile(10) == pytest.approx(T9, rel=1e-6)
    assert t_quantile(600) == pytest.approx(T599, abs=5e-5)
    # E = 5: mean 0.7, s = sqrt(0.1 / 4)
    assert ci_half_width([0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(T4 * np.sqrt(0.025) / np.sqrt(5), rel=1e-6)
    # E = 10: 0.0 .. 0.9, s = sqrt(82.5 / 9) / 10
    assert ci_half_width(np.arange(10) / 10) == pytest.approx(T9 * np.sqrt(82.5 / 9) / 10 / np.sqrt(10), rel=1e-6)
    # E = 600: 300 zeros and 300 ones, s = sqrt(150 / 599)
    assert ci_half_width([0.0, 1.0] * 300) == pytest.approx(T599 * np.sqrt(150 / 599) / np.sqrt(600), rel=3e-5)
    assert np.isnan(ci_half_width([0.5]))
    # about 13% wider than the normal interval at the demo's 10 episodes
    assert t_quantile(10) / 1.96 == pytest.approx(1.154, abs=1e-3)


def test_paired_difference_interval_and_p_value_by_hand():
    d = paired([0.6, 0.8, 0.7], [0.5, 0.6, 0.7])  # differences 0.1, 0.2, 0.0: mean 0.1, s 0.1
    assert d.mean == pytest.approx(0.1) and d.n == 3
    assert d.ci == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-6)
    # t = sqrt(3) on 2 degrees of freedom: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), p = 2 (1 - F)
    t = np.sqrt(3)
    assert d.p_value == pytest.approx(2 * (0.5 - t / (2 * np.sqrt(2 + t * t))), rel=1e-6)
    assert d.tie  # 0.1 - 0.248 < 0 < 0.1 + 0.248
    same = paired([0.5, 0.6], [0.5, 0.6])
    assert same.mean == 0 and same.tie and same.p_value == 1.0
    clear = paired([0.9, 0.91, 0.92, 0.9], [0.5, 0.52, 0.5, 0.49])
    assert not clear.tie and clear.p_value < 1e-4


def test_holm_correction_on_a_hand_made_example():
    # sorted: 0.01 x 4 = 0.04; 0.03 x 3 = 0.09; 0.04 x 2 = 0.08 -> 0.09 (monotone); 0.20 x 1 = 0.20
    assert holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    adj = holm([0.02, float("nan")])
    assert adj[0] == pytest.approx(0.02) and np.isnan(adj[1])  # nan does not count as a test


# "cheap" is practically equivalent to "slow" on validation: 0.2 points below it on every episode
VAL = {"slow": [0.80, 0.82, 0.78, 0.81], "cheap": [0.798, 0.818, 0.778, 0.808], "worse": [0.50, 0.52, 0.49, 0.51]}
TEST = {"slow": [0.70, 0.72, 0.71], "cheap": [0.69, 0.70, 0.70], "worse": [0.95, 0.96, 0.94]}
COST = {"slow": 2.0, "cheap": 0.01, "worse": 0.001}


def _rows(test: dict, val: dict = VAL) -> pd.DataFrame:
    return pd.DataFrame([
        {"target": "t", "shots": 5, "seed": 0, "episode": i, "strategy": s, "accuracy": a, "seconds": COST[s],
         "cost": COST[s], "cell_seconds": 10 * COST[s], "val_episodes": json.dumps([[j, v] for j, v in enumerate(val[s])])}
        for s, accs in test.items() for i, a in enumerate(accs)])


def test_a_tie_on_validation_recommends_the_cheaper_strategy():
    (c,) = choose(_rows(TEST))
    assert c.val_winner == "slow"  # highest validation mean
    assert sorted(c.tied) == ["cheap", "slow"]  # paired validation CI of cheap - slow within ±1 point
    assert c.recommended == "cheap"  # the cheaper of the tie; "worse" is cheaper still but not tied
    assert c.test_best == "worse"  # best on the test episodes, which the choice never looked at
    assert c.confirm.mean == pytest.approx(np.mean(TEST["cheap"]) - np.mean(TEST["worse"]))
    curse = winners_curse([c])
    assert curse["differ"] == 1 and curse["mean_gap"] == pytest.approx(np.mean(TEST["worse"]) - np.mean(TEST["slow"]))


def test_a_tie_is_practical_equivalence_not_an_interval_that_includes_zero():
    """Four noisy validation episodes whose interval includes 0 but is wider than the margin are no
    tie: the validation winner is recommended, however much cheaper the other is; with enough
    episodes the same small difference is a tie."""
    noisy = {**VAL, "cheap": [0.79, 0.80, 0.79, 0.80]}  # cheap - slow: -0.75 ± 2.0 points, includes 0
    (c,) = choose(_rows(TEST, noisy))
    assert c.tied == ["slow"] and c.recommended == c.val_winner == "slow"
    assert choose(_rows(TEST, noisy), margin=0.05)[0].recommended == "cheap"  # a wider stated margin ties them
    rng = np.random.default_rng(0)
    slow = list(0.8 + 0.05 * rng.standard_normal(100))
    many = {"slow": slow, "cheap": [a - 0.002 + 0.004 * rng.standard_normal() for a in slow],
            "worse": [a - 0.3 for a in slow]}
    test = {s: [0.7, 0.7, 0.7] for s in many}
    (c,) = choose(_rows(test, many))
    assert c.recommended == "cheap" and "equivalent" in c.reason


def test_cost_ties_are_broken_by_a_fixed_cost_never_by_seconds():
    """Two feature strategies of one cost tier: the higher validation mean is recommended whatever the
    timer said; a row's seconds never decide."""
    rows = _rows(TEST)
    rows.loc[rows["strategy"] == "slow", "cost"] = 0.01  # "slow" now costs what "cheap" costs
    rows.loc[rows["strategy"] == "slow", "seconds"] = 5.0
    (c,) = choose(rows)
    assert c.recommended == "slow"  # equivalent, same cost: the better validation mean
    rows["seconds"] = rows["seconds"].sample(frac=1.0, random_state=1).to_numpy()  # timer noise
    assert choose(rows)[0].recommended == "slow"


def test_the_choice_reads_validation_rows_only():
    base = choose(_rows(TEST))[0]
    names = list(TEST)
    for shift in (1, 2):  # hand each strategy's test accuracies to another strategy
        swapped = {s: TEST[names[(i + shift) % 3]] for i, s in enumerate(names)}
        c = choose(_rows(swapped))[0]
        assert (c.val_winner, c.recommended, c.tied) == (base.val_winner, base.recommended, base.tied)
        assert c.test_best != base.test_best
    # and a change on validation does change it: make "worse" the clear validation winner
    c = choose(_rows(TEST, {**VAL, "worse": [0.95, 0.96, 0.97, 0.95]}))[0]
    assert c.val_winner == c.recommended == "worse"


def test_without_validation_rows_the_choice_says_it_used_the_test_episodes():
    rows = _rows(TEST).drop(columns=["val_episodes"])
    (c,) = choose(rows)
    assert c.val_winner is None and c.recommended == "worse" and "optimistic" in c.reason


def test_summary_tables_carry_t_intervals_holm_p_values_and_the_recommendation():
    rows = _rows(TEST)
    s = summarize(rows).set_index("strategy")
    assert s.loc["slow", "ci95"] == pytest.approx(4.302653 * np.std(TEST["slow"], ddof=1) / np.sqrt(3), rel=1e-6)
    assert s.loc["slow", "cell_seconds"] == pytest.approx(20.0)
    text = summary_markdown(summarize(rows), rows, choices=choose(rows))
    assert "| cheap ★ |" in text and "recommended: cheap" in text


def test_a_tie_the_test_episodes_contradict_is_said_and_not_undone():
    test = {"slow": [0.80, 0.82, 0.81], "cheap": [0.60, 0.61, 0.60], "worse": [0.50, 0.52, 0.51]}
    (c,) = choose(_rows(test))
    assert c.recommended == "cheap" and c.test_disagrees  # the choice stands: it is made on validation
    assert c.vs_winner.mean == pytest.approx(np.mean(test["cheap"]) - np.mean(test["slow"]))
    (ok,) = choose(_rows(TEST))
    assert not ok.test_disagrees


def test_a_summary_names_a_pretrained_backbone_by_its_key_not_a_local_path():
    """Committed summaries must stay valid on another machine: the weights as the user gave them,
    plus a pretrained backbone's key, never the tl home's absolute path."""
    import pandas as pd

    from tl.report import describe, weights_text

    home = "/home/someone/.cache/tl/backbones/digits_cnn-mnist-2a3c2e2dacab"
    assert weights_text("pretrained", home) == "pretrained, key digits_cnn-mnist-2a3c2e2dacab"
    assert weights_text("pretrained:shift", "s3://b/tl/backbones/k1") == "pretrained:shift, key k1"
    assert weights_text("/data/model.safetensors", "/data/model.safetensors") == "/data/model.safetensors"
    assert weights_text("random", None) == "random"
    rows = pd.DataFrame({"n_way": [10], "queries": [15], "episode": [0], "seed": [0]})
    text = describe({"backbone": "digits_cnn", "weights": "pretrained"}, "test", rows, home)
    assert "pretrained, key digits_cnn-mnist-2a3c2e2dacab" in text and "/home/someone" not in text
