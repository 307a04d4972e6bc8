"""Real MRI with tissue labels, offline: the MNI152 template shipped inside nilearn's wheel.

nilearn ships the ICBM 2009a nonlinear symmetric template (1 mm, 197×233×189, skull-stripped
T1 plus grey- and white-matter probability maps) in ``nilearn/datasets/data/``. We read those
files directly (never through a fetcher, so nothing is ever downloaded, and without importing
nilearn's heavy stack).

Labels: 0 = background (everything not GM/WM, including CSF), 1 = grey matter, 2 = white
matter, by the argmax of ``(1 - gm - wm, gm, wm)`` per voxel (after the probability maps are
resampled to the working resolution, so thin structures are not lost to nearest-neighbour
sampling).

It is **one subject**: a dataset written here is that template under random smooth
deformations, poses and intensity changes. A model trained on it learns this anatomy's tissue
contrast; its scores on other deformations of the same template show that training works on
real MR contrast, not that it generalises to other people's brains.

Seeds: case ``i`` of the training stream draws from ``SeedSequence([seed, 0, i])`` and case
``j`` of the evaluation stream (test split, or a whole dataset written with ``evaluation=True``)
from ``SeedSequence([seed, 1, j])``; the stream number keeps the two disjoint whatever ``seed``
and the case counts are, so no evaluation case ever repeats a training case.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from training.errors import DatasetError, InputError
from training.io.volume import Volume, read_nifti, write_labels, write_nifti

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ["background", "grey matter", "white matter"]
CLASS_COLORS = ["#000000", "#ff8c00", "#00bfff"]
DATASET_NAME = "mni152"  # case file stem
DOMAIN = "mni152-brain"  # dataset name, hence the domain name training gives it
TRAIN_ROLE, TEST_ROLE = 0, 1
DESCRIPTION = (
    "Brain tissue (grey / white matter) on ONE real subject: the MNI152 ICBM 2009a nonlinear "
    "symmetric T1 template shipped with nilearn (skull-stripped), under random smooth "
    "deformations, poses and intensity changes (gamma, contrast curve, bias field, Rician noise). "
    "Labels are the argmax of (1 - gm - wm, gm, wm) of the template's tissue probability maps. "
    "Scores on held-out cases show learning on real MR contrast, not generalisation to other people."
)
REFERENCE = (
    "Fonov et al., NeuroImage 54 (2011) and NeuroImage 47 (2009) S102; ICBM 2009a template, "
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University (free to use and redistribute with this notice)"
)


def _data_dir() -> Path | None:
    spec = importlib.util.find_spec("nilearn")  # locates the package without importing it
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def mni152_files() -> dict[str, Path]:
    """Paths of the shipped T1, GM and WM files; :class:`InputError` if nilearn lacks them."""
    data = _data_dir()
    if data is None:
        raise InputError("the MNI152 template needs nilearn: pip install nilearn (it ships the files)")
    paths = {k: data / v for k, v in _FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(
            f"this nilearn install lacks {', '.join(missing)} in {data}; install nilearn >= 0.10"
        )
    return paths


def mni152_available() -> bool:
    try:
        mni152_files()
    except InputError:
        return False
    return True


def _resample(array: np.ndarray, affine: np.ndarray, resolution_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling to isotropic ``resolution_mm`` (Gaussian anti-aliasing when shrinking)."""
    import SimpleITK as sitk

    from training.io.volume import from_sitk, to_sitk

    img = to_sitk(array.astype(np.float32), affine)
    old = np.array(img.GetSpacing())
    if np.allclose(old, resolution_mm):
        return array.astype(np.float32), affine
    if resolution_mm > old.min():
        sigma = [max(0.0, 0.5 * (resolution_mm - s)) for s in old]  # mm; ~ half the size change
        img = sitk.SmoothingRecursiveGaussian(img, sigma)
    size = [max(1, round(n * s / resolution_mm)) for n, s in zip(img.GetSize(), old)]
    out = sitk.Resample(
        img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [resolution_mm] * 3,
        img.GetDirection(), 0.0, sitk.sitkFloat32,
    )
    return from_sitk(out)


