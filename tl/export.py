"""Train the winning strategy on all of a target's labelled images and write a self-contained model folder.

The strategy and its hyper-parameters come from a comparison's ``best.yaml`` (a target and a shot
count pick the entry) or are given directly. Training uses every labelled image of the target's
training split (``train_on: all``, the default: for the embedded suite, every image of the
``adapt`` split) or K images per class of it (``train_on: shots``), with the same code the
comparison's episodes run: a trained strategy trains a backbone and a linear head with the one
training loop; a feature strategy fits its head (prototypes, logistic or standardised linear
weights) on the backbone's embeddings.

The folder holds ``model.safetensors`` (backbone and head) and ``model.json`` (backbone name and
stages, input size and preprocessing, class names, the head, strategy, parameters and config, the
comparison entry it came from, the accuracy evaluated on the target's test split, provenance). It
is written as a temporary folder renamed at the end, with ``model.json`` written last: a folder
without it is not a model. ``load_model`` needs only the folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl.config import to_dict
from tl.errors import ConfigError, DataError, WeightsError

MODEL_FILE = "model.safetensors"
MANIFEST = "model.json"
FORMAT = "tl-model"
FORMAT_VERSION = 1
TRAIN_ON = ("all", "shots")


# --- the exported module ------------------------------------------------------------------------

class LinearFeatureHead(nn.Module):
    """The torch form of ``tl.strategies.feature.FeatureHead``: ``scores = T(f) @ weight + bias`` with
    ``T`` standardising (``mean``, ``std``) and/or L2-normalising; ``weight`` is features x classes."""

    def __init__(self, in_features: int, classes: int, *, normalize: bool, standardize: bool, bias: bool,
                 scale: float = 1.0):
        super().__init__()
        self.normalize, self.standardize, self.scale = normalize, standardize, scale
        self.weight = nn.Parameter(torch.zeros(in_features, classes))
        self.bias = nn.Parameter(torch.zeros(classes)) if bias else None
        if standardize:
            self.register_buffer("mean", torch.zeros(in_features))
            self.register_buffer("std", torch.ones(in_features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            f = (f - self.mean) / self.std
        if self.normalize:
            f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = f @ self.weight
        return s if self.bias is None else s + self.bias


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
    return {"kind": "feature_linear", "in_features": head.weight.shape[0], "classes": head.weight.shape[1],
            "normalize": head.normalize, "standardize": head.standardize, "bias": head.bias is not None,
            "scale": head.scale}


def torch_head(fitted) -> LinearFeatureHead:
    """A fitted NumPy ``FeatureHead`` as a torch module (float32)."""
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
        elif h["kind"] == "feature_linear":
            head = LinearFeatureHead(h["in_features"], h["classes"], normalize=h["normalize"],
                                     standardize=h["standardize"], bias=h["bias"], scale=h["scale"])
        else:
            raise WeightsError(f"model '{where}': unknown head kind '{h['kind']}' in {MANIFEST}")
    except KeyError as exc:
        raise WeightsError(f"model '{where}': {MANIFEST} lacks the key {exc}") from exc
    except ConfigError as exc:
        raise WeightsError(f"model '{where}': its backbone cannot be built here: {exc}") from exc
    from tl.models import Preprocessing

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    if expected and _sha256(weights) != expected:
        raise WeightsError(f"'{weights}' was changed after export: its sha256 differs from {MANIFEST}")
    return model, list(manifest["classes"]), manifest


# --- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportConfig:
    """What to export. Either ``best`` (a comparison's best.yaml; ``target`` and ``shots`` pick the
    entry, and it gives the strategy, parameters, backbone and weights) or ``strategy`` + ``params``.

    ``target``: an embedded target (``mnistm``, ``optdigits``, ``optdigits:novel``) trained on its
    ``train_split`` and evaluated on its ``test_split``; or ``data``: a user's labelled images (an
    image folder with one subfolder per class, a CSV manifest or a Parquet file), all of which train,
    evaluated on ``test_data`` when given (a best.yaml of a comparison on the user's ``data`` names
    them itself). Adaptation strategies use the training images as their unlabelled pool. ``train_on``: ``all`` labelled images, or ``shots`` per
    class (drawn by ``seed``). ``backbone``/``weights``/``input_size`` default to best.yaml's, else
    the digits CNN and the tl home's pretrained weights."""

    best: str | None = None
    target: str | None = None
    shots: int | None = None
    strategy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    backbone: str | None = None
    weights: str | None = None
    input_size: int | None = None
    data: str | None = None
    test_data: str | None = None
    train_split: str = "adapt"
    test_split: str = "test"
    train_on: str = "all"
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"config key 'train_on' must be one of {TRAIN_ON}, got '{self.train_on}'")
        if self.best and self.strategy:
            raise ConfigError("config keys 'best' and 'strategy': give one (best.yaml names the strategy)")
        if not self.best and not self.strategy:
            raise ConfigError("config key 'best' (a comparison's best.yaml) or 'strategy' is required")
        if self.best and self.params:
            raise ConfigError("config key 'params' goes with 'strategy'; best.yaml gives the parameters")
        if self.target and self.data:
            raise ConfigError("config keys 'target' and 'data': give one (an embedded target or your images)")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"config key 'shots' must be at least 1, got {self.shots}")
        if self.train_on == "shots" and self.shots is None:
            raise ConfigError("config key 'train_on: shots' needs 'shots' (images per class)")


