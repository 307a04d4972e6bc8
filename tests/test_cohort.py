"""``u2net predict -i FOLDER``: a cohort with the bundled model, on small synthetic cases.

Finding cases (nnU-Net's naming, one-file cases, DICOM sub-folders), skipping what is written,
one bad case among good ones, deterministic parts, the summary CSV, and a real interrupted run.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.commands.cli import main
from training.infer.cohort import Case, find_cases, split_cases
from training.io.volume import nifti_to_ours, read_image

from .test_volume import write_dicom_series

CPU = ["--device", "cpu", "--quiet"]


def _nifti(path: Path, shape=(14, 18, 16), spacing=(1.4, 1.3, 1.3), seed: int = 0, channels: int = 1) -> Path:
    """A small MR-like image (a bright ellipsoid in noise); 4D with ``channels`` > 1."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    c = [s / 2 + rng.uniform(-1, 1) for s in shape]
    blob = ((zz - c[0]) / 4) ** 2 + ((yy - c[1]) / 5) ** 2 + ((xx - c[2]) / 4) ** 2 < 1
    data = np.stack([rng.normal(100, 15, shape) + (60 + 20 * k) * blob for k in range(channels)])
    affine = np.diag([*spacing[::-1], 1.0])  # NIfTI (i, j, k) = our (d2, d1, d0)
    affine[:3, 3] = [12.0, -7.5, 3.0]
    arr = np.transpose(data.astype(np.float32), (3, 2, 1, 0))
    nib.save(nib.Nifti1Image(arr[..., 0] if channels == 1 else arr, affine), path)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _summary(out: Path, name: str = "summary.csv") -> dict[str, dict[str, str]]:
    return {row["case"]: row for row in _rows(out / name)}


def _labels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_nnunet_naming_two_modalities_and_a_4d_case(tmp_path):
    """prostate-mr (T2 + ADC): CASE_0000/CASE_0001 pairs and a 4D one-file case; labels on each
    case's grid, equal to a one-case `u2net predict` of the same files."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    spacing = (4.6, 2.0, 2.0)  # near the domain's: one tile per case
    for i in range(2):
        for m in range(2):
            _nifti(images / f"p{i}_{m:04d}.nii.gz", (10, 30, 28), spacing, seed=10 * i + m)
    _nifti(images / "four.nii.gz", (9, 26, 30), spacing, seed=7, channels=2)
    (images / "notes.txt").write_text("not an image")

    rc = main(["predict", "-i", str(images), "-o", str(out), "--domain", "prostate-mr", *CPU])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "four_prostate-mr.nii.gz", "p0_prostate-mr.nii.gz", "p1_prostate-mr.nii.gz"
    ]
    for case, source in [("p0", "p0_0000"), ("p1", "p1_0000"), ("four", "four")]:
        labels, ref = nib.load(out / f"{case}_prostate-mr.nii.gz"), nib.load(images / f"{source}.nii.gz")
        assert labels.shape == ref.shape[:3] and np.array_equal(labels.affine, ref.affine)
    rows = _summary(out)
    assert sorted(rows) == ["four", "p0", "p1"]
    assert {r["status"] for r in rows.values()} == {"done"}
    assert all(float(r["seconds"]) > 0 and r["domain"] == "prostate-mr" for r in rows.values())

    single = tmp_path / "single.nii.gz"
    assert main(["predict", str(images / "p1_0000.nii.gz"), str(images / "p1_0001.nii.gz"),
                 "--domain", "prostate-mr", "-o", str(single), *CPU]) == 0
    assert np.array_equal(_labels(out / "p1_prostate-mr.nii.gz"), _labels(single))


def test_one_modality_plain_nnunet_and_dicom_cases(tmp_path):
    """hippocampus-mr: a CASE_0000 file, a plain file, a DICOM sub-folder (read as read_image reads
    it); a sub-folder without DICOM files and a year-like suffix are not mistaken for cases."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    _nifti(images / "a_0000.nii.gz", seed=1)
    _nifti(images / "scan_2024.nii", seed=2)
    arr = (np.random.default_rng(3).normal(300, 40, (12, 16, 18))).astype(np.int16)
    arr[4:9, 5:11, 6:12] += 200
    write_dicom_series(images / "dcm_case", arr, np.diag([1.3, 1.3, 1.4, 1.0]), "1.2.826.0.1.3680043.2.1125.77")
    (images / "empty_folder").mkdir()

    cases = find_cases(images, modalities=1)
    assert [(c.name, [p.name for p in c.inputs]) for c in cases] == [
        ("a", ["a_0000.nii.gz"]), ("dcm_case", ["dcm_case"]), ("scan_2024", ["scan_2024.nii"])
    ]
    rc = main(["predict", "-i", str(images), "-o", str(out), "--domain", "hippocampus-mr", *CPU])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_hippocampus-mr.nii.gz", "dcm_case_hippocampus-mr.nii.gz", "scan_2024_hippocampus-mr.nii.gz",
        "summary.csv",
    ]
    dicom = read_image(images / "dcm_case")
    written = nib.load(out / "dcm_case_hippocampus-mr.nii.gz")
    assert written.shape[::-1] == dicom.shape
    assert np.allclose(nifti_to_ours(written.affine), dicom.affine, atol=1e-4)


