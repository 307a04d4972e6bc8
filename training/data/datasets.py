"""Medical Segmentation Decathlon (MSD) datasets: loading, validation and train/val splits.

Layout (what ``u2net synth`` writes and the MSD tasks ship)::

    ROOT/dataset.json   name, modality {"0": "T2", "1": "ADC"}, labels {"0": "background", ...},
                        training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                        test ["./imagesTs/y.nii.gz"], optional "u2net": {"modality", "colors"}
    ROOT/imagesTr/      3D NIfTI, or 4D with one volume per modality (MSD multi-modal)
    ROOT/labelsTr/      integer label maps on the image grid

nnU-Net v2 variants are accepted too: ``channel_names`` instead of ``modality``, labels as
``{"name": value}``, and no ``training`` list (cases found as ``imagesTr/ID_0000.nii.gz`` …
with ``labelsTr/ID.nii.gz``).

:func:`load_dataset` checks what can be checked from file headers (files exist, every training
image has a label, shapes, affines and channel counts agree) and raises :class:`DatasetError`
with one line naming the file. Label *values* are checked when the labels are read
(:mod:`training.data.preprocess`). :func:`load_split` writes ``ROOT/splits_final.json`` once and reuses it.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import DatasetError, InputError
from training.io.atomic import atomic_write_text
from training.io.volume import is_nifti, nifti_to_ours

SPLIT_FILE = "splits_final.json"


@dataclass
class Case:
    id: str
    images: list[Path]  # one (possibly 4D) file, or one file per modality
    label: Path | None = None


@dataclass
class MSDDataset:
    root: Path
    name: str  # as written in dataset.json
    modalities: list[str]  # one name per channel, e.g. ["T2", "ADC"]
    modality: str  # "CT" or "MR"
    class_names: list[str]  # index = label value; [0] is background
    colors: list[str] | None = None
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    domain: str = ""  # a valid domain name derived from ``name`` (see :func:`domain_name`)
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def case(self, case_id: str) -> Case:
        for c in self.training + self.test:
            if c.id == case_id:
                return c
        raise KeyError(case_id)


def domain_name(name: str) -> str:
    """A dataset name made into a valid domain name (letters, digits, '_', '-', '.')."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_.-") or "domain"
    return clean[:64]


def case_id(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- dataset.json ---------------------------------------------------------------------------------
def _read_json(root: Path) -> dict:
    js = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    if not js.is_file():
        raise DatasetError(
            f"{js}: missing; an MSD dataset folder needs a dataset.json (see u2net synth for an example)"
        )
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{js}: not valid JSON ({e}); fix or regenerate the file") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{js}: expected a JSON object with name, modality, labels and training")
    return doc


