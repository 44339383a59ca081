"""One strategy entry of any grid: a registered strategy, its fixed ``params``, an optional grid
``search`` over some of them (chosen per cell on validation episodes), and its table label."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tl.errors import ConfigError


@dataclass(frozen=True)
class StrategyEntry:
    """``strategy``: a registered name (see "Strategy parameters"); ``params``: its fixed parameters;
    ``search``: lists of values for some of them, chosen per cell on validation episodes; ``label``: its
    name in tables (default the strategy's own, ``finetune_k2`` for a fixed depth)."""

    strategy: str
    label: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    search: dict[str, list] = field(default_factory=dict)

    def build(self, params: dict[str, Any] | None = None):
        from tl.strategies.registry import make_strategy

        return make_strategy(self.strategy, self.params if params is None else params)

    def name(self) -> str:
        """The label in tables: given, or the strategy's own (``finetune_k2`` for a fixed depth)."""
        return self.label or self.build().display_label(self.search)

    def candidates(self) -> list[dict[str, Any]]:
        """Every parameter set of the grid (one, the fixed params, when there is no search)."""
        if not self.search:
            return [dict(self.params)]
        keys = sorted(self.search)
        return [{**self.params, **dict(zip(keys, combo))} for combo in itertools.product(*(self.search[k] for k in keys))]

    def check(self, stages: int) -> None:
        """Every candidate builds and fits a backbone of ``stages`` stages (before any work starts)."""
        if "bn_stats" in self.search:
            raise ConfigError(f"strategy '{self.name()}': bn_stats cannot be searched (each value needs its own "
                              f"embeddings and backbone): give each its own entry, as the default comparison does")
        for key, values in self.search.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"strategy '{self.name()}': search key 'search.{key}' needs a non-empty list")
        for params in self.candidates():
            self.build(params).check_depth(stages, f"strategy '{self.name()}'")

    def plain(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "label": self.label, "params": dict(self.params),
                "search": {k: list(v) for k, v in self.search.items()}}


def check_labels(entries, key: str = "strategies") -> None:
    labels = [e.name() for e in entries]
    if not entries:
        raise ConfigError(f"config key '{key}' is empty")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"config key '{key}': two entries share a label ({labels})")
