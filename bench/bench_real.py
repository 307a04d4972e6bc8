"""The journeys a radiologist runs, on the real scans of ../shared/realdata (skipped where absent).

* ``real_domain``: every shipped domain on every real scan that has a matching label (Dice, seconds),
  through ``training.infer.pipeline.predict`` as the plugin calls it. ``held_out`` says whether the
  scan was never trained on (the model cards name the training scans).
* ``real_domain_fov``: each CT domain on each CT (narrower than 500 mm) centred in a 500 and a
  600 mm field of view, air around it: same anatomy, same voxels, only the field of view differs.
* ``real_teach``: few-slice teaching as the Fine-tune panel does it: keep K evenly spaced axial
  slices of one organ's label (every other slice unlabelled: "train only on labelled slices"),
  teach a new domain with the panel's default settings (``training.train.config.teaching_config``)
  through the panel's own job (``napari_u2net._finetune_worker.finetune_job`` and ``publish``),
  segment the scan with the new domain and score Dice on every slice the user did not label.
  ``threshold_dice``: the best HU window (+ largest component) for that organ on those slices,
  tuned on the truth itself: the bar a model must clear (CT only).

Labels are TotalSegmentator's model output (pseudo ground truth), brought onto each image's grid
by its affine (patient B's label file is stored with its rows flipped); patient C's liver is
dcmqi's example segmentation of 3 CT slices. Patients B and C are only ever segmented here, never
taught on. One JSON line per case:

    python bench/bench_real.py [--quick] [--only teach|domain] [--slices 3 5 10] [--organs liver spleen]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "realdata"
TS = REAL / "totalsegmentator"

# TotalSegmentator's label values (class_map.json; the same for total and total_mr)
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}


@dataclass
class Scan:
    name: str
    image: Path
    label: Path
    modality: str
    organs: dict[str, int]  # organ → label value
    teach: tuple[str, ...] = ()  # the organs to teach on this scan (never on patient B)
    patient: str = ""  # scans of one patient share it: a domain trained on one is not held out on the other


# the patient of each real file a domain's provenance may list as trained on ("real_scans")
PATIENT_OF = {"totalsegmentator/example_ct.nii.gz": "A", "totalsegmentator/example_ct_sm.nii.gz": "A",
              "totalsegmentator/example_mr_sm.nii.gz": "MR"}  # abdomen-ct learns the MR's outlines


SCANS = [
    Scan("ct_patient_a", TS / "example_ct.nii.gz", TS / "example_seg_fast_force_split.nii.gz", "CT", ORGANS,
         ("liver", "spleen", "kidney_right", "kidney_left"), "A"),
    Scan("ct_patient_a_crop", TS / "example_ct_sm.nii.gz", TS / "example_seg_fast.nii.gz", "CT", ORGANS, (), "A"),
    Scan("ct_patient_b", TS / "example_ct_dicom", TS / "example_seg_dicom.nii.gz", "CT",
         {"spleen": 1, "liver": 5}, (), "B"),
    # a third patient (C): dcmqi's 3 CT slices (1 mm apart) and the liver of its DICOM SEG example
    Scan("ct_patient_c_3slices", REAL / "dcmqi" / "ct-3slice", REAL / "dcmqi" / "liver_seg.nrrd", "CT",
         {"liver": 1}, (), "C"),
    Scan("mr_abdomen", TS / "example_mr_sm.nii.gz", TS / "example_seg_mr.nii.gz", "MR", ORGANS,
         ("liver", "spleen"), "MR"),
    Scan("mr_glioblastoma", REAL / "pyradiomics" / "brain1_image.nrrd", REAL / "pyradiomics" / "brain1_label.nrrd",
         "MR", {"tumour": 1}, ("tumour",)),
]


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def load(scan: Scan):
    """(image Volume, label array on the image's grid)."""
    from training.io.resample import labels_on
    from training.io.volume import read_image

    image, label = read_image(scan.image), read_image(scan.label)
    return image, labels_on(label, image).astype(np.int32)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = int(pred.sum()) + int(truth.sum())
    return 2.0 * int((pred & truth).sum()) / s if s else float("nan")


def labelled_rows(truth: np.ndarray, k: int) -> np.ndarray:
    """K evenly spaced axial slices through the organ, its first and last slices excluded."""
    rows = np.nonzero(truth.reshape(truth.shape[0], -1).any(1))[0]
    return rows[np.linspace(0, len(rows) - 1, k + 2).round().astype(int)[1:-1]]


def threshold_dice(hu: np.ndarray, truth: np.ndarray, rest: np.ndarray) -> tuple[float, list[int]]:
    """The best HU window [lo, hi] (steps of 10 HU) + largest 3D component, scored on ``rest``."""
    from scipy import ndimage

    best, window = 0.0, [0, 0]
    t = truth[rest]
    for lo in range(-100, 201, 10):
        for hi in range(lo + 20, 301, 10):
            mask = (hu >= lo) & (hu <= hi)
            lab, n = ndimage.label(mask)
            if n == 0:
                continue
            sizes = np.bincount(lab.ravel())[1:]
            # the component that overlaps the organ most: a generous, tuned-on-truth threshold
            overlap = np.bincount(lab[truth].ravel(), minlength=n + 1)[1:]
            keep = (lab == 1 + int(np.argmax(overlap if overlap.any() else sizes)))[rest]
            d = dice(keep, t)
            if d > best:
                best, window = d, [lo, hi]
    return best, window


def teach(scan: Scan, image, truth: np.ndarray, organ: str, k: int, keep: np.ndarray, base: Path, work: Path,
          args) -> dict:
    from napari_u2net import _finetune_worker as fw
    from training.infer.config import InferenceConfig
    from training.infer.pipeline import predict
    from training.model.modelfile import load_model
    from training.train.config import teaching_config

    sparse = np.zeros(truth.shape, np.uint8)
    sparse[keep] = truth[keep]
    name = f"{organ.replace('_', '-')}-{scan.modality.lower()}-{k}"
    pair = fw.TrainingPair(scan.name, image.data, image.affine, f"{organ} labels",
                           fw.prepare_labels(sparse, f"{organ} labels", True))
    config = teaching_config(False, device="cpu", iterations=args.iterations,
                             patch_size=tuple(args.patch) if args.patch else None)
    if args.batch:
        config.batch_size = args.batch
    request = fw.FineTuneRequest(base, work, name, [pair], ["background", organ], scan.modality,
                                 config=config, only_labelled_slices=True, threads=args.threads)
    t0 = time.perf_counter()
    gen = fw.finetune_job(request, threading.Event())
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        result = stop.value
    fw.publish(result)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = predict(load_model(work), image, [name], InferenceConfig(device="cpu"))[name].labels > 0
    seg_seconds = time.perf_counter() - t1
    rest = np.ones(truth.shape[0], bool)
    rest[keep] = False
    line = {"bench": "real_teach", "scan": scan.name, "organ": organ, "slices": k,
            "dice_rest": round(dice(pred[rest], truth[rest]), 4), "seconds": round(seconds, 1),
            "iterations": result.iterations_done, "patch": list(config.patch_size or []) or "auto",
            "kept": "best" if result.chosen_file == result.best_file else "last",
            "segment_seconds": round(seg_seconds, 1)}
    return line


FOV_MM = (500.0, 600.0)  # fields of view of ordinary abdominal CTs, wider than patient A's 300×366 mm


def centred_in_field_of_view(image, labels: np.ndarray, fov_mm: float):
    """``image`` centred in a field of view ``fov_mm`` wide in each in-plane axis (air around it,
    its voxels at their world positions), and ``labels`` padded alike; None if it is wider already."""
    from scripts.real_domains import in_field_of_view
    from training.io.volume import spacing_of

    spacing = spacing_of(image.affine)
    pad = []
    for axis in (1, 2):
        extra = max(0, round(float(fov_mm / spacing[axis])) - image.data.shape[axis + 1])
        pad.append((extra // 2, extra - extra // 2))
    return None if pad == [(0, 0), (0, 0)] else in_field_of_view(image, labels, pad)


def domain_runs(model_dir: Path, scans: list[Scan]) -> None:
    """``real_domain`` lines; for a CT also ``real_domain_fov``: the same scan centred in wider
    fields of view, air around it (same anatomy, same voxels, so any change in Dice is the domain's
    dependence on seeing the whole body in each tile: inference cuts a wide scan into tiles, and a
    domain taught on one small-FOV scan never saw a cut body)."""
    from training.infer.config import InferenceConfig
    from training.infer.pipeline import predict
    from training.model.modelfile import load_model

    model = load_model(model_dir)
    for scan in scans:
        image, labels = load(scan)
        for domain, meta in model.adapters.items():
            if meta.modality.upper() != scan.modality:
                continue
            organs = {value: cls.replace(" ", "_").replace("-", "_")
                      for value, cls in enumerate(meta.class_names[1:], start=1)}
            organs = {v: o for v, o in organs.items() if o in scan.organs and (labels == scan.organs[o]).any()}
            if not organs:
                continue
            t0 = time.perf_counter()
            pred = predict(model, image, [domain], InferenceConfig(device="cpu"))[domain].labels
            seconds = round(time.perf_counter() - t0, 1)
            trained = (meta.provenance or {}).get("real_scans", {})
            held_out = scan.patient not in {PATIENT_OF.get(f) for f in trained}
            as_scanned = {organ: round(dice(pred == value, labels == scan.organs[organ]), 4)
                          for value, organ in organs.items()}
            for organ, d in as_scanned.items():
                emit(bench="real_domain", scan=scan.name, domain=domain, organ=organ, dice=d, seconds=seconds,
                     held_out=held_out)
            for fov in FOV_MM if scan.modality == "CT" else ():
                wide = centred_in_field_of_view(image, labels, fov)
                if wide is None:
                    continue
                wide_pred = predict(model, wide[0], [domain], InferenceConfig(device="cpu"))[domain].labels
                for value, organ in organs.items():
                    emit(bench="real_domain_fov", scan=scan.name, domain=domain, organ=organ, fov_mm=fov,
                         shape=list(wide[1].shape),
                         dice=round(dice(wide_pred == value, wide[1] == scan.organs[organ]), 4),
                         dice_as_scanned=as_scanned[organ], held_out=held_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 slices only, liver and spleen on the CT")
    parser.add_argument("--only", choices=("teach", "domain"))
    parser.add_argument("--slices", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--organs", nargs="+", help="teach only these organs")
    parser.add_argument("--scans", nargs="+", help="only these scans (names as in the JSON lines)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the panel's)")
    parser.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    parser.add_argument("--iterations", type=int, help="instead of the panel's default (to try other settings)")
    parser.add_argument("--patch", type=int, nargs=3, help="instead of the panel's default (Z Y X)")
    parser.add_argument("--batch", type=int, help="instead of the panel's default")
    args = parser.parse_args()
    if not TS.is_dir():
        print(f"skipped: no real data ({REAL} is absent)")
        return 0

    from training.io.folders import bundled_model_dir

    base = args.model or bundled_model_dir()
    scans = [s for s in SCANS if not args.scans or s.name in args.scans]
    if args.only != "teach":
        domain_runs(base, scans)
    if args.only == "domain":
        return 0
    slices = [5] if args.quick else args.slices
    tmp = Path(tempfile.mkdtemp(prefix="bench_real_"))
    try:
        for scan in scans:
            organs = [o for o in scan.teach if (not args.organs or o in args.organs)]
            if args.quick:
                organs = [o for o in organs if scan.name == "ct_patient_a" and o in ("liver", "spleen")]
            if not organs:
                continue
            image, labels = load(scan)
            for organ in organs:
                truth = labels == scan.organs[organ]
                for k in slices:
                    keep = labelled_rows(truth, k)
                    line = teach(scan, image, truth, organ, k, keep, base, tmp / f"{organ}-{k}", args)
                    if scan.modality == "CT":
                        rest = np.ones(truth.shape[0], bool)
                        rest[keep] = False
                        line["threshold_dice"], line["threshold_hu"] = threshold_dice(image.data[0], truth, rest)
                        line["threshold_dice"] = round(line["threshold_dice"], 4)
                    emit(**line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
