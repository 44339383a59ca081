"""timm models as backbones (the optional ``timm`` extra): ``timm:resnet18``, ``timm:convnext_atto``,
``timm:vit_tiny_patch16_224`` or any other name ``timm.list_models()`` knows, with an optional
pretrained tag (``timm:resnet18.a1_in1k``) that selects the preprocessing of that weights release.

Stages come from the model's own ``feature_info`` (the modules whose outputs timm's
``features_only`` wrapper returns; Wightman, "PyTorch Image Models", 2019): stage i holds every
module after the end of stage i-1 up to and including ``feature_info[i]``, so "freeze the first k
stages" means the same as for the registry's own backbones. Models without ``feature_info`` fall
back to one stage per top-level child that has parameters (timm's coarse parameter grouping).

Features are the model's ``forward_features`` followed by its own pooling
(``forward_head(pre_logits=True)``: global average pooling for CNNs, the class token for ViTs).
When the stages, run one after another, reproduce ``forward_features`` (checked once per model on
a random input: true for ResNets, EfficientNets, MobileNets, ConvNeXts, RegNets, ...), a frozen
prefix can be computed once and cached like any backbone's. Otherwise (ViTs: the position embedding
and class token sit between modules) the stages are parameter groups only: freezing is exact, but
the frozen prefix is recomputed each step (``run_stages(x, 0, k)`` passes ``x`` through).

Pretrained weights (``weights="timm:NAME[.TAG]"``, from the user's caches only, or any local file of
timm-named weights) are a weights source like the others, in ``tl.models.weights``; this provider maps
timm's state-dict names onto the stages. timm is imported only when a ``timm:`` backbone is asked for.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Sequence

import torch
from torch import nn

from tl.errors import ConfigError
from tl.models.backbone import IMAGENET, Backbone, BackboneSpec, Preprocessing, image_size
from tl.models.registry import register_prefix
from tl.models.timm_extra import PREFIX, timm_arch, timm_module


def _create(name: str, size: tuple[int, int] | None) -> nn.Module:
    """A randomly initialised timm model without its classifier (never downloads anything)."""
    timm = timm_module()
    arch = timm_arch(name)
    try:
        if size is not None:
            try:  # transformers fix their position embedding to the image size at creation
                return timm.create_model(arch, pretrained=False, num_classes=0, img_size=size)
            except TypeError:
                pass
        return timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:
        raise ConfigError(f"backbone '{name}': timm could not build '{arch}': {exc}") from exc


def _preprocessing(net: nn.Module, size: tuple[int, int] | None) -> Preprocessing:
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    _, h, w = cfg.get("input_size", (3, 224, 224))

    def three(v, default):
        v = tuple(float(x) for x in (v or default))
        return v * 3 if len(v) == 1 else v[:3]

    return Preprocessing(size or (int(h), int(w)), three(cfg.get("mean"), IMAGENET[0]),
                         three(cfg.get("std"), IMAGENET[1]))


def _safe(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class _Plan:
    """How one timm architecture is cut into stages (found once per architecture and size)."""

    bodies: tuple[tuple[str, ...], ...]  # flattened module names of each stage, in forward order
    head: tuple[str, ...]  # modules only the pooling/head uses (kept in the last stage)
    ends: tuple[str, ...]  # the feature_info module that ends each stage
    sequential: bool
    feature_dim: int


def _flatten(net: nn.Module, targets: Sequence[str], any_container: bool) -> list[tuple[str, nn.Module]]:
    """Children in forward order, opening a container (one level at a time) when a stage ends inside it."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            opens = any_container or isinstance(child, (nn.Sequential, nn.ModuleList))
            if opens and any(t.startswith(full + ".") for t in targets):
                visit(full + ".", child)
            else:
                out.append((full, child))

    visit("", net)
    return out


def _cut(name: str, net: nn.Module, any_container: bool) -> tuple[list[list[tuple[str, nn.Module]]], list, list[str]]:
    """Stage bodies, the modules after the last stage, and the modules that end each stage."""
    info = getattr(net, "feature_info", None)
    ends = [f["module"] for f in info] if info else []
    flat = _flatten(net, ends, any_container)
    names = [n for n, _ in flat]
    if not ends:  # no feature_info: one stage per top-level child that has parameters
        ends = [n for n, m in flat if any(True for _ in m.parameters())]
    try:
        cuts = [names.index(e) for e in ends]
    except ValueError:
        return [], [], ends
    if cuts != sorted(set(cuts)):
        raise ConfigError(f"backbone '{name}': its feature_info modules {ends} are not in forward order")
    bodies, start = [], 0
    for c in cuts:
        bodies.append(flat[start : c + 1])
        start = c + 1
    return bodies, flat[start:], ends


