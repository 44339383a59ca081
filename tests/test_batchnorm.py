"""BatchNorm statistics: AdaBN's re-estimation is that of the whole pool at once (whatever the batch
order or size), and ``batch_norm: frozen`` freezes the backbone's BatchNorm only (issue 42, items 5
and 9). Fast, no Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tl.nn.batchnorm as bn
from tl.data import load_embedded
from tl.models import build_backbone
from tl.models.backbone import Classifier
from tl.nn import ReplayBatches, batchnorm_layers, reestimate_batchnorm
from tl.strategies import make_strategy
from tl.train.loop import train_steps


def _pool(per_class: int = 40) -> tuple[torch.nn.Module, torch.Tensor]:
    """The digits CNN and a class-sorted pool of real digits (optdigits, ``per_class`` of each,
    upsampled to 28x28 by the backbone's preprocessing), to be cut into batches as callers do."""
    torch.manual_seed(0)
    model = build_backbone("digits_cnn")
    data = load_embedded("optdigits")
    rows = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in range(10)])
    return model, model.preprocessing(torch.from_numpy(data.images[rows]))


def _stats(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone()) for m in batchnorm_layers(model)]


def _assert_same(a, b, rtol=1e-4, atol=1e-6) -> None:
    for i, ((ma, va), (mb, vb)) in enumerate(zip(a, b)):
        assert torch.allclose(ma, mb, rtol=rtol, atol=atol), (i, (ma - mb).abs().max())
        assert torch.allclose(va, vb, rtol=rtol, atol=atol), (i, ((va - vb) / vb).abs().max())


