"""Measurements of a segmentation, per class: volume, expected volume with an interval, intensity.

* ``volume_ml``: the hard labels' voxels × the voxel volume (what the user sees and edits).
* ``expected_ml``: the sum of the class's calibrated probabilities × the voxel volume (the mean
  of the volume under the model's own belief; CURVAS' definition).
* ``low_ml``/``high_ml``: the interval ``expected ± scale × band``: ``band`` is the volume of the
  class's uncertain band, V(p > 0.1) − V(p > 0.9), plus 1 % of the expected volume, and
  ``scale`` was fitted on the domain's validation cases so that the interval covers the true
  volume in 90 % of them (split conformal, :mod:`training.train.calibration`); without a
  calibration the scale is 1 and the interval is only indicative.
* ``mean``/``std``: the image intensity inside the class (first modality; HU for CT).

:func:`measure_labels` needs the labels only (the plugin calls it after a hand edit);
:func:`measure_result` adds the probabilistic figures from a result's ``probabilities`` map.
:func:`write_stats` writes rows of measurements as JSON or CSV (one row per case, domain and class).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from training.errors import InputError

BAND = (0.1, 0.9)  # probability thresholds bounding a class's uncertain band
BAND_FLOOR = 0.01  # … plus this fraction of the expected volume (a sure result still gets an interval)
DEFAULT_NOMINAL = 0.9
STATS_SUFFIXES = (".json", ".csv")


@dataclass
class ClassMeasure:
    """One class of one result (volumes in mL; intensity in the image's unit)."""

    label: int
    name: str
    voxels: int
    volume_ml: float
    expected_ml: float | None = None
    low_ml: float | None = None
    high_ml: float | None = None
    mean: float | None = None
    std: float | None = None


def voxel_volume_ml(affine) -> float:
    """The volume of one voxel of a grid (mL) from its affine (mm)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _first_channel(image):
    if image is None:
        return None
    image = np.asarray(image)
    return image[0] if image.ndim == 4 else image


def measure_labels(labels: np.ndarray, voxel_ml: float, names: list[str], image=None) -> list[ClassMeasure]:
    """Per foreground class (1 … len(names)-1) of hard ``labels``: voxels, volume and, with
    ``image`` ((Z, Y, X) or (C, Z, Y, X), same grid), the mean and spread of its first channel."""
    labels = np.asarray(labels)
    image = _first_channel(image)
    if image is not None and image.shape != labels.shape:
        raise InputError(f"the image {image.shape} and the labels {labels.shape} are not on the same grid")
    counts = np.bincount(labels.ravel(), minlength=len(names))
    out = []
    for k in range(1, len(names)):
        n = int(counts[k])
        mean = std = None
        if image is not None and n:
            values = image[labels == k].astype(np.float64)
            mean, std = float(values.mean()), float(values.std())
        out.append(ClassMeasure(k, names[k], n, n * voxel_ml, mean=mean, std=std))
    return out


def volume_band(probabilities: np.ndarray, voxel_ml: float, expected_ml: float) -> float:
    """Width (mL) of a class's uncertain band: V(p > 0.1) − V(p > 0.9) + 1 % of its expected volume."""
    lo, hi = BAND
    count = int(np.count_nonzero(probabilities > lo)) - int(np.count_nonzero(probabilities > hi))
    return count * voxel_ml + BAND_FLOOR * expected_ml


def interval_scales(calibration: dict | None, num_classes: int) -> list[float]:
    """Per foreground class the scale of the volume interval (1 without a calibration)."""
    vi = (calibration or {}).get("volume_interval") or {}
    scale = vi.get("scale")
    if isinstance(scale, list) and len(scale) == num_classes - 1:
        return [float(s) for s in scale]
    return [1.0] * (num_classes - 1)


def measure_result(result, volume, class_names: list[str]) -> list[ClassMeasure]:
    """:func:`measure_labels` of a :class:`~training.infer.result.DomainResult` on ``volume``'s grid,
    plus the expected volume and its interval when the result has a ``probabilities`` map
    (``InferenceConfig(probabilities=True)``)."""
    voxel_ml = voxel_volume_ml(volume.affine)
    rows = measure_labels(result.labels, voxel_ml, class_names, volume.data)
    probs = result.maps.get("probabilities")
    if probs is None:
        return rows
    scales = interval_scales(result.calibration, len(class_names))
    for row in rows:
        p = probs[row.label]
        expected = float(p.sum(dtype=np.float64)) * voxel_ml
        half = scales[row.label - 1] * volume_band(p, voxel_ml, expected)
        row.expected_ml, row.low_ml, row.high_ml = expected, max(expected - half, 0.0), expected + half
    return rows


# -- scoring a volume forecast (u2net evaluate, the benchmark) -------------------------------------
def interval_std(low: float, high: float, nominal: float = DEFAULT_NOMINAL) -> float:
    """The normal spread whose central ``nominal`` interval is [low, high]."""
    return (high - low) / (2 * NormalDist().inv_cdf(0.5 + nominal / 2))


def crps_normal(mean: float, std: float, truth: float) -> float:
    """CRPS of a normal forecast N(mean, std²) for the observed ``truth`` (same unit)."""
    if std <= 0:
        return abs(truth - mean)
    z = (truth - mean) / std
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return std * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def score_volume(row: ClassMeasure, true_ml: float, nominal: float = DEFAULT_NOMINAL) -> dict:
    """How a class's expected volume and interval did against the reference volume ``true_ml``:
    error (mL and % of the truth), whether the interval covered it, and the volume's CRPS (mL)
    under the normal whose central ``nominal`` interval is [low, high]."""
    if row.expected_ml is None:
        return {}
    error = row.expected_ml - true_ml
    std = interval_std(row.low_ml, row.high_ml, nominal)
    return {
        "true_ml": true_ml,
        "expected_ml": row.expected_ml,
        "volume_error_ml": error,
        "volume_error_pct": 100.0 * abs(error) / true_ml if true_ml > 0 else None,
        "covered": bool(row.low_ml <= true_ml <= row.high_ml),
        "crps_ml": crps_normal(row.expected_ml, std, true_ml),
    }


# -- the stats file -----------------------------------------------------------------------------------
COLUMNS = ("case", "domain", *ClassMeasure.__dataclass_fields__)


def stats_rows(case: str, prediction, volume, model) -> list[dict]:
    """One row per domain and class of a :class:`~training.infer.result.Prediction` of ``volume``."""
    rows = []
    for result in prediction:
        for m in measure_result(result, volume, model.meta(result.domain).class_names):
            rows.append({"case": case, "domain": result.domain, **asdict(m)})
    return rows


def check_stats_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any inference, a stats file that cannot be written: not .json/.csv, already
    there (unless ``overwrite``), or in a read-only, full or missing place."""
    from training.io.atomic import check_writable

    path = Path(path)
    if path.suffix.lower() not in STATS_SUFFIXES:
        raise InputError(f"{path}: a stats file ends in .json or .csv")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists; remove it or pass --overwrite")
    check_writable(path)
    return path


def format_stats(rows: list[dict], suffix: str) -> str:
    """JSON (an array of row objects) or CSV (a header of :data:`COLUMNS`, empty cells for None)."""
    if suffix.lower() == ".json":
        return json.dumps(rows, indent=1) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return buf.getvalue()


def write_stats(path: str | Path, rows: list[dict], overwrite: bool = False) -> Path:
    """Write ``rows`` to ``path`` (.json or .csv by its suffix), atomically."""
    from training.io.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, format_stats(rows, path.suffix), overwrite=overwrite)
    return path