def _run(modules: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for _, m in modules:
        x = m(x)
    return x


@lru_cache(maxsize=None)
def _plan(name: str, size: tuple[int, int] | None) -> _Plan:
    """Cut the model into stages and check, on a random input, whether the stages run in sequence
    reproduce ``forward_features`` (then trailing modules that ``forward_features`` also runs, such as
    EfficientNet's ``conv_head``, join the last stage). Draws no random numbers from the caller's
    generator, so a seeded build is the same whether or not the plan was cached."""
    with torch.random.fork_rng(devices=[]):
        return _make_plan(name, size)


def _make_plan(name: str, size: tuple[int, int] | None) -> _Plan:
    net = _create(name, size).eval()
    pp = _preprocessing(net, size)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *pp.size, generator=gen)
    with torch.no_grad():
        ref = net.forward_features(x)
        feature_dim = int(net.forward_head(ref, pre_logits=True).flatten(1).shape[1])
        bodies, tail, ends = _cut(name, net, any_container=False)
        keep = None
        if bodies:
            try:
                y = _run([m for b in bodies for m in b], x)
                for j in range(len(tail) + 1):
                    if y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
                        keep = j
                        break
                    if j < len(tail):
                        y = tail[j][1](y)
            except Exception:  # a module that cannot run on its predecessor's output: not sequential
                keep = None
    if keep is not None:
        bodies[-1] = bodies[-1] + tail[:keep]
        head = tail[keep:]
    else:
        bodies, tail, ends = _cut(name, net, any_container=True)
        if not bodies:
            raise ConfigError(f"backbone '{name}': cannot find its feature_info modules {ends} among its submodules")
        head = tail
    return _Plan(tuple(tuple(n for n, _ in b) for b in bodies), tuple(n for n, _ in head), tuple(ends),
                 keep is not None, feature_dim)


