"""Confusion counts of result rows: per-class accuracy and confusion matrices are summed from each
row's ``confusion`` column (``{"true,pred": count}`` over the dataset's class ids)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd


def confusion_matrix(rows: pd.DataFrame, n_classes: int) -> np.ndarray:
    """Summed confusion counts (true class x predicted class) of the given result rows."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cell in rows["confusion"]:
        for key, n in json.loads(cell).items():
            t, p = map(int, key.split(","))
            m[t, p] += n
    return m
