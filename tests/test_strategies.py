"""Every registered strategy: a finite first step, gradients exactly where they should be, BatchNorm
handled as stated, NaN losses named. Ray Train fine-tuning is a run of ``tl.runs`` (tests/test_runs.py)."""

import copy

import numpy as np
import pytest
import torch

from tl.data import load_embedded, sample_episodes
from tl.errors import ConfigError, TrainingError
from tl.models import build_backbone, count_trainable
from tl.strategies import REGISTRY, EpisodeTask, TrainedStrategy, make_strategy
from tl.train.loop import make_optimizer, train_steps


def episode(shots=2):
    d = load_embedded("optdigits").split("adapt")
    bb = build_backbone("digits_cnn")
    images = bb.preprocessing(torch.from_numpy(d.images))
    ep = sample_episodes(d.labels, 5, shots, 3, 1, seed=0)[0]
    return bb, images[ep.support], torch.as_tensor(ep.support_labels), images[ep.query], ep


def bn_stats(module):
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_strategy_runs_an_episode(name):
    bb, x, y, q, ep = episode()
    s = make_strategy(name)
    task = EpisodeTask(n_way=5, support_y=ep.support_labels, seed=0)
    if s.uses_embeddings:
        with torch.no_grad():
            task.support_emb, task.query_emb = bb(x).numpy(), bb(q).numpy()
    else:
        task.support_x, task.query_x, task.backbone = x, q, lambda: copy.deepcopy(bb)
        s = make_strategy(name, {"steps": 2})
        if s.uses_pool:  # the target's unlabelled pool, for the strategies that use one
            task.unlabelled_x = q
    pred = s.predict_episode(task)
    assert pred.shape == (len(q),) and set(pred) <= set(range(5))


TRAINED = sorted(n for n, c in REGISTRY.items() if issubclass(c, TrainedStrategy))
#: the parameter-efficient strategies: which backbone parameters each trains (written here from the
#: method's definition, not from the strategy's code)
PARTIAL = {"bitfit": lambda path, module, pname: pname == "bias",
           "norm_tuning": lambda path, module, pname: isinstance(module, torch.nn.BatchNorm2d),
           # lora: only the adapters' two factors, never a pretrained weight
           "lora": lambda path, module, pname: pname in ("lora_A", "lora_B")}


def untouched(name, model):
    """Ids of the parameters a parameter-efficient strategy leaves as they are: backbone parameters
    not of its kind, and ``protonet_ft``'s head (the support set's prototypes, computed, not trained)."""
    if name == "protonet_ft":
        return {id(p) for p in model.head.parameters()}
    keep = PARTIAL.get(name)
    if keep is None:
        return set()
    return {id(p) for path, m in model.backbone.named_modules() for pname, p in m.named_parameters(recurse=False)
            if not keep(path, m, pname)}


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("k", [0, 2, 4])
@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_one_step_gradients_reach_exactly_the_trainable_parameters(name, k, bn):
    if name == "scratch" and k:
        with pytest.raises(ConfigError, match="frozen must be 0"):
            make_strategy(name, {"frozen": k})
        return
    bb, x, y, _, _ = episode()
    if name == "protonet_ft" and k == bb.num_stages:
        with pytest.raises(ConfigError, match="'prototype' strategy"):
            make_strategy(name, {"frozen": k}).prepare(bb, 5)
        return
    # lora's B factor starts at zero, so A's gradient is exactly zero at the first step: look at the second
    steps = 2 if name == "lora" else 1
    s = make_strategy(name, {"frozen": k, "batch_norm": bn, "steps": steps})
    model = s.prepare(bb, 5)
    frozen_params = {id(p) for st in model.backbone.stages[:k] for p in st.parameters()} | untouched(name, model)
    s.on_start(model, x, y)
    before_frozen = bn_stats(model.backbone.stages[:k])
    before_live = bn_stats(model.backbone.stages[k:])
    losses = train_steps(model, s, iter([(x, y)] * steps), steps)
    assert np.all(np.isfinite(losses))
    for p in model.parameters():
        if id(p) in frozen_params:
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, bn_stats(model.backbone.stages[:k])))
    live_changed = any(not torch.equal(a, b) for a, b in zip(before_live, bn_stats(model.backbone.stages[k:])))
    assert live_changed == (bn == "train" and k < 4)
    n_opt = sum(p.numel() for g in make_optimizer(s, model).param_groups for p in g["params"])
    assert n_opt == count_trainable(model)


def test_trainable_counts_per_k_through_the_strategy():
    expected = [388896, 387968, 369408, 295424, 0]
    head = 256 * 10 + 10
    for k, n in enumerate(expected):
        model = make_strategy("finetune", {"frozen": k}).prepare(build_backbone("digits_cnn"), 10)
        assert count_trainable(model) == n + head


