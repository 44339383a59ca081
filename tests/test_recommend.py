"""Transferability scores against hand-computed values and their definitions, and the recommendation
they make: a separable embedding above a random one, "can't tell" between copies, the ranked table
and family rule written by the workflow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import multivariate_normal

from tl.errors import ConfigError
from tl.recommend import WIN_SHARE, Candidate, RecommendConfig, ensemble_ranks, recommend, write_outputs
from tl.transfer_scores import h_score, information_maximization, leep, log_evidence, logme, loo_prototype, nce, pool_im

REPO = Path(__file__).resolve().parent.parent


def test_log_evidence_is_the_gaussian_marginal_likelihood_and_logme_maximises_it():
    """With m ~ N(0, I/α) and noise N(0, I/β), y ~ N(0, F Fᵀ/α + I/β): a closed form. LogME's fixed
    point is at least as high as any (α, β) on a grid around it."""
    rng = np.random.default_rng(0)
    F, y = rng.normal(size=(12, 5)), rng.normal(size=12)
    for a, b in ((0.7, 2.3), (5.0, 0.1)):
        exact = multivariate_normal.logpdf(y, np.zeros(12), F @ F.T / a + np.eye(12) / b)
        assert log_evidence(F, y, a, b) == pytest.approx(exact, rel=1e-10)
    labels = np.repeat([0, 1], 6)
    grid = np.logspace(-3, 3, 61)
    # the grid's best evidence per one-hot column, per sample, averaged over the two classes
    on_grid = np.mean([max(log_evidence(F, (labels == c).astype(float), a, b) for a in grid for b in grid)
                       for c in (0, 1)]) / 12
    assert on_grid - 1e-9 <= logme(F, labels) <= on_grid + 2e-3


def test_h_score_is_its_definition_and_shrinks_like_ledoit_wolf():
    from sklearn.covariance import ledoit_wolf

    rng = np.random.default_rng(1)
    for n, d in ((30, 8), (10, 40)):  # more samples than dimensions, and fewer
        F, y = rng.normal(size=(n, d)), np.repeat(np.arange(5), n // 5)
        Fc = F - F.mean(0)
        G = np.stack([Fc[y == c].mean(0) for c in y])
        definition = np.trace(np.linalg.pinv(np.cov(F.T, bias=True)) @ np.cov(G.T, bias=True))
        assert h_score(F, y, 0.0) == pytest.approx(definition, rel=1e-8)
        cov, a = ledoit_wolf(F)
        assert h_score(F, y) == pytest.approx(np.trace(np.linalg.inv(cov) @ ((1 - a) * np.cov(G.T, bias=True))), rel=1e-8)


def test_leep_and_nce_on_a_two_class_toy():
    """Source probabilities over 2 source classes for 4 images of target classes 0, 0, 1, 1 (by hand:
    P(y=0|z=0) = 1.7/2.1, P(y=0|z=1) = 0.3/1.9)."""
    theta = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    p00, p01 = 1.7 / 2.1, 0.3 / 1.9
    eep = [0.9 * p00 + 0.1 * p01, 0.8 * p00 + 0.2 * p01, 0.3 * (1 - p00) + 0.7 * (1 - p01),
           0.1 * (1 - p00) + 0.9 * (1 - p01)]
    assert leep(theta, y) == pytest.approx(np.mean(np.log(eep)), rel=1e-12)
    assert nce(theta, y) == 0.0  # hard source labels 0, 0, 1, 1 determine the target labels
    assert nce(theta, np.array([0, 1, 1, 1])) == pytest.approx(-0.5 * np.log(2))  # z=0: a fair coin; z=1: sure


def test_scores_rank_a_separable_embedding_above_a_random_one():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(4), 5)
    separable = np.hstack([np.eye(4)[y] * 5 + rng.normal(size=(20, 4)) * 0.3, rng.normal(size=(20, 12))])
    noise = rng.normal(size=(20, 16))
    for score in (logme, h_score, loo_prototype):
        assert score(separable, y) > score(noise, y), score.__name__
    informative = np.eye(4)[y] * 0.8 + 0.05
    shuffled = informative[rng.permutation(20)]
    for score in (leep, nce):
        assert score(informative, y) > score(shuffled, y), score.__name__
    assert np.isnan(loo_prototype(separable[::5], y[::5]))  # one shot per class: no leave-one-out
    assert list(ensemble_ranks(np.array([[1.0, 5.0], [0.0, 6.0], [-1.0, np.nan]]))) == [1.0, 2.0, 3.0]


def test_pool_im_is_its_definition_and_prefers_an_embedding_that_clusters_the_pool():
    """IM = H(mean p) - mean H(p) (scipy's entropy), over ln C; an embedding in which the unlabelled pool
    forms the classes the single shots define scores above one where the pool is noise."""
    from scipy.stats import entropy

    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4), size=30)
    assert information_maximization(p, eps=0.0) == pytest.approx(entropy(p.mean(0)) - entropy(p, axis=1).mean())
    centres = np.eye(4) * 4
    shots, y = centres + rng.normal(size=(4, 4)) * 0.2, np.arange(4)  # one shot per class
    clustered = np.repeat(centres, 50, axis=0) + rng.normal(size=(200, 4)) * 0.3
    noise = rng.normal(size=(200, 4)) * 2
    good, bad = pool_im(shots, y, clustered), pool_im(shots, y, noise)
    assert -1 <= bad < good <= 1 and good > 0.5

    # by hand: centred on the pool's mean, L2-normalised, softmax(20 cos) against the prototypes
    mu = clustered.mean(0)
    unit = lambda X: (X - mu) / np.linalg.norm(X - mu, axis=1, keepdims=True)  # noqa: E731

    def softmax_cos(protos):
        z = 20 * unit(clustered) @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
        q = np.exp(z - z.max(1, keepdims=True))
        return q / q.sum(1, keepdims=True)

    def im(q):
        return (entropy(q.mean(0)) - entropy(q, axis=1).mean()) / np.log(4)

    q = softmax_cos(unit(shots))
    assert pool_im(shots, y, clustered, refine=0) == pytest.approx(im(q), rel=1e-6)
    # one soft k-means step (Ren et al. 2018): each prototype the mean of its shot and the pool weighted by q
    step = (unit(shots) + q.T @ unit(clustered)) / (1 + q.sum(0))[:, None]
    assert pool_im(shots, y, clustered, refine=1) == pytest.approx(im(softmax_cos(step)), rel=1e-6)


def test_refining_on_the_pool_reads_the_clusters_past_an_atypical_shot():
    """One shot per class, one of them drawn near another class's cluster: the unrefined prototypes split
    the pool unevenly (two prototypes claim one cluster), the refined ones move onto the clusters."""
    rng = np.random.default_rng(5)
    centres = np.eye(4) * 4
    pool = np.repeat(centres, 50, axis=0) + rng.normal(size=(200, 4)) * 0.3
    shots, y = centres.copy(), np.arange(4)
    shots[3] = 0.8 * centres[2] + 0.2 * centres[3]  # class 3's image looks more like class 2
    raw, refined = pool_im(shots, y, pool, refine=0), pool_im(shots, y, pool)
    assert refined > raw + 0.05 and refined > 0.8


def test_one_shot_ranks_by_the_unlabelled_pool_and_never_says_it_can_tell(pretrained):
    """At one shot per class the ensemble is pool_im alone (LogME and H-score left out, LOO undefined,
    LEEP only for one candidate), resampling the pool measures its spread, but it never says it can tell."""
    cands = [Candidate(weights=pretrained, stages=[4], name="pretrained"),
             Candidate(weights="random", stages=[4], name="random")]
    r = recommend(RecommendConfig(candidates=cands, target="optdigits", shots=1, bootstrap=20, pool=200), "/nonexistent",
                  log=lambda _: None)
    assert r["ensemble_of"] == ["pool_im"] and r["pool"] == 200 and r["images"] == 10
    # the pool's resamples agree as often as would let more shots tell (WIN_SHARE: 20 of 20 in the CI runs of
    # 2026-12-05 morning, 19 of 20 in the evening's on the same code, 80f5353), but one image per class leaves
    # the draw's spread unmeasured: it leans, never tells
    assert r["rows"][0]["candidate"] == "pretrained" and r["wins"] >= WIN_SHARE and not r["can_tell"]
    assert r["recommended"]["candidate"] == "pretrained"
    assert r["rows"][0]["scores"]["pool_im"] > r["rows"][1]["scores"]["pool_im"]
    blind = recommend(RecommendConfig(candidates=cands, target="optdigits", shots=1, pool=0), "/nonexistent",
                      log=lambda _: None)
    assert blind["pool"] == 0 and blind["wins"] is None and not blind["can_tell"]
    assert blind["ensemble_of"] == ["logme", "h_score"] and blind["rows"][0]["scores"]["pool_im"] is None


def test_copies_of_a_candidate_cannot_be_told_apart():
    twin = [Candidate(weights="random", stages=[4], name="a"), Candidate(weights="random", stages=[4], name="b")]
    r = recommend(RecommendConfig(candidates=twin, target="optdigits", shots=3, bootstrap=20), "/nonexistent",
                  log=lambda _: None)
    assert not r["can_tell"] and r["wins"] == 0.0 and r["runner_up"] == "b stage 4"
    assert r["rows"][0]["scores"] == r["rows"][1]["scores"]
    with pytest.raises(ConfigError, match="share the label"):
        RecommendConfig(candidates=[Candidate(), Candidate()])


def test_recommend_ranks_the_pretrained_backbone_first_and_writes_its_table(pretrained, tmp_path):
    cands = [Candidate(weights=pretrained, name="pretrained"), Candidate(weights="random", name="random")]
    r = recommend(RecommendConfig(candidates=cands, target="optdigits", shots=5, bootstrap=30), tmp_path,
                  log=lambda _: None)
    assert len(r["rows"]) == 8 and r["images"] == 50 and r["split"] == "adapt"
    top = r["rows"][0]
    assert top["candidate"] == "pretrained" and r["recommended"]["family"] in ("feature", "finetune")
    assert (r["recommended"]["family"] == "feature") == (top["stage"] == 4)
    with_head = [row for row in r["rows"] if row["scores"]["leep"] is not None]
    assert [(row["candidate"], row["stage"]) for row in with_head] == [("pretrained", 4)]
    write_outputs(r, tmp_path / "out")
    doc = yaml.safe_load((tmp_path / "out" / "recommend.yaml").read_text())
    assert doc["recommended"] == r["recommended"] and doc["rows"][0]["candidate"] == "pretrained"
    md = (tmp_path / "out" / "recommend.md").read_text()
    assert md.count("\n| ") == 1 + 8 and "| 1 | pretrained |" in md


@pytest.mark.slow
def test_recommend_workflow_smoke_test(ray_local, tmp_path):
    config = tmp_path / "cands.yaml"
    config.write_text(yaml.safe_dump({"candidates": [{"backbone": "digits_cnn", "weights": "random"}]}))
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "workflows.recommend", "--smoke-test", "--config", str(config),
                           "--address", address, "--storage", str(tmp_path / "home"), "--output", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = yaml.safe_load((tmp_path / "out" / "recommend.yaml").read_text())
    assert doc["target"] == "optdigits" and doc["shots"] == 2 and len(doc["rows"]) == 4
    assert json.loads(json.dumps(doc["recommended"]))["candidate"] == "digits_cnn (random)"


@pytest.mark.parametrize("backbone", ["digits_cnn", "timm:resnet10t", "timm:vit_tiny_patch16_224"])
def test_stage_features_are_the_backbones_own_features_at_each_stage(backbone):
    """One pass through sequential stages (the last pooled by the model's own head) and one forward per
    stage otherwise (a ViT) give what ``backbone(x, stage=s)`` gives."""
    import torch

    from tl.data import load_embedded
    from tl.models import make_backbone
    from tl.recommend import stage_features

    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    images = load_embedded("optdigits").split("adapt").images[:5]
    bb = make_backbone(backbone, "random", None if backbone == "digits_cnn" else 32).eval()
    got = stage_features(bb, images, list(range(1, bb.num_stages + 1)), batch_size=3)
    with torch.inference_mode():
        x = bb.preprocessing(torch.from_numpy(images))
        for s, f in got.items():
            np.testing.assert_allclose(f, bb(x, stage=s).numpy(), rtol=1e-4, atol=1e-5)  # batches of 3 vs 5
