"""Few-shot cells that use the target's unlabelled images: target BatchNorm statistics (``bn_stats``)
for every strategy, and transductive prototype refinement (``bd_cspn``, ``soft_kmeans``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tl.compare import CompareConfig, run_compare
from tl.config import load_config
from tl.data import load_embedded
from tl.embeddings import target_bn_stats
from tl.errors import ConfigError
from tl.export import ExportConfig, export
from tl.model_file import load_model
from tl.models import make_backbone
from tl.strategies import make_strategy

QUIET = lambda _: None  # noqa: E731
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _state(weights: str) -> dict[str, torch.Tensor]:
    return make_backbone("digits_cnn", weights).state_dict()


def test_target_statistics_change_only_batchnorm_statistics_and_never_read_a_label(pretrained, tmp_path):
    pool = load_embedded("optdigits").split("adapt")
    path = target_bn_stats("digits_cnn", pretrained, None, pool, tmp_path / "cache", QUIET)
    assert path.startswith(str(tmp_path / "cache" / "bn_stats"))
    source, target = _state(pretrained), _state(path)
    assert source.keys() == target.keys()
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert stats, "the digits CNN has BatchNorm layers"
    for k in source:
        if k.endswith(BN_BUFFERS):
            continue
        assert torch.equal(source[k], target[k]), f"{k} is not a BatchNorm statistic, yet it changed"
    assert all(not torch.equal(source[k], target[k]) for k in stats)
    # the same images without any label (-1), and with their labels shuffled: the same statistics
    unlabelled = dataclasses.replace(pool, labels=np.full(len(pool), -1), _fingerprint=None)
    shuffled = dataclasses.replace(pool, labels=np.random.default_rng(0).permutation(pool.labels), _fingerprint=None)
    for other in (unlabelled, shuffled):
        again = _state(target_bn_stats("digits_cnn", pretrained, None, other, tmp_path / "cache", QUIET))
        assert all(torch.equal(again[k], target[k]) for k in stats)
    # cached: the second call for the same pool reads the file it wrote, and writes nothing
    written = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "bn_stats").iterdir()}
    assert target_bn_stats("digits_cnn", pretrained, None, pool, tmp_path / "cache", QUIET) == path
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache" / "bn_stats").iterdir()} == written


def _episode():
    """Two well separated clusters of unit vectors (angles 20 and 70 degrees in the first two of 8
    dimensions) and one shot per class, where class 0's shot is mislabelled-looking: at 60 degrees,
    nearer class 1's cluster than its own. Cosine prototypes put the boundary at 75 degrees, so every
    class-1 query (at 70) is called class 0; the queries, read together, show the two clusters."""
    rng = np.random.default_rng(0)

    def at(deg: float, n: int) -> np.ndarray:
        a = np.deg2rad(deg + rng.normal(0, 2, n))
        x = np.zeros((n, 8))
        x[:, 0], x[:, 1] = np.cos(a), np.sin(a)
        return x + rng.normal(0, 0.01, (n, 8))

    support = np.vstack([at(60, 1), at(90, 1)])
    query = np.vstack([at(20, 10), at(70, 10)])
    return support, np.array([0, 1]), query, np.repeat([0, 1], 10)


def test_transductive_strategies_recover_the_clusters_that_prototypes_miss():
    support, labels, query, truth = _episode()
    plain = make_strategy("prototype").fit_predict(support, labels, query, 2)
    assert (plain == truth).mean() == pytest.approx(0.5)  # every class-1 query goes to class 0
    for name in ("bd_cspn", "soft_kmeans"):
        strategy = make_strategy(name)
        assert strategy.transductive and strategy.setting == "transductive"
        pred = strategy.fit_predict(support, labels, query, 2)
        assert (pred == truth).all(), (name, pred)


def test_an_inductive_prediction_ignores_the_other_queries_and_a_transductive_one_may_not():
    support, labels, query, truth = _episode()
    one = query[15:16]  # a class-1 query
    for name in ("prototype", "logistic", "linear_probe"):
        s = make_strategy(name)
        assert not s.transductive
        alone = s.fit_predict(support, labels, one, 2)[0]
        assert s.fit_predict(support, labels, query, 2)[15] == alone
        assert s.fit_predict(support, labels, query[10:], 2)[5] == alone
    for name in ("bd_cspn", "soft_kmeans"):
        s = make_strategy(name)
        together = s.fit_predict(support, labels, query, 2)[15]
        alone = s.fit_predict(support, labels, one, 2)[0]
        assert (together, alone) == (1, 0), name  # the other queries move the prototypes


def test_bn_stats_is_checked_and_cannot_be_searched():
    assert make_strategy("finetune", {"bn_stats": "target"}).setting == "bn_stats: target"
    assert make_strategy("dann").setting == "inductive"
    with pytest.raises(ConfigError, match="bn_stats must be one of"):
        make_strategy("prototype", {"bn_stats": "test"})
    with pytest.raises(ConfigError, match="bn_stats cannot be searched"):
        load_config(CompareConfig, base={"strategies": [{"strategy": "prototype", "search": {"bn_stats": ["source", "target"]}}]})


@pytest.mark.slow
def test_a_comparison_with_target_statistics_and_transduction(ray_local, pretrained, tmp_path):
    """Feature and trained strategies with ``bn_stats: target`` and a transductive one run as cells of
    a comparison; the target statistics are made once per target, from its `adapt` split (and per
    validation fold); summary.csv
    names every row's setting and summary.md pairs each option with its plain counterpart."""
    base = {"experiment": "tbn", "targets": ["optdigits"], "shots": [1], "episodes": 3, "val_episodes": 1,
            "queries": 5, "strategies": [
                {"strategy": "prototype"}, {"strategy": "prototype", "label": "prototype_bn_target",
                                            "params": {"bn_stats": "target"}},
                {"strategy": "bd_cspn", "label": "bd_cspn_bn_target", "params": {"bn_stats": "target"}},
                {"strategy": "finetune", "params": {"frozen": 3, "steps": 3}},
                {"strategy": "finetune", "label": "finetune_bn_target", "params": {"frozen": 3, "steps": 3,
                                                                            "bn_stats": "target"}}]}
    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base=base)
    out = run_compare(cfg, tmp_path / "home", tmp_path / "out", QUIET)
    assert out.grid.failed == [] and out.rows == 5 * 3
    # once per target: from the whole split (test episodes), and without each of its 2 validation folds
    assert len(list((tmp_path / "home" / "cache" / "bn_stats").iterdir())) == 3
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("strategy")
    assert summary["setting"].to_dict() == {
        "prototype": "inductive", "finetune_k3": "inductive", "prototype_bn_target": "bn_stats: target",
        "finetune_bn_target": "bn_stats: target", "bd_cspn_bn_target": "transductive"}
    rows = pd.read_parquet(tmp_path / "out" / "rows.parquet")
    params = rows.groupby("strategy")["params"].first().map(json.loads)
    assert params["finetune_bn_target"]["bn_stats"] == "target" and params["finetune_k3"]["bn_stats"] == "source"
    text = (tmp_path / "out" / "summary.md").read_text()
    section = text[text.index("## What the unlabelled target images add"):text.index("Few-shot evaluation")]
    table = [line for line in section.splitlines() if line.startswith("| optdigits")]
    assert sorted(line.split(" | ")[2:5] for line in table) == [
        ["bd_cspn_bn_target", "transductive", "prototype_bn_target"], ["finetune_bn_target", "bn_stats: target", "finetune_k3"],
        ["prototype_bn_target", "bn_stats: target", "prototype"]]


