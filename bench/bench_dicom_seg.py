"""DICOM SEG round trips on the real files of ../shared/realdata (skipped where absent).

1. dcmqi's reference SEG of 3 real CT slices: read on its series' grid, compared voxel by voxel
   with the same mask as NRRD.
2. Patient B's JPEG 2000 Siemens CT (20 slices; evaluation only): ``u2net predict`` with the
   bundled model's spleen-ct domain, once to NIfTI and once to a DICOM SEG; the SEG read back by
   highdicom alone (its own volume and geometry) and by ``read_seg``, compared voxel by voxel
   with the NIfTI labels of the same run.
3. TotalSegmentator's 31-organ labels of the same series written as a SEG and read back.

Prints a line per check, then JSON lines (one per check).

    python bench/bench_dicom_seg.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "realdata"
DCMQI = REAL / "dcmqi"
REAL_CT = REAL / "totalsegmentator" / "example_ct_dicom"


def on_grid(array, affine, target, shape):
    """``array`` on the grid (``target``, ``shape``) that differs from its own by flips, axis
    permutations and whole-voxel shifts only."""
    m = np.linalg.inv(target) @ affine
    assert np.allclose(np.abs(m[:3, :3]).round(), np.abs(m[:3, :3]), atol=1e-3), m
    index = np.indices(array.shape).reshape(3, -1)
    out = np.zeros(shape, array.dtype)
    out[tuple(np.rint(m[:3, :3] @ index + m[:3, 3:]).astype(int))] = array.ravel()
    return out


def highdicom_labels(path, affine, shape):
    import highdicom as hd

    vol = hd.seg.segread(str(path)).get_volume(combine_segments=True)
    return on_grid(np.asarray(vol.array), np.asarray(vol.affine), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, shape)


def dcmqi() -> dict:
    import SimpleITK as sitk

    from training.io.dicom_seg import read_seg
    from training.io.volume import from_sitk

    t = time.perf_counter()
    seg = read_seg(DCMQI / "liver.dcm")
    seconds = time.perf_counter() - t
    mask, affine = from_sitk(sitk.ReadImage(str(DCMQI / "liver_seg.nrrd")))
    return {"check": "dcmqi_liver_seg_read", "shape": list(seg.labels.shape), "voxels": int(mask.sum()),
            "differing_voxels": int((seg.labels != mask).sum()), "max_affine_diff_mm": float(np.abs(seg.affine - affine).max()),
            "read_s": round(seconds, 3)}


def predict_round_trip(work: Path) -> dict:
    from training.commands.cli import main
    from training.io.dicom_seg import read_seg
    from training.io.volume import read_image

    timings = {}
    for out in ("spleen.nii.gz", "spleen.dcm"):
        t = time.perf_counter()
        rc = main(["predict", str(REAL_CT), "--domain", "spleen-ct", "-o", str(work / out), "--quiet", "--device", "cpu"])
        timings[out] = round(time.perf_counter() - t, 2)
        assert rc == 0, out
    nifti = read_image(work / "spleen.nii.gz")
    volume_affine, shape = nifti.affine, nifti.shape
    t = time.perf_counter()
    seg = read_seg(work / "spleen.dcm", image=REAL_CT)
    read_s = time.perf_counter() - t
    by_highdicom = highdicom_labels(work / "spleen.dcm", volume_affine, shape)
    return {"check": "predict_spleen_ct_real_jpeg2000", "shape": list(shape), "spleen_voxels": int((nifti.data[0] == 1).sum()),
            "differing_voxels_read_seg": int((seg.labels != nifti.data[0]).sum()),
            "differing_voxels_highdicom": int((by_highdicom != nifti.data[0]).sum()),
            "predict_nifti_s": timings["spleen.nii.gz"], "predict_seg_s": timings["spleen.dcm"],
            "seg_bytes": (work / "spleen.dcm").stat().st_size, "read_seg_s": round(read_s, 2)}


def organs_round_trip(work: Path) -> dict:
    from training.io.dicom_seg import read_seg, write_seg
    from training.io.volume import read_image

    volume = read_image(REAL_CT)
    nifti = read_image(REAL_CT.parent / "example_seg_dicom.nii.gz")
    labels = on_grid(nifti.data[0], nifti.affine, volume.affine, volume.shape).astype(np.uint8)
    names = json.loads((REAL_CT.parent / "class_map.json").read_text())["total"]
    classes = ["background"] + [names.get(str(v), f"label {v}") for v in range(1, int(labels.max()) + 1)]
    t = time.perf_counter()
    out = write_seg(work / "organs.dcm", labels, volume.affine, REAL_CT, classes, domain="total")
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    back = read_seg(out, image=REAL_CT)
    read_s = time.perf_counter() - t
    return {"check": "totalsegmentator_organs_seg", "classes_present": len(np.unique(labels)) - 1,
            "segments": len(back.names) - 1, "differing_voxels_read_seg": int((back.labels != labels).sum()),
            "differing_voxels_highdicom": int((highdicom_labels(out, volume.affine, volume.shape) != labels).sum()),
            "write_s": round(write_s, 2), "read_s": round(read_s, 2), "seg_bytes": out.stat().st_size}


def main() -> int:
    if not (DCMQI / "liver.dcm").is_file() or not REAL_CT.is_dir():
        print(f"skipped: {REAL} (the real DICOM files) is not on this machine")
        return 0
    results = [dcmqi()]
    with tempfile.TemporaryDirectory() as tmp:
        results.append(predict_round_trip(Path(tmp)))
        results.append(organs_round_trip(Path(tmp)))
    for r in results:
        print(f"{r['check']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "check"))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
