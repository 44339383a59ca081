"""Augmentation for a source model that transfers: digits stay digits, their look does not.

A model pretrained on clean MNIST (white strokes on black, centred, thin) meets coloured strokes
on textured photographs (MNIST-M) or blurry thick 8x8 scans (optdigits) and fails, although it
scores 99% on its own validation digits. Domain randomisation (Tobin et al. 2017) trains on
looks the source never shows, so the features must carry the shape: every image gets a small
affine warp (rotation, scale, shear and shift that keep a 6 a 6), a stroke width change, a
stroke colour and background colour drawn apart (either polarity: inversion included), a smooth
random background texture, a loss of resolution and pixel noise. Nothing here sees a target
image. Every draw comes from the caller's generator, so an epoch's augmentation is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SOURCE_AUGMENTS = ("shift", "digits")


@dataclass(frozen=True)
class DigitAugment:
    """The draws' ranges. ``rotate`` degrees, ``scale`` relative, ``shear`` radians, ``shift`` a
    fraction of the side; the rest probabilities per image (``contrast``: the least difference in
    brightness between stroke and background)."""

    rotate: float = 15.0
    scale: float = 0.15
    shear: float = 0.2
    shift: float = 0.1
    p_colour: float = 0.9
    p_invert: float = 0.5
    contrast: float = 0.3
    p_texture: float = 0.5
    p_width: float = 0.3
    p_lowres: float = 0.3
    noise: float = 0.05


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _chance(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def affine(x: torch.Tensor, a: DigitAugment, gen: torch.Generator) -> torch.Tensor:
    """A small random affine warp per image (bilinear, the border's value outside)."""
    n = len(x)
    ang = _uniform(n, -a.rotate, a.rotate, gen) * math.pi / 180
    s = 1 + _uniform(n, -a.scale, a.scale, gen)
    sh = _uniform(n, -a.shear, a.shear, gen)
    t = _uniform(2 * n, -2 * a.shift, 2 * a.shift, gen).view(n, 2)  # affine_grid's unit is half the side
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin + sh, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _stroke(g: torch.Tensor, a: DigitAugment, gen: torch.Generator) -> torch.Tensor:
    """Thicker (grey dilation) or thinner (erosion) strokes for a share ``p_width`` of the images."""
    n = len(g)
    pick = _chance(n, a.p_width, gen)
    thick = _chance(n, 0.5, gen)
    dil = F.max_pool2d(g, 3, 1, 1)
    ero = -F.max_pool2d(-g, 3, 1, 1)
    out = torch.where((pick & thick).view(n, 1, 1, 1), dil, g)
    return torch.where((pick & ~thick).view(n, 1, 1, 1), ero, out)


def _colours(n: int, a: DigitAugment, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stroke and background colours (n x 3) whose brightness differs by at least ``contrast``;
    the stroke the darker one for a share ``p_invert``."""
    hi = _uniform(n, 0.5 + a.contrast / 2, 1.0, gen).view(n, 1)
    lo = _uniform(n, 0.0, 0.5 - a.contrast / 2, gen).view(n, 1)
    tint_hi = _uniform(3 * n, 0.6, 1.4, gen).view(n, 3)
    tint_lo = _uniform(3 * n, 0.6, 1.4, gen).view(n, 3)
    bright, dark = (hi * tint_hi).clamp(0, 1), (lo * tint_lo).clamp(0, 1)
    inv = _chance(n, a.p_invert, gen).view(n, 1)
    return torch.where(inv, dark, bright), torch.where(inv, bright, dark)


def digit_augment(x: torch.Tensor, gen: torch.Generator, a: DigitAugment = DigitAugment()) -> torch.Tensor:
    """Augment a batch of digits (N x 3 x H x W in [0, 1], strokes brighter than the background, as
    the embedded sources are); returns the same shape in [0, 1]."""
    n, _, h, w = x.shape
    g = affine(x.mean(1, keepdim=True), a, gen)
    g = _stroke(g, a, gen)
    g = (g - g.amin((2, 3), keepdim=True)) / (g.amax((2, 3), keepdim=True) - g.amin((2, 3), keepdim=True)).clamp_min(1e-6)
    fg, bg = _colours(n, a, gen)
    bg_map = bg.view(n, 3, 1, 1).expand(n, 3, h, w)
    texture = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen) - 0.5, size=(h, w), mode="bicubic",
                            align_corners=False)
    textured = _chance(n, a.p_texture, gen).view(n, 1, 1, 1)
    bg_map = torch.where(textured, (bg_map + 0.6 * texture).clamp(0, 1), bg_map)
    coloured = bg_map + (fg.view(n, 3, 1, 1) - bg_map) * g
    grey = g.expand(n, 3, h, w)
    out = torch.where(_chance(n, a.p_colour, gen).view(n, 1, 1, 1), coloured, grey)
    side = torch.randint(7, max(8, h // 2 + 1), (n,), generator=gen)
    low = _chance(n, a.p_lowres, gen)
    for i in torch.nonzero(low).flatten().tolist():  # few images: a per-image resize is cheap
        r = int(side[i])
        small = F.interpolate(out[i:i + 1], size=(r, r * w // h), mode="area")
        out[i] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    out = out + a.noise * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def digit_augment_preprocessed(x: torch.Tensor, preprocessing, gen: torch.Generator) -> torch.Tensor:
    """``digit_augment`` on a batch in a backbone's normalisation (``preprocessing.mean``/``std``):
    undone to [0, 1], augmented, and normalised again. Drawn on the CPU (the generator's device)
    and handed back on ``x``'s device, in its memory format."""
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
    cpu = x.detach().float().cpu().contiguous()
    out = (digit_augment((cpu * std + mean).clamp(0, 1), gen) - mean) / std
    return torch.empty_like(x).copy_(out)
