"""A cohort in one run (``u2net predict -i``) against one ``u2net predict`` call per case (docs/inference.md).

10 synthetic CT cases of 120×256×256 voxels, 1.5×0.8×0.8 mm (a thin-slice CT around the
spleen, 180×205×205 mm), so the spleen-ct domain resamples each to its 6.4×3.7×3.7 mm grid (one
32×64×64 tile) and the probabilities back, in nnU-Net's naming (``ctNN_0000.nii.gz``). Two
spleen-ct phantoms are drawn and resampled to that grid; the other cases are copies with their own
noise. ``--full-fov`` keeps the phantom's whole abdomen instead (110×258×258 voxels of
2.6×1.3×1.3 mm, 8 tiles a case): on a CPU the network is then nearly all of the time.

Both ways run as subprocesses in the same run, with the bundled model on the CPU: the cohort
loads the model once and overlaps reading and writing with the network; one-by-one pays the start
(imports, model, first-call set-up) for every case and does its steps in turn. Each child's peak
resident memory comes from ``wait4``; ``cases_work_s`` sums the summary's per-case seconds (read +
segment + write), which the overlapped run's wall time hides in part.

    python bench/bench_cohort.py              # the documented case (about 3 minutes on 2 idle cores)
    python bench/bench_cohort.py --quick      # 4 cases
    python bench/bench_cohort.py --full-fov   # network-bound variant (about 10 minutes)

Prints one JSON line: {"bench": "cohort", "cases", "cohort_s", "one_by_one_s", "speedup", "cases_per_hour", …}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAIN = "spleen-ct"
SHAPE, SPACING = (120, 256, 256), (1.5, 0.8, 0.8)  # (slices, rows, columns), mm: a thin-slice CT around the spleen
PHANTOM_SCALE = 1.5  # the phantom is drawn on a coarser grid (quicker), then resampled to SHAPE
FULL_SCALE = 2.3  # --full-fov: 110×258×258 voxels of 2.6×1.3×1.3 mm, the phantom's whole abdomen


def make_cases(folder: Path, cases: int, full_fov: bool) -> tuple[int, ...]:
    """``ctNN_0000.nii.gz``: two generated phantoms, each case one of them plus its own noise.

    By default each phantom is resampled to a thin-slice grid around its spleen (SHAPE voxels of
    SPACING mm); with ``full_fov`` the phantom's whole field of view is kept (FULL_SCALE)."""
    import numpy as np

    from training.data.synth import generate_case
    from training.io.resample import resample
    from training.io.volume import write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    phantoms = []
    for seed in range(min(2, cases)):
        volume, labels = generate_case(DOMAIN, seed, FULL_SCALE if full_fov else PHANTOM_SCALE)
        if full_fov:
            phantoms.append((volume.data[0].astype(np.float32), volume.affine))
            continue
        centre = volume.affine @ np.r_[np.argwhere(labels == 1).mean(axis=0), 1.0]  # the spleen, mm
        affine = np.eye(4)
        affine[:3, :3] = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0) * SPACING
        affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2)
        phantoms.append((resample(volume.data[0], volume.affine, affine, SHAPE), affine))
    for i in range(cases):
        data, affine = phantoms[i % len(phantoms)]
        noise = np.random.default_rng(100 + i).normal(0, 8, data.shape)
        write_nifti(folder / f"ct{i:02d}_0000.nii.gz", np.clip(data + noise, -1024, 3071).astype(np.int16), affine)
    return phantoms[0][0].shape


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, the child's peak resident MB). Fails loudly on a non-zero exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 cases instead of 10")
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--full-fov", action="store_true",
                    help="the phantom's whole abdomen (8 tiles a case instead of 1: network-bound on a CPU)")
    args = ap.parse_args()
    cases = args.cases or (4 if args.quick else 10)
    u2net = [sys.executable, "-m", "training", "predict", "--domain", DOMAIN, "--device", "cpu", "--quiet"]

    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        start = time.perf_counter()
        shape = make_cases(images, cases, args.full_fov)
        print(f"{cases} cases of {shape} written in {time.perf_counter() - start:.1f} s", file=sys.stderr)

        cohort_s, cohort_mb = timed([*u2net, "-i", str(images), "-o", str(tmp / "cohort")])
        with open(tmp / "cohort" / "summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == cases and {r["status"] for r in rows} == {"done"}, rows
        work_s = sum(float(r["seconds"]) for r in rows)  # read + segment + write, case by case

        one_s, one_mb = 0.0, 0.0
        for image in sorted(images.iterdir()):
            out = tmp / "single" / image.name.replace("_0000.nii.gz", f"_{DOMAIN}.nii.gz")
            seconds, mb = timed([*u2net, str(image), "-o", str(out)])
            one_s, one_mb = one_s + seconds, max(one_mb, mb)

    print(json.dumps({
        "bench": "cohort", "cases": cases, "cohort_s": round(cohort_s, 1), "one_by_one_s": round(one_s, 1),
        "speedup": round(one_s / cohort_s, 2), "cases_per_hour": round(3600 * cases / cohort_s),
        "one_by_one_cases_per_hour": round(3600 * cases / one_s), "cases_work_s": round(work_s, 1),
        "cohort_peak_mb": round(cohort_mb), "one_case_peak_mb": round(one_mb), "shape": list(shape),
        "fov": "full" if args.full_fov else "spleen",
    }))


if __name__ == "__main__":
    main()
