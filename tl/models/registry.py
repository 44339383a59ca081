"""Where backbone providers register, and the one factory that builds a backbone by name.

A provider registers named specs (``digits_cnn``, ``resnet18``) or a name prefix whose specs it
makes on demand (``timm:`` + any timm model). Importing ``tl.models`` imports every provider, so
this registry is full whenever anything in the package has been imported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Sequence

import torch

from tl.errors import ConfigError
from tl.models.backbone import Backbone, BackboneSpec, image_size
from tl.models.weights import load_weights

InputSize = int | Sequence[int] | None


@dataclass(frozen=True)
class _Family:
    """Backbones named ``prefix + anything``, described and built by their provider on demand."""

    spec: Callable[[str], BackboneSpec]
    build: Callable[[str, InputSize], Backbone]


_SPECS: dict[str, BackboneSpec] = {}
_FAMILIES: dict[str, _Family] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _SPECS[spec.name] = spec
    return spec


def register_prefix(prefix: str, spec: Callable[[str], BackboneSpec],
                    build: Callable[[str, InputSize], Backbone]) -> None:
    """Names starting with ``prefix`` go to a provider that knows more models than it can list
    (timm): ``spec(name)`` describes one, ``build(name, input_size)`` builds it."""
    _FAMILIES[prefix] = _Family(spec, build)


def registered() -> list[str]:
    """The named backbones (prefix families such as ``timm:`` are open-ended, so not listed)."""
    return sorted(_SPECS)


def _family(name: str) -> _Family | None:
    return next((f for prefix, f in _FAMILIES.items() if name.startswith(prefix)), None)


def get_spec(name: str) -> BackboneSpec:
    family = _family(name)
    if family is not None:
        return family.spec(name)
    if name not in _SPECS:
        named = [p for p in _FAMILIES if not p.endswith(":")]  # providers of a few fixed names (ImageNet's)
        raise ConfigError(f"unknown backbone '{name}' (registered: {', '.join(registered() + sorted(named))}; "
                          f"or timm:<model> with the timm extra)")
    return _SPECS[name]


@lru_cache(maxsize=None)
def num_stages(name: str) -> int:
    """How many stages a registered backbone has (built once, then remembered)."""
    return len(get_spec(name).builder())


def build_backbone(name: str, input_size: InputSize = None) -> Backbone:
    """A randomly initialised backbone; ``input_size`` overrides the preprocessing size."""
    family = _family(name)
    if family is not None:
        return family.build(name, input_size)
    spec = get_spec(name)
    size = image_size(input_size)
    pp = spec.preprocessing if size is None else replace(spec.preprocessing, size=size)
    return Backbone(spec.name, spec.builder(), spec.feature_dim, pp, spec.key_map)


@lru_cache(maxsize=64)
def input_size_of(name: str, input_size: InputSize = None) -> tuple[int, int]:
    """The (height, width) a backbone takes: what a user's images are decoded to unless their data
    spec says otherwise (built once per name and override, then remembered)."""
    return tuple(int(v) for v in build_backbone(name, input_size).preprocessing.size)  # type: ignore[return-value]


def make_backbone(name: str, weights: str | None = None, input_size: int | None = None, seed: int = 0) -> Backbone:
    """Build a registered backbone and load its weights. Without weights the random initialisation
    is drawn from ``seed``, so every process (driver, Ray actors) builds the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bb = build_backbone(name, input_size)
    load_weights(bb, weights)
    return bb


def check_weights(backbone: str, weights: str | None, input_size: InputSize = None) -> str | None:
    """``--check``'s look at weights the user names (a local file or folder, a ``torchvision:`` or
    ``timm:`` name, ``imagenet``): loaded into the backbone here, so a file that does not fit is
    the same clear error before anything starts; returns what was checked (None: nothing to check:
    random weights, a ``pretrained`` name, made when the run needs it, or a URI, not fetched by a check)."""
    from tl.storage import is_uri

    w = str(weights or "")
    if w in ("", "random", "none") or w == "pretrained" or w.startswith("pretrained:") or is_uri(w):
        return None
    make_backbone(backbone, w, input_size if isinstance(input_size, int) else None)
    return f"weights {w} fit backbone {backbone}"