def _by_hand(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's input over the whole pool, in one eval-mode forward under the statistics it holds:
    its per-channel mean and unbiased variance (float64)."""
    seen = {}

    def keep(m, args):
        seen.setdefault(m, args[0].double())

    hooks = [m.register_forward_pre_hook(keep) for m in batchnorm_layers(model)]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for m in batchnorm_layers(model):
        a = seen[m].transpose(0, 1).reshape(seen[m].shape[1], -1)
        out.append((a.mean(1).float(), a.var(1).float()))
    return out


def test_a_class_sorted_pool_in_batches_has_the_statistics_of_the_whole_pool():
    """Batches of 64 cut from class-sorted digits give each layer the mean and unbiased variance of
    its inputs over every image at once, under the new statistics of the layers below (what the
    model computes in eval mode on the pool); the old running average of per-batch statistics had
    running_var ~30% too low at the first layer."""
    model, x = _pool()
    whole, batched = copy.deepcopy(model), copy.deepcopy(model)
    assert reestimate_batchnorm(whole, [x]) == len(x)
    assert reestimate_batchnorm(batched, (x[i:i + 64] for i in range(0, len(x), 64))) == len(x)
    _assert_same(_stats(batched), _stats(whole))
    _assert_same(_stats(batched), _by_hand(batched, x))
    assert all(int(m.num_batches_tracked) == -(-len(x) // 64) for m in batchnorm_layers(batched))
    # the first layer's input does not depend on any statistic: exactly what training mode computes
    # on the pool as one batch (deeper ones differ from it by the n/(n-1) of training mode's biased
    # normalisation, below 1e-3 here)
    train_mode = copy.deepcopy(model).train()
    for m in batchnorm_layers(train_mode):
        m.momentum = 1.0
    with torch.no_grad():
        train_mode(x)
    _assert_same(_stats(batched), _stats(train_mode)[:1], rtol=1e-5)
    _assert_same(_stats(batched), _stats(train_mode), rtol=2e-3, atol=1e-5)


def test_the_order_and_the_sizes_of_the_batches_do_not_matter():
    model, x = _pool(30)
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    reestimate_batchnorm(a, [x[i:i + 64] for i in range(0, len(x), 64)])
    chunks = list(x.split(64))
    order = np.random.default_rng(0).permutation(len(chunks))
    reestimate_batchnorm(b, iter([chunks[i] for i in order]))
    # odd sizes, a batch of one image and an empty one, read again on every pass
    cuts = [0, 1, 2, 300, 300, 517, len(x)]
    assert reestimate_batchnorm(c, ReplayBatches(lambda: (x[s:e] for s, e in zip(cuts, cuts[1:])))) == len(x)
    _assert_same(_stats(b), _stats(a))
    _assert_same(_stats(c), _stats(a))


def test_every_path_gives_the_same_statistics(monkeypatch):
    """Kept step outputs (a chain), outputs too big to keep, and a model that is no known chain
    (prefix passes of the whole model): the same numbers, on a ResNet-18 with downsampling blocks
    and on the DTN with its BatchNorm1d."""
    torch.manual_seed(0)
    for name, size, n in (("resnet18", 16, 16), ("dtn_b256", None, 40)):
        model = build_backbone(name, size)
        s = model.preprocessing.size
        x = torch.cat([torch.rand(n, 3, *s) * (0.3 + 0.2 * k) + 0.1 * k for k in range(3)])
        results = []
        for budget, chain in ((bn.CACHE_BYTES, bn._chain), (0, bn._chain), (bn.CACHE_BYTES, lambda run: None)):
            monkeypatch.setattr(bn, "CACHE_BYTES", budget)
            monkeypatch.setattr(bn, "_chain", chain)
            m = copy.deepcopy(model)
            reestimate_batchnorm(m, list(x.split(n)))
            results.append(_stats(m))
        monkeypatch.undo()
        for r in results[1:]:
            _assert_same(r, results[0], rtol=1e-4, atol=1e-5)
        _assert_same(results[0], _by_hand(m, x), rtol=1e-4, atol=1e-5)


def test_modes_parameters_and_unreached_layers_are_kept():
    """Modes restored module by module, every parameter unchanged, no gradient; the stages before a
    cached frozen prefix's ``start`` and a discriminator's BatchNorm keep their own statistics."""
    _, x = _pool(30)
    strategy = make_strategy("dann", {"discriminator_bn": True})
    model = strategy.prepare(build_backbone("digits_cnn"), 10)
    with torch.no_grad():
        h = model.backbone.eval().run_stages(x, 0, 1)  # the cached output of a frozen first stage
    model.train()
    model.backbone.stages[2].eval()
    model.start = 1
    modes = {n: m.training for n, m in model.named_modules()}
    before = copy.deepcopy(model.state_dict())
    skipped = batchnorm_layers(model.backbone.stages[0]) + batchnorm_layers(model.alignment)
    assert len(skipped) == 3
    assert reestimate_batchnorm(model, [h[:100], h[100:]]) == 300
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    names = {n for n, m in model.named_modules() if m in skipped}
    for key, value in before.items():
        stats = key.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
        if stats and key.rsplit(".", 1)[0] not in names:
            assert not torch.equal(after[key], value) or key.endswith("num_batches_tracked"), key
        else:
            assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())


def test_nothing_to_estimate_from_is_an_error_that_changes_nothing():
    model, x = _pool(1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no target image"):
        reestimate_batchnorm(model, iter([]))
    with pytest.raises(ValueError, match="no target image"):
        reestimate_batchnorm(model, [x[:0]])
    # one image: the convolutional layers have positions enough, the 1-d BatchNorm of the DTN does not
    dtn = build_backbone("dtn_b256")
    dtn_before = copy.deepcopy(dtn.state_dict())
    with pytest.raises(ValueError, match="at least two"):
        reestimate_batchnorm(dtn, [torch.rand(1, 3, 32, 32)])
    for m, b in ((model, before), (dtn, dtn_before)):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
    assert reestimate_batchnorm(model, [x[:1]]) == 1


# --- batch_norm: frozen ------------------------------------------------------------------------


def test_frozen_batch_norm_freezes_the_backbone_but_not_the_discriminator():
    """``batch_norm: frozen`` is about the backbone's statistics: with DANN's ``discriminator_bn``,
    the discriminator's BatchNorm trains (training mode, running statistics updated by the step)
    while the backbone's stay in eval mode and unchanged."""
    _, x = _pool(7)
    strategy = make_strategy("dann", {"discriminator_bn": True, "batch_norm": "frozen", "steps": 1,
                                      "batch_size": 32, "target_batch_size": 32})
    assert strategy.batch_norm == "frozen"
    model = strategy.prepare(build_backbone("digits_cnn"), 10)
    backbone_bn, disc_bn = batchnorm_layers(model.backbone), batchnorm_layers(model.alignment)
    assert backbone_bn and disc_bn
    before = {m: _stats_of(m) for m in backbone_bn + disc_bn}
    y = torch.arange(32) % 10
    train_steps(model, strategy, iter([(x[:32], y)]), 1, target_batches=iter([x[32:]]))
    assert all(not m.training for m in backbone_bn)
    assert all(m.training for m in disc_bn) and model.alignment.training
    for m in backbone_bn:
        assert all(torch.equal(a, b) for a, b in zip(_stats_of(m), before[m]))
        assert int(m.num_batches_tracked) == 0
    for m in disc_bn:
        assert not torch.equal(m.running_mean, before[m][0]) and not torch.equal(m.running_var, before[m][1])
        assert int(m.num_batches_tracked) == 1
    # a plain Classifier: every BatchNorm is the backbone's
    plain = Classifier(build_backbone("digits_cnn"), 10)
    train_steps(plain, make_strategy("finetune", {"batch_norm": "frozen", "steps": 1}), iter([(x[:32], y)]), 1)
    assert all(not m.training for m in batchnorm_layers(plain))


def _stats_of(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return m.running_mean.clone(), m.running_var.clone()
