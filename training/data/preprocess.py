"""Preprocessing for training: plan (target spacing, normalisation, patch size) and a case cache.

Training must see images exactly as inference will (:func:`training.infer.pipeline.predict`), so a
case goes through the same steps, using the same functions from :mod:`training.io.resample`:

1. exact reorientation to canonical axes (axis 0 → superior, 1 → anterior, 2 → right);
2. SimpleITK resampling to the plan's spacing (linear for images, nearest for labels), skipped
   when the spacing already matches (``needs_resampling``), as inference does;
3. normalisation of the whole resampled image with the plan's per-modality specs
   (:mod:`training.data.normalization`; the specs go into the adapter metadata);
4. cropping to the box of non-zero voxels (any channel) — after normalisation, so per-image
   statistics are those inference computes on the full image.

Plan (:func:`plan_dataset`): median spacing of the training cases on canonical axes; per
modality ``{"scheme": "ct", "clip": [p0.5, p99.5], "mean", "std"}`` from foreground voxels of
CT, or ``{"scheme": "zscore", "nonzero": ...}`` for MR (``nonzero`` when cropping to the
non-zero box removes more than a quarter of the volume, e.g. skull-stripped images); a patch
size from the median shape (multiples of 16, or 8 on small axes, at most 64×128×128).

Cache (:func:`preprocess_dataset`): ``CACHE/<plan hash>/<case id>.npz`` with the source files'
sizes and modification times; a case is recomputed when its files change, and the plan itself
is cached as ``CACHE/plan-<hash of the sources>.json``. Default ``CACHE`` is
``ROOT/.u2net_cache``; ``cache_dir=False`` disables caching. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.data.datasets import Case, MSDDataset, _header
from training.data.normalization import CT_AIR_HU, ct_spec, normalize
from training.errors import DatasetError, InputError
from training.io.atomic import atomic_write_bytes
from training.io.resample import (
    canonical_orientation,
    needs_resampling,
    reorient_affine,
    reorient_array,
    resample,
    resampled_grid,
)
from training.io.volume import IGNORE_INDEX, Volume, read_image, spacing_of

PREPROCESS_VERSION = 1
CACHE_SUBDIR = ".u2net_cache"
MAX_PATCH = (64, 128, 128)  # the largest patch a plan suggests (z, y, x): fits a GPU's memory
FG_SAMPLES_PER_CASE = 10000


@dataclass
class PreprocessPlan:
    spacing: list[float]  # target voxel size (z, y, x) mm on canonical axes
    normalization: list[dict]  # one spec per modality (training.data.normalization)
    modality: str  # "CT" or "MR"
    patch_size: list[int]  # suggested training patch (z, y, x)
    class_names: list[str]
    modalities: list[str] = field(default_factory=list)
    median_shape: list[int] = field(default_factory=list)  # at the target spacing
    version: int = PREPROCESS_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessPlan:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def hash(self) -> str:
        """Identifies the preprocessed data: the patch size does not change it."""
        key = {k: v for k, v in self.to_dict().items() if k not in ("patch_size", "median_shape")}
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreprocessedCase:
    id: str
    image: np.ndarray  # (C, Z, Y, X) float32, normalised, target spacing, cropped
    label: np.ndarray | None  # (Z, Y, X) uint8
    properties: dict = field(default_factory=dict)


# -- planning ---------------------------------------------------------------------------------------
def _canonical_geometry(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and shape of a case on canonical axes, from its header."""
    shape, affine = _header(case.images[0])
    o = canonical_orientation(affine)
    aff_c = reorient_affine(affine, shape[:3], o)
    return spacing_of(aff_c), np.array([shape[p] for p in o.perm], dtype=np.float64)


