"""Calibration, volume intervals and the cost of the uncertainty map (issue 17), on the bundled model.

Held-out cases come from seeds never trained on and not used to fit the temperatures
(scripts/calibrate_default.py fits on seed 2000; here synthetic seed 1000 — the README's
evaluation seed — and the MNI152 template's evaluation stream of seed 0). Every case is
segmented as ``u2net predict`` does, with the calibrated probabilities on the image's own grid.

JSON lines (last):

* ``{"bench": "calibration", "domain", "ece_before", "ece_after", "temperature", "cases"}``:
  top-label ECE over voxels, with the network's own probabilities and with the temperature;
* ``{"bench": "volume_interval", "domain", "coverage", "nominal", "mean_abs_volume_error_pct",
  "hard_volume_error_pct", "crps_ml", "volumes"}``: per foreground class and case, the expected
  volume and its interval against the true labels' volume;
* ``{"bench": "unlike_training", "domain", "in_domain_ratio_max", "other_ratio_min", …}``: mean
  uncertainty inside the predicted foreground ÷ the domain's validation figure, on its own
  held-out images and on other domains' images (what the "looks unlike" note's threshold rests on);
* ``{"bench": "uncertainty_cost", "extra_seconds_pct", "extra_peak_mb", …}``: a CT-sized volume
  (216×504×504, a synthetic spleen CT upsampled) through spleen-ct, with and without the uncertainty map, each in its own
  subprocess (peak RSS), best of two runs each;
* ``{"bench": "mni152_real", …}``: grey/white matter volumes on the real MNI152 template against
  its tissue probability maps (skipped without nilearn's files).

``--quick`` (fewer cases, no CT-sized volume) for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_SEED = 1000  # synthetic: the README's held-out seed; never trained on, never fitted on
MNI_BENCH_SEED = 0  # the template's evaluation stream of the recipe's seed (disjoint from training)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def calibration_lines(model, recipe: dict, cases: int) -> tuple[list[dict], dict]:
    """ECE and volume figures per domain; also each domain's held-out images (for the next step)."""
    import torch

    from scripts.calibrate_default import heldout_cases
    from training.data.mni152 import DOMAIN as BRAIN
    from training.infer.measure import measure_result, score_volume, voxel_volume_ml
    from training.infer.pipeline import InferenceConfig, predict
    from training.train.calibration import EceMeter, calibrated

    lines, images = [], {}
    for domain in model.domains:
        meta = model.meta(domain)
        seed = MNI_BENCH_SEED if domain == BRAIN else BENCH_SEED
        before, after, scores, ratios = EceMeter(), EceMeter(), [], []
        images[domain] = []
        t0 = time.perf_counter()
        for volume, truth in heldout_cases(domain, seed, cases, recipe):
            result = predict(model, volume, [domain], InferenceConfig(uncertainty=True, probabilities=True))[domain]
            probs = result.maps["probabilities"]
            after.add(probs, truth)
            before.add(calibrated(torch.from_numpy(probs), 1.0 / meta.temperature), truth)
            voxel_ml = voxel_volume_ml(volume.affine)
            for m in measure_result(result, volume, meta.class_names):
                true_ml = float((truth == m.label).sum()) * voxel_ml
                if true_ml > 0:
                    s = score_volume(m, true_ml)
                    s["hard_error_pct"] = 100 * abs(m.volume_ml - true_ml) / true_ml
                    scores.append(s)
            ratios.append(_fg_ratio(result, meta))
            if len(images[domain]) < 2:
                images[domain].append(volume)
        _log(f"{domain}: {cases} cases in {time.perf_counter() - t0:.0f} s")
        lines.append({"bench": "calibration", "domain": domain, "ece_before": before.value,
                      "ece_after": after.value, "temperature": meta.temperature, "cases": cases})
        lines.append({
            "bench": "volume_interval", "domain": domain,
            "coverage": float(np.mean([s["covered"] for s in scores])), "nominal": 0.9,
            "mean_abs_volume_error_pct": float(np.mean([s["volume_error_pct"] for s in scores])),
            "hard_volume_error_pct": float(np.mean([s["hard_error_pct"] for s in scores])),
            "crps_ml": float(np.mean([s["crps_ml"] for s in scores])),
            "mean_true_ml": float(np.mean([s["true_ml"] for s in scores])), "volumes": len(scores),
        })
        images[domain].append([r for r in ratios if r is not None])
    return lines, images


