"""Augmentation of few-shot support batches: a stated option of the trained strategies, because a
support set of ten images is over-fitted in a few steps without it. Works on preprocessed tensors
(N x 3 x H x W), per image, from a seeded generator so an episode stays reproducible.

- ``crop``: a random resized crop (area 60-100%, aspect 3/4-4/3) back to H x W
  (the Inception-style crop of Szegedy et al. 2015, as torchvision's RandomResizedCrop);
- ``crop_flip``: the crop, then a horizontal flip with probability 1/2 (not for digits or text,
  where a flip changes the class: the default is ``none``);
- ``digits``: the digits recipe of the source model that transfers (``tl.train.digit_augment``:
  small warps, stroke width, colours of either polarity, texture, lower resolution, noise), for
  digit-like sources; it needs the backbone's ``preprocessing`` to work in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop", "crop_flip", "digits")


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator, preprocessing=None) -> torch.Tensor:
    """``x`` augmented per image by ``mode`` (one of ``AUGMENTATIONS``), every draw from ``gen``."""
    if mode == "none":
        return x
    if mode == "digits":
        from tl.train.digit_augment import digit_augment_preprocessed

        if preprocessing is None:
            raise ValueError("augment 'digits' needs the backbone's preprocessing (its mean and std)")
        return digit_augment_preprocessed(x, preprocessing, gen)
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        u = torch.rand(4, generator=gen).tolist()
        area = (0.6 + 0.4 * u[0]) * h * w
        ratio = math.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
        ch = max(1, min(h, int(round(math.sqrt(area / ratio)))))
        cw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
        top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if mode == "crop_flip" and bool(torch.rand(1, generator=gen) < 0.5):
            img = img.flip(-1)
        out[i] = img
    return out


def augment_stream(batches, mode: str, seed: int, preprocessing=None):
    """``(x, y)`` batches with ``x`` augmented by ``mode``, every draw from one generator seeded
    with ``seed`` (the batches themselves when ``mode`` is ``none``): an episode's support batches
    and a Ray Train run's labelled stream alike."""
    if mode == "none":
        return batches
    gen = torch.Generator().manual_seed(seed)
    return ((augment_batch(x, mode, gen, preprocessing), y) for x, y in batches)
