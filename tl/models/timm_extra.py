"""The optional ``timm`` extra, imported only when a ``timm:`` name is used: the core never needs it.

Both the timm provider (building models) and the weights sources (timm's pretrained releases in the
user's caches) go through here, so a missing extra or an unknown model reads the same from either.
"""

from __future__ import annotations

from types import ModuleType

from tl.errors import ConfigError

PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def timm_module() -> ModuleType:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("timm backbones need the optional extra: pip install 'tl[timm]' (or pip install timm)") from exc
    return timm


def timm_arch(name: str) -> str:
    """``timm:resnet18.a1_in1k`` -> ``resnet18.a1_in1k``, checked against timm's registry."""
    arch = name[len(PREFIX):] if is_timm(name) else name
    timm = timm_module()
    if not arch or not timm.is_model(arch):
        raise ConfigError(f"unknown timm model '{arch}' in backbone '{name}' (timm {timm.__version__}; "
                          f"see timm.list_models())")
    return arch
