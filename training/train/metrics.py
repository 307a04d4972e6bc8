"""Per-class Dice between integer label maps."""

from __future__ import annotations

import math

import numpy as np

from training.io.volume import IGNORE_INDEX


def dice_per_class(pred, truth, num_classes: int, ignore_index: int = IGNORE_INDEX) -> list[float]:
    """Dice of each foreground class 1..K-1 (NaN where the class is absent in both)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the label's {truth.shape}")
    valid = truth != ignore_index
    out = []
    for c in range(1, num_classes):
        p, t = (pred == c) & valid, (truth == c) & valid
        denom = int(p.sum()) + int(t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


def mean_ignoring_nan(values) -> float:
    """Mean of the defined values: a class absent from both maps has no Dice and must not count as 0."""
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")
