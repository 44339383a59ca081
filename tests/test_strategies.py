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
    pred = s.predict_episode(task)
    assert pred.shape == (len(q),) and set(pred) <= set(range(5))


TRAINED = sorted(n for n, c in REGISTRY.items() if issubclass(c, TrainedStrategy))
#: the parameter-efficient strategies: which backbone parameters each trains (written here from the
#: method's definition, not from the strategy's code)
PARTIAL = {"bitfit": lambda module, pname: pname == "bias",
           "norm_tuning": lambda module, pname: isinstance(module, torch.nn.BatchNorm2d)}


def untouched(name, model):
    """Ids of the backbone parameters a parameter-efficient strategy leaves as pretrained."""
    keep = PARTIAL.get(name)
    if keep is None:
        return set()
    return {id(p) for m in model.backbone.modules() for pname, p in m.named_parameters(recurse=False)
            if not keep(m, pname)}


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("k", [0, 2, 4])
@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_one_step_gradients_reach_exactly_the_trainable_parameters(name, k, bn):
    if name == "scratch" and k:
        with pytest.raises(ConfigError, match="frozen must be 0"):
            make_strategy(name, {"frozen": k})
        return
    bb, x, y, _, _ = episode()
    s = make_strategy(name, {"frozen": k, "batch_norm": bn, "steps": 1})
    model = s.prepare(bb, 5)
    frozen_params = {id(p) for st in model.backbone.stages[:k] for p in st.parameters()} | untouched(name, model)
    s.on_start(model, x, y)
    before_frozen = bn_stats(model.backbone.stages[:k])
    before_live = bn_stats(model.backbone.stages[k:])
    losses = train_steps(model, s, iter([(x, y)]), 1)
    assert np.isfinite(losses[0])
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


def test_bad_strategy_config_is_named():
    with pytest.raises(ConfigError, match="unknown strategy 'dnn'"):
        make_strategy("dnn")
    with pytest.raises(ConfigError, match="unknown config key 'strategies.finetune.frozn'"):
        make_strategy("finetune", {"frozn": 1})
    with pytest.raises(ConfigError, match="batch_norm"):
        make_strategy("finetune", {"batch_norm": "maybe"})


@pytest.mark.parametrize("name, moved", [("bitfit", {"bias"}), ("norm_tuning", {"weight", "bias"})])
def test_a_parameter_efficient_model_moves_only_its_kind_of_parameter(name, moved):
    """Trained and exported as a user gets it (``tl.export.train_model``): every other backbone
    tensor, BatchNorm's running statistics included (``batch_norm: frozen``), is byte-identical."""
    from tl.export import train_model

    d = load_embedded("optdigits").split("adapt")
    idx = np.concatenate([np.flatnonzero(d.labels == c)[:3] for c in range(10)])
    bb = build_backbone("digits_cnn")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    model = train_model(make_strategy(name, {"steps": 5}), copy.deepcopy(bb), d.images[idx], d.labels[idx], 10, 0)
    after = model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn_layers = {k.rsplit(".", 1)[0] for k in before if k.endswith("running_mean")}
    assert changed == {f"{layer}.{p}" for layer in bn_layers for p in moved}
