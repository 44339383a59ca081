"""Transfer strategies: one small file per strategy, registered by name (``registry.py``)."""

from tl.strategies.base import EpisodeTask, FeatureStrategy, Strategy, TrainedStrategy
from tl.strategies.entry import StrategyEntry, check_labels
from tl.strategies.registry import REGISTRY, make_strategy, registered

__all__ = ["EpisodeTask", "FeatureStrategy", "Strategy", "StrategyEntry", "TrainedStrategy", "check_labels",
           "REGISTRY", "make_strategy", "registered"]
