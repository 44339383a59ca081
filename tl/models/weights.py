"""Where backbone weights come from, every source beside the others: ``imagenet`` (an installed
package's release, ``tl.models.imagenet_weights``); a torchvision weights name or a
timm pretrained release (``timm:NAME[.TAG]``), both only from the user's caches and never downloaded;
a ``.safetensors`` file; a ``.pt`` file loaded with ``weights_only=True``; or a folder written by
this project's pretraining workflow; files and folders may be local or at a URI
(``s3://…``, copied locally once). A file that does not fit the backbone is an error naming the
missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch

from tl.errors import WeightsError
from tl.storage import Location, is_uri
from tl.models.backbone import Backbone
from tl.models.timm_extra import is_timm, timm_arch, timm_module

MODEL_FILE = "backbone.safetensors"
META_FILE = "meta.json"


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WeightsError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"weights file '{path}' is not a safetensors file: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"weights file '{path}' was refused: it holds objects other than tensors, and tl never "
            f"unpickles code from a file (weights_only=True). Save a plain state_dict or use .safetensors"
        ) from exc
    except Exception as exc:
        raise WeightsError(f"weights file '{path}' is not a weights file: {exc}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file '{path}' does not hold a state_dict of tensors")
    return obj


def torchvision_weights_file(name: str) -> Path:
    """Path in the user's torch cache of a torchvision weights enum (``ResNet18_Weights.IMAGENET1K_V1``)."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except Exception as exc:
        raise WeightsError(f"unknown torchvision weights '{name}' (for example ResNet18_Weights.IMAGENET1K_V1)") from exc
    filename = os.path.basename(weights.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise WeightsError(
            f"torchvision weights '{name}' are not in the torch cache ({path}); tl never downloads weights. "
            f"Put the file there (torchvision downloads it to that path) or pass a local weights file"
        )
    return path


def _hf_cache_dir() -> str | None:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return env
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def timm_weights_file(name: str) -> Path:
    """Where the user's caches hold the pretrained weights of ``name`` (``resnet18`` or
    ``resnet18.a1_in1k``): the Hugging Face hub cache, then the torch hub cache. Never downloads."""
    timm = timm_module()
    arch = timm_arch(name)
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise WeightsError(f"timm model '{arch}' has no pretrained weights release")
    looked = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for f in files:
            hit = try_to_load_from_cache(cfg.hf_hub_id, f, cache_dir=_hf_cache_dir())
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
            looked.append(f"hf://{cfg.hf_hub_id}/{f}")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return path
        looked.append(str(path))
    raise WeightsError(f"timm weights '{arch}' ({cfg.tag or 'default'}) are not in the local caches (looked for "
                       f"{', '.join(looked) or 'nothing: no source is known'}); tl never downloads weights. Put the "
                       f"file there or pass a local weights file")


def read_timm_weights(source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict (timm names) and metadata for ``timm:NAME[.TAG]``, from the cache only: timm itself
    loads the file (applying its checkpoint conversions), with ``weights_only`` torch loading."""
    timm = timm_module()
    arch = timm_arch(source)
    path = timm_weights_file(arch)
    try:
        net = timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    except Exception as exc:
        raise WeightsError(f"timm weights '{arch}' in '{path}' could not be loaded: {exc}") from exc
    return net.state_dict(), {"source": source, "file": str(path)}


def read_weights(source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and metadata from a weights source string."""
    if is_timm(source):
        return read_timm_weights(source)
    if source.startswith("torchvision:"):
        path = torchvision_weights_file(source.split(":", 1)[1])
        return _read_file(path), {"source": source, "file": str(path)}
    path = Location.of(source).fetch() if is_uri(source) else Path(source).expanduser()  # a bucket: a local copy
    if path.is_dir():
        model, meta = path / MODEL_FILE, path / META_FILE
        if not model.is_file() or not meta.is_file():
            raise WeightsError(f"folder '{path}' is not a tl pretraining output (needs {MODEL_FILE} and {META_FILE})")
        return _read_file(model), json.loads(meta.read_text())
    if path.parent.is_file():
        raise WeightsError(f"weights path '{path}' is not usable: its parent '{path.parent}' is a file")
    return _read_file(path), {"source": str(path)}


#: what a weights file may hold, said whenever one does not fit
ACCEPTED = ("tl reads .pt/.pth state dicts (weights_only) and .safetensors files whose names are the backbone's "
            "own, timm's or torchvision's; a file in other names whose tensors match the architecture's one to one "
            "in order and shape converts with: python -m workflows.convert_weights FILE --backbone NAME --output "
            "NEW.safetensors")


def load_into(backbone: Backbone, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict strictly, mapping foreign names (torchvision's, timm's) onto stage names first.
    A file that does not fit is one error: how many of its tensors matched, a few names on each side
    (the file's as written, the architecture's as its own library names them) and what tl accepts."""
    mapped: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for k, v in state.items():
        new = k if k.startswith("stages.") else backbone.key_map(k)
        if new is not None:
            mapped[new], original[new] = v, k
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    shapes = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or shapes:
        native = backbone.native_names()

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        matched = len(set(own) & set(mapped)) - len(shapes)
        parts = [f"{matched} of the file's {len(mapped)} tensors match the architecture's {len(own)}"]
        if unexpected:
            parts.append(f"in the file only: {show([original[k] for k in unexpected])}")
        if missing:
            parts.append(f"in the architecture only: {show([native.get(k, k) for k in missing])}")
        if shapes:
            parts.append("wrong shapes: " + show([f"{original[k]} {tuple(mapped[k].shape)} vs {native.get(k, k)} "
                                                  f"{tuple(own[k].shape)}" for k in shapes]))
        raise WeightsError(f"weights '{where}' do not fit backbone '{backbone.name}': " + "; ".join(parts)
                           + f". {ACCEPTED}")
    backbone.load_state_dict(mapped, strict=True)


def load_weights(backbone: Backbone, source: str | None) -> dict:
    """Load ``source`` into ``backbone`` (None or 'random' keeps the random init); returns metadata."""
    if source in (None, "", "random", "none"):
        return {"source": "random"}
    from tl.models.imagenet_weights import IMAGENET_WEIGHTS, imagenet_state

    if source == IMAGENET_WEIGHTS:  # the installed package's release for this backbone
        state, meta = imagenet_state(backbone.name)
        load_into(backbone, state, f"{source} ({meta['file']})")
        return meta
    state, meta = read_weights(source)
    if meta.get("backbone") not in (None, backbone.name):
        raise WeightsError(f"weights '{source}' were trained for backbone '{meta['backbone']}', not '{backbone.name}'")
    load_into(backbone, state, source)
    return meta


def save_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Write a module's state dict as safetensors (contiguous copies, no shared storage)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}, str(path))


def file_sha256(path: str | Path) -> str:
    """The sha256 of a weights file, as result files record it, so a later change to the weights is caught."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """Digest of every tensor in a state dict: anything that changes the weights changes it."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
