"""Strategy registry: one small file per strategy, one line here to register it."""

from __future__ import annotations

from typing import Any

from tl.config import from_dict
from tl.errors import ConfigError
from tl.strategies.adapt import ADAPT_STRATEGIES
from tl.strategies.base import Strategy
from tl.strategies.feature import LinearProbe, Logistic, Prototype
from tl.strategies.finetune import Finetune, LPFT, Scratch
from tl.strategies.mlp import MLPProbe
from tl.strategies.peft import BitFit, LoRA, NormTuning
from tl.strategies.protonet import ProtoNetFT
from tl.strategies.transductive import BDCSPN, SoftKMeans

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (LinearProbe, Prototype, Logistic, MLPProbe, BDCSPN, SoftKMeans, Finetune, LPFT, Scratch,
                              BitFit, NormTuning, LoRA, ProtoNetFT, *ADAPT_STRATEGIES)
}


def registered(family: str | None = None) -> list[str]:
    return [n for n, c in REGISTRY.items() if family is None or c.family == family]


# keys of former versions, refused with the key that replaced them
RENAMED = {"target_statistics": "'bn_stats: target'"}


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """A strategy by name with hyper-parameters; unknown names and keys are errors naming them."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown strategy '{name}' (registered: {', '.join(REGISTRY)})")
    params = dict(params or {})
    for key, now in RENAMED.items():
        if key in params:
            raise ConfigError(f"config key 'strategies.{name}.{key}' was renamed: write {now} (one name for the "
                              f"BatchNorm statistics of the target's unlabelled images)")
    return from_dict(REGISTRY[name], params, prefix=f"strategies.{name}")
