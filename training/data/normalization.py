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
# CT from fewer cases than this: the foreground's percentiles say more about the one or two scans
# at hand (a non-contrast liver gives −23…80 HU) than about the next patient's (contrast-enhanced
# liver at 90–120 HU would be clipped flat with bone and contrast-filled bowel), so the clip range
# is widened to at least a soft-tissue window and scaled by the window, not by the few scans' spread.
FEW_CT_CASES = 5
CT_SOFT_TISSUE_WINDOW = (-200.0, 300.0)  # HU
# CT scans hold air at about −1000 HU; MR intensities are never negative. Halfway is safe for both:
# a scan with values this low holds air, so its values are Hounsfield units.
CT_AIR_HU = -500.0


def ct_spec(foreground: np.ndarray, cases: int, hounsfield: bool = True) -> dict:
    """The ``ct`` spec from foreground HU values sampled over ``cases`` scans (nnU-Net's rule:
    clip to the 0.5–99.5 percentiles, z-score with the clipped values' statistics); fewer than
    :data:`FEW_CT_CASES` scans in Hounsfield units (``hounsfield``: they hold air, see
    :data:`CT_AIR_HU`): clip to those percentiles widened to :data:`CT_SOFT_TISSUE_WINDOW` and
    map the range to [−2, 2]."""
    values = np.asarray(foreground, dtype=np.float64).ravel()
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if cases < FEW_CT_CASES and hounsfield:
        lo, hi = min(lo, CT_SOFT_TISSUE_WINDOW[0]), max(hi, CT_SOFT_TISSUE_WINDOW[1])
        return {"scheme": "ct", "clip": [lo, hi], "mean": (lo + hi) / 2, "std": (hi - lo) / 4}
    clipped = np.clip(values, lo, hi)
    return {"scheme": "ct", "clip": [lo, hi], "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-3))}


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
