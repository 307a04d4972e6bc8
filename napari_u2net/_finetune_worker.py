"""The fine-tune job without Qt: checks the user's layers, stages a model copy, trains, publishes.

Why a staging copy: :func:`training.train.adaptation.adapt_domain` writes the adapter into the model
directory it trains in (at the end, and when stopped). The panel must be able to *discard* a
stopped run and to keep the best checkpoint rather than the last, so training happens in
``<target>/.staging-<name>-<id>/`` (hard links to the trunk and adapters: nothing is copied, and the
originals are never opened for writing) and only :func:`publish` moves the chosen adapter into the
user's model directory, with one atomic ``os.replace``.

The user's model directory is a writable copy (trunk + adapters, the trunk hash unchanged) of
the model the panel starts from: the bundled model may sit in a read-only package folder and a
downloaded one in a checksummed cache.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.volume import IGNORE_INDEX
from training.model.layout import ADAPTER_DIR, TRUNK_FILE
from training.model.user_models import copy_atomic, ensure_user_model

STAGING_PREFIX = ".staging-"
BEST_FILE = "best.safetensors"


# -- label checks ---------------------------------------------------------------------------------
def prepare_labels(labels: np.ndarray, name: str, only_labelled_slices: bool) -> np.ndarray:
    """The user's labels as training targets (uint8, 255 = ignore); InputError if unusable.

    With ``only_labelled_slices``, slices along axis 0 that hold no nonzero label become 255
    (not looked at), and inside labelled slices 0 stays background.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise InputError(f"labels layer {name!r} holds {labels.dtype} values; a labels layer of integers is needed")
    top = int(labels.max()) if labels.size else 0
    if top >= IGNORE_INDEX:
        raise InputError(
            f"labels layer {name!r} uses label {top}: at most {IGNORE_INDEX - 1} classes can be trained "
            f"({IGNORE_INDEX} marks unlabelled voxels); renumber the labels 1, 2, … or split the structures into several domains"
        )
    if int(labels.min()) < 0:
        raise InputError(f"labels layer {name!r} has negative labels; use 0 for background and 1, 2, … for structures")
    if top == 0:
        raise InputError(
            f"labels layer {name!r} is empty: paint (or correct) the structure to learn on at least a few slices"
        )
    out = labels.astype(np.uint8)
    if only_labelled_slices:
        painted = out.reshape(out.shape[0], -1).any(axis=1)
        out[~painted] = IGNORE_INDEX
    valid = out[out != IGNORE_INDEX]
    values = np.unique(valid)
    if len(values) < 2:
        what = "background" if values[0] != 0 else "any structure"
        raise InputError(
            f"labels layer {name!r} holds a single class ({int(values[0])}) where it is looked at: the "
            f"model needs {what} too. Paint the structure on a slice that also shows background, "
            "or turn off 'train only on labelled slices'"
        )
    return out


def labelled_slices(labels: np.ndarray) -> list[int]:
    """Indices along axis 0 of the slices that are looked at (not all 255)."""
    return [int(i) for i in np.nonzero((labels != IGNORE_INDEX).reshape(labels.shape[0], -1).any(axis=1))[0]]


def check_geometry(image_name: str, image_shape, image_affine, labels_name: str, labels_shape, labels_affine) -> None:
    """Labels must lie voxel for voxel on the image's grid (same shape and data→world transform)."""
    if tuple(image_shape) != tuple(labels_shape):
        raise InputError(
            f"labels layer {labels_name!r} has shape {tuple(labels_shape)} but image {image_name!r} has "
            f"{tuple(image_shape)}: pair each image with labels drawn on it (e.g. a segmentation of that image)"
        )
    if not np.allclose(np.asarray(image_affine), np.asarray(labels_affine), atol=1e-4, rtol=1e-5):
        raise InputError(
            f"labels layer {labels_name!r} is not placed on image {image_name!r} (different scale, "
            "translation or orientation): pair it with the image it was drawn on, or give it the image's transform"
        )


