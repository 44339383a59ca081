"""The source pretraining's digit augmentation: seeded, in range, and digits stay digits.

"Keeps the label" is checked with a classifier that owes nothing to the augmentation: nearest
neighbours among the clean MNIST train digits, on stroke maps (grey, polarity set so strokes are
bright, background removed, unit norm). Colour, inversion, texture and noise leave its accuracy on
the validation digits where it is; the whole augmentation (warps included, to which raw-pixel
neighbours are sensitive) keeps it far above chance, and a warp that does change digits (any
rotation angle: a 6 becomes a 9) is caught by the same measure.
"""

import numpy as np
import pytest
import torch

from tl.data import load_embedded
from tl.train.digit_augment import DigitAugment, digit_augment


def _strokes(x: torch.Tensor) -> torch.Tensor:
    g = x.mean(1)
    n = len(g)
    border = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], 1).median(1).values
    g = torch.where((border > g.mean((1, 2))).view(n, 1, 1), 1 - g, g)
    g = (g - g.flatten(1).median(1).values.view(n, 1, 1)).clamp_min(0)
    return (g / g.flatten(1).norm(dim=1).clamp_min(1e-6).view(n, 1, 1)).flatten(1)


@pytest.fixture(scope="module")
def digits():
    d = load_embedded("mnist")
    train, val = d.split("train"), d.split("val")
    ref, ref_y = _strokes(torch.from_numpy(train.images)), torch.from_numpy(train.labels)

    def accuracy(x: torch.Tensor) -> float:
        return float((ref_y[(_strokes(x) @ ref.T).argmax(1)] == torch.from_numpy(val.labels)).float().mean())

    return torch.from_numpy(val.images), accuracy


def test_the_augmentation_is_seeded_and_in_range(digits):
    x, _ = digits
    a = digit_augment(x[:64], torch.Generator().manual_seed(3))
    assert a.shape == x[:64].shape and a.dtype == torch.float32 and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, digit_augment(x[:64], torch.Generator().manual_seed(3)))
    assert not torch.equal(a, digit_augment(x[:64], torch.Generator().manual_seed(4)))
    assert float((a - x[:64]).abs().mean()) > 0.1  # it does change how digits look


def test_digits_keep_their_label(digits):
    x, accuracy = digits
    clean = accuracy(x)
    assert clean > 0.9
    looks = DigitAugment(rotate=0, scale=0, shear=0, shift=0, p_width=0, p_lowres=0)
    assert accuracy(digit_augment(x, torch.Generator().manual_seed(0), looks)) >= clean - 0.03
    whole = np.mean([accuracy(digit_augment(x, torch.Generator().manual_seed(s))) for s in range(3)])
    any_angle = DigitAugment(rotate=180, scale=0, shear=0, shift=0, p_colour=0, p_texture=0, p_width=0,
                               p_lowres=0, noise=0)
    turned = accuracy(digit_augment(x, torch.Generator().manual_seed(0), any_angle))
    assert whole >= 0.5 and turned < 0.35, (clean, whole, turned)


def test_a_run_or_episode_augments_its_labelled_stream_in_the_backbones_normalisation(digits):
    """``augment: digits`` of a trained strategy: applied between undoing and redoing the backbone's
    normalisation (so the augmented batch is still in it), seeded, labels untouched; a run wraps its
    labelled stream with it (tl.train.augment.augment_stream)."""
    from tl.models import build_backbone
    from tl.train.augment import augment_batch, augment_stream

    pp = build_backbone("digits_cnn", 28).preprocessing
    mean, std = torch.tensor(pp.mean).view(1, 3, 1, 1), torch.tensor(pp.std).view(1, 3, 1, 1)
    x = (digits[0][:16] - mean) / std
    y = torch.arange(16)
    a = augment_batch(x, "digits", torch.Generator().manual_seed(5), pp)
    assert torch.equal(a, augment_batch(x, "digits", torch.Generator().manual_seed(5), pp))
    back = a * std + mean
    assert a.shape == x.shape and not torch.equal(a, x) and back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="preprocessing"):
        augment_batch(x, "digits", torch.Generator())
    (ax, ay), = list(augment_stream(iter([(x, y)]), "digits", 5, pp))
    assert torch.equal(ax, a) and torch.equal(ay, y)