def test_trainable_counts_of_the_parameter_efficient_strategies():
    """digits_cnn: convolutions without bias, each followed by BatchNorm of 32, 64, 128, 256 channels.
    ``bitfit`` trains their shifts (480 at k=0), ``norm_tuning`` their scales and shifts (960); the
    first k stages stay frozen whole, and the head (256 x 10 + 10) always trains."""
    head = 256 * 10 + 10
    shifts = [480, 448, 384, 256, 0]
    for name, per_k in (("bitfit", shifts), ("norm_tuning", [2 * n for n in shifts])):
        counts = [count_trainable(make_strategy(name, {"frozen": k}).prepare(build_backbone("digits_cnn"), 10))
                  for k in range(5)]
        assert counts == [n + head for n in per_k], name
    rn = build_backbone("resnet18")
    bn = sum(m.num_features for m in rn.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert count_trainable(make_strategy("bitfit").prepare(rn, 10)) == bn + 512 * 10 + 10


def test_trainable_counts_of_lora_and_protonet_ft():
    """lora, rank r: each 3x3 convolution cin -> cout of digits_cnn learns A (r x cin x 3 x 3) and B
    (cout x r) and nothing else of the stage; protonet_ft trains the unfrozen stages whole and no head."""
    head = 256 * 10 + 10
    convs = [(3, 32), (32, 64), (64, 128), (128, 256)]
    for rank in (1, 4):
        per_stage = [rank * cin * 9 + cout * rank for cin, cout in convs]
        counts = [count_trainable(make_strategy("lora", {"frozen": k, "rank": rank}).prepare(build_backbone("digits_cnn"), 10))
                  for k in range(5)]
        assert counts == [sum(per_stage[k:]) + head for k in range(5)], rank
    finetune = [388896, 387968, 369408, 295424]
    counts = [count_trainable(make_strategy("protonet_ft", {"frozen": k}).prepare(build_backbone("digits_cnn"), 10))
              for k in range(4)]
    assert counts == finetune
    rn = build_backbone("resnet18")  # 20 convolutions (3 of them 1x1 downsamples) and no linear layer in the backbone
    convs_rn = [m for m in rn.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = sum(4 * c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels * 4 for c in convs_rn)
    assert len(convs_rn) == 20 and count_trainable(make_strategy("lora").prepare(rn, 10)) == expected + 512 * 10 + 10


def test_mlp_probe_trains_the_described_head_on_embeddings():
    """512 hidden units, ReLU, dropout 0.5 (active in training only), on standardised embeddings; fits a
    separable toy set, and the same seed gives the same head."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    labels = np.repeat(np.arange(3), 5)
    support = centres[labels] + rng.normal(size=(15, 16))
    s = make_strategy("mlp_probe")
    head = s.fit_head(support, labels, 3, seed=1)
    layers = [type(m).__name__ for m in head.net]
    assert layers == ["Linear", "ReLU", "Dropout", "Linear"] and head.net[0].out_features == 512
    assert head.net[2].p == 0.5 and not head.training
    assert count_trainable(head) == 16 * 512 + 512 + 512 * 3 + 3
    query = centres[[0, 1, 2]] + rng.normal(size=(3, 16)) * 0.5
    assert list(s.fit_predict(support, labels, query, 3, seed=1)) == [0, 1, 2]
    again = s.fit_head(support, labels, 3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))


def test_lora_and_protonet_ft_are_refused_or_kept_apart_where_they_cannot_run():
    with pytest.raises(ConfigError, match="rank"):
        make_strategy("lora", {"rank": 0})
    from tl.runs import RunConfig
    with pytest.raises(ConfigError, match="one few-shot episode"):
        RunConfig(strategy="protonet_ft", target="mnistm")


def test_non_finite_loss_names_strategy_step_and_rate():
    bb, x, y, _, _ = episode()
    s = make_strategy("finetune", {"lr": 1e30, "clip_grad": 0.0, "momentum": 0.0, "steps": 5})
    with pytest.raises(TrainingError, match=r"non-finite loss .* in 'finetune' at step \d+ with learning rate 1e\+30"):
        train_steps(s.prepare(bb, 5), s, iter([(x, y)] * 5), 5)


def test_frozen_prefix_cache_gives_the_same_model():
    """Training on cached frozen-stage outputs equals training through the frozen stages."""
    bb, x, y, q, ep = episode(3)
    s = make_strategy("finetune", {"frozen": 2, "steps": 5})
    task = EpisodeTask(n_way=5, support_y=ep.support_labels, seed=3, support_x=x, query_x=q,
                       backbone=lambda: copy.deepcopy(bb))
    fast = s.predict_episode(task)
    torch.manual_seed(3)
    model = s.prepare(copy.deepcopy(bb), 5)
    from tl.strategies.base import _support_batches
    from tl.train.loop import predict
    train_steps(model, s, _support_batches(x, y, s.batch_size, 3), 5)
    assert np.array_equal(fast, predict(model, q))


def test_a_support_set_one_image_over_the_batch_size_trains():
    """11 support images in batches of 10: the eleventh joins the last batch rather than forming a batch of
    one, which BatchNorm1d (digits_cnn's head) cannot normalise in training mode; each pass uses every image once."""
    from tl.strategies.base import _support_batches

    bb, x, y, q, ep = episode(3)  # 5-way 3-shot: 15 images
    x11, y11 = x[:11], y[:11]
    s = make_strategy("finetune", {"steps": 4, "batch_size": 10})
    batches = _support_batches(x11, y11, s.batch_size, 0)
    sizes = [len(next(batches)[0]) for _ in range(3)]
    assert sizes == [11, 11, 11]
    model = s.prepare(bb, 5)
    train_steps(model, s, _support_batches(x11, y11, s.batch_size, 0), 4)
    passes = _support_batches(torch.arange(12), y[:12], 10, 0)  # 12 = 10 + 2: two batches, every image once
    first, second = next(passes)[0], next(passes)[0]
    assert (len(first), len(second)) == (10, 2) and sorted(torch.cat([first, second]).tolist()) == list(range(12))


def test_bad_strategy_config_is_named():
    with pytest.raises(ConfigError, match="unknown strategy 'dnn'"):
        make_strategy("dnn")
    with pytest.raises(ConfigError, match="unknown config key 'strategies.finetune.frozn'"):
        make_strategy("finetune", {"frozn": 1})
    with pytest.raises(ConfigError, match="batch_norm"):
        make_strategy("finetune", {"batch_norm": "maybe"})


@pytest.mark.parametrize("name, moved", [("bitfit", {"bias"}), ("norm_tuning", {"weight", "bias"}),
                                         ("lora", "conv")])
def test_a_parameter_efficient_model_moves_only_its_kind_of_parameter(name, moved):
    """Trained and exported as a user gets it (``tl.export.train_model``): every other backbone
    tensor, BatchNorm's running statistics included (``batch_norm: frozen``), is byte-identical.
    lora's exported backbone has the plain layers' keys, its adapters merged into the convolutions."""
    from tl.export import train_model

    d = load_embedded("optdigits").split("adapt")
    idx = np.concatenate([np.flatnonzero(d.labels == c)[:3] for c in range(10)])
    bb = build_backbone("digits_cnn")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = train_model(make_strategy(name, {"steps": 5}), copy.deepcopy(bb), d.images[idx], d.labels[idx], 10, 0)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert set(after) == set(before)
    if moved == "conv":
        assert changed == {k for k in before if k.endswith(".weight") and before[k].ndim == 4}
        return
    bn_layers = {k.rsplit(".", 1)[0] for k in before if k.endswith("running_mean")}
    assert changed == {f"{layer}.{p}" for layer in bn_layers for p in moved}


@pytest.mark.parametrize("name,frozen", [("lp_ft", 3), ("dann", 2)])
def test_rows_are_the_same_with_the_frozen_prefix_computed_once_or_at_every_step(name, frozen, monkeypatch):
    """A trained strategy with frozen stages in eval mode runs them once per episode (``EpisodeRun``'s
    ``cache_prefix``); the rows of the same seeded episodes are those of the run that computes them at
    every step: the same accuracy and the same confusion counts (finetune's model: the test above; here
    lp_ft's probe and dann's two streams through the prefix, in a cell's episode runner)."""
    from tl.evaluate.episodes import run_episodes
    from tl.strategies.base import EpisodeRun

    d = load_embedded("optdigits").split("adapt")
    bb = build_backbone("digits_cnn")
    strategy = make_strategy(name, {"frozen": frozen, "steps": 3})
    x = bb.preprocessing(torch.from_numpy(d.images[:12]))
    task = EpisodeTask(n_way=5, support_y=d.labels[:10] % 5, seed=0, support_x=x[:10], query_x=x[10:],
                       backbone=lambda: copy.deepcopy(bb), unlabelled_x=x if strategy.uses_pool else None)
    rows = {}
    for cached in (True, False):
        monkeypatch.setattr(EpisodeRun, "cache_prefix", cached)
        assert strategy.start_episode(task).model.start == (frozen if cached else 0)
        rows[cached] = run_episodes({name: strategy}, d, shots=2, queries=5, episodes=2, seed=0, n_way=5,
                                    backbone=copy.deepcopy(bb), unlabelled=d if strategy.uses_pool else None)
    assert len(rows[True]) == len(rows[False]) == 2
    for a, b in zip(rows[True], rows[False]):
        assert a["accuracy"] == b["accuracy"] and a["confusion"] == b["confusion"], (a, b)
