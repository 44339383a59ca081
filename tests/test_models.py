"""Backbones: stages, freezing, and every way weights arrive (files these tests make)."""

import pickle

import pytest
import torch

from tl.errors import ConfigError, WeightsError
from tl.models import Classifier, build_backbone, count_trainable, load_weights, make_backbone, registered, save_weights

# Trainable parameters of each backbone (head excluded) with the first k stages frozen, k = 0..all.
# Like torchvision's trainable-layers table: resnet18 at k=0 is torchvision's 11,689,512 less fc.
TRAINABLE = {
    "digits_cnn": [388896, 387968, 369408, 295424, 0],
    # three 5x5 convolutions with BatchNorm (4,992; 205,184; 819,968), then 4x4x256 -> 512 with BatchNorm (2,098,688)
    "dtn": [3128832, 3123840, 2918656, 2098688, 0],
    "dtn_b256": [3260672, 3255680, 3050496, 2230528, 131840, 0],  # dtn, then 512 -> 256 with BatchNorm (131,840)
    "resnet18": [11176512, 11166976, 11019008, 10493440, 8393728, 0],
    "resnet50": [23508032, 23498496, 23282688, 22063104, 14964736, 0],
}


def test_every_registered_backbone_has_a_table_row():
    assert set(registered()) == set(TRAINABLE)


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_trainable_counts_per_frozen_depth(name):
    bb = build_backbone(name)
    assert bb.num_stages == len(TRAINABLE[name]) - 1
    assert [count_trainable(bb.freeze_first(k)) for k in range(bb.num_stages + 1)] == TRAINABLE[name]
    with pytest.raises(ConfigError, match="out of range"):
        bb.freeze_first(bb.num_stages + 1)


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_features_have_declared_size(name):
    bb = build_backbone(name, input_size=64 if name != "digits_cnn" else None)
    x = torch.rand(2, 3, *bb.preprocessing.size)
    assert bb(x).shape == (2, bb.feature_dim)


def test_frozen_stages_keep_batchnorm_statistics():
    bb = build_backbone("digits_cnn").freeze_first(2)
    bb.train()
    frozen_bn = bb.stages[0][1]
    live_bn = bb.stages[2][1]
    before_frozen, before_live = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    bb(torch.rand(8, 3, 28, 28) * 5)
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(live_bn.running_mean, before_live)
    assert not bb.stages[0].training and bb.stages[3].training


def test_safetensors_and_pt_roundtrip(tmp_path):
    src = build_backbone("digits_cnn")
    save_weights(src, tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        dst = make_backbone("digits_cnn", str(tmp_path / f))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


def test_torchvision_state_dict_maps_onto_stages(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    bb = make_backbone("resnet18", str(tmp_path / "tv.pth"))
    assert torch.equal(bb.stages[0][0].weight, tv.conv1.weight)
    assert torch.equal(bb.stages[4][1].bn2.running_var, tv.layer4[1].bn2.running_var)
    x = torch.rand(1, 3, 64, 64)
    tv.eval(), bb.eval()
    ref = torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))), 1)
    assert torch.allclose(bb(x), ref, atol=1e-5)


def test_torchvision_weights_name_from_the_torch_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not in the torch cache.*never downloads"):
        make_backbone("resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), ckpt / url.rsplit("/", 1)[1])
    bb = make_backbone("resnet18", "torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(bb.stages[1][0].conv1.weight, tv.layer1[0].conv1.weight)
    with pytest.raises(WeightsError, match="unknown torchvision weights"):
        make_backbone("resnet18", "torchvision:NoSuchWeights.V9")


def test_mismatched_weights_name_the_keys(tmp_path):
    save_weights(build_backbone("digits_cnn"), tmp_path / "digits.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit backbone 'resnet18': 1 of the file's 24 tensors match the "
                                           r"architecture's 120; in the file only: stages\.1\..*; in the architecture "
                                           r"only: stages\.1\..*tl reads \.pt/\.pth state dicts .*convert_weights"):
        make_backbone("resnet18", str(tmp_path / "digits.safetensors"))
    wide = build_backbone("digits_cnn")
    state = wide.state_dict()
    state["stages.3.1.bias"] = torch.zeros(10)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(WeightsError, match=r"wrong shapes: stages.3.1.bias \(10,\) vs stages.3.1.bias \(256,\)"):
        make_backbone("digits_cnn", str(tmp_path / "shape.pt"))


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/tl-evil-was-run", "w"))


def test_pickle_is_refused_never_executed(tmp_path):
    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(WeightsError, match="refused"):
        make_backbone("digits_cnn", str(f))
    import os
    assert not os.path.exists("/tmp/tl-evil-was-run")


def test_not_a_weights_file(tmp_path):
    (tmp_path / "notes.safetensors").write_text("hello")
    (tmp_path / "notes.pt").write_text("hello")
    for f in ("notes.safetensors", "notes.pt"):
        with pytest.raises(WeightsError, match=f):
            make_backbone("digits_cnn", str(tmp_path / f))
    with pytest.raises(WeightsError, match="does not exist"):
        make_backbone("digits_cnn", str(tmp_path / "none.safetensors"))


def test_classifier_and_unknown_backbone():
    m = Classifier(build_backbone("digits_cnn"), 10)
    assert m(torch.rand(3, 3, 28, 28)).shape == (3, 10)
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")
    assert load_weights(build_backbone("digits_cnn"), None) == {"source": "random"}