def test_export_with_target_statistics_and_transduction(pretrained, tmp_path):
    """An exported bd_cspn with bn_stats target carries the target statistics (the same as the
    comparison's, from the same unlabelled split) and a head rectified on the unlabelled images."""
    manifest = export(ExportConfig(strategy="bd_cspn", params={"bn_stats": "target"}, target="optdigits",
                                   weights=pretrained, shots=1), tmp_path / "home", tmp_path / "model", QUIET)
    assert manifest["strategy"]["params"]["bn_stats"] == "target" and manifest["head"]["standardize"]
    model, _, _ = load_model(tmp_path / "model")
    exported = model.backbone.state_dict()
    pool = load_embedded("optdigits").split("adapt")
    target = _state(target_bn_stats("digits_cnn", pretrained, None, pool, tmp_path / "cache", QUIET))
    source = _state(pretrained)
    for k in target:
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(exported[k], target[k], atol=1e-6) and not torch.equal(exported[k], source[k])
    assert manifest["evaluation"]["accuracy"] > 0.5


@pytest.mark.slow
def test_a_search_with_target_statistics(ray_local, pretrained, tmp_path):
    """Every candidate of a search embeds with the target's statistics (made once from its `adapt`
    split), the test phase too; best.yaml still names the source weights, which export resolves."""
    import yaml

    from tl.search import SearchConfig, run_search

    cfg = load_config(SearchConfig, overrides=[f"weights={pretrained}"], base={
        "target": "optdigits", "shots": 1, "queries": 5, "val_episodes": 2, "test_episodes": 2,
        "strategy": "logistic", "params": {"bn_stats": "target"}, "scheduler": "none",
        "space": {"C": {"grid": [1.0, 10.0]}}})
    out = run_search(cfg, tmp_path / "home", tmp_path / "out", QUIET)
    assert out.params["bn_stats"] == "target" and 0.0 < out.test_accuracy <= 1.0
    # from the whole split (test episodes), and without each of its 2 validation folds (validation episodes)
    assert len(list((tmp_path / "home" / "cache" / "bn_stats").iterdir())) == 3
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert "bn_stats" not in str(best["weights"]) and best["best"]["optdigits"][1]["params"]["bn_stats"] == "target"
    with pytest.raises(ConfigError, match="bn_stats cannot be searched"):
        run_search(load_config(SearchConfig, overrides=[f"weights={pretrained}"], base={
            "target": "optdigits", "shots": 1, "strategy": "logistic",
            "space": {"bn_stats": {"grid": ["source", "target"]}}}), tmp_path / "home", tmp_path / "out2", QUIET)