def default_class_names(labels: np.ndarray, features=None) -> list[str]:
    """Class names from a labels layer's features (a 'class' or 'name' column), else generic ones."""
    labels = np.asarray(labels)  # a lazy layer is read here (the panel calls this from a worker)
    top = max(int(np.max(labels)) if np.size(labels) else 0, 1)
    names = ["background"] + [f"class {i}" for i in range(1, min(top, IGNORE_INDEX - 1) + 1)]
    if features is None or not hasattr(features, "columns") or len(features) == 0:
        return names
    column = next((c for c in ("class", "name") if c in features.columns), None)
    if column is None:
        return names
    index = features["index"].tolist() if "index" in features.columns else list(range(len(features)))
    for i, value in zip(index, features[column].tolist()):
        i = int(i)
        if 0 <= i < len(names) and isinstance(value, str) and value.strip():
            names[i] = value.strip()
    return names


def parse_class_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


# -- model directories ------------------------------------------------------------------------------
def model_domains(model_dir: Path) -> list[dict]:
    from training.model.layout import model_dir_domains

    return model_dir_domains(Path(model_dir))[0]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_staging(target: Path, name: str) -> Path:
    """A throw-away model directory beside the user's, sharing its files by hard links."""
    staging = Path(target) / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    (staging / ADAPTER_DIR).mkdir(parents=True)
    _link_or_copy(Path(target) / TRUNK_FILE, staging / TRUNK_FILE)
    for f in sorted((Path(target) / ADAPTER_DIR).glob("*.safetensors")):
        _link_or_copy(f, staging / ADAPTER_DIR / f.name)
    return staging


# -- the job ------------------------------------------------------------------------------------------
@dataclass
class TrainingPair:
    """One (image layer, labels layer) pair, already read out of napari."""

    image_name: str
    image: np.ndarray  # (C, Z, Y, X) raw intensities
    affine: np.ndarray  # 4×4 index → RAS mm
    labels_name: str
    labels: np.ndarray  # (Z, Y, X) uint8, 255 = ignore (after prepare_labels)


@dataclass
class FineTuneRequest:
    source_dir: Path  # the model to start from
    target_dir: Path  # the user's (writable) model directory
    name: str
    pairs: list[TrainingPair]
    class_names: list[str]
    modality: str = "CT"
    init_from: str | None = "auto"
    config: object = None  # training.train.trainer.TrainConfig
    only_labelled_slices: bool = False
    overwrite: bool = False
    colors: list[str] | None = None
    threads: int | None = None  # torch CPU threads while training (None: all cores but one)


@dataclass
class FineTuneResult:
    """What a finished or stopped job left in its staging folder, for :func:`publish`."""

    request: FineTuneRequest
    staging: Path
    last_file: Path
    best_file: Path | None
    best_val: float | None
    best_iteration: int | None
    iterations_done: int
    stopped: bool
    seconds: float
    reports: list = field(default_factory=list)

    @property
    def chosen_file(self) -> Path:
        """The best validated checkpoint when one beats the last weights, else the last weights."""
        last_val = self.reports[-1].val_mean if self.reports else None
        if self.best_file is not None and self.best_file.exists() and (
            last_val is None or (self.best_val is not None and self.best_val > last_val)
        ):
            return self.best_file
        return self.last_file


def _val_cases(pairs: list[TrainingPair], margin: int = 8) -> list[tuple]:
    """Validation on the user's own labels, cropped to the looked-at slices ± ``margin`` (context)."""
    out = []
    for p in pairs:
        rows = labelled_slices(p.labels)
        z0, z1 = max(0, rows[0] - margin), min(p.labels.shape[0], rows[-1] + 1 + margin)
        out.append((p.image[:, z0:z1], p.labels[z0:z1]))
    return out


