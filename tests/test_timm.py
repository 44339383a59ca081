"""timm backbones (optional extra): stages from feature_info, the freeze-count test, weights from local
files and the user's cache only (never downloaded), and a timm model exported and loaded back."""

import copy

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from tl.errors import ConfigError, WeightsError  # noqa: E402
from tl.models import build_backbone, count_trainable, get_spec, make_backbone, num_stages, save_weights  # noqa: E402
from tl.models.backbone import IMAGENET  # noqa: E402
from tl.models.weights import load_into, read_timm_weights  # noqa: E402
from tl.strategies import make_strategy  # noqa: E402
from tl.train.loop import train_steps  # noqa: E402

CNN = "timm:mobilenetv3_small_050"  # stages run in sequence (BatchNorm everywhere)
VIT = "timm:vit_tiny_patch16_224"  # stages are parameter groups (class token, position embedding)
SIZE = {CNN: 64, VIT: 32}


def bn_stats(modules):
    return [m.running_mean.clone() for s in modules for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_stages_come_from_feature_info():
    net = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    bb = build_backbone(CNN)
    assert bb.num_stages == len(net.feature_info) == num_stages(CNN) == 5
    assert bb.sequential and "stages run in sequence" in get_spec(CNN).description
    assert [list(s.body._modules)[-1] for s in bb.stages] == ["bn1", "blocks_0", "blocks_1", "blocks_3", "blocks_5"]
    assert bb.preprocessing.size == (224, 224) and (bb.preprocessing.mean, bb.preprocessing.std) == IMAGENET
    assert build_backbone(CNN, input_size=64).preprocessing.size == (64, 64)
    vit = build_backbone(VIT, input_size=32)
    assert vit.num_stages == 12 and not vit.sequential and "cls_token" in dict(vit.stages[0].named_parameters())
    assert vit.preprocessing.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", [CNN, VIT])
def test_features_are_forward_features_and_the_model_s_pooling(name):
    bb = build_backbone(name, input_size=SIZE[name]).eval()
    x = torch.rand(2, 3, SIZE[name], SIZE[name])
    with torch.no_grad():
        f = bb(x)
        ref = bb.net.forward_head(bb.net.forward_features(x), pre_logits=True)
        k = 2
        cached = bb(bb.run_stages(x, 0, k), start=k)  # a frozen prefix computed once, as strategies do
        mid = bb(x, stage=2)
    assert f.shape == (2, bb.feature_dim) and torch.allclose(f, ref)
    assert torch.allclose(cached, f, atol=1e-5)
    assert mid.ndim == 2 and bb.stage_dim(2) == mid.shape[1]


@pytest.mark.parametrize("name", [CNN, VIT])
def test_freeze_count(name):
    """Trainable counts fall as k grows, to 0; one training step reaches exactly the unfrozen
    parameters; frozen BatchNorm statistics stay put while live ones move."""
    bb = build_backbone(name, input_size=SIZE[name])
    counts = [count_trainable(bb.freeze_first(k)) for k in range(bb.num_stages + 1)]
    assert counts[0] == sum(p.numel() for p in bb.net.parameters())
    assert all(a > b for a, b in zip(counts, counts[1:])) and counts[-1] == 0
    with pytest.raises(ConfigError, match="out of range"):
        bb.freeze_first(bb.num_stages + 1)
    x, y = torch.rand(8, 3, SIZE[name], SIZE[name]), torch.arange(8) % 4
    for k in (1, bb.num_stages - 1):
        s = make_strategy("finetune", {"frozen": k, "batch_norm": "train", "steps": 1})
        model = s.prepare(copy.deepcopy(bb), 4)
        frozen = {id(p) for st in model.backbone.stages[:k] for p in st.parameters()}
        before_frozen, before_live = bn_stats(model.backbone.stages[:k]), bn_stats(model.backbone.stages[k:])
        train_steps(model, s, iter([(x, y)]), 1)
        for p in model.parameters():
            if id(p) in frozen:
                assert p.grad is None and not p.requires_grad
            else:
                assert p.grad is not None
        assert sum(p.numel() for p in model.parameters() if p.grad is not None) == count_trainable(model)
        assert all(torch.equal(a, b) for a, b in zip(before_frozen, bn_stats(model.backbone.stages[:k])))
        after_live = bn_stats(model.backbone.stages[k:])
        assert not before_live or any(not torch.equal(a, b) for a, b in zip(before_live, after_live))
        assert not any(m.training for st in model.backbone.stages[:k] for m in st.modules())


def test_an_episode_with_a_frozen_prefix_runs():
    from tl.strategies import EpisodeTask

    bb = build_backbone(CNN, input_size=32)
    x, y = torch.rand(6, 3, 32, 32), np.arange(6) % 3
    task = EpisodeTask(n_way=3, support_y=y, seed=0, support_x=x, query_x=torch.rand(4, 3, 32, 32),
                       backbone=lambda: copy.deepcopy(bb))
    pred = make_strategy("finetune", {"frozen": 3, "steps": 2}).predict_episode(task)
    assert pred.shape == (4,) and set(pred) <= {0, 1, 2}


def test_weights_from_a_local_timm_file(tmp_path):
    """A state dict in timm's own names (classifier included) loads onto the stages; the classifier is
    dropped. Weights of another architecture are refused, naming keys."""
    src = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "mnv3.pt")
    bb = make_backbone(CNN, str(tmp_path / "mnv3.pt"))
    mine = bb.net.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(mine[k], v), k
    save_weights(build_backbone("digits_cnn"), tmp_path / "digits.safetensors")
    # both sides in their own names: the file's (tl's digits stages), the architecture's (timm's)
    with pytest.raises(WeightsError, match=r"do not fit backbone 'timm:mobilenetv3_small_050': 0 of the file's \d+ "
                                           r"tensors match .*in the file only: stages\.0\..*in the architecture only: "
                                           r"(blocks|bn1|conv_stem)\."):
        make_backbone(CNN, str(tmp_path / "digits.safetensors"))


def test_pretrained_weights_only_from_the_cache(tmp_path, monkeypatch):
    """``timm:NAME.TAG`` weights come from the Hugging Face cache when it holds them; otherwise the error
    says where it looked and that nothing is downloaded."""
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="not in the local caches.*never downloads"):
        read_timm_weights("timm:mobilenetv3_small_050.lamb_in1k")
    src = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000)
    repo = tmp_path / "hub" / "models--timm--mobilenetv3_small_050.lamb_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    state, meta = read_timm_weights("timm:mobilenetv3_small_050.lamb_in1k")
    assert meta["file"].endswith("model.safetensors") and "classifier.weight" not in state
    bb = build_backbone(CNN)
    load_into(bb, state, "cache")
    assert torch.equal(bb.stages[0].body.conv_stem.weight, src.conv_stem.weight)


def test_unknown_timm_model_is_named():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet_nope'"):
        build_backbone("timm:resnet_nope")


def test_a_timm_model_exports_and_loads(tmp_path):
    from tl.export import ExportConfig, export
    from tl.model_file import load_model, scores

    m = export(ExportConfig(strategy="prototype", target="optdigits", backbone=CNN, input_size=32, weights="random",
                            train_on="shots", shots=2), tmp_path, tmp_path / "model", lambda _: None)
    model, classes, manifest = load_model(tmp_path / "model")
    assert manifest["backbone"]["name"] == CNN and manifest["input_size"] == [32, 32]
    from tl.data import load_embedded

    test = load_embedded("optdigits").split("test")
    acc = float((scores(model, test.images).argmax(1) == test.labels).mean())
    assert acc == m["evaluation"]["accuracy"]