def _fg_ratio(result, meta) -> float | None:
    """Mean uncertainty inside the predicted foreground ÷ the domain's validation figure."""
    fg = result.labels > 0
    reference = (meta.calibration or {}).get("mean_uncertainty_fg")
    if not fg.any() or not reference:
        return None
    return float(result.maps["uncertainty"][fg].astype(np.float32).mean()) / reference


def _crop_like(volume, like):
    """The centre of ``volume`` with at most ``like``'s physical extent (a small domain's sweep over
    a whole abdomen would take thousands of tiles; what it sees is what matters here)."""
    from training.io.volume import Volume

    spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(0))
    extent = np.sqrt((like.affine[:3, :3] ** 2).sum(0)) * np.array(like.shape)
    size = np.minimum(np.array(volume.shape), np.ceil(extent / spacing).astype(int))
    lo = (np.array(volume.shape) - size) // 2
    box = tuple(slice(a, a + n) for a, n in zip(lo, size))
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return Volume(np.ascontiguousarray(volume.data[(slice(None), *box)]), affine)


def unlike_lines(model, images: dict) -> list[dict]:
    """Each single-modality domain on the other domains' held-out images (2 each)."""
    from training.infer.pipeline import UNLIKE_TRAINING_RATIO, InferenceConfig, predict

    lines = []
    for domain in model.domains:
        meta = model.meta(domain)
        own = images[domain][-1]
        other, empty, flagged, runs = [], 0, 0, 0
        for source, vols in images.items():
            for volume in vols[:-1]:
                if source == domain or volume.channels != meta.in_channels:
                    continue
                volume = _crop_like(volume, images[domain][0])
                result = predict(model, volume, [domain], InferenceConfig(uncertainty=True))[domain]
                runs += 1
                ratio = _fg_ratio(result, meta)
                if ratio is None:
                    empty += 1
                else:
                    other.append(ratio)
                flagged += any("looks unlike" in n for n in result.notes)
        lines.append({
            "bench": "unlike_training", "domain": domain, "threshold": UNLIKE_TRAINING_RATIO,
            "in_domain_ratio_mean": float(np.mean(own)) if own else None,
            "in_domain_ratio_max": float(np.max(own)) if own else None,
            "in_domain_flagged": int(sum(r >= UNLIKE_TRAINING_RATIO for r in own)), "in_domain_cases": len(own),
            "other_runs": runs, "other_empty": empty, "other_flagged": flagged,
            "other_ratio_min": float(np.min(other)) if other else None,
            "other_ratio_median": float(np.median(other)) if other else None,
        })
    return lines


