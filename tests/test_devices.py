"""Right on a real cluster (issue 45): parameters frozen before DDP wraps the model, the precision of
mixed precision chosen per GPU, the losses read from the device in windows. What needs a GPU runs in
``python -m benchmarks.gpu``; here the same code paths on the CPU."""

import copy
import re

import numpy as np
import pytest
import torch

from tl.errors import TrainingError
from tl.models import build_backbone
from tl.strategies import EpisodeTask, make_strategy
from tl.strategies.finetune import Finetune
from tl.train import loop
from tl.train.loop import amp_dtype, grad_scaler, precision_name, train_steps


def batches(n=16, seed=0):
    """A fixed batch of random 28x28 images (digits_cnn's input) and 5 labels, repeated."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 28, 28, generator=gen), torch.arange(n) % 5
    while True:
        yield x, y


# --- frozen parameters ---------------------------------------------------------------------------


def test_param_groups_only_build_groups_and_freeze_settles_requires_grad():
    for name in ("finetune", "lp_ft", "dann"):
        s = make_strategy(name, {"backbone_lr_mult": 0})
        model = s.prepare(build_backbone("digits_cnn"), 5)
        groups = s.param_groups(model)
        assert "backbone" not in [g["name"] for g in groups]
        assert all(p.requires_grad for p in model.backbone.parameters())  # building groups changes nothing
        s.freeze(model)
        assert not any(p.requires_grad for p in model.backbone.parameters())
        assert all(p.requires_grad for p in model.head.parameters())
    s = make_strategy("finetune", {"frozen": 2})
    model = s.prepare(build_backbone("digits_cnn"), 5)
    before = [p.requires_grad for p in model.parameters()]
    s.freeze(model)  # a positive rate: what prepare froze stays as it is, nothing more
    assert [p.requires_grad for p in model.parameters()] == before


def test_an_episode_at_backbone_rate_zero_leaves_the_backbone_as_it_was():
    bb = build_backbone("digits_cnn")
    x, y = next(batches(10))
    s = make_strategy("finetune", {"backbone_lr_mult": 0, "steps": 3, "batch_norm": "frozen"})
    task = EpisodeTask(n_way=5, support_y=y.numpy(), seed=0, support_x=x, query_x=x[:4],
                       backbone=lambda: copy.deepcopy(bb))
    run = s.start_episode(task)
    run.advance(3)
    after = run.model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in bb.state_dict().items())


# --- mixed precision -----------------------------------------------------------------------------


def test_amp_dtype_is_bf16_where_the_gpu_has_it_else_fp16_and_none_off_cuda(monkeypatch):
    assert amp_dtype("cpu") is None and amp_dtype(torch.device("cpu")) is None
    assert precision_name(None) == "fp32" and grad_scaler(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("cuda") == torch.bfloat16 and precision_name(amp_dtype("cuda:0")) == "bf16"
    assert grad_scaler(torch.bfloat16) is None
    # an emulated bf16 (a GPU before Ampere) is not bf16 hardware: fp16 with a loss scaler there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("cuda") == torch.float16 and precision_name(torch.float16) == "fp16"
    assert amp_dtype("cpu") is None


def test_autocast_asked_for_on_the_cpu_changes_nothing():
    bb = build_backbone("digits_cnn")
    s = make_strategy("finetune", {"steps": 3})
    runs = []
    for autocast in (False, True):
        torch.manual_seed(0)
        runs.append(train_steps(s.prepare(copy.deepcopy(bb), 5), s, batches(), 3, autocast=autocast))
    assert runs[0] == runs[1]


def test_precision_is_said_once_per_prefix(capsys):
    loop._SAID.discard("[t-once]")
    assert loop.say_precision("[t-once]", "cpu") == "fp32"
    loop.say_precision("[t-once]", "cpu")
    assert capsys.readouterr().out == "[t-once] mixed precision: fp32 (no autocast on cpu)\n"


# --- losses read in windows ----------------------------------------------------------------------


def test_losses_are_the_same_floats_whatever_the_window():
    bb = build_backbone("digits_cnn")
    s = make_strategy("finetune", {"steps": 5, "batch_norm": "train"})
    got, seen = {}, []
    for every in (1, 2, 50):
        torch.manual_seed(0)
        got[every] = train_steps(s.prepare(copy.deepcopy(bb), 5), s, batches(), 5, sync_every=every)
    torch.manual_seed(0)
    with_callback = train_steps(s.prepare(copy.deepcopy(bb), 5), s, batches(), 5,
                                on_step=lambda step, value: seen.append((step, value)))
    assert got[1] == got[2] == got[50] == with_callback and len(got[1]) == 5
    assert all(isinstance(v, float) for v in got[1]) and np.all(np.isfinite(got[1]))
    assert seen == list(enumerate(got[1]))  # on_step: every step's value, when it is set


class NanAt(Finetune):
    """Finetune whose loss is NaN at step 3; remembers the steps it computed."""

    name = "nan_at"
    computed: list = []

    def loss(self, model, x, y, step):
        NanAt.computed.append(step)
        loss = super().loss(model, x, y, step)
        return loss * float("nan") if step == 3 else loss


@pytest.mark.parametrize("every, computed", [(50, 6), (2, 4)])
def test_a_non_finite_loss_stops_at_the_read_naming_its_own_step_and_rate(every, computed):
    s = NanAt(steps=6, lr=0.01, momentum=0.0)
    NanAt.computed = []
    message = "non-finite loss (nan) in 'nan_at' at step 3 with learning rate 0.0025"
    with pytest.raises(TrainingError, match=re.escape(message)):
        train_steps(s.prepare(build_backbone("digits_cnn"), 5), s, batches(), 6, sync_every=every,
                    lr_scale=lambda step: 1 / (step + 1))
    assert NanAt.computed == list(range(computed))  # read every `every` steps: no read (no wait) in between


# --- Ray Train: DDP over two workers -------------------------------------------------------------


@pytest.mark.slow
def test_two_ddp_workers_at_backbone_rate_zero_leave_the_pretrained_backbone_bit_identical(
        ray_local, pretrained, storage, tmp_path):
    """lp_ft with ``backbone_lr_mult: 0`` on 2 workers: the backbone is frozen before DDP wraps the model
    (frozen after, DDP waits for gradients that never come), its probe sees model and batch on one device."""
    from pathlib import Path

    from safetensors.torch import load_file

    from tl.models.weights import MODEL_FILE
    from tl.runs import RunConfig, run

    cfg = RunConfig(weights=pretrained, target="optdigits", strategy="lp_ft", limit=64, workers=2, checkpoint_every=2,
                    params={"steps": 2, "batch_size": 32, "backbone_lr_mult": 0, "probe_steps": 5})
    rec = run(cfg, storage, tmp_path / "out", log=lambda _: None)
    assert rec["steps"] == 2 and rec["device"] == "cpu" and rec["precision"] == "fp32"
    start = load_file(str(Path(pretrained) / MODEL_FILE))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    backbone = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
    assert backbone.keys() == start.keys()
    assert all(torch.equal(backbone[k], v) for k, v in start.items())
