"""Dice of a model's domain on an MSD dataset's labelled cases, exactly as a user would get it.

Inference runs as ``u2net predict`` does (raw image in, labels at the image's own geometry out)
and is compared with the raw label files, so preprocessing and geometry errors show up here.
With ``calibration=True`` it also scores the probabilities: the top-label ECE over voxels with
the network's own probabilities (before) and with the domain's temperature (after), and per
class the expected volume against the reference (error, coverage of the 90 % interval, CRPS),
as :mod:`training.infer.measure` reports them. Used by ``u2net evaluate`` and by the default
model's recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from training.errors import InputError


def class_mismatch(model_classes: list[str], dataset_classes: list[str]) -> str:
    """Why Dice against this dataset's labels would mean little ("" when the classes agree):
    label value k must mean the same structure in the model and in the dataset."""
    if [c.lower() for c in model_classes] == [c.lower() for c in dataset_classes]:
        return ""
    return (
        f"the domain's classes ({', '.join(model_classes)}) differ from the dataset's "
        f"({', '.join(dataset_classes)}); label values are compared as they are, so Dice may be 0 "
        "or meaningless: evaluate a domain made for these labels"
    )


def evaluate_dataset(
    model,
    dataset_dir: Path,
    domain: str,
    *,
    device: str = "auto",
    case_ids: list[str] | None = None,
    limit: int | None = None,
    on_case: Callable[[dict], None] | None = None,
    calibration: bool = False,
) -> dict:
    """Per-case and mean foreground Dice per class; ``on_case`` sees each case's result.
    ``calibration``: also ECE before/after and the volume figures (module docstring)."""
    from training.data.datasets import load_dataset
    from training.infer.measure import measure_result, score_volume, voxel_volume_ml
    from training.infer.pipeline import InferenceConfig, predict
    from training.io.volume import read_image
    from training.train.calibration import EceMeter, calibrated
    from training.train.metrics import dice_per_class, mean_ignoring_nan

    ds = load_dataset(dataset_dir)
    if domain not in model.adapters:
        raise InputError(f"model has no domain {domain!r}; it has: {', '.join(model.adapters)}")
    meta = model.meta(domain)
    cases = [c for c in ds.training if c.label is not None]
    if case_ids is not None:
        wanted = set(case_ids)
        cases = [c for c in cases if c.id in wanted]
    cases = cases[:limit] if limit else cases
    if not cases:
        raise InputError(f"{dataset_dir}: no labelled case to evaluate")
    names = meta.class_names[1:]
    mismatch = class_mismatch(meta.class_names, ds.class_names)
    if mismatch:
        warnings.warn(f"{dataset_dir}: {mismatch}", stacklevel=2)
    config = InferenceConfig(device=device, probabilities=calibration)
    per_case = []
    before, after = EceMeter(), EceMeter()
    for case in cases:
        volume = read_image(case.images)
        truth = np.asarray(read_image(case.label).data[0]).round().astype(np.int64)
        result = predict(model, volume, [domain], config)[domain]
        pred = result.labels
        scores = dict(zip(names, dice_per_class(pred, truth, meta.num_classes)))
        per_case.append({"case": case.id, "dice": scores, "mean": mean_ignoring_nan(scores.values())})
        if calibration:
            probs = result.maps["probabilities"]
            after.add(probs, truth)
            before.add(calibrated(torch.from_numpy(probs), 1.0 / meta.temperature), truth)
            voxel_ml = voxel_volume_ml(volume.affine)
            per_case[-1]["volume"] = {
                m.name: score_volume(m, float((truth == m.label).sum()) * voxel_ml)
                for m in measure_result(result, volume, meta.class_names)
            }
        if on_case is not None:
            on_case(per_case[-1])
    mean_per_class = {n: mean_ignoring_nan([c["dice"][n] for c in per_case]) for n in names}
    extra = _calibration_summary(meta, per_case, before.value, after.value) if calibration else {}
    return {
        "dataset": str(dataset_dir),
        "domain": domain,
        "class_mismatch": mismatch,
        "cases": len(per_case),
        "per_case": per_case,
        "mean_dice_per_class": mean_per_class,
        "mean_dice": mean_ignoring_nan(mean_per_class.values()),
        **extra,
    }


def _calibration_summary(meta, per_case: list[dict], ece_before, ece_after) -> dict:
    """ECE before/after and, per class and over all, the volume error, coverage and CRPS."""
    from training.infer.measure import DEFAULT_NOMINAL

    def pooled(rows: list[dict]) -> dict:
        rows = [r for r in rows if r and r.get("true_ml")]
        errors = [r["volume_error_pct"] for r in rows]
        return {
            "cases": len(rows),
            "mean_abs_volume_error_pct": float(np.mean(errors)) if rows else None,
            "coverage": float(np.mean([r["covered"] for r in rows])) if rows else None,
            "crps_ml": float(np.mean([r["crps_ml"] for r in rows])) if rows else None,
        }

    names = meta.class_names[1:]
    per_class = {n: pooled([c["volume"].get(n) for c in per_case]) for n in names}
    return {
        "calibrated": bool(meta.calibration),
        "temperature": meta.temperature,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "volume": {"nominal": DEFAULT_NOMINAL, **pooled([v for c in per_case for v in c["volume"].values()]),
                   "per_class": per_class},
    }
