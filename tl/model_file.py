"""The exported model format: what a model folder holds, and how to read it back with nothing else.

A model folder holds ``model.safetensors`` (backbone and head) and ``model.json`` (backbone name and
stages, input size and preprocessing, class names, the head, strategy, parameters and config, the
comparison entry it came from, the accuracy evaluated on the target's test split, provenance).
``model.json`` is written last: a folder without it is not a model. Its ``training`` entry records what
the model trained on: the data, its fingerprint, the training images' ids and a digest of each
(``image_digest``), so a prediction over those images can say that they are not new to the model. This module is the format alone
(``tl.export`` trains and writes, ``tl.predict`` reads), so a reader needs neither training code nor
the comparison that chose the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl.errors import ConfigError, WeightsError
from tl.models.weights import file_sha256
from tl.nn.heads import LinearFeatureHead, MLPHead

MODEL_FILE = "model.safetensors"
MANIFEST = "model.json"
FORMAT = "tl-model"
FORMAT_VERSION = 1


class ExportedModel(nn.Module):
    """Backbone and head as one module: images N x 3 x H x W in [0, 1] -> class scores (the
    backbone's preprocessing runs inside, so a caller needs nothing but the model)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, scale: float = 1.0):
        super().__init__()
        self.backbone, self.head, self.scale = backbone, head, scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.backbone.preprocessing(images)))

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Class probabilities from scores: softmax(scale x scores); the predicted class is the argmax
        of the scores either way."""
        return F.softmax(scores.float() * self.scale, dim=1)


def head_spec(head: nn.Module) -> dict:
    """What ``model.json`` says about a head, enough to rebuild it."""
    if isinstance(head, nn.Linear):
        return {"kind": "linear", "in_features": head.in_features, "classes": head.out_features, "scale": 1.0}
    if isinstance(head, MLPHead):
        return {"kind": "mlp", "in_features": head.in_features, "hidden": head.hidden, "classes": head.classes,
                "dropout": head.dropout, "scale": 1.0}
    return {"kind": "feature_linear", "in_features": head.weight.shape[0], "classes": head.weight.shape[1],
            "normalize": head.normalize, "standardize": head.standardize, "bias": head.bias is not None,
            "scale": head.scale}


def torch_head(fitted: Any) -> LinearFeatureHead:
    """A fitted NumPy ``FeatureHead`` as a torch module (float32), so a feature strategy's classifier
    is stored in the same file as a trained one."""
    d, n = fitted.weight.shape
    head = LinearFeatureHead(d, n, normalize=fitted.normalize, standardize=fitted.mean is not None,
                             bias=fitted.bias is not None, scale=fitted.scale)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(np.asarray(fitted.weight), dtype=torch.float32))
        if fitted.bias is not None:
            head.bias.copy_(torch.as_tensor(np.asarray(fitted.bias), dtype=torch.float32))
        if fitted.mean is not None:
            head.mean.copy_(torch.as_tensor(fitted.mean, dtype=torch.float32))
            head.std.copy_(torch.as_tensor(fitted.std, dtype=torch.float32))
    return head


def _build(manifest: dict, where: str) -> ExportedModel:
    """The architecture a manifest describes, randomly initialised (weights are loaded next)."""
    from tl.models import build_backbone

    try:
        bb, h = manifest["backbone"], manifest["head"]
        with torch.random.fork_rng(devices=[]):
            backbone = build_backbone(bb["name"], tuple(manifest["preprocessing"]["size"]))
        if h["kind"] == "linear":
            head: nn.Module = nn.Linear(h["in_features"], h["classes"])
        elif h["kind"] == "mlp":
            head = MLPHead(h["in_features"], h["classes"], hidden=h["hidden"], dropout=h["dropout"])
        elif h["kind"] == "feature_linear":
            head = LinearFeatureHead(h["in_features"], h["classes"], normalize=h["normalize"],
                                     standardize=h["standardize"], bias=h["bias"], scale=h["scale"])
        else:
            raise WeightsError(f"model '{where}': unknown head kind '{h['kind']}' in {MANIFEST}")
    except KeyError as exc:
        raise WeightsError(f"model '{where}': {MANIFEST} lacks the key {exc}") from exc
    except ConfigError as exc:
        raise WeightsError(f"model '{where}': its backbone cannot be built here: {exc}") from exc
    from tl.models.backbone import Preprocessing

    pp = manifest["preprocessing"]
    backbone.preprocessing = Preprocessing(tuple(pp["size"]), tuple(pp["mean"]), tuple(pp["std"]))
    return ExportedModel(backbone, head, float(h.get("scale", 1.0)))


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load strictly; a state dict of another architecture is an error naming the keys."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing keys: {show(missing)}"] if missing else []
        parts += [f"unexpected keys: {show(unexpected)}"] if unexpected else []
        if shapes:
            parts.append("wrong shapes: " + show([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        raise WeightsError(f"weights '{where}' do not fit the model that {MANIFEST} describes: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def model_from_parts(manifest: dict, state: dict[str, torch.Tensor], where: str = "model") -> ExportedModel:
    """The model from a manifest and its state dict (how Ray actors get it without the folder)."""
    model = _build(manifest, where)
    _fit_state(model, state, where)
    return model.eval()


def image_digest(image: np.ndarray) -> str:
    """One image's identity in ``model.json``'s ``training.image_digests``: the first 16 hex digits of
    the sha256 of its decoded pixels (float32, 3 x H x W, at the model's decode size). The same file
    decodes to the same pixels in the export and in ``tl.predict``, so a training image is recognised
    under any name, in any folder, manifest or Parquet file."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()[:16]


def training_digests(manifest: dict) -> set[str] | None:
    """The digests of the images a model trained on, or None for a model exported before they were
    recorded (its training images cannot be recognised)."""
    digests = (manifest.get("training") or {}).get("image_digests")
    return None if digests is None else set(digests)


def write_weights(model: nn.Module, folder: Path) -> dict:
    """Write ``model.safetensors`` into ``folder``; returns the manifest's ``files`` entry for it."""
    from safetensors.torch import save_file

    path = folder / MODEL_FILE
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": FORMAT})
    os.chmod(path, 0o644)  # safetensors writes owner-only; a model folder is meant to be shared
    return {MODEL_FILE: {"sha256": file_sha256(path), "bytes": path.stat().st_size}}


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``model.json``: the last file of a model folder, which makes the folder a model."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_plain))


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (np.ndarray, tuple)):
        return list(v)
    return str(v)


