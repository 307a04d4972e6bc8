"""Measurements per class (training/infer/measure.py) and ``u2net predict --stats``."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import adapter_meta, small_net
from tests.training_data import ball_case
from training.commands.cli import main
from training.infer.measure import (
    crps_normal,
    interval_std,
    measure_labels,
    measure_result,
    score_volume,
    voxel_volume_ml,
)
from training.infer.result import DomainResult
from training.io.volume import Volume
from training.model.modelfile import save_model

AFFINE = np.diag([1.5, 0.8, 2.0, 1.0])  # 2.4 mm³ voxels
VOXEL_ML = 1.5 * 0.8 * 2.0 / 1000


def test_measure_labels_counts_volumes_and_intensity():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (10, 12, 14)).astype(np.uint8)
    image = rng.normal(40, 10, (2, 10, 12, 14)).astype(np.float32)
    rows = measure_labels(labels, VOXEL_ML, ["background", "liver", "tumour"], image)
    assert [r.label for r in rows] == [1, 2] and [r.name for r in rows] == ["liver", "tumour"]
    for r in rows:
        n = int((labels == r.label).sum())
        assert r.voxels == n and r.volume_ml == pytest.approx(n * VOXEL_ML)
        inside = image[0][labels == r.label]  # the first modality
        assert r.mean == pytest.approx(inside.mean(), rel=1e-5) and r.std == pytest.approx(inside.std(), rel=1e-4)
        assert r.expected_ml is None and r.low_ml is None
    empty = measure_labels(np.zeros_like(labels), VOXEL_ML, ["background", "x"], image)[0]
    assert empty.voxels == 0 and empty.volume_ml == 0 and empty.mean is None
    assert voxel_volume_ml(AFFINE) == pytest.approx(VOXEL_ML)


def test_measure_result_expected_volume_and_interval():
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0, 1, (8, 9, 10)).astype(np.float16)
    probs = np.stack([1 - p1, p1])
    labels = (p1 > 0.5).astype(np.uint8)
    vol = Volume(rng.normal(0, 1, (1, 8, 9, 10)).astype(np.float32), AFFINE)
    narrow = DomainResult("d", labels, {"probabilities": probs},
                          calibration={"temperature": 1.2, "volume_interval": {"nominal": 0.9, "scale": [0.5]}})
    row = measure_result(narrow, vol, ["background", "organ"])[0]
    assert row.expected_ml == pytest.approx(float(p1.astype(np.float64).sum()) * VOXEL_ML)
    band = (int((p1 > 0.1).sum()) - int((p1 > 0.9).sum())) * VOXEL_ML + 0.01 * row.expected_ml
    assert row.high_ml - row.expected_ml == pytest.approx(0.5 * band)
    assert row.low_ml == pytest.approx(row.expected_ml - 0.5 * band)
    wide = measure_result(DomainResult("d", labels, {"probabilities": probs}), vol, ["background", "organ"])[0]
    assert wide.high_ml - wide.expected_ml == pytest.approx(band)  # no calibration: scale 1
    s = score_volume(row, row.expected_ml * 1.1)
    assert s["covered"] == (row.low_ml <= row.expected_ml * 1.1 <= row.high_ml)
    assert s["volume_error_pct"] == pytest.approx(100 / 11, rel=1e-6)


def test_crps_of_a_normal_forecast():
    assert crps_normal(0.0, 1.0, 0.0) == pytest.approx(0.2337, abs=1e-4)  # σ (√2 − 1)/√π
    assert crps_normal(5.0, 0.0, 3.0) == 2.0
    assert interval_std(-1.6449, 1.6449) == pytest.approx(1.0, rel=1e-3)


# -- the CLI -------------------------------------------------------------------------------------
@pytest.fixture
def case(tmp_path):
    """A small model (domain "ct") and a CT-like image file with a bright ball."""
    net = small_net()
    metas = {n: adapter_meta(net, n) for n in net.domains}
    metas["ct"].calibration = {"temperature": 1.5, "volume_interval": {"nominal": 0.9, "scale": [0.8]}}
    save_model(tmp_path / "model", net, metas)
    img, _ = ball_case(3, shape=(16, 20, 18))
    nib.save(nib.Nifti1Image(img[0] * 100 + 40, AFFINE), tmp_path / "img.nii.gz")
    return tmp_path


def _label_file(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_predict_writes_stats(case, capsys, suffix):
    stats = case / f"stats{suffix}"
    assert main(["predict", str(case / "img.nii.gz"), "--domain", "ct", "--model", str(case / "model"),
                 "-o", str(case / "out.nii.gz"), "--device", "cpu", "--quiet", "--stats", str(stats)]) == 0
    assert f"stats: {stats}" in capsys.readouterr().out
    labels = _label_file(case / "out.nii.gz")
    image = np.asarray(nib.load(case / "img.nii.gz").dataobj, dtype=np.float64)
    if suffix == ".json":
        rows = json.loads(stats.read_text())
    else:
        with stats.open() as f:
            rows = [{k: (float(v) if k not in ("case", "domain", "name") and v != "" else (v or None))
                     for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(rows) == 1
    row = rows[0]
    assert row["case"] == "img" and row["domain"] == "ct" and row["name"] == "class1" and row["label"] == 1
    n = int((labels == 1).sum())
    assert n > 0 and row["voxels"] == n
    assert row["volume_ml"] == pytest.approx(n * VOXEL_ML, rel=1e-6)
    assert row["mean"] == pytest.approx(image[labels == 1].mean(), rel=1e-4)
    assert row["low_ml"] <= row["expected_ml"] <= row["high_ml"] and row["expected_ml"] > 0


def test_stats_path_that_cannot_be_written_is_refused_before_inference(case, capsys):
    argv = ["predict", str(case / "img.nii.gz"), "--domain", "ct", "--model", str(case / "model"),
            "-o", str(case / "out.nii.gz"), "--device", "cpu", "--quiet", "--stats"]
    assert main([*argv, str(case / "stats.txt")]) == 2
    assert "a stats file ends in .json or .csv" in capsys.readouterr().err
    (case / "old.json").write_text("mine")
    assert main([*argv, str(case / "old.json")]) == 2
    assert "already exists" in capsys.readouterr().err and (case / "old.json").read_text() == "mine"
    assert not (case / "out.nii.gz").exists()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    ro = case / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        assert main([*argv, str(ro / "stats.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("u2net predict: error: ") and "read-only" in err[0]
        assert not (case / "out.nii.gz").exists()  # refused before the inference wrote anything
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