class _Stage(nn.Module):
    """The modules of one stage (``body``, run in order when the model is sequential) and, in the last
    stage, the modules its pooling uses (``head``). Parameters that belong to no module (a ViT's class
    token and position embedding) are registered here under their dotted name with '_'."""

    def __init__(self, body: Sequence[tuple[str, nn.Module]], head: Sequence[tuple[str, nn.Module]] = ()):
        super().__init__()
        self.body = nn.Sequential(OrderedDict((_safe(n), m) for n, m in body))
        if head:
            self.head = nn.ModuleDict(OrderedDict((_safe(n), m) for n, m in head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TimmBackbone(Backbone):
    """A timm model behind the ``Backbone`` interface. The timm model (``net``) keeps running its own
    ``forward_features``/``forward_head``; the stages hold the same module objects, so the state dict
    (``stages.*``), freezing, BatchNorm modes and devices all go through the stages."""

    def __init__(self, name: str, net: nn.Module, plan: _Plan, preprocessing: Preprocessing):
        modules = dict(_flatten(net, plan.ends, any_container=not plan.sequential))
        stages = [_Stage([(n, modules[n]) for n in body]) for body in plan.bodies]
        stages[-1] = _Stage([(n, modules[n]) for n in plan.bodies[-1]], [(n, modules[n]) for n in plan.head])
        super().__init__(name, stages, plan.feature_dim, preprocessing, partial(_timm_key, name))
        self.__dict__["net"] = net  # not a registered child: its modules are registered once, in the stages
        self.sequential = plan.sequential
        self._loose_buffers: list[tuple[nn.Module, str, nn.Module, str]] = []
        self._adopt_loose(net)
        self.train(net.training)

    def _adopt_loose(self, net: nn.Module) -> None:
        """Register parameters and buffers that no stage module holds in the stage of the next
        tensor that one does (a ViT's class token joins the patch embedding's stage)."""
        owner = {}
        for i, s in enumerate(self.stages):
            for t in list(s.parameters()) + list(s.buffers()):
                owner[id(t)] = i
        tensors = [(n, t, False) for n, t in net.named_parameters()] + [(n, t, True) for n, t in net.named_buffers()]
        stage_of_next, pending = len(self.stages) - 1, []
        for n, t, is_buffer in reversed(tensors):
            if id(t) in owner:
                stage_of_next = owner[id(t)]
            else:
                pending.append((n, t, is_buffer, stage_of_next))
        for n, t, is_buffer, i in reversed(pending):
            mod_name, _, attr = n.rpartition(".")
            module = net.get_submodule(mod_name) if mod_name else net
            if is_buffer:
                self.stages[i].register_buffer(_safe(n), t)
                self._loose_buffers.append((module, attr, self.stages[i], _safe(n)))
            else:
                self.stages[i].register_parameter(_safe(n), t)

    def native_names(self) -> dict[str, str]:
        """Stage names -> timm's names of the same tensors."""
        timm_of = {id(t): k for k, t in self.net.state_dict(keep_vars=True).items()}
        return {k: timm_of[id(t)] for k, t in self.state_dict(keep_vars=True).items() if id(t) in timm_of}

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for module, attr, stage, key in self._loose_buffers:  # buffers are replaced, not changed in place
            module._buffers[attr] = stage._buffers[key]
        return self

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        if "net" in self.__dict__:
            self.net.training = mode  # the top-level flag only: frozen stages stay in eval mode
        return self

    def run_stages(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Unpooled output of stages ``start+1 .. end``. When the stages do not run in sequence, the
        prefix of the first k stages is the identity and the full model runs at the end (so a frozen
        prefix "cached" by a strategy is the input itself, and the result is the same)."""
        if start == 0 and end == self.num_stages:
            return self.net.forward_features(x)
        if self.sequential:
            return super().run_stages(x, start, end)
        if end == self.num_stages:
            return self.net.forward_features(x)
        if start == 0:
            return x
        raise ConfigError(f"backbone '{self.name}' does not run stage by stage: stages {start + 1}..{end} "
                          f"cannot run on their own")

    def forward(self, x: torch.Tensor, stage: int | None = None, start: int = 0) -> torch.Tensor:
        """Pooled features after stage ``stage`` (default: the model's own pooling of its last stage)."""
        last = self.num_stages if stage is None else stage
        if not 1 <= last <= self.num_stages:
            raise ConfigError(f"backbone '{self.name}' has stages 1..{self.num_stages}, not {last}")
        if last == self.num_stages:
            return self.net.forward_head(self.run_stages(x, start, last), pre_logits=True).flatten(1)
        if start:
            raise ConfigError(f"backbone '{self.name}': an intermediate stage is read from raw images only")
        if self.sequential:
            out = super().run_stages(x, 0, last)
        elif hasattr(self.net, "forward_intermediates"):
            out = self.net.forward_intermediates(x, indices=[last - 1], intermediates_only=True)[0]
            return self._pool(out)
        else:
            raise ConfigError(f"backbone '{self.name}' cannot read features after stage {last}; use the last stage")
        if out.ndim == 4 and getattr(self.net, "output_fmt", "NCHW") == "NHWC":
            out = out.permute(0, 3, 1, 2)
        return self._pool(out)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens: N x T x C
            return x.mean(1)
        return Backbone._pool(x)


def build_timm(name: str, input_size: int | Sequence[int] | None = None) -> TimmBackbone:
    """A randomly initialised timm backbone (``input_size`` overrides the pretrained config's size)."""
    size = image_size(input_size)
    if size is not None and size == timm_spec(name).preprocessing.size:
        size = None
    plan = _plan(name, size)
    net = _create(name, size)
    return TimmBackbone(name, net, plan, _preprocessing(net, size))


def _key_map(name: str, plan: _Plan) -> Callable[[str], str | None]:
    """timm state-dict names -> stage names; the classifier's keys are dropped (tl adds its own head)."""
    net = _create(name, None)
    backbone = TimmBackbone(name, net, plan, _preprocessing(net, None))
    ids = {}
    for new, t in list(backbone.state_dict(keep_vars=True).items()):
        ids.setdefault(id(t), new)
    table = {old: ids[id(t)] for old, t in net.state_dict(keep_vars=True).items() if id(t) in ids}
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)

    def key_map(key: str) -> str | None:
        if key in table:
            return table[key]
        if any(key == c or key.startswith(c + ".") for c in classifier):
            return None
        return key

    return key_map


@lru_cache(maxsize=None)
def timm_spec(name: str) -> BackboneSpec:
    """The registry entry of a timm backbone, built on first use (the registry delegates ``timm:`` here)."""
    with torch.random.fork_rng(devices=[]):
        return _make_spec(name)


def _make_spec(name: str) -> BackboneSpec:
    plan = _plan(name, None)
    pp = _preprocessing(_create(name, None), None)
    kind = "stages run in sequence" if plan.sequential else "stages are parameter groups"
    return BackboneSpec(
        name=name, builder=lambda: list(build_timm(name).stages), feature_dim=plan.feature_dim, preprocessing=pp,
        description=f"timm {timm_arch(name)}: {len(plan.bodies)} stages ending at {', '.join(plan.ends)} ({kind})",
        key_map=_key_map(name, plan),
    )


def _timm_key(name: str, key: str) -> str | None:
    """A backbone's key map, looked up when weights are loaded: building one needs no spec."""
    return timm_spec(name).key_map(key)


register_prefix(PREFIX, timm_spec, build_timm)