def needs_ray(cfg: ExportConfig) -> bool:
    """Whether this export reads image files (Ray Data) or may pretrain the default backbone (Ray
    Train); exporting from the embedded suite with given weights runs in-process, without Ray."""
    if cfg.data or cfg.test_data:
        return True
    if cfg.best:
        best = read_best(cfg.best, cfg.target, cfg.shots)
        return bool(best.get("data")) or (cfg.weights or best.get("weights") or "pretrained") == "pretrained"
    return (cfg.weights or "pretrained") == "pretrained"


def read_best(path: str | Path, target: str | None, shots: int | None) -> dict:
    """The best.yaml entry for a target and shot count (either may be left out when there is one)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'best': file '{p}' does not exist")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"'{p}' is not valid YAML: {exc}") from exc
    best = doc.get("best") if isinstance(doc, dict) else None
    if not isinstance(best, dict) or not best:
        raise ConfigError(f"'{p}' has no 'best' entries (is it a comparison's best.yaml?)")
    if target is None:
        if len(best) != 1:
            raise ConfigError(f"'{p}' has targets {sorted(best)}: choose one with --set target=NAME")
        target = next(iter(best))
    if target not in best:
        raise ConfigError(f"'{p}' has no target '{target}' (it has {sorted(best)})")
    by_shots = {int(k): v for k, v in best[target].items()}
    if shots is None:
        if len(by_shots) != 1:
            raise ConfigError(f"'{p}' has {sorted(by_shots)} shots for '{target}': choose with --set shots=K")
        shots = next(iter(by_shots))
    if shots not in by_shots:
        raise ConfigError(f"'{p}' has no {shots}-shot entry for '{target}' (it has {sorted(by_shots)})")
    entry = by_shots[shots]
    for key in ("strategy", "params"):
        if key not in entry:
            raise ConfigError(f"'{p}': entry {target}/{shots} lacks '{key}'")
    extra = {}
    rows = p.parent / "rows.parquet"
    if rows.is_file():  # the comparison's full config sits beside best.yaml; input_size is only there
        try:
            import pyarrow.parquet as pq

            cfg = json.loads(pq.read_table(rows, columns=["config"]).column("config")[0].as_py())
            extra["input_size"] = cfg.get("input_size")
            if target in (cfg.get("data") or {}):
                extra["data"] = cfg["data"][target]  # the user's images the comparison ran on
        except Exception:
            pass
    return {"file": str(p.resolve()), "experiment": doc.get("experiment"), "backbone": doc.get("backbone"),
            "weights": doc.get("weights"), "target": target, "shots": shots, "entry": entry, **extra}


def _load_target(cfg: ExportConfig, target: str | None, size: tuple[int, int], best: dict | None):
    """Training images, evaluation images (or None), what they are, and the size files were decoded
    to (None for the embedded suite's arrays)."""
    from tl.data import load_embedded, load_source

    src = (best or {}).get("data") if not cfg.data else None
    if cfg.data or src:
        if cfg.data:
            train, where = _load_user(cfg.data, size, None), cfg.data
        else:  # the user's data entry of the comparison best.yaml came from: every image trains
            size = tuple(src.get("size") or size)
            train = load_source(folder=src.get("folder"), csv=src.get("csv"), parquet=src.get("parquet"), size=size,
                                classes=src.get("classes"))
            where = src.get("folder") or src.get("csv") or src.get("parquet")
        test = _load_user(cfg.test_data, size, train.classes) if cfg.test_data else None
        return (train, test, {"data": where, "split": "all"}, ({"data": cfg.test_data, "split": "all"} if test else None),
                size)
    if not target:
        raise ConfigError("config key 'target' (an embedded target such as mnistm) or 'data' (your images) is required")
    full = load_embedded(target)
    return (full.split(cfg.train_split), full.split(cfg.test_split), {"data": target, "split": cfg.train_split},
            {"data": target, "split": cfg.test_split}, None)


def _load_user(path: str, size: tuple[int, int], classes):
    from tl.data import load_source

    p = Path(path)
    kind = "csv" if p.suffix == ".csv" else "parquet" if p.suffix == ".parquet" else "folder"
    return load_source(**{kind: str(p)}, size=size, classes=classes)


def _take_shots(data, shots: int, seed: int):
    """K images per class, drawn by ``seed``; a class with fewer is an error naming it."""
    rng = np.random.default_rng(seed)
    keep = []
    for c, name in enumerate(data.classes):
        idx = np.flatnonzero(data.labels == c)
        if len(idx) < shots:
            raise DataError(f"class '{name}' of '{data.name}' has {len(idx)} images, fewer than shots={shots}")
        keep.extend(rng.choice(idx, shots, replace=False))
    return data.subset(np.sort(np.asarray(keep)))


def embed(backbone: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Last-stage embeddings of raw images (as the embedding cache computes them)."""
    backbone.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
            out.append(backbone(backbone.preprocessing(x)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.feature_dim), np.float32)


def train_model(strategy, backbone, images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int,
                batch_size: int = 256) -> ExportedModel:
    """Train ``strategy`` on labelled images with the same code an episode runs; returns backbone + head."""
    from tl.strategies import EpisodeTask, FeatureStrategy, TrainedStrategy

    if isinstance(strategy, FeatureStrategy):
        if not hasattr(strategy, "fit_head"):
            raise ConfigError(f"strategy '{strategy.name}' has no fit_head: its classifier cannot be exported")
        fitted = strategy.fit_head(embed(backbone, images, batch_size), labels, n_classes)
        return ExportedModel(backbone, torch_head(fitted), fitted.scale).eval()
    if not isinstance(strategy, TrainedStrategy):
        raise ConfigError(f"strategy '{strategy.name}' is neither a feature nor a trained strategy: it cannot be exported")
    with torch.no_grad():
        x = backbone.preprocessing(torch.from_numpy(np.ascontiguousarray(images)))
    # adaptation strategies take the training images themselves as their unlabelled target pool
    task = EpisodeTask(n_way=n_classes, support_y=np.asarray(labels), seed=seed, support_x=x, query_x=x[:0],
                       unlabelled_x=x, backbone=lambda: copy.deepcopy(backbone))
    run = strategy.start_episode(task)
    run.advance(strategy.steps)
    model = run.model
    model.start = 0  # the frozen prefix was cached during training; the exported model starts from images
    return ExportedModel(model.backbone, model.head).eval()


def scores(model: ExportedModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class scores of raw images (N x 3 x H x W in [0, 1])."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, head_spec(model.head)["classes"]), np.float32)


def _evaluate(model: ExportedModel, data, batch_size: int) -> dict:
    pred = scores(model, data.images, batch_size).argmax(1)
    correct = pred == data.labels
    per_class = {name: round(float(correct[data.labels == c].mean()), 4)
                 for c, name in enumerate(data.classes) if (data.labels == c).any()}
    return {"images": int(len(data)), "correct": int(correct.sum()), "accuracy": float(correct.mean()),
            "per_class_accuracy": per_class}


def _write_folder(output: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling folder, then rename it into place (replacing an older model)."""
    output = output.resolve() if output.exists() else Path(os.path.abspath(output))
    for parent in [output.parent, *output.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output '{output}' is not writable: '{parent}' is a file")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file())):
        raise ConfigError(f"output '{output}' exists and is not a tl model folder; refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(cfg: ExportConfig, storage: Path, output: Path, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and write the model folder; returns its manifest."""
    from safetensors.torch import load_file, save_file

    from tl.models import get_spec, make_backbone
    from tl.pretrain import resolve_weights
    from tl.runtime import provenance
    from tl.strategies import make_strategy

    t0 = time.time()
    best = read_best(cfg.best, cfg.target, cfg.shots) if cfg.best else None
    if best:
        name, params = best["entry"]["strategy"], dict(best["entry"]["params"])
        target = best["target"] if not cfg.data else None
    else:
        name, params, target = cfg.strategy, dict(cfg.params), cfg.target
    strategy = make_strategy(name, params)
    backbone_name = cfg.backbone or (best or {}).get("backbone") or "digits_cnn"
    weights_source = cfg.weights or (best or {}).get("weights") or "pretrained"
    input_size = cfg.input_size if cfg.input_size is not None else (best or {}).get("input_size")
    weights = resolve_weights(weights_source, backbone_name, storage, log)
    backbone = make_backbone(backbone_name, weights, input_size, seed=cfg.seed)
    train, test, train_info, test_info, decode = _load_target(cfg, target, tuple(backbone.preprocessing.size), best)
    if cfg.train_on == "shots":
        train = _take_shots(train, cfg.shots, cfg.seed)
    missing = [c for c, n in train.class_counts().items() if n == 0]
    if missing:
        raise DataError(f"'{train.name}' has no labelled image of class(es) {missing}")
    what = f"{cfg.shots} per class" if cfg.train_on == "shots" else "all"
    log(f"[export] training {name} on {len(train)} labelled images of {train_info['data']} ({what}; "
        f"{len(train.classes)} classes) with {backbone_name}")
    model = train_model(strategy, backbone, train.images, train.labels, len(train.classes), cfg.seed, cfg.batch_size)
    stages = [sum(p.numel() for p in s.parameters()) for s in model.backbone.stages]
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "classes": list(train.classes),
        "backbone": {"name": backbone_name, "description": get_spec(backbone_name).description,
                     "num_stages": len(stages), "stage_parameters": stages, "feature_dim": model.backbone.feature_dim,
                     "frozen_stages": int(getattr(strategy, "frozen", 0)), "weights": weights_source,
                     "weights_resolved": weights},
        "input_size": list(model.backbone.preprocessing.size),
        "preprocessing": model.backbone.preprocessing.describe(),
        "decode_size": list(decode) if decode else None,
        "head": head_spec(model.head),
        "strategy": {"name": name, "family": strategy.family, "params": strategy.params()},
        "training": {**train_info, "mode": cfg.train_on, "shots": cfg.shots if cfg.train_on == "shots" else None,
                     "images": int(len(train)), "per_class": train.class_counts(), "seed": cfg.seed},
        "config": to_dict(cfg),
        "comparison": best,
        "evaluation": None,
        "files": {},
        "provenance": provenance(),
    }

    def write(folder: Path) -> None:
        weights_file = folder / MODEL_FILE
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(weights_file),
                  metadata={"format": FORMAT})
        os.chmod(weights_file, 0o644)  # safetensors writes owner-only; a model folder is meant to be shared
        manifest["files"] = {MODEL_FILE: {"sha256": _sha256(weights_file), "bytes": weights_file.stat().st_size}}
        if test is not None:  # evaluate what was written, read back from the file
            saved = model_from_parts(manifest, load_file(str(weights_file)), str(weights_file))
            manifest["evaluation"] = {**test_info, **_evaluate(saved, test, cfg.batch_size)}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_plain))

    _write_folder(Path(output), write)
    ev = manifest["evaluation"]
    acc = f"; accuracy on {ev['data']}/{ev.get('split', 'test')}: {100 * ev['accuracy']:.2f}% ({ev['correct']}/{ev['images']})" \
        if ev else "; no test data given, so no accuracy"
    log(f"[export] wrote {output} in {time.time() - t0:.1f} s{acc}")
    return manifest


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, (np.ndarray, tuple)):
        return list(v)
    return str(v)
