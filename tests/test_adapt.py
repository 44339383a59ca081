"""Domain adaptation: gradient reversal, the alignment losses, the selection scores and every
adaptation strategy (one step, in-episode). The two-stream Ray Train run is tests/test_runs.py."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tl.data import load_embedded, sample_episodes
from tl.errors import ConfigError
from tl.models import build_backbone
from tl.nn import (
    CDANLoss, CORALLoss, DANNLoss, GradientReversal, MCCLoss, MMDLoss, coefficient, coral, ganin_lambda, gaussian_mmd2,
    grad_reverse, information_maximization, minimum_class_confusion, reestimate_batchnorm, soft_neighborhood_density,
)
from tl.strategies import REGISTRY, EpisodeTask, make_strategy
from tl.strategies.adapt import AdaptStrategy, episode_source_labels
from tl.train.loop import make_optimizer, train_steps

ADAPT = sorted(n for n, c in REGISTRY.items() if issubclass(c, AdaptStrategy))
ALIGNING = [n for n in ADAPT if REGISTRY[n].needs_target]


# --- gradient reversal -------------------------------------------------------------------------


def test_reversal_is_identity_forward_and_minus_lambda_grad_backward():
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(5, 7)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    x.grad = None
    layer = GradientReversal(2.0)
    (layer(x) * w).sum().backward()
    assert torch.allclose(x.grad, -2.0 * w)


def test_lambda_schedule_and_constant_option():
    assert ganin_lambda(0.0) == 0.0
    assert ganin_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert ganin_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    vals = [ganin_lambda(p) for p in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    assert coefficient("ganin", 0.3, 2.0) == pytest.approx(2 * ganin_lambda(0.3))
    assert coefficient("constant", 0.3, 0.7) == 0.7
    with pytest.raises(ConfigError, match="unknown coefficient schedule 'linear'"):
        coefficient("linear", 0.3)


# --- alignment losses --------------------------------------------------------------------------


def _chance(loss_module):
    last = loss_module.discriminator.net[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return loss_module


def test_dann_loss_at_a_chance_discriminator_is_log2_and_reverses_feature_gradients():
    dann = _chance(DANNLoss(16))
    fs, ft = torch.randn(8, 16), torch.randn(12, 16) + 1
    assert dann(fs, ft, coeff=1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    # with a live discriminator: the features get −λ times the gradient the discriminator loss has
    dann = DANNLoss(16)
    f = torch.randn(20, 16, requires_grad=True)
    dann(f[:8], f[8:], coeff=0.4).backward()
    reversed_grad = f.grad.clone()
    f.grad = None
    d = dann.discriminator(f)
    F.binary_cross_entropy_with_logits(d, torch.cat([torch.ones(8), torch.zeros(12)])).backward()
    assert torch.allclose(reversed_grad, -0.4 * f.grad, atol=1e-6)


def test_cdan_entropy_conditioned_loss_is_log2_at_chance_and_uses_the_multilinear_map():
    cdan = _chance(CDANLoss(16, 4))
    fs, ft, ls, lt = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 4), torch.randn(8, 4)
    assert cdan(fs, ft, ls, lt).item() == pytest.approx(math.log(2), abs=1e-6)
    assert cdan.discriminator.net[0].in_features == 16 * 4 and not cdan.randomized
    big = CDANLoss(512, 10, random_dim=64)
    assert big.randomized and big.discriminator.net[0].in_features == 64
    assert torch.isfinite(big(torch.randn(4, 512), torch.randn(4, 512), torch.randn(4, 10), torch.randn(4, 10)))
    with pytest.raises(ConfigError, match="logits"):
        cdan(fs, ft)


def test_mmd_of_a_sample_with_itself_is_zero_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randn(64, 16, generator=gen)
    assert float(gaussian_mmd2(x, x)) == pytest.approx(0.0, abs=1e-6)
    vals = [float(MMDLoss()(x, y + s)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(vals, vals[1:])), vals
    assert vals[0] < 0.1 * vals[-1]


def test_coral_of_identical_batches_is_zero_and_not_otherwise():
    x = torch.randn(32, 8)
    assert float(coral(x, x)) == 0.0
    assert float(CORALLoss()(x, x.clone(), coeff=5.0)) == 0.0
    assert float(coral(x, 3 * x)) > 0
    # the covariance, not the mean: a shift alone costs nothing
    assert float(coral(x, x + 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_unsupervised_scores_prefer_confident_balanced_clustered_predictions():
    labels = torch.arange(100) % 10
    confident = F.one_hot(labels, 10).float() * 10
    unsure = torch.randn(100, 10) * 0.01
    collapsed = F.one_hot(torch.zeros(100, dtype=torch.long), 10).float() * 10
    im = [information_maximization(z) for z in (confident, unsure, collapsed)]
    assert im[0] > 2.0 and im[1] < 0.1 and im[2] < 0.1
    # ten tight clusters of ten: each point's soft neighbours are its nine class-mates, SND = log 9
    assert soft_neighborhood_density(confident) == pytest.approx(math.log(9), abs=1e-3)
    assert soft_neighborhood_density(unsure) > soft_neighborhood_density(confident)


# --- strategies --------------------------------------------------------------------------------


def _data(n=16):
    src = load_embedded("mnist").split("train")
    tgt = load_embedded("mnistm").split("adapt")
    bb = build_backbone("digits_cnn")
    pp = bb.preprocessing
    return (bb, pp(torch.from_numpy(src.images[:n])), torch.from_numpy(src.labels[:n]),
            pp(torch.from_numpy(tgt.images[:n])))


def test_mcc_loss_on_a_hand_made_batch_matches_its_formula():
    """Jin et al. 2020, eqs. 1-6, written out element by element for 3 examples and 3 classes."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    t = 2.5
    p = np.exp(logits.numpy() / t)
    p /= p.sum(1, keepdims=True)
    h = -(p * np.log(p)).sum(1)
    w = 1 + np.exp(-h)
    w = 3 * w / w.sum()
    c = np.zeros((3, 3))
    for j in range(3):
        for k in range(3):
            c[j, k] = sum(w[i] * p[i, j] * p[i, k] for i in range(3))
    c_hat = c / c.sum(0, keepdims=True)
    expected = sum(c_hat[j, k] for j in range(3) for k in range(3) if j != k) / 3
    assert minimum_class_confusion(logits, t).item() == pytest.approx(expected, rel=1e-5)
    assert MCCLoss(t)(None, None, None, logits, coeff=0.5).item() == pytest.approx(0.5 * expected, rel=1e-5)
    # confident, one class per example: no confusion; uniform predictions: the most
    assert minimum_class_confusion(torch.eye(3) * 50).item() == pytest.approx(0.0, abs=1e-6)
    assert minimum_class_confusion(torch.zeros(4, 3)).item() == pytest.approx(2 / 3, rel=1e-5)