# -- the cost of the uncertainty map on a CT-sized volume ------------------------------------------
_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from training.infer.pipeline import InferenceConfig, predict
from training.io.volume import Volume
from training.model.modelfile import load_model
from training.model.registry import resolve_model
data = np.load({npy!r}, mmap_mode="r")
vol = Volume(np.asarray(data)[None], np.diag([{sz}, {sy}, {sx}, 1.0]))
model = load_model(resolve_model(None), domains=["spleen-ct"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = predict(model, vol, ["spleen-ct"], InferenceConfig(device="cpu", uncertainty={unc}))
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": base / 1024, "maps": list(r["spleen-ct"].maps)}}))
"""


def cost_line(recipe: dict) -> dict:
    """Time and peak memory of spleen-ct on a CT-sized volume with and without the uncertainty map."""
    from scipy import ndimage

    from training.data.synth import case_seed, generate_case

    volume, _ = generate_case("spleen-ct", case_seed(BENCH_SEED, 99), float(recipe.get("size_scale", 0.75)))
    target = (216, 504, 504)  # a CT's size: ~55 M voxels of ~1.3 × 0.6 × 0.6 mm
    factors = [t / s for t, s in zip(target, volume.shape)]
    data = ndimage.zoom(volume.data[0].astype(np.float32), factors, order=1).astype(np.int16)
    spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(0)) / np.array(factors)
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "ct.npy"
        np.save(npy, data)
        runs = {False: [], True: []}
        for unc in (False, True, False, True):
            code = _CHILD.format(root=str(ROOT), npy=str(npy), sz=spacing[0], sy=spacing[1], sx=spacing[2], unc=unc)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs[unc].append(json.loads(out.stdout.strip().splitlines()[-1]))
            _log(f"uncertainty={unc}: {runs[unc][-1]}")
    plain = min(runs[False], key=lambda r: r["seconds"])
    with_map = min(runs[True], key=lambda r: r["seconds"])
    peak = min(r["peak_mb"] for r in runs[False]), min(r["peak_mb"] for r in runs[True])
    return {"bench": "uncertainty_cost", "shape": list(data.shape), "spacing_mm": [round(float(s), 3) for s in spacing],
            "seconds": round(plain["seconds"], 2), "seconds_with_uncertainty": round(with_map["seconds"], 2),
            "extra_seconds_pct": round(100 * (with_map["seconds"] / plain["seconds"] - 1), 1),
            "peak_mb": round(peak[0]), "peak_mb_with_uncertainty": round(peak[1]),
            "extra_peak_mb": round(peak[1] - peak[0])}


def mni_line(model) -> dict | None:
    """The real MNI152 template (1 mm) through mni152-brain: GM/WM volumes against the template's
    tissue probability maps (soft: Σ p × voxel volume; hard: its argmax labels)."""
    from training.data.mni152 import DOMAIN as BRAIN
    from training.data.mni152 import load_mni152, mni152_available, mni152_files
    from training.infer.measure import measure_result, voxel_volume_ml
    from training.infer.pipeline import InferenceConfig, predict
    from training.io.volume import read_nifti

    if BRAIN not in model.domains or not mni152_available():
        print("skipped: mni152_real (nilearn's MNI152 files are not installed)")
        return None
    volume, labels = load_mni152(1.0, crop_margin_mm=None)
    voxel_ml = voxel_volume_ml(volume.affine)
    meta = model.meta(BRAIN)
    result = predict(model, volume, [BRAIN], InferenceConfig(probabilities=True))[BRAIN]
    rows = measure_result(result, volume, meta.class_names)
    files = mni152_files()
    line = {"bench": "mni152_real", "domain": BRAIN, "shape": list(volume.shape)}
    for row, key in zip(rows, ("gm", "wm")):
        soft = float((read_nifti(files[key]).data[0].astype(np.float64) / 255.0).sum()) * voxel_ml
        hard = float((labels == row.label).sum()) * voxel_ml
        line[key] = {"template_soft_ml": round(soft, 1), "template_labels_ml": round(hard, 1),
                     "predicted_ml": round(row.volume_ml, 1), "expected_ml": round(row.expected_ml, 1),
                     "interval_ml": [round(row.low_ml, 1), round(row.high_ml, 1)],
                     "error_vs_labels_pct": round(100 * (row.volume_ml - hard) / hard, 1),
                     "covers_labels": bool(row.low_ml <= hard <= row.high_ml)}
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=12, help="held-out cases per domain (default 12)")
    p.add_argument("--quick", action="store_true", help="3 cases per domain, no CT-sized volume")
    args = p.parse_args()

    import torch

    from scripts.calibrate_default import recipe_of
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    torch.manual_seed(0)
    model = load_model(resolve_model(None))
    if not any(m.calibration for m in model.adapters.values()):
        print("skipped: the bundled model has no calibration (run python -m scripts.calibrate_default)")
        return 0
    recipe = recipe_of(model)
    lines, images = calibration_lines(model, recipe, 3 if args.quick else args.cases)
    _log("\n".join(json.dumps(line) for line in lines))
    lines += unlike_lines(model, images)
    _log("\n".join(json.dumps(line) for line in lines if line["bench"] == "unlike_training"))
    mni = mni_line(model)
    if mni is not None:
        lines.append(mni)
        _log(json.dumps(mni))
    if not args.quick:
        lines.append(cost_line(recipe))
    print("\nbench             domain           figures")
    for line in lines:
        rest = {k: v for k, v in line.items() if k not in ("bench", "domain")}
        print(f"{line['bench']:<17} {line.get('domain', ''):<16} {json.dumps(rest)[:160]}")
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
