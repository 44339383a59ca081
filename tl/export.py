"""Train the winning strategy on all of a target's labelled images and write a model folder.

The strategy and its hyper-parameters come from a ``best.yaml`` (a target and a shot count pick the
entry) or are given directly. Training uses every labelled image of the target's training split
(``train_on: all``, the default: for the embedded suite, every image of the ``adapt`` split) or K
images per class of it (``train_on: shots``), with the same code the comparison's episodes run: a
trained strategy trains a backbone and a linear head with the one training loop; a feature strategy
fits its head (prototypes, logistic or standardised linear weights) on the backbone's embeddings.

The folder's format is ``tl.model_file``'s; here it is written as a temporary folder renamed at the
end, with the manifest written last, after the accuracy on the target's test split is measured on
the weights read back from the file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tl.config import to_dict
from tl.data.episodes import take_shots
from tl.data.spec import DataSpec, check_files_of, load_data, load_target, resolve
from tl.errors import ConfigError, DataError
from tl.model_file import (FORMAT, FORMAT_VERSION, MANIFEST, MODEL_FILE, ExportedModel, batched, head_spec,
                           image_digest, model_from_parts, scores, torch_head, write_manifest, write_weights)
from tl.storage import Location, check_writable

TRAIN_ON = ("all", "shots")


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
    data: str | DataSpec | None = None
    test_data: str | DataSpec | None = None
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
    from tl.pretrain import is_pretrained

    if cfg.data or cfg.test_data:
        return True
    if cfg.best:
        best = read_best(cfg.best, cfg.target, cfg.shots)
        return bool(best.get("data")) or is_pretrained(cfg.weights or best.get("weights") or "pretrained") or (
            not cfg.weights and str(best.get("weights") or "").startswith("/") and not Path(best["weights"]).exists())
    return is_pretrained(cfg.weights or "pretrained")


def _pick(options: dict, key, ambiguous: str, missing: str):
    """``key``, or the only key of ``options`` when it is None; errors say which to choose."""
    if key is None:
        if len(options) != 1:
            raise ConfigError(ambiguous)
        key = next(iter(options))
    if key not in options:
        raise ConfigError(missing)
    return key


def read_best(path: str | Path, target: str | None, shots: int | None) -> dict:
    """The best.yaml entry for a target and shot count (either may be left out when there is one)."""
    from tl.config import read_yaml

    loc = Location.of(path)
    if not loc.is_file():
        raise ConfigError(f"config key 'best': file '{path}' does not exist")
    p = loc.fetch() if not loc.is_local else Path(loc.path)  # a best.yaml in a bucket: a local copy
    doc = read_yaml(p)
    best = doc.get("best")
    if not isinstance(best, dict) or not best:
        raise ConfigError(f"'{p}' has no 'best' entries (is it a comparison's best.yaml?)")
    target = _pick(best, target, f"'{p}' has targets {sorted(best)}: choose one with --set target=NAME",
                   f"'{p}' has no target '{target}' (it has {sorted(best)})")
    by_shots = {int(k): v for k, v in best[target].items()}
    shots = _pick(by_shots, shots, f"'{p}' has {sorted(by_shots)} shots for '{target}': choose with --set shots=K",
                  f"'{p}' has no {shots}-shot entry for '{target}' (it has {sorted(by_shots)})")
    entry = by_shots[shots]
    for key in ("strategy", "params"):
        if key not in entry:
            raise ConfigError(f"'{p}': entry {target}/{shots} lacks '{key}'")
    extra = {}
    rows = loc.parent / "rows.parquet"
    if rows.is_file():  # the comparison's full config sits beside best.yaml; input_size is only there
        try:
            import pyarrow.parquet as pq

            cfg = json.loads(pq.read_table(rows.path, columns=["config"], filesystem=rows.fs)
                             .column("config")[0].as_py())
            extra["input_size"] = cfg.get("input_size")
            if target in (cfg.get("data") or {}):
                extra["data"] = cfg["data"][target]  # the user's images the comparison ran on
        except Exception:
            pass
    ref = {k: doc[k] for k in ("weights", "weights_key", "weights_sha256") if doc.get(k)}
    return {"file": str(loc), "experiment": doc.get("experiment"), "backbone": doc.get("backbone"),
            "weights": doc.get("weights"), "weights_ref": ref, "target": target, "shots": shots, "entry": entry,
            **extra}


def _user_data(cfg: ExportConfig, best: dict | None) -> tuple[str, DataSpec] | None:
    """The user's data an export trains on: ``data``, or the data entry of the comparison best.yaml
    came from; None for an embedded target."""
    from tl.config import from_dict

    src = (best or {}).get("data") if not cfg.data else None
    if cfg.data:
        name, spec = resolve(cfg.data, "data")
        if spec is None:
            raise ConfigError(f"config key 'data': '{name}' is an embedded dataset: give it as 'target' (trained "
                              f"on its '{cfg.train_split}' split)")
        return name, spec
    if src:  # the user's data entry of the comparison best.yaml came from
        spec = from_dict(DataSpec, {k: v for k, v in src.items() if v is not None}, "best.yaml data")
        return spec.label(), spec
    return None


def check_data(cfg: ExportConfig) -> list[str]:
    """What ``--check`` can say about the images an export would train on, without training: a user's
    folder, manifest or Parquet file listed (no image decoded, no Ray) and refused when it has fewer
    than two classes (``tl.data.spec.check_listing``). Returns notes on what it could not list (data
    not on this machine, a bucket, a best.yaml that is not here)."""
    from dataclasses import replace

    from tl.data.spec import check_listing
    from tl.models import input_size_of

    best = None
    if cfg.best and not cfg.data:
        loc = Location.of(cfg.best)
        if not loc.is_local or not loc.is_file():
            return [f"best.yaml '{cfg.best}' is not on this machine: its data not checked here"]
        best = read_best(cfg.best, cfg.target, cfg.shots)
    user = _user_data(cfg, best)
    if user is None:
        return []
    name, spec = user
    backbone = cfg.backbone or (best or {}).get("backbone") or "digits_cnn"
    input_size = cfg.input_size if cfg.input_size is not None else (best or {}).get("input_size")
    got = check_listing(name, replace(spec, split="none"), "data", input_size_of(backbone, input_size))
    return [got] if isinstance(got, str) else []


def _load_target(cfg: ExportConfig, target: str | None, size: tuple[int, int], best: dict | None):
    """Training images, evaluation images (or None), what they are, and the size files were decoded
    to (None for the embedded suite's arrays). A user's data trains with every image."""
    from dataclasses import replace

    user = _user_data(cfg, best)
    if user is not None:
        name, spec = user
        spec = replace(spec.with_defaults(size, "none"), split="none")  # every image trains
        # a folder, manifest or Parquet stays files until rows are used; one of fewer than two classes stops here
        train = load_data(name, spec, size, lazy=True)
        test = None
        if cfg.test_data:
            test_name, test_spec = resolve(cfg.test_data, "test_data")
            if test_spec is None:
                raise ConfigError(f"config key 'test_data': '{test_name}' is an embedded dataset, whose classes are "
                                  f"not those of '{spec.where}'")
            test = load_data(test_name, replace(test_spec.with_defaults(spec.size, "none"), split="none"), spec.size,
                             classes=train.classes, lazy=True)
        return (train, test, {"data": spec.where, "split": "all"},
                ({"data": test_spec.where, "split": "all"} if test is not None else None), spec.size)
    if not target:
        raise ConfigError("config key 'target' (an embedded target such as mnistm) or 'data' (your images) is required")
    parts = load_target(target, None, test_split=cfg.test_split, val_split=cfg.train_split)
    return (parts["val"], parts["test"], {"data": target, "split": cfg.train_split},
            {"data": target, "split": cfg.test_split}, None)


def embed(backbone: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Last-stage embeddings of raw images (as the embedding cache computes them)."""
    backbone.eval()
    return batched(lambda x: backbone(backbone.preprocessing(x)), images, backbone.feature_dim, batch_size)


def train_model(strategy, backbone, images: np.ndarray, labels: np.ndarray, n_classes: int, seed: int,
                batch_size: int = 256, unlabelled: np.ndarray | None = None) -> ExportedModel:
    """Train ``strategy`` on labelled images with the same code an episode runs; returns backbone + head.
    ``unlabelled``: embeddings of the target's unlabelled images, for a transductive strategy."""
    from tl.strategies import EpisodeTask, FeatureStrategy, TrainedStrategy

    if isinstance(strategy, FeatureStrategy):
        if not hasattr(strategy, "fit_head"):
            raise ConfigError(f"strategy '{strategy.name}' has no fit_head: its classifier cannot be exported")
        feats = embed(backbone, images, batch_size)
        fitted = (strategy.fit_head(feats, labels, n_classes, unlabelled=unlabelled) if strategy.transductive
                  else strategy.fit_head(feats, labels, n_classes))
        if isinstance(fitted, nn.Module):  # a head trained in torch (mlp_probe)
            return ExportedModel(backbone, fitted.eval()).eval()
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
    model = run.model.to(memory_format=torch.contiguous_format)  # saved weights in the plain layout
    strategy.ready(model)
    # the trained backbone's weights in the plain architecture (lora: adapters merged); the frozen prefix
    # was cached during training, the exported model starts from images
    plain = copy.deepcopy(backbone)
    plain.load_state_dict(strategy.plain_state(model.backbone.state_dict()))
    return ExportedModel(plain, model.head).eval()


def _evaluate(model: ExportedModel, data, batch_size: int) -> dict:
    """Accuracy on ``data``, decoded a block of rows at a time (a set held as files is never whole in
    memory)."""
    block = max(batch_size, 4096)
    pred = np.concatenate([scores(model, data.pixels(np.arange(i, min(i + block, len(data)))), batch_size).argmax(1)
                           for i in range(0, len(data), block)]) if len(data) else np.zeros(0, np.int64)
    correct = pred == data.labels
    per_class = {name: round(float(correct[data.labels == c].mean()), 4)
                 for c, name in enumerate(data.classes) if (data.labels == c).any()}
    return {"images": int(len(data)), "correct": int(correct.sum()), "accuracy": float(correct.mean()),
            "per_class_accuracy": per_class}


def _write_folder(output: "str | Path | Location", write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling folder, then rename it into place (replacing an older model).
    At a URI: written locally, then uploaded with the manifest last (a folder without it is no model)."""
    loc = Location.of(output)
    if not loc.is_local:
        if loc.is_file() or (loc.files() and not (loc / MANIFEST).is_file()):
            raise ConfigError(f"output '{loc}' exists and is not a tl model folder; refusing to replace it")
        check_writable(loc, "output")
        with tempfile.TemporaryDirectory(prefix="tl-model-") as tmp:
            write(Path(tmp))
            (loc / MANIFEST).unlink()  # an older model's manifest goes first: a reader never mixes two
            loc.upload(Path(tmp), last=(MANIFEST,))
        return
    output = Path(loc.path)
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


def export(cfg: ExportConfig, storage: "str | os.PathLike | Location", output: "str | Path | Location",
           log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and write the model folder; returns its manifest."""
    from safetensors.torch import load_file

    from tl.models import get_spec, input_size_of, make_backbone
    from tl.pretrain import resolve_reference, resolve_weights
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
    # the data first: data that cannot be trained on (a one-class folder) stops before any pretraining
    train, test, train_info, test_info, decode = _load_target(cfg, target, input_size_of(backbone_name, input_size),
                                                              best)
    if cfg.weights or not best:
        weights = resolve_weights(weights_source, backbone_name, storage, log)
    else:  # best.yaml names its backbone by key and sha256: found again in this storage
        weights = resolve_reference(best["weights_ref"], backbone_name, storage, log)
    backbone = make_backbone(backbone_name, weights, input_size, seed=cfg.seed)
    from tl.embeddings import pool_rows, reestimate_on

    pool = train  # the target's unlabelled images (the split the shots come from), for bn_stats and transduction
    if strategy.bn_stats_at_start == "target":
        seen = reestimate_on(backbone, pool, pool_rows(pool))
        log(f"[export] BatchNorm statistics re-estimated on {seen} unlabelled images of {train_info['data']} "
            f"(bn_stats: target)")
    unlabelled = None
    if strategy.transductive:
        rows = pool_rows(pool)
        unlabelled = np.concatenate([embed(backbone, pool.pixels(rows[i:i + 256]), cfg.batch_size)
                                     for i in range(0, len(rows), 256)])
        log(f"[export] {name} is transductive: its prototypes are refined on {len(rows)} unlabelled images of "
            f"{train_info['data']}")
    if cfg.train_on == "shots":
        train = train.subset(take_shots(train.labels, train.classes, cfg.shots, cfg.seed, train.name))
    missing = [c for c, n in train.class_counts().items() if n == 0]
    if missing:
        raise DataError(f"'{train.name}' has no labelled image of class(es) {missing}")
    what = f"{cfg.shots} per class" if cfg.train_on == "shots" else "all"
    log(f"[export] training {name} on {len(train)} labelled images of {train_info['data']} ({what}; "
        f"{len(train.classes)} classes) with {backbone_name}")
    # a folder's rows are decoded here, in memory: the shots (or, with train_on: all, every image;
    # many-shot training on a large folder streams instead: workflows.finetune)
    check_files_of({"data": train, "test_data": test})
    pixels = train.pixels(np.arange(len(train)))
    model = train_model(strategy, backbone, pixels, train.labels, len(train.classes), cfg.seed, cfg.batch_size,
                        unlabelled=unlabelled)
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
                     "images": int(len(train)), "per_class": train.class_counts(), "seed": cfg.seed,
                     # what it trained on, so that a prediction on these images says so (tl.predict)
                     "fingerprint": train.fingerprint(), "ids": [str(i) for i in train.ids],
                     "image_digests": [image_digest(im) for im in pixels]},
        "config": to_dict(cfg),
        "comparison": best,
        "evaluation": None,
        "files": {},
        "provenance": provenance(),
    }

    def write(folder: Path) -> None:
        manifest["files"] = write_weights(model, folder)
        if test is not None:  # evaluate what was written, read back from the file
            weights_file = folder / MODEL_FILE
            saved = model_from_parts(manifest, load_file(str(weights_file)), str(weights_file))
            manifest["evaluation"] = {**test_info, **_evaluate(saved, test, cfg.batch_size)}
        write_manifest(folder, manifest)

    _write_folder(output, write)
    ev = manifest["evaluation"]
    acc = f"; accuracy on {ev['data']}/{ev.get('split', 'test')}: {100 * ev['accuracy']:.2f}% ({ev['correct']}/{ev['images']})" \
        if ev else "; no test data given, so no accuracy"
    log(f"[export] wrote {output} in {time.time() - t0:.1f} s{acc}")
    return manifest

