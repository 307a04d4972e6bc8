"""Intensity normalisation, described by JSON-able dicts stored in each adapter's metadata.

Training computes the statistics (e.g. CT foreground percentiles and mean/std over a dataset)
and stores one dict per modality; inference applies exactly the same transform. Schemes:

* ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to fixed (dataset)
  bounds, then z-score with dataset statistics; Hounsfield units mean the same in every scan.
* ``{"scheme": "zscore", "nonzero": bool}``: per-image z-score (MR has arbitrary units); with
  ``nonzero`` the statistics come from non-zero voxels only and zeros stay zero.
* ``{"scheme": "none"}``: pass through.
"""

from __future__ import annotations

import numpy as np

from training.errors import InputError

SCHEMES = ("ct", "zscore", "none")


def normalize_channel(x: np.ndarray, spec: dict) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    scheme = spec.get("scheme", "zscore")
    if scheme == "none":
        return x.copy()
    if scheme == "ct":
        lo, hi = spec["clip"]
        std = max(float(spec["std"]), 1e-6)
        return (np.clip(x, lo, hi) - float(spec["mean"])) / std
    if scheme == "zscore":
        mask = x != 0 if spec.get("nonzero") else None
        values = x[mask] if mask is not None and mask.any() else x
        # float64 statistics: float32 squares overflow for values beyond ~1e19 (a scaled image)
        mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
        out = (x - mean) / max(std, 1e-6)  # a constant image becomes zeros, not NaN
        if mask is not None:
            out[~mask] = 0
        return out.astype(np.float32, copy=False)
    raise InputError(f"unknown normalisation scheme {scheme!r}; expected one of {SCHEMES}")


def normalize(data: np.ndarray, specs: list[dict]) -> np.ndarray:
    """Normalise a (C, D0, D1, D2) array channel by channel (one spec per modality)."""
    if data.ndim != 4:
        raise ValueError(f"expected (C, D0, D1, D2), got {data.shape}")
    if not specs:
        specs = [{"scheme": "zscore"}] * data.shape[0]
    if len(specs) != data.shape[0]:
        raise InputError(f"{data.shape[0]} channels but {len(specs)} normalisation specs")
    return np.stack([normalize_channel(c, s) for c, s in zip(data, specs)]).astype(np.float32, copy=False)