@pytest.mark.slow
def test_adabn_changes_only_batchnorm_statistics_to_the_targets_own():
    """Every parameter byte-identical; the first BatchNorm's running mean is the mean of the target
    images' activations below it, its variance the unbiased variance of all of them at once (not
    an average of the batches' variances); the API takes images only."""
    bb, _, _, xt = _data()
    model = make_strategy("adabn").prepare(bb, 10)
    before, was = copy.deepcopy(model.state_dict()), model.training
    seen = reestimate_batchnorm(model, [xt[:10], xt[10:]])
    assert seen == len(xt) and model.training == was
    after = model.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not torch.equal(m.running_mean, before[n + ".running_mean"])
                       for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    first = bns[0]
    below = _layers_before(model, first)
    with torch.no_grad():
        act = below(xt)
    assert torch.allclose(first.running_mean, act.mean((0, 2, 3)), atol=1e-5)
    var = act.var((0, 2, 3))  # the unbiased variance of all of them at once, not an average of batch variances
    assert torch.allclose(first.running_var, var, rtol=1e-4, atol=1e-6)
    assert set(after) == set(before) and first.momentum == 0.1


def _layers_before(model, bn):
    """The modules of the backbone's first stage up to ``bn`` (its conv), as one function."""
    mods = []
    for m in model.backbone.modules():
        if m is bn:
            break
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d)):
            mods.append(m)
    return torch.nn.Sequential(*mods).eval()


def test_adabn_episode_predicts_under_target_bn_stats_and_trains_like_source_only():
    task, ep = _episode_task(with_source=False)
    a = make_strategy("adabn", {"steps": 3}).start_episode(task)
    b = make_strategy("source_only", {"steps": 3}).start_episode(task)
    a.advance(3), b.advance(3)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    state = copy.deepcopy(a.model.state_dict())
    pa = a.predict()
    assert all(torch.equal(v, a.model.state_dict()[k]) for k, v in state.items()), "scored on a copy"
    assert pa.shape == b.predict().shape