@pytest.mark.slow
def test_adabn_in_a_comparison_cell_is_the_source_model_under_the_pools_statistics(pretrained):
    """A comparison's cell hands AdaBN the target's unlabelled pool (Strategy.uses_pool): its rows differ
    from source_only's, and each equals the source-only model of the same episode scored with BatchNorm
    statistics re-estimated on that pool."""
    import copy

    from tl.compare import CompareConfig, target_data
    from tl.evaluate import CellInputs, Episodes, EpisodeSettings, run_cell
    from tl.nn import reestimate_batchnorm
    from tl.strategies import StrategyEntry
    from tl.train.loop import predict

    parts = target_data(CompareConfig(targets=("mnistm",)), "mnistm")
    settings = EpisodeSettings(backbone="digits_cnn", input_size=None, queries=5, n_way=None, episodes=2,
                               val_episodes=1)
    inputs = CellInputs(data={"mnistm": parts}, settings=settings, weights=pretrained)
    params = {"steps": 60}
    rows = {}
    for name in ("source_only", "adabn"):
        spec = {"target": "mnistm", "shots": 1, "seed": 0, "label": name,
                "entry": StrategyEntry(name, params=params).plain()}
        rows[name] = run_cell(spec, inputs)[0]
    assert (rows["source_only"]["pool"] == 0).all() and (rows["adabn"]["pool"] == len(parts["val"])).all()
    assert rows["adabn"]["accuracy"].tolist() != rows["source_only"]["accuracy"].tolist()
    assert json.loads(rows["adabn"]["val_episodes"].iloc[0]), "AdaBN is scored on validation episodes too"
    source_only, adabn = make_strategy("source_only", params), make_strategy("adabn", params)
    eps = Episodes([adabn], parts["test"], 1, 5, 2, 0, None, make_backbone("digits_cnn", pretrained), None,
                   unlabelled=parts["val"])
    for ep, acc in zip(eps.episodes, rows["adabn"]["accuracy"]):
        task = eps.task(adabn, ep)
        run = source_only.start_episode(task)
        run.advance(60)
        scored = copy.deepcopy(run.model)
        reestimate_batchnorm(scored, [task.unlabelled_x])
        assert acc == pytest.approx(float(np.mean(predict(scored, run.query) == ep.query_labels)))


@pytest.mark.slow
def test_validation_queries_never_estimate_the_statistics_that_score_them(ray_local, pretrained, tmp_path):
    """bn_stats target: the validation episodes' queries come from one fold of the `adapt` split, and
    the statistics that score them were estimated on the other fold only; the test episodes get the
    statistics of the whole split."""
    from tl.compare import cells, prepare
    from tl.data.episodes import query_folds, sample_episodes
    from tl.embeddings import reestimate_on

    cfg = load_config(CompareConfig, overrides=[f"weights={pretrained}"], base={
        "targets": ["optdigits"], "shots": [1], "episodes": 1, "feature_val_episodes": 4,
        "strategies": [{"strategy": "prototype", "label": "prototype_bn_target", "params": {"bn_stats": "target"}}]})
    inputs = prepare(cfg, cells(cfg), pretrained, tmp_path / "home", QUIET)["inputs"]
    val = inputs.data["optdigits"]["val"]
    folds = query_folds(val.labels)
    for ep in sample_episodes(val.labels, None, 1, 5, 4, 0, stream=1, folds=folds):
        assert set(folds[ep.query]) == {ep.index % 2}  # an episode's queries: one fold
    stats = [k for k in _state(pretrained) if k.endswith(("running_mean", "running_var"))]
    whole = _state(inputs.target_weights["optdigits"])
    for f, w in inputs.fold_weights["optdigits"].items():
        by_hand = make_backbone("digits_cnn", pretrained)
        reestimate_on(by_hand, val, np.flatnonzero(folds != f))  # the other fold only
        got, want = _state(w), by_hand.state_dict()
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in stats)
        assert any(not torch.allclose(got[k], whole[k], atol=1e-5) for k in stats)
    emb = inputs.embeddings["optdigits"]["target"]
    assert set(emb["val"]) == {0, 1} and emb["test"].shape[0] == len(inputs.data["optdigits"]["test"])