def read_manifest(folder: str | Path) -> dict:
    """``model.json`` of a model folder; a folder without it is refused (an interrupted export)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder '{folder}' does not exist or is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise WeightsError(f"'{folder}' is not a complete tl model folder: it has no {MANIFEST} (the export writes it "
                           f"last, so an interrupted export leaves none); export the model again")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"'{path}' is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WeightsError(f"'{path}' is not a tl model manifest (no \"format\": \"{FORMAT}\")")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"'{path}' has format version {manifest['format_version']}; this tl reads up to "
                           f"{FORMAT_VERSION}: upgrade tl")
    return manifest


def load_model(folder: str | Path) -> tuple[ExportedModel, list[str], dict]:
    """(model in eval mode, class names, manifest) from a model folder alone: no training config,
    comparison or pretrained weights are needed. The weights must fit the described architecture
    and match the digest recorded at export."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise WeightsError(f"model folder '{folder}' has no {MODEL_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise WeightsError(f"'{weights}' is not a safetensors file: {exc}") from exc
    model = model_from_parts(manifest, state, str(weights))
    expected = manifest.get("files", {}).get(MODEL_FILE, {}).get("sha256")
    if expected and file_sha256(weights) != expected:
        raise WeightsError(f"'{weights}' was changed after export: its sha256 differs from {MANIFEST}")
    return model, list(manifest["classes"]), manifest


def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, width: int,
            batch_size: int = 256) -> np.ndarray:
    """``fn`` over raw images (N x 3 x H x W in [0, 1]) in batches, without gradients: N x ``width``
    float32 (``width`` shapes the empty result)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(fn(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def scores(model: ExportedModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class scores of raw images (N x 3 x H x W in [0, 1]) in-process: what a loaded model is for."""
    model.eval()
    return batched(model, images, head_spec(model.head)["classes"], batch_size)