def test_any_adaptation_method_can_be_scored_with_target_bn_stats():
    """``bn_stats: target`` (AdaBN's scoring) is an option of every method: the scored model is a
    copy with the pool's BatchNorm statistics and the same weights; without it, the model itself.
    It is re-estimated after training, never handed as the starting weights; the former key
    ``target_statistics`` is refused with the one that replaced it."""
    bb, _, _, xt = _data()
    plain, tbn = make_strategy("dann"), make_strategy("dann", {"bn_stats": "target"})
    assert plain.bn_stats == "source" and make_strategy("adabn").bn_stats == "target"
    assert tbn.uses_pool and tbn.bn_stats_at_start == "source" and tbn.setting == "bn_stats: target"
    with pytest.raises(ConfigError, match="strategies.dann.target_statistics' was renamed: write 'bn_stats: target'"):
        make_strategy("dann", {"target_statistics": True})
    model = tbn.prepare(bb, 10)
    assert plain.scoring_model(model, [xt], "cpu") is model
    scored = tbn.scoring_model(model, [xt], "cpu")
    assert scored is not model
    for (n, p), q in zip(scored.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    bn = [(a, b) for a, b in zip(scored.modules(), model.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bn and all(not torch.equal(a.running_mean, b.running_mean) for a, b in bn)


def test_every_adaptation_strategy_is_registered():
    assert {"source_only", "adabn", "dann", "cdan", "mmd", "coral", "mcc"} <= set(ADAPT)
    assert not REGISTRY["source_only"].needs_target and all(REGISTRY[n].needs_target for n in ALIGNING)


@pytest.mark.parametrize("name", ADAPT)
@pytest.mark.parametrize("k", [0, 2])
def test_one_step_finite_loss_and_gradients_reach_the_right_parameters(name, k):
    bb, xs, ys, xt = _data()
    s = make_strategy(name, {"frozen": k, "batch_norm": "train", "steps": 10})
    model = s.prepare(bb, 10)
    losses = train_steps(model, s, iter([(xs, ys)]), 6, target_batches=iter([xt]), start_step=5)
    assert np.isfinite(losses[0])
    frozen = {id(p) for st in model.backbone.stages[:k] for p in st.parameters()}
    for pname, p in model.named_parameters():
        if id(p) in frozen:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
    n_opt = sum(p.numel() for g in make_optimizer(s, model).param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name in ("dann", "cdan"):
        assert any(pn.startswith("alignment.discriminator") for pn, _ in model.named_parameters())


@pytest.mark.parametrize("name", ADAPT)
def test_the_target_batch_is_used_exactly_when_the_strategy_needs_it(name):
    bb, xs, ys, xt = _data()
    s = make_strategy(name, {"batch_norm": "frozen", "steps": 10, "weight": 1.0, "schedule": "constant"})
    model = s.prepare(bb, 10)
    torch.manual_seed(0)
    a = s.loss(copy.deepcopy(model), xs, ys, 5, xt).item()
    torch.manual_seed(0)
    b = s.loss(copy.deepcopy(model), xs, ys, 5, torch.flip(xt, dims=[3]) * 0.5).item()
    assert (a != pytest.approx(b, abs=1e-7)) == REGISTRY[name].needs_target


def test_lr_is_annealed_as_ganin_et_al():
    bb, xs, ys, xt = _data()
    s = make_strategy("dann", {"steps": 10, "lr": 0.02, "lr_schedule": "ganin"})
    model = s.prepare(bb, 10)
    opt = make_optimizer(s, model)
    train_steps(model, s, iter([(xs, ys)] * 4), 4, optimizer=opt, target_batches=iter([xt] * 4),
                lr_scale=s.lr_scale)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / (1 + 10 * 3 / 10) ** 0.75)
    assert {g["name"] for g in opt.param_groups} == {"head", "backbone", "alignment"}


def test_the_reference_recipes_schedules_and_discriminator_are_reachable():
    """TLlib's digits recipe over 3,000 steps: GRL 2/(1+exp(-i/1000))-1 is gamma 3, the learning rate's
    (1+0.001 i)^-0.75 is lr_gamma 3; BatchNorm in the discriminator; Nesterov momentum in the optimiser."""
    s = make_strategy("dann", {"steps": 3000, "gamma": 3, "lr_gamma": 3, "lr_schedule": "ganin",
                               "discriminator_bn": True, "nesterov": True, "hidden": [16, 16]})
    for i in (0, 500, 1000, 2999):
        assert s.coefficient(i) == pytest.approx(2 / (1 + math.exp(-i / 1000)) - 1)
        assert s.lr_scale(i) == pytest.approx((1 + 0.001 * i) ** -0.75)
    model = s.prepare(build_backbone("digits_cnn"), 10)
    norms = [m for m in model.alignment.discriminator.net if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [16, 16]
    assert all(g["nesterov"] for g in make_optimizer(s, model).param_groups)
    plain = make_strategy("dann", {"hidden": [16, 16]})
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.prepare(build_backbone("digits_cnn"), 10).modules())
    assert not any(g["nesterov"] for g in make_optimizer(plain, plain.prepare(build_backbone("digits_cnn"), 10)).param_groups)
    ganin = make_strategy("dann", {"lr_schedule": "ganin"})
    assert ganin.lr_scale(1) == pytest.approx((1 + 10 / ganin.steps) ** -0.75)  # Ganin et al.'s rate by default


def test_bad_adaptation_settings_are_named():
    with pytest.raises(ConfigError, match="bn_forward"):
        make_strategy("dann", {"bn_forward": "mixed"})
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_strategy("cdan", {"lr_schedule": "cosine"})
    with pytest.raises(ConfigError, match="lr_gamma"):
        make_strategy("dann", {"lr_gamma": -1})


def _episode_task(shots=2, with_source=True):
    d = load_embedded("mnistm").split("test")
    bb = build_backbone("digits_cnn")
    images = bb.preprocessing(torch.from_numpy(d.images))
    ep = sample_episodes(d.labels, 5, shots, 3, 1, seed=0)[0]
    pool = bb.preprocessing(torch.from_numpy(load_embedded("mnistm").split("adapt").images[:200]))
    task = EpisodeTask(n_way=5, support_y=ep.support_labels, seed=0, support_x=images[ep.support],
                       query_x=images[ep.query], unlabelled_x=pool, backbone=lambda: copy.deepcopy(bb))
    if with_source:
        src = load_embedded("mnist").split("train")
        task.source_x = bb.preprocessing(torch.from_numpy(src.images[::12]))
        task.source_y = episode_source_labels(src.labels[::12], src.classes, [d.classes[c] for c in ep.classes])
    return task, ep


def test_source_labels_are_mapped_into_the_episode_by_class_name():
    got = episode_source_labels(np.array([0, 3, 7, 3, 9]), tuple("0123456789"), ("7", "3", "5"))
    assert got.tolist() == [-1, 1, 0, 1, -1]


@pytest.mark.parametrize("name", ADAPT)
@pytest.mark.parametrize("with_source", [True, False])
def test_every_adaptation_strategy_runs_a_few_shot_episode(name, with_source):
    task, ep = _episode_task(with_source=with_source)
    pred = make_strategy(name, {"steps": 3}).predict_episode(task)
    assert pred.shape == (len(ep.query),) and set(pred) <= set(range(5))


def test_episode_source_images_train_the_head_where_labelled_and_bad_labels_are_named():
    task, ep = _episode_task()
    s = make_strategy("dann", {"steps": 4, "frozen": 2})
    run = s.start_episode(task)
    assert run.model.start == 2  # frozen prefix computed once for every stream
    batch = next(run.second)
    assert set(batch) == {"target", "source_x", "source_y"} and len(batch["source_x"]) == s.source_batch_size
    x, y = next(run.batches)
    run.model.eval()  # running BatchNorm statistics: the two losses differ only by the source term
    labelled = s.loss(run.model, x, y, 2, batch).item()
    unlabelled = s.loss(run.model, x, y, 2, dict(batch, source_y=torch.full_like(batch["source_y"], -1))).item()
    assert np.isfinite(labelled) and labelled > unlabelled + 1e-3
    run.advance(4)
    assert run.predict().shape == (len(ep.query),)
    task.source_y = np.full(len(task.source_x), 5)
    with pytest.raises(ConfigError, match="source_y"):
        s.predict_episode(task)


def test_the_benchmark_summary_states_each_methods_own_settings():
    """A method whose params override the recipe (3,000 steps here) is named with them in the
    summary's description, which otherwise states only the recipe's 600 steps."""
    import pandas as pd

    from tl.adapt_bench import AdaptExperimentConfig, describe
    from tl.config import load_config

    rows = pd.DataFrame([{"source_images": 3600, "target_images": 500, "target": "mnistm"}])
    cfg = load_config(AdaptExperimentConfig, overrides=[
        "methods=[{strategy: source_only}, {strategy: dann, label: dann_long, params: {steps: 3000}}]"])
    text = describe(cfg, rows)
    assert "600 steps of 32 source" in text and "own settings over that recipe: dann_long: steps 3000." in text
    assert "own settings" not in describe(load_config(AdaptExperimentConfig), rows)
    # the experiment's own recipe (params): the steps it sets, and the keys the sentence has no place for
    shared = describe(load_config(AdaptExperimentConfig, overrides=["params={steps: 1200, weight_decay: 0.001, augment: digits}"]), rows)
    assert "1200 steps of 32 source" in shared and "weight_decay 0.001, augment digits," in shared