def _indexed(mapping, what: str, js: Path) -> list[str]:
    """{"0": "a", "1": "b"} (MSD) or {"a": 0, "b": 1} (nnU-Net v2) → ["a", "b"]."""
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f'{js}: \'{what}\' must be a non-empty object like {{"0": "..."}}')
    try:
        if all(isinstance(v, str) for v in mapping.values()):
            pairs = {int(k): str(v) for k, v in mapping.items()}
        else:
            pairs = {int(v): str(k) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise DatasetError(f"{js}: '{what}' keys must be integers 0, 1, …") from None
    if sorted(pairs) != list(range(len(pairs))):
        raise DatasetError(f"{js}: '{what}' must be numbered 0, 1, … without gaps, got {sorted(pairs)}")
    return [pairs[i] for i in range(len(pairs))]


def _resolve(root: Path, rel: str, js: Path) -> Path:
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{js}: a file entry is not a path: {rel!r}")
    p = Path(rel)
    return p if p.is_absolute() else (root / p).resolve()


def _image_files(root: Path, entry, n_mod: int, js: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    paths = [_resolve(root, e, js) for e in entries]
    if len(paths) == 1 and not paths[0].exists():
        # nnU-Net style: one file per modality next to the listed name (x_0000.nii.gz, …)
        stem = case_id(paths[0])
        split = [paths[0].with_name(f"{stem}_{i:04d}.nii.gz") for i in range(n_mod)]
        if all(p.exists() for p in split):
            return split
    return paths


def _scan_v2(root: Path, n_mod: int) -> list[dict]:
    """Training list of an nnU-Net v2 dataset (no ``training`` key)."""
    labels = sorted((root / "labelsTr").glob("*.nii*"))
    return [
        {
            "image": [f"./imagesTr/{case_id(p)}_{i:04d}.nii.gz" for i in range(n_mod)],
            "label": f"./labelsTr/{p.name}",
        }
        for p in labels
    ]


def load_dataset(root, domain: str | None = None, check_geometry: bool = True) -> MSDDataset:
    """Read and validate ``root/dataset.json`` and the files it lists (headers only).

    ``domain`` overrides the domain name derived from the dataset's ``name``.
    """
    root = Path(root).expanduser().resolve()
    doc = _read_json(root)
    js = root / "dataset.json"
    mod_map = doc.get("modality", doc.get("channel_names"))
    modalities = _indexed(mod_map, "modality", js) if mod_map is not None else ["image"]
    if "labels" not in doc:
        raise DatasetError(f'{js}: no \'labels\'; add e.g. "labels": {{"0": "background", "1": "organ"}}')
    class_names = _indexed(doc["labels"], "labels", js)
    if len(class_names) < 2:
        raise DatasetError(f"{js}: 'labels' needs background and at least one class")
    extra = doc.get("u2net") if isinstance(doc.get("u2net"), dict) else {}
    modality = str(
        extra.get("modality") or ("CT" if any(m.upper() == "CT" for m in modalities) else "MR")
    ).upper()
    if modality not in ("CT", "MR"):
        raise DatasetError(f'{js}: u2net.modality must be "CT" or "MR", got {modality!r}')
    colors = extra.get("colors")
    if colors is not None and (not isinstance(colors, list) or len(colors) < len(class_names)):
        raise DatasetError(f"{js}: u2net.colors must list one colour per label ({len(class_names)})")
    name = str(doc.get("name") or root.name)

    entries = doc.get("training")
    if entries is None:
        entries = _scan_v2(root, len(modalities))
    if not isinstance(entries, list):
        raise DatasetError(f'{js}: \'training\' must be a list of {{"image": ..., "label": ...}}')
    training, seen = [], set()
    for e in entries:
        if not isinstance(e, dict) or "image" not in e:
            raise DatasetError(f"{js}: each training entry needs an 'image' (and a 'label'), got {e!r}")
        images = _image_files(root, e["image"], len(modalities), js)
        if e.get("label") in (None, ""):
            raise DatasetError(f"{images[0]}: training image without a label in dataset.json")
        label = _resolve(root, e["label"], js)
        cid = case_id(label)
        if cid in seen:
            raise DatasetError(f"{label}: listed twice in {js}")
        seen.add(cid)
        training.append(Case(cid, images, label))
    test = []
    for e in doc.get("test") or []:
        ref = e.get("image") if isinstance(e, dict) else e
        images = _image_files(root, ref, len(modalities), js)
        test.append(
            Case(case_id(images[0]).removesuffix("_0000") if len(images) > 1 else case_id(images[0]), images)
        )
    if not training:
        raise DatasetError(f"{js}: no training cases listed (and none found in labelsTr/)")

    for case in training + test:
        for p in case.images + ([case.label] if case.label else []):
            if not p.exists():
                kind = "label" if p == case.label else "image"
                raise DatasetError(f"{p}: {kind} file listed in dataset.json does not exist")
        if check_geometry:
            _check_case(case, len(modalities))
    return MSDDataset(
        root=root,
        name=name,
        modalities=modalities,
        modality=modality,
        class_names=class_names,
        colors=[str(c) for c in colors] if colors else None,
        training=training,
        test=test,
        domain=domain_name(domain or name),
        description=str(doc.get("description", "")),
    )


def _header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape (our axis order), channel count and affine, from the header only."""
    import nibabel as nib

    if not is_nifti(path):
        raise DatasetError(f"{path}: dataset files must be NIfTI (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for corrupt headers
        raise DatasetError(f"{path}: cannot read this NIfTI file ({e})") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]
    if len(shape) not in (3, 4):
        raise DatasetError(f"{path}: expected a 3D or 4D image, got shape {img.shape}")
    channels = shape[3] if len(shape) == 4 else 1
    return (shape[2], shape[1], shape[0], channels), nifti_to_ours(img.affine)


def _check_case(case: Case, n_mod: int) -> None:
    heads = [(p, *_header(p)) for p in case.images]
    channels = sum(h[1][3] for h in heads)
    first_path, first_shape, first_aff = heads[0]
    if channels != n_mod:
        raise DatasetError(
            f"{first_path}: has {channels} channel(s) but dataset.json lists {n_mod} modalities"
        )
    others = heads[1:]
    if case.label is not None:
        lshape, laff = _header(case.label)
        if lshape[3] != 1:
            raise DatasetError(f"{case.label}: a label map must be 3D, got {lshape[3]} volumes")
        others.append((case.label, lshape, laff))
    for path, shape, aff in others:
        if shape[:3] != first_shape[:3]:
            raise DatasetError(
                f"{path}: shape {shape[:3]} differs from its image {first_path.name} {first_shape[:3]} "
                "(our axis order); label and image must share one grid"
            )
        if not np.allclose(aff, first_aff, atol=1e-3, rtol=1e-4):
            raise DatasetError(
                f"{path}: affine differs from its image {first_path.name}; label and image must share one grid "
                "(same origin, spacing and orientation)"
            )


# -- splits ---------------------------------------------------------------------------------------
FEW_CASES = 2  # up to this many cases: train on all of them
def make_splits(ids: list[str], n_folds: int = 5, seed: int = 0) -> list[dict]:
    """K-fold splits (shuffled with ``seed``). With one or two cases every case trains and the
    validation sees the same cases (it then only picks the best weights; it is not held out):
    holding one of two real scans back would halve what little there is to learn from."""
    ids = sorted(ids)
    if len(ids) <= FEW_CASES:
        return [{"train": list(ids), "val": list(ids)}]
    k = max(2, min(n_folds, len(ids)))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    folds = [sorted(order[i::k]) for i in range(k)]
    return [{"train": sorted(set(ids) - set(f)), "val": f} for f in folds]


def load_split(
    dataset: MSDDataset, n_folds: int = 5, fold: int = 0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Train and validation case ids of ``fold``.

    The folds are written once to ``ROOT/splits_final.json`` (nnU-Net's format: a list of
    ``{"train": [...], "val": [...]}``) and reused by every later run, whatever ``n_folds`` and
    ``seed`` say, so that runs stay comparable. If the dataset's cases no longer match that file,
    a DatasetError says to delete it. With fewer cases than folds, each case is its own fold
    (leave-one-out); one or two cases are used for both training and validation.
    """
    ids = sorted(c.id for c in dataset.training)
    path = Path(dataset.root) / SPLIT_FILE
    if path.exists():
        try:
            splits = json.loads(path.read_text())
            ok = isinstance(splits, list) and all(
                isinstance(s, dict) and "train" in s and "val" in s for s in splits
            )
        except ValueError:
            ok = False
        if not ok or not splits:
            raise DatasetError(f"{path}: not a valid split file; delete it to make new splits")
        listed = set().union(*[set(s["train"]) | set(s["val"]) for s in splits])
        if listed != set(ids):
            raise DatasetError(
                f"{path}: its cases differ from dataset.json's training cases; delete it to make new splits"
            )
    else:
        splits = make_splits(ids, n_folds, seed)
        _write_json_atomic(path, splits)
    if not 0 <= fold < len(splits):
        raise DatasetError(f"{path}: fold {fold} does not exist; it has folds 0–{len(splits) - 1}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def _write_json_atomic(path: Path, obj) -> None:
    try:
        atomic_write_text(path, json.dumps(obj, indent=1))
    except (OSError, InputError) as e:  # read-only dataset: the split is deterministic, so just do not store it
        warnings.warn(f"cannot write {path} ({e}); the split is recomputed each time", stacklevel=3)
