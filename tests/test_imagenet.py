"""ImageNet weights from the installed packages (tl.models.imagenet): EfficientNet-Lite0 and -Lite2
as tl backbones with ``weights: imagenet``, checked by a known answer through tl's own loading and
preprocessing, and the mapping by position that refuses what does not fit."""

import pytest
import torch
from skimage import data

from tl.errors import WeightsError
from tl.models import get_spec, make_backbone, num_stages
from tl.models.imagenet_weights import RELEASES, imagenet_state, map_by_position


def _image(name: str) -> torch.Tensor:
    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_imagenet_weights_and_preprocessing_give_the_known_answers():
    """scikit-image's chelsea is ImageNet class 285 (Egyptian cat) and coffee 967 (espresso), through
    make_backbone(..., "imagenet"), the backbone's own preprocessing (timm's size, mean, std and
    bicubic interpolation) and the release's classifier on the backbone's features."""
    bb = make_backbone("efficientnet_lite0", "imagenet").eval()
    assert bb.name == "efficientnet_lite0" and bb.feature_dim == 1280
    pp = bb.preprocessing
    assert pp.size == (224, 224) and pp.mean == pp.std == (0.5, 0.5, 0.5) and pp.interpolation == "bicubic"
    state, meta = imagenet_state("efficientnet_lite0")
    assert meta["package"] == RELEASES["efficientnet_lite0"].requirement and meta["file"].endswith(".pth")
    w, b = state["classifier.weight"], state["classifier.bias"]
    with torch.no_grad():
        probs = torch.cat([(bb(pp(_image(n))) @ w.T + b).softmax(1) for n in ("chelsea", "coffee")])
    assert probs.argmax(1).tolist() == [285, 967], probs.max(1)
    assert probs.max(1).values.min() > 0.5, probs.max(1)


def test_both_releases_load_with_their_stages_and_sizes():
    """Frozen depth counts timm's stages as for any backbone; Lite2 takes 260 px; the features of the
    loaded weights differ from a random initialisation's."""
    assert num_stages("efficientnet_lite0") == num_stages("efficientnet_lite2") == 5
    assert get_spec("efficientnet_lite2").preprocessing.size == (260, 260)
    lite2 = make_backbone("efficientnet_lite2", "imagenet", input_size=64).eval()
    random = make_backbone("efficientnet_lite2", None, input_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert lite2(x).shape == (2, 1280) and not torch.allclose(lite2(x), random(x))
    with pytest.raises(WeightsError, match="exist for backbones efficientnet_lite0, efficientnet_lite2, not 'digits_cnn'"):
        make_backbone("digits_cnn", "imagenet")


def test_mapping_by_position_refuses_a_shape_or_count_mismatch_naming_both_sides():
    dst = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.weight": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(0)}
    src = {"_conv.weight": torch.ones(4, 3, 3, 3), "_bn.weight": torch.ones(4)}
    out = map_by_position(src, dst, "mine.pth", "arch")
    assert set(out) == set(dst) and torch.equal(out["bn.weight"], torch.ones(4))  # the counters are the architecture's
    with pytest.raises(WeightsError, match=r"the first 1 of 2 tensors match, then '_bn.weight' \(5,\) in the file "
                                           r"meets 'bn.weight' \(4,\) in the architecture"):
        map_by_position({**src, "_bn.weight": torch.ones(5)}, dst, "mine.pth", "arch")
    with pytest.raises(WeightsError, match="the file has 3 tensors, the architecture 2; all 2 of the architecture "
                                           "match, then '_extra' has no counterpart"):
        map_by_position({**src, "_extra": torch.ones(1)}, dst, "mine.pth", "arch")


@pytest.mark.slow
def test_a_foreign_checkpoint_is_refused_by_check_and_converts_by_position(tmp_path):
    """A user's port of digits_cnn in other names: ``--check`` refuses it before anything runs, naming
    both sides and what tl accepts; ``workflows.convert_weights`` maps it by position to safetensors that
    load as the same tensors; a shape mismatch is refused at its first pair and nothing is written."""
    import subprocess
    import sys
    from pathlib import Path

    from tl.models import build_backbone
    from tl.models.convert import convert_weights

    repo = Path(__file__).resolve().parent.parent
    own = {k: v for k, v in build_backbone("digits_cnn").state_dict().items() if not k.endswith("num_batches_tracked")}
    foreign = {f"net.layer{i}.param": v.clone() + 1 for i, v in enumerate(own.values())}
    torch.save(foreign, tmp_path / "port.pth")
    r = subprocess.run([sys.executable, "-m", "workflows.finetune", "--check", "--set", f"weights={tmp_path / 'port.pth'}",
                        "--set", "target=optdigits"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"0 of the file's {len(foreign)} tensors match" in r.stderr and "net.layer0.param" in r.stderr
    assert "in the architecture only: stages.0." in r.stderr and "convert_weights" in r.stderr and "Ray" not in r.stdout

    out = tmp_path / "mine.safetensors"
    r = subprocess.run([sys.executable, "-m", "workflows.convert_weights", str(tmp_path / "port.pth"), "--backbone",
                        "digits_cnn", "--output", str(out)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{len(own)} tensors of" in r.stdout, r.stdout + r.stderr
    loaded = make_backbone("digits_cnn", str(out)).state_dict()
    assert all(torch.equal(loaded[k], v + 1) for k, v in own.items())

    bad = dict(foreign, **{"net.layer2.param": torch.zeros(7)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"the first 2 of \d+ tensors match, then 'net\.layer2\.param' \(7,\) in the "
                                           r"file meets 'stages\.\S+' \(\d+.*\) in the architecture"):
        convert_weights(str(tmp_path / "bad.pth"), "digits_cnn", tmp_path / "bad.safetensors")
    assert not list(tmp_path.glob("bad.safetensors*"))
