"""Dice of a model's domain on an MSD dataset's labelled cases, exactly as a user would get it.

Inference runs as ``u2net predict`` does (raw image in, labels at the image's own geometry out)
and is compared with the raw label files, so preprocessing and geometry errors show up here.
Used by ``u2net evaluate`` and by the default model's recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
) -> dict:
    """Per-case and mean foreground Dice per class; ``on_case`` sees each case's result."""
    from training.data.datasets import load_dataset
    from training.infer.pipeline import InferenceConfig, predict
    from training.io.volume import read_image
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
    config = InferenceConfig(device=device)
    per_case = []
    for case in cases:
        volume = read_image(case.images)
        truth = np.asarray(read_image(case.label).data[0]).round().astype(np.int64)
        pred = predict(model, volume, [domain], config)[domain].labels
        scores = dict(zip(names, dice_per_class(pred, truth, meta.num_classes)))
        per_case.append({"case": case.id, "dice": scores, "mean": mean_ignoring_nan(scores.values())})
        if on_case is not None:
            on_case(per_case[-1])
    mean_per_class = {n: mean_ignoring_nan([c["dice"][n] for c in per_case]) for n in names}
    return {
        "dataset": str(dataset_dir),
        "domain": domain,
        "class_mismatch": mismatch,
        "cases": len(per_case),
        "per_case": per_case,
        "mean_dice_per_class": mean_per_class,
        "mean_dice": mean_ignoring_nan(mean_per_class.values()),
    }