def load_mni152(resolution_mm: float = 2.0, crop_margin_mm: float | None = 10.0) -> tuple[Volume, np.ndarray]:
    """The template T1 (intensities 0..1) and its labels (0 bg, 1 GM, 2 WM) on one grid.

    ``resolution_mm`` resamples to isotropic voxels (1.0 keeps the shipped grid);
    ``crop_margin_mm`` crops to the brain's bounding box plus that margin, padding with background
    where the margin reaches past the shipped field of view (None: the shipped field of view).
    """
    if resolution_mm <= 0:
        raise InputError(f"resolution_mm must be positive, got {resolution_mm}")
    paths = mni152_files()
    vols = {k: read_nifti(p) for k, p in paths.items()}
    affine = vols["t1"].affine
    arrays = {}
    for k, v in vols.items():
        a = v.data[0].astype(np.float32) / 255.0  # stored as uint8; nilearn rescales to 0..1 too
        arrays[k], new_affine = _resample(a, affine, resolution_mm)
    affine = new_affine
    t1 = np.clip(arrays["t1"], 0.0, None)
    gm, wm = np.clip(arrays["gm"], 0, 1), np.clip(arrays["wm"], 0, 1)
    labels = np.argmax(np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm]), axis=0).astype(np.uint8)
    if crop_margin_mm is not None:
        inside = np.argwhere((t1 > 0.01) | (labels > 0))
        margin = int(np.ceil(crop_margin_mm / resolution_mm))
        lo = inside.min(axis=0) - margin  # may lie outside the shipped grid: padded with background
        hi = inside.max(axis=0) + margin + 1
        pad = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, t1.shape)]
        t1, labels = np.pad(t1, pad), np.pad(labels, pad)
        box = tuple(slice(a + before, b + before) for a, b, (before, _) in zip(lo, hi, pad))
        t1, labels = t1[box], labels[box]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    meta = {
        "name": "MNI152 ICBM 2009a nonlinear symmetric T1 (nilearn)",
        "resolution_mm": float(resolution_mm),
        "label_rule": "argmax(1 - gm - wm, gm, wm)",
        "classes": CLASS_NAMES,
    }
    vol = Volume(np.ascontiguousarray(t1[None]), affine, source=str(paths["t1"]), meta=meta)
    return vol, np.ascontiguousarray(labels)


# -- random cases ---------------------------------------------------------------------------------
@dataclass
class CaseParams:
    """How strongly each case departs from the template (defaults: plausible scan-to-scan spread)."""

    rotation_deg: float = 12.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift_mm: float = 6.0
    elastic_mm: float = 3.0
    smooth_mm: float = 25.0
    gamma_log: float = 0.35  # gamma = exp(U(-g, g))
    contrast: float = 0.3  # slopes of the 5-piece monotone intensity curve: U(1 - c, 1 + c), normalised
    bias: float = 0.25  # RMS of the log bias field
    bias_smooth_mm: float = 60.0
    noise: tuple[float, float] = (0.005, 0.04)  # Rician noise sigma, fraction of white matter level
    units: tuple[float, float] = (300.0, 1500.0)  # arbitrary scanner units of the output