def finetune_job(request: FineTuneRequest, stop, train_fn: Callable | None = None) -> Iterator:
    """Generator for a napari thread worker: yields TrainReports, returns a FineTuneResult.

    Everything is written in a staging folder inside ``request.target_dir``; nothing the user
    has is touched until :func:`publish`. The staging folder is removed if training fails.
    """
    import time

    import torch

    from training.io.volume import Volume
    from training.train.adaptation import adapt_domain

    train_fn = train_fn or adapt_domain
    config = request.config
    if config is not None and config.val_every:
        # a checkpoint at every validation, so that the best-so-far file matches its Dice
        request.config = config = dataclasses.replace(config, checkpoint_every=config.val_every)
    target = ensure_user_model(request.source_dir, request.target_dir)
    staging = make_staging(target, request.name)
    last_file = staging / ADAPTER_DIR / f"{request.name}.safetensors"
    best_file, best_val, best_it = None, None, None
    reports: list = []
    threads = torch.get_num_threads()
    want = request.threads if request.threads else max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(max(1, min(want, threads)))
    t0 = time.perf_counter()
    try:
        cases = [(Volume(p.image, p.affine), p.labels) for p in request.pairs]
        val = _val_cases(request.pairs)
        gen = train_fn(
            staging, request.name, cases, request.class_names, request.modality,
            init_from=request.init_from, config=request.config, stop=stop,
            colors=request.colors, val_cases=val, overwrite=request.overwrite,
        )
        for report in gen:
            reports.append(report)
            if report.val_mean is not None and report.val_mean == report.val_mean and last_file.exists():
                if best_val is None or report.val_mean > best_val:
                    # the trainer wrote this iteration's adapter just before reporting it
                    best_file = staging / BEST_FILE
                    copy_atomic(last_file, best_file)
                    best_val, best_it = float(report.val_mean), report.iteration
            yield report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    if not reports or not last_file.exists():  # stopped before the first iteration: nothing to keep
        shutil.rmtree(staging, ignore_errors=True)
        from training.errors import Cancelled

        raise Cancelled("fine-tuning stopped before the first iteration; nothing was saved")
    done = reports[-1].iteration
    planned = reports[-1].iterations or (request.config.iterations if request.config is not None else done)
    return FineTuneResult(
        request, staging, last_file, best_file, best_val, best_it, done,
        stopped=done < planned, seconds=time.perf_counter() - t0, reports=reports,
    )


def provenance_for(result: FineTuneResult, chosen: Path) -> dict:
    """What the panel adds to the adapter's provenance: layers, voxel counts, metrics."""
    req = result.request
    pairs = []
    for p in req.pairs:
        counts = np.bincount(p.labels[p.labels != IGNORE_INDEX].ravel(), minlength=len(req.class_names))
        pairs.append({
            "image": p.image_name,
            "labels": p.labels_name,
            "shape": [int(s) for s in p.labels.shape],
            "labelled_slices": len(labelled_slices(p.labels)),
            "voxels": {req.class_names[i]: int(c) for i, c in enumerate(counts[: len(req.class_names)])},
            "ignored_voxels": int((p.labels == IGNORE_INDEX).sum()),
        })
    last = result.reports[-1] if result.reports else None
    best = chosen == result.best_file
    return {
        "source": "napari-u2net fine-tune panel",
        "pairs": pairs,
        "only_labelled_slices": bool(req.only_labelled_slices),
        "iterations_planned": int(last.iterations) if last is not None and last.iterations else None,
        "iterations_done": int(result.iterations_done),
        "stopped_early": bool(result.stopped),
        "kept": "best" if best else "last",
        "kept_iteration": int(result.best_iteration if best else result.iterations_done),
        "final_loss": float(last.loss) if last is not None else None,
        "val_dice_on_own_labels": result.best_val if best else (last.val_mean if last is not None else None),
        "seconds": round(float(result.seconds), 2),
        "base_model": str(req.source_dir),
    }


def publish(result: FineTuneResult) -> Path:
    """Stamp the provenance into the chosen adapter and move it into the user's model (atomic)."""
    from training.model.modelfile import read_weights, write_weights

    chosen = result.chosen_file
    state, meta = read_weights(chosen, "adapter")
    meta["provenance"] = {**meta.get("provenance", {}), **provenance_for(result, chosen)}
    write_weights(chosen, state, meta)  # atomic, inside the staging folder
    dest = Path(result.request.target_dir) / ADAPTER_DIR / f"{result.request.name}.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(chosen, dest)
    discard(result)
    return dest


def discard(result: FineTuneResult) -> None:
    shutil.rmtree(result.staging, ignore_errors=True)
