"""Episodic evaluation, split by job (docs/architecture.md, "Evaluation protocol"):

- ``tl.evaluate.episodes``: the episode runner (the same seeded episodes for every strategy, one row
  per strategy x episode; a search's staged accuracies);
- ``tl.evaluate.selection``: a searched entry's choice of candidate (successive halving);
- ``tl.evaluate.cell``: the cell function and its typed inputs (``CellInputs``, ``EpisodeSettings``);
- ``tl.evaluate.confusion``: confusion counts summed over rows.
"""

from tl.evaluate.cell import CellInputs, EpisodeSettings, run_cell, validation_draws
from tl.evaluate.confusion import confusion_matrix
from tl.evaluate.episodes import MAX_POOL, Episodes, run_episodes, staged_accuracy
from tl.evaluate.selection import VAL_RULES, Selection, select_on_validation

__all__ = ["CellInputs", "EpisodeSettings", "Episodes", "MAX_POOL", "Selection", "VAL_RULES", "confusion_matrix",
           "run_cell", "run_episodes", "select_on_validation", "staged_accuracy", "validation_draws"]