def _smooth_noise(shape, rng: np.random.Generator, smooth_mm: float, spacing) -> np.ndarray:
    """A zero-mean, unit-RMS random field that varies over ~``smooth_mm``."""
    step = np.maximum(1.0, smooth_mm / 2.0 / np.asarray(spacing))
    coarse = rng.standard_normal([int(np.ceil(n / s)) + 3 for n, s in zip(shape, step)])
    coarse = ndimage.gaussian_filter(coarse, 1.0, mode="reflect")
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse.shape)], order=3, mode="nearest")
    field = field[tuple(slice(0, n) for n in shape)]
    field -= field.mean()
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def make_case(
    template: Volume, labels: np.ndarray, rng: np.random.Generator, params: CaseParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One random case: (int16 image (D0, D1, D2) in scanner units, uint8 labels), same grid."""
    from training.data.deform import random_affine, random_smooth_displacement, sampling_field, warp

    p = params or CaseParams()
    shape, spacing = template.shape, template.spacing
    matrix = random_affine(rng, p.rotation_deg, p.scale, spacing)
    disp = random_smooth_displacement(shape, rng, p.elastic_mm, p.smooth_mm, spacing)
    disp += (rng.uniform(-p.shift_mm, p.shift_mm, 3) / spacing).astype(np.float32).reshape(3, 1, 1, 1)
    field = sampling_field(shape, matrix, disp)
    image = warp(template.data[0], field, order=1, mode="constant", cval=0.0)
    lab = warp(labels, field, order=0, mode="constant", cval=0)

    image = np.clip(image, 0.0, None) ** np.exp(rng.uniform(-p.gamma_log, p.gamma_log))
    # Tissue contrast: a random monotone curve through 0 (background stays black) and the maximum.
    top = max(float(image.max()), 1e-6)
    steps = rng.uniform(1.0 - p.contrast, 1.0 + p.contrast, 5)
    knots_y = np.concatenate([[0.0], np.cumsum(steps) / steps.sum()]) * top
    image = np.interp(image, np.linspace(0.0, top, 6), knots_y).astype(np.float32)
    image *= np.exp(p.bias * _smooth_noise(shape, rng, p.bias_smooth_mm, spacing))
    wm_level = float(np.median(image[lab == 2])) if (lab == 2).any() else float(image.max() or 1.0)
    sigma = rng.uniform(*p.noise) * wm_level
    image = np.hypot(image + rng.normal(0.0, sigma, shape), rng.normal(0.0, sigma, shape))  # Rician
    image *= rng.uniform(*p.units) / max(wm_level, 1e-6)
    return np.clip(np.rint(image), 0, 32767).astype(np.int16), lab.astype(np.uint8)


def case_rng(seed: int, role: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` of a split (role 0 training, 1 test): disjoint streams."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(role), int(index)]))


def write_mni152_dataset(
    out_dir: str | Path,
    cases: int,
    seed: int,
    test_cases: int = 0,
    resolution_mm: float = 2.0,
    params: CaseParams | None = None,
    margin_mm: float = 20.0,
    evaluation: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write an MSD-layout dataset of random cases of the template; returns its dataset.json.

    ``imagesTr/ labelsTr/`` hold the training cases, ``imagesTs/ labelsTs/`` the test cases
    (their labels are kept for evaluation; MSD's own test split has none).

    ``evaluation=True`` draws the labelled ``imagesTr/labelsTr`` cases from the evaluation
    stream instead (the same cases as ``test_cases`` of a dataset with the same seed): write
    the training set with ``evaluation=False`` and an evaluation set (for ``u2net evaluate``,
    which scores labelled cases) with ``evaluation=True`` and the same seed, and no case is
    shared. ``margin_mm`` of background is kept around the brain so that posed and enlarged
    cases stay inside the grid. A non-empty folder is refused; ``dataset.json`` is written last,
    so an interrupted run leaves no loadable half-dataset. ``progress(done, total)`` per case.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not an empty folder; choose a new folder")
    if cases < 0 or test_cases < 0 or cases + test_cases == 0:
        raise InputError("ask for at least one case (cases and test_cases must be ≥ 0)")
    template, labels = load_mni152(resolution_mm, margin_mm)
    p = params or CaseParams()
    training, test, test_labels = [], [], []
    if evaluation:  # labelled cases first, then further evaluation-stream cases as the test split
        splits = [("Tr", TEST_ROLE, cases, 0, 0), ("Ts", TEST_ROLE, test_cases, cases, cases)]
    else:
        splits = [("Tr", TRAIN_ROLE, cases, 0, 0), ("Ts", TEST_ROLE, test_cases, cases, 0)]
    done = 0
    for split, role, count, first_id, first_index in splits:
        for i in range(count):
            image, lab = make_case(template, labels, case_rng(seed, role, first_index + i), p)
            name = f"{DATASET_NAME}_{first_id + i:03d}.nii.gz"
            write_nifti(out / f"images{split}" / name, image, template.affine)
            write_labels(out / f"labels{split}" / name, lab, template.affine)
            if split == "Tr":
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                test.append(f"./imagesTs/{name}")
                test_labels.append(f"./labelsTs/{name}")
            done += 1
            if progress is not None:
                progress(done, cases + test_cases)
    doc = {
        "name": DOMAIN,
        "description": DESCRIPTION,
        "reference": REFERENCE,
        "licence": "ICBM 2009a template licence (see reference); synthetic variations CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w"},
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "u2net": {
            "modality": "MR",
            "colors": CLASS_COLORS,
            "test_labels": test_labels,
            "generator": "training.data.mni152.write_mni152_dataset",
            "seed": int(seed),
            "stream": "evaluation" if evaluation else "training",
            "seed_scheme": (
                "case i of a stream uses numpy SeedSequence([seed, s, i]); s=0 training stream, "
                "s=1 evaluation stream (test split, or every case with evaluation=True)"
            ),
            "resolution_mm": float(resolution_mm),
            "margin_mm": float(margin_mm),
            "label_rule": "argmax(1 - gm - wm, gm, wm) of the template's probability maps",
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.__dict__.items()},
        },
    }
    path = out / "dataset.json"
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path