def test_summary_holds_each_case_volumes_and_stats_writes_the_measurements(tmp_path):
    """The summary's measurement columns: per class the labels' volume (voxels × voxel volume),
    the intensity inside and, with --stats, the expected volume and its interval; --stats FILE
    holds one row per case, domain and class."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i, name in enumerate(("a", "b")):
        _nifti(images / f"{name}.nii.gz", seed=20 + i)
    stats = tmp_path / "stats.csv"
    rc = main(["predict", "-i", str(images), "-o", str(out), "--domain", "hippocampus-mr",
               "--stats", str(stats), *CPU])
    assert rc == 0
    voxel_ml = 1.4 * 1.3 * 1.3 / 1000
    rows = _summary(out)
    measured = _rows(stats)
    assert sorted({r["case"] for r in measured}) == ["a", "b"]
    for case in ("a", "b"):
        labels = _labels(out / f"{case}_hippocampus-mr.nii.gz")
        for k, name in ((1, "anterior"), (2, "posterior")):
            ml = (labels == k).sum() * voxel_ml
            assert float(rows[case][f"{name}_ml"]) == pytest.approx(ml, abs=1e-3)
            assert float(rows[case][f"{name}_low_ml"]) <= float(rows[case][f"{name}_expected_ml"])
            (row,) = [r for r in measured if r["case"] == case and r["name"] == name]
            assert row["domain"] == "hippocampus-mr" and int(row["voxels"]) == (labels == k).sum()


def test_rerun_skips_written_cases_and_overwrite_redoes_them(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(3):
        _nifti(images / f"c{i}.nii.gz", seed=i)
    args = ["predict", "-i", str(images), "-o", str(out), "--domain", "hippocampus-mr", *CPU]
    assert main(args) == 0
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == 3
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}

    _nifti(images / "c3.nii.gz", seed=3)  # a case added since
    assert main(args) == 0
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in files} == stamps
    rows = _summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {"c0": "skipped", "c1": "skipped", "c2": "skipped",
                                                        "c3": "done"}
    assert rows["c0"]["output"].endswith("c0_hippocampus-mr.nii.gz")

    assert main([*args, "--overwrite"]) == 0
    assert all(p.stat().st_ino != stamps[p][1] for p in files)  # each replaced by a new file
    assert {r["status"] for r in _summary(out).values()} == {"done"}


def test_a_partly_written_case_computes_only_what_is_missing_and_the_summary_keeps_measurements(tmp_path):
    """Python API: a second domain added later is computed alone; measurement columns (the hook)
    of skipped rows survive a re-run."""
    from training.infer.cohort import run_cohort, summary_path, write_summary
    from training.infer.config import InferenceConfig
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(2):
        _nifti(images / f"m{i}.nii.gz", seed=i)
    domains = ["hippocampus-mr", "mni152-brain"]
    model = load_model(resolve_model(None), domains=domains)
    cases, config = find_cases(images, 1), InferenceConfig(device="cpu")

    def measure(result, volume):
        return {f"{result.domain}_voxels": int(np.count_nonzero(result.labels)), "grid": "x".join(map(str, volume.shape))}

    first = list(run_cohort(model, cases, domains[:1], out, config))
    assert [r.written for r in first] == [["hippocampus-mr"], ["hippocampus-mr"]]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    reports = list(run_cohort(model, cases, domains, out, config, measure=measure))
    assert [(r.case, r.status, r.written) for r in reports] == [("m0", "done", ["mni152-brain"]),
                                                                ("m1", "done", ["mni152-brain"])]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*hippocampus-mr*")} == stamps
    summary = write_summary(summary_path(out), reports, domains)
    rows = _rows(summary)
    assert [(r["case"], r["domain"], r["status"]) for r in rows] == [
        ("m0", "hippocampus-mr", "skipped"), ("m0", "mni152-brain", "done"),
        ("m1", "hippocampus-mr", "skipped"), ("m1", "mni152-brain", "done"),
    ]
    assert list(rows[0])[:6] == ["case", "domain", "output", "status", "seconds", "message"]
    voxels = [r["mni152-brain_voxels"] for r in rows if r["domain"] == "mni152-brain"]
    assert rows[1]["grid"] == "14x18x16" and all(v.isdigit() for v in voxels)

    again = list(run_cohort(model, cases, domains, out, config, measure=measure))
    assert {r.status for r in again} == {"skipped"}
    write_summary(summary, again, domains)
    rows = _rows(summary)
    assert {r["status"] for r in rows} == {"skipped"}
    assert [r["mni152-brain_voxels"] for r in rows if r["domain"] == "mni152-brain"] == voxels


def test_bad_cases_are_reported_and_skipped_exit_1(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    _nifti(images / "good1.nii.gz", seed=1)
    _nifti(images / "good2.nii.gz", seed=2)
    (images / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    nib.save(nib.Nifti1Image(np.full((16, 18, 14), 7.0, np.float32), np.eye(4)), images / "blank.nii.gz")
    _nifti(images / "mr_0000.nii.gz", (10, 30, 28), (4.6, 2.0, 2.0), seed=4)  # its _0001 is missing

    rc = main(["predict", "-i", str(images), "-o", str(out), "--domain", "hippocampus-mr", *CPU])
    assert rc == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "good1_hippocampus-mr.nii.gz", "good2_hippocampus-mr.nii.gz", "mr_hippocampus-mr.nii.gz"
    ]
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" failed:")[0] for line in err[:-1]] == [
        "u2net predict: case blank", "u2net predict: case broken"
    ]
    assert "blank" in err[0] and "cannot read" in err[1]
    assert err[-1].startswith("u2net predict: error: 2 of 5 cases failed")
    rows = _summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {
        "blank": "failed", "broken": "failed", "good1": "done", "good2": "done", "mr": "done"
    }
    assert "blank" in rows["blank"]["message"] and rows["broken"]["output"] == ""

    # prostate-mr needs two modality files: mr_0000 alone is a case with a missing modality
    out2 = tmp_path / "out2"
    rc = main(["predict", "-i", str(images), "-o", str(out2), "--domain", "prostate-mr", *CPU])
    assert rc == 1
    assert "needs 2: _0000, _0001" in _summary(out2)["mr"]["message"]


def test_parts_are_disjoint_and_cover_every_case(tmp_path):
    cases = [Case(f"c{i:02d}", []) for i in range(11)]
    parts = [split_cases(list(reversed(cases)), 4, k) for k in range(4)]
    names = [c.name for part in parts for c in part]
    assert sorted(names) == [c.name for c in cases] and len(set(names)) == 11
    assert [c.name for c in parts[1]] == ["c01", "c05", "c09"]  # case i goes to part i % N

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(5):
        _nifti(images / f"k{i}.nii.gz", (10, 12, 12), seed=i)
    done = []
    for k in range(3):
        args = ["predict", "-i", str(images), "-o", str(out), "--domain", "hippocampus-mr", *CPU]
        assert main([*args, "--num-parts", "3", "--part-id", str(k)]) == 0
        rows = _summary(out, f"summary.part-{k}-of-3.csv")
        assert {r["status"] for r in rows.values()} == {"done"}
        done += list(rows)
    assert sorted(done) == [f"k{i}" for i in range(5)]
    assert len(list(out.glob("*.nii.gz"))) == 5


@pytest.mark.parametrize("problem", ["missing folder", "empty folder", "output is a file", "image and folder",
                                     "part out of range", "same case twice", "parts without -i", "output is input"])
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, problem):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    _nifti(images / "x.nii.gz")
    folder = images
    extra: list[str] = []
    if problem == "missing folder":
        folder = tmp_path / "nope"
    elif problem == "empty folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif problem == "output is a file":
        out = images / "x.nii.gz"
    elif problem == "image and folder":
        extra = [str(images / "x.nii.gz")]
    elif problem == "part out of range":
        extra = ["--num-parts", "2", "--part-id", "2"]
    elif problem == "same case twice":
        _nifti(images / "x_0000.nii.gz")
    elif problem == "output is input":
        out = images
    args = ["-i", str(folder), "-o", str(out), *extra]
    if problem == "parts without -i":
        args = [str(images / "x.nii.gz"), "-o", str(tmp_path / "x_seg.nii.gz"), "--num-parts", "2"]
    rc = main(["predict", *args, "--domain", "hippocampus-mr", *CPU])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("u2net predict: error: "), err
    assert not list(tmp_path.rglob("*hippocampus-mr*")) and not list(tmp_path.rglob("summary*.csv"))


def test_sigterm_mid_cohort_leaves_complete_files_and_a_rerun_finishes(tmp_path):
    """A real run killed by SIGTERM while it works: every labels file present is complete, no
    temporary is left, no summary is claimed; the re-run skips those and does the rest."""
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    n, shape = 5, (32, 36, 32)  # about a second a case (idle 2-core CPU): the kill lands mid-cohort
    for i in range(n):
        _nifti(images / f"s{i}.nii.gz", shape, seed=i)
    script = [sys.executable, "-m", "training", "predict", "-i", str(images), "-o", str(out),
              "--domain", "hippocampus-mr", "--overlap", "0.8", *CPU]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180

    def labels_written() -> list:
        try:  # the run's up-front write check makes ``out`` and removes it again: it can vanish mid-glob
            return list(out.glob("s*_hippocampus-mr.nii.gz"))
        except FileNotFoundError:
            return []

    while not labels_written():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    written = sorted(out.iterdir())
    assert all(p.name.endswith("_hippocampus-mr.nii.gz") and not p.name.startswith(".") for p in written)
    assert 1 <= len(written) < n  # it was stopped mid-cohort
    for p in written:
        assert _labels(p).shape == shape[::-1]  # complete: the whole array reads back

    stamps = {p.name: p.stat().st_mtime_ns for p in written}
    rerun = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    rows = _summary(out)
    assert len(rows) == n and {r["status"] for r in rows.values()} <= {"done", "skipped"}
    assert {f"{c}_hippocampus-mr.nii.gz" for c, r in rows.items() if r["status"] == "skipped"} == set(stamps)
    assert {p.name: p.stat().st_mtime_ns for p in written} == stamps
    assert len(list(out.glob("*.nii.gz"))) == n and not list(out.glob(".*"))