def _sources(case: Case) -> list:
    out = []
    for p in list(case.images) + ([case.label] if case.label else []):
        st = Path(p).stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def suggest_patch_size(median_shape, cap=MAX_PATCH) -> list[int]:
    patch = []
    for n, c in zip(median_shape, cap):
        n = min(int(n), int(c))
        step = 16 if n >= 32 else 8
        patch.append(max(8, n // step * step))
    return patch


def _read_label(case: Case, class_names: list[str], shape=None) -> np.ndarray:
    data = read_image(case.label).data[0]
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise DatasetError(f"{case.label}: shape {data.shape} differs from its image {tuple(shape)}")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.round(data)
        if not np.array_equal(rounded, data):
            raise DatasetError(f"{case.label}: label values must be whole numbers; this looks like an image")
        data = rounded
    values = np.unique(data).astype(np.int64)
    allowed = set(range(len(class_names))) | {IGNORE_INDEX}
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise DatasetError(
            f"{case.label}: label values {bad[:5]} are not among dataset.json's labels "
            f"(0–{len(class_names) - 1}, or {IGNORE_INDEX} = ignore); fix the file or add the classes"
        )
    return data.astype(np.uint8)


def plan_dataset(dataset: MSDDataset, cases: list[Case] | None = None, cache_dir=None) -> PreprocessPlan:
    """Target spacing, normalisation and patch size for a dataset (cached by source files)."""
    cases = list(cases if cases is not None else dataset.training)
    if not cases:
        raise DatasetError(f"{dataset.root}: no training cases to plan preprocessing from")
    cache = _cache_root(dataset, cache_dir)
    sig = hashlib.sha1(
        json.dumps(
            [
                dataset.modalities,
                dataset.modality,
                dataset.class_names,
                PREPROCESS_VERSION,
                [[c.id, _sources(c)] for c in cases],
            ]
        ).encode()
    ).hexdigest()[:16]
    plan_file = cache / f"plan-{sig}.json" if cache else None
    if plan_file is not None and plan_file.exists():
        try:
            return PreprocessPlan.from_dict(json.loads(plan_file.read_text()))
        except (ValueError, TypeError):
            pass  # unreadable: recompute and overwrite

    geo = [_canonical_geometry(c) for c in cases]
    spacings = np.array([g[0] for g in geo])
    target = np.median(spacings, axis=0)
    median_shape = np.median([g[1] * g[0] / target for g in geo], axis=0).round().astype(int)

    n_mod = len(dataset.modalities)
    is_ct = [dataset.modality == "CT" and (m.upper() == "CT" or n_mod == 1) for m in dataset.modalities]
    rng = np.random.default_rng(0)
    fg = [[] for _ in range(n_mod)]
    lowest = [np.inf] * n_mod
    crop_ratio = []
    for case in cases:
        vol = read_image(case.images)
        if any(is_ct):
            lab = _read_label(case, dataset.class_names, vol.shape)
            mask = (lab > 0) & (lab != IGNORE_INDEX)
            if not mask.any():
                mask = np.ones_like(mask)
            idx = np.flatnonzero(mask)
            take = (
                idx
                if len(idx) <= FG_SAMPLES_PER_CASE
                else rng.choice(idx, FG_SAMPLES_PER_CASE, replace=False)
            )
            for c in range(n_mod):
                if is_ct[c]:
                    fg[c].append(vol.data[c].ravel()[take].astype(np.float64))
                    lowest[c] = min(lowest[c], float(vol.data[c].min()))
        if not all(is_ct):
            box = nonzero_box(vol.data)
            crop_ratio.append(np.prod([b - a for a, b in box]) / np.prod(vol.shape))
    nonzero = bool(crop_ratio) and float(np.median(crop_ratio)) < 0.75
    specs = []
    for c in range(n_mod):
        if is_ct[c]:
            specs.append(ct_spec(np.concatenate(fg[c]), len(fg[c]), lowest[c] <= CT_AIR_HU))
        else:
            specs.append({"scheme": "zscore", "nonzero": nonzero})
    plan = PreprocessPlan(
        spacing=[float(s) for s in target],
        normalization=specs,
        modality=dataset.modality,
        patch_size=suggest_patch_size(median_shape),
        class_names=list(dataset.class_names),
        modalities=list(dataset.modalities),
        median_shape=[int(s) for s in median_shape],
    )
    if plan_file is not None:
        _atomic_write(plan_file, json.dumps(plan.to_dict(), indent=1).encode())
    return plan


# -- one case ---------------------------------------------------------------------------------------
def nonzero_box(data: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] per spatial axis of the voxels non-zero in any channel (all if none)."""
    mask = np.any(np.asarray(data) != 0, axis=0) if data.ndim == 4 else np.asarray(data) != 0
    if not mask.any():
        return [(0, n) for n in mask.shape]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return box


def preprocess_case(
    volume: Volume, label: np.ndarray | None, plan: PreprocessPlan, case_id: str = ""
) -> PreprocessedCase:
    """Reorient, resample, normalise and crop one case (see the module docstring)."""
    if volume.channels != len(plan.normalization):
        raise DatasetError(
            f"{volume.source or case_id}: {volume.channels} channel(s) but the plan has "
            f"{len(plan.normalization)} modalities"
        )
    if label is not None and tuple(label.shape) != volume.shape:
        raise DatasetError(
            f"{volume.source or case_id}: label shape {label.shape} differs from image {volume.shape}"
        )
    o = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, o)
    data_c = reorient_array(volume.data, o)
    shape_c = tuple(data_c.shape[1:])
    label_c = reorient_array(label, o) if label is not None else None
    if needs_resampling(affine_c, plan.spacing):
        grid_affine, grid_shape = resampled_grid(affine_c, shape_c, plan.spacing)
        image = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
        if label_c is not None:
            label_c = resample(np.ascontiguousarray(label_c), affine_c, grid_affine, grid_shape, linear=False)
    else:
        grid_affine, grid_shape = affine_c, shape_c
        image = np.ascontiguousarray(data_c, dtype=np.float32)
    box = nonzero_box(image)
    if label_c is not None and np.any((label_c > 0) & (label_c != IGNORE_INDEX)):
        lbox = nonzero_box(((label_c > 0) & (label_c != IGNORE_INDEX))[None])
        box = [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(box, lbox)]
    image = normalize(image, plan.normalization)
    sl = tuple(slice(a, b) for a, b in box)
    image = np.ascontiguousarray(image[(slice(None), *sl)], dtype=np.float32)
    label_out = np.ascontiguousarray(label_c[sl], dtype=np.uint8) if label_c is not None else None
    props = {
        "original_shape": list(volume.shape),
        "original_affine": np.asarray(volume.affine).tolist(),
        "orientation": {"perm": list(o.perm), "flip": list(o.flip)},
        "resampled_shape": list(grid_shape),
        "resampled_affine": np.asarray(grid_affine).tolist(),
        "crop_box": [list(b) for b in box],
        "spacing": list(plan.spacing),
    }
    return PreprocessedCase(case_id, image, label_out, props)


# -- dataset with cache -----------------------------------------------------------------------------
def _cache_root(dataset: MSDDataset, cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    root = Path(cache_dir) if cache_dir else Path(dataset.root) / CACHE_SUBDIR
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(
            f"cannot create the preprocessing cache {root} ({e}); preprocessing without a cache", stacklevel=3
        )
        return None
    return root


def _atomic_write(path: Path, data: bytes) -> None:
    """A cache write that cannot be made (read-only or full disk) only costs the cache."""
    try:
        atomic_write_bytes(path, data)
    except (OSError, InputError) as e:  # atomic writes say why in an InputError
        warnings.warn(f"cannot write {path} ({e}); not cached", stacklevel=3)


def _load_cached(path: Path, sources: list) -> PreprocessedCase | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("sources") != sources:
                return None
            label = z["label"] if meta.get("has_label") else None
            return PreprocessedCase(meta["id"], z["image"], label, meta["properties"])
    except (OSError, ValueError, KeyError):
        return None  # missing, partial or foreign: recompute


def _save_cached(path: Path, case: PreprocessedCase, sources: list) -> None:
    import io

    meta = {
        "id": case.id,
        "sources": sources,
        "has_label": case.label is not None,
        "properties": case.properties,
    }
    buf = io.BytesIO()
    arrays = {"image": case.image, "meta": np.array(json.dumps(meta))}
    if case.label is not None:
        arrays["label"] = case.label
    np.savez(buf, **arrays)
    _atomic_write(path, buf.getvalue())


def preprocess_dataset(
    dataset: MSDDataset,
    plan: PreprocessPlan,
    cache_dir=None,
    ids: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[PreprocessedCase]:
    """Preprocess the training cases (or the cases ``ids``, training or test), cached on disk."""
    pool = dataset.training + dataset.test
    if ids is None:
        cases = list(dataset.training)
    else:
        by_id = {c.id: c for c in pool}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DatasetError(f"{dataset.root / 'dataset.json'}: no case named {missing[0]!r}")
        cases = [by_id[i] for i in ids]
    root = _cache_root(dataset, cache_dir)
    folder = root / plan.hash() if root is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / "plan.json", json.dumps(plan.to_dict(), indent=1).encode())
    out = []
    for n, case in enumerate(cases):
        sources = _sources(case)
        path = folder / f"{case.id}.npz" if folder is not None else None
        done = _load_cached(path, sources) if path is not None and path.exists() else None
        if done is None:
            volume = read_image(case.images)
            label = _read_label(case, plan.class_names, volume.shape) if case.label is not None else None
            done = preprocess_case(volume, label, plan, case.id)
            if path is not None:
                _save_cached(path, done, sources)
        out.append(done)
        if progress is not None:
            progress(n + 1, len(cases))
    return out
