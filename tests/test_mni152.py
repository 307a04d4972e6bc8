"""The real MNI152 template from nilearn's wheel: read offline, labelled, varied, written as MSD."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.data.datasets import load_dataset
from training.data.mni152 import (
    CLASS_NAMES,
    case_rng,
    load_mni152,
    make_case,
    mni152_available,
    mni152_files,
    write_mni152_dataset,
)
from training.errors import DatasetError
from training.io.volume import read_image


@pytest.fixture(scope="module")
def template():
    return load_mni152(4.0)  # coarse: fast, same anatomy


def test_available_offline_from_the_wheel():
    assert mni152_available()
    files = mni152_files()
    assert all(p.is_file() and "nilearn" in p.parts for p in files.values())


def test_full_resolution_grid_and_labels():
    vol, labels = load_mni152(1.0, crop_margin_mm=None)
    assert vol.shape == (189, 233, 197)  # the shipped 197×233×189 grid, slice axis first
    assert np.allclose(vol.spacing, 1.0)
    # The ICBM 2009 grid starts at (-98, -134, -72) mm RAS; index (0,0,0) must map there.
    assert np.allclose(vol.affine[:3, 3], [-98, -134, -72])
    assert 0.0 <= vol.data.min() and vol.data.max() == pytest.approx(1.0)
    counts = np.bincount(labels.ravel(), minlength=3)
    assert len(counts) == 3
    gm_ml, wm_ml = counts[1] / 1000, counts[2] / 1000  # 1 mm³ voxels
    assert 800 < gm_ml < 1300 and 450 < wm_ml < 800  # plausible adult tissue volumes
    brain = counts[1] + counts[2]
    assert counts[1] / brain > 0.2 and counts[2] / brain > 0.2
    # The T1 contrast matches the labels: WM brighter than GM, GM brighter than the rest.
    t1 = vol.data[0]
    assert np.median(t1[labels == 2]) > np.median(t1[labels == 1]) > np.median(t1[labels == 0])


def test_downsampled_crop_keeps_geometry(template):
    vol, labels = template
    full, full_labels = load_mni152(4.0, crop_margin_mm=None)
    assert np.allclose(vol.spacing, 4.0)
    assert labels.shape == vol.shape and vol.data.dtype == np.float32
    assert np.prod(vol.shape) < np.prod(full.shape) * 1.5
    # The same world point carries the same label in the cropped and the uncropped grids.
    for idx in np.argwhere(labels > 0)[::97]:
        world = vol.affine @ np.r_[idx, 1]
        j = np.rint(np.linalg.solve(full.affine, world)[:3]).astype(int)
        assert labels[tuple(idx)] == full_labels[tuple(j)]
    # Tissue volumes survive resampling (within 10 %).
    v4 = np.bincount(labels.ravel(), minlength=3)[1:] * 64
    v1 = np.bincount(load_mni152(1.0, None)[1].ravel(), minlength=3)[1:]
    assert np.all(np.abs(v4 / v1 - 1) < 0.1)


def test_cases_vary_reproducibly_with_aligned_labels(template):
    vol, labels = template
    a_img, a_lab = make_case(vol, labels, case_rng(0, 0, 0))
    b_img, b_lab = make_case(vol, labels, case_rng(0, 0, 1))
    c_img, c_lab = make_case(vol, labels, case_rng(0, 0, 0))
    d_img, d_lab = make_case(vol, labels, case_rng(1, 0, 0))  # another seed, same index
    assert np.array_equal(a_img, c_img) and np.array_equal(a_lab, c_lab)
    assert not np.array_equal(a_lab, b_lab) and not np.array_equal(a_img, b_img)
    assert not np.array_equal(a_lab, d_lab) and not np.array_equal(a_img, d_img)
    assert not np.array_equal(a_lab, labels)  # actually deformed
    for img, lab in ((a_img, a_lab), (b_img, b_lab)):
        assert img.dtype == np.int16 and lab.dtype == np.uint8 and img.shape == vol.shape
        assert set(np.unique(lab)) == {0, 1, 2}
        # Image and labels warped by the same field: the tissue contrast still matches the labels.
        assert np.median(img[lab == 2]) > np.median(img[lab == 1]) > np.median(img[lab == 0])


def test_training_and_test_streams_are_disjoint():
    draws = lambda role: {tuple(case_rng(7, role, i).random(4)) for i in range(50)}
    assert not draws(0) & draws(1)


def test_write_dataset_msd_layout(tmp_path):
    out = tmp_path / "mni"
    path = write_mni152_dataset(out, cases=2, seed=3, test_cases=1, resolution_mm=4.0)
    doc = json.loads(path.read_text())
    assert doc["modality"] == {"0": "T1w"}
    assert doc["labels"] == {"0": "background", "1": "grey matter", "2": "white matter"}
    assert [c for c in CLASS_NAMES] == list(doc["labels"].values())
    assert doc["u2net"]["modality"] == "MR" and len(doc["u2net"]["colors"]) == 3
    assert "ONE" in doc["description"]
    assert doc["numTraining"] == 2 and doc["numTest"] == 1
    images = [out / c["image"] for c in doc["training"]] + [out / doc["test"][0]]
    label_files = [out / c["label"] for c in doc["training"]] + [out / doc["u2net"]["test_labels"][0]]
    read = [(read_image(i), read_image(lf)) for i, lf in zip(images, label_files)]
    for img, lab in read:
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert np.allclose(img.spacing, 4.0)
        assert set(np.unique(lab.data)) == {0, 1, 2}
    # Three different cases (train, train, test).
    arrays = [lab.data.tobytes() for _, lab in read]
    assert len(set(arrays)) == 3
    # The test case is the test stream's case 0, not a training draw.
    vol, labels = load_mni152(4.0, 20.0)
    _, expected = make_case(vol, labels, case_rng(3, 1, 0))
    assert np.array_equal(read[2][1].data[0], expected)
    # The project's MSD loader accepts it, with the domain name and classes we wrote.
    ds = load_dataset(out)
    assert ds.domain == "mni152-brain" and ds.modality == "MR" and ds.modalities == ["T1w"]
    assert ds.class_names == CLASS_NAMES and [c.id for c in ds.training] == ["mni152_000", "mni152_001"]
    with pytest.raises(DatasetError, match="not an empty folder"):
        write_mni152_dataset(out, cases=1, seed=3, resolution_mm=4.0)
    # An evaluation dataset with the same seed: its labelled cases are the evaluation stream
    # (its first case is the test case above), never a training case.
    calls = []
    ev = write_mni152_dataset(tmp_path / "ev", cases=1, seed=3, resolution_mm=4.0, evaluation=True,
                              progress=lambda d, t: calls.append((d, t)))
    evdoc = json.loads(ev.read_text())
    assert evdoc["u2net"]["stream"] == "evaluation" and calls == [(1, 1)]
    ev_label = read_image(tmp_path / "ev" / evdoc["training"][0]["label"]).data
    assert np.array_equal(ev_label, read[2][1].data)
    assert all(not np.array_equal(ev_label, lab.data) for _, lab in read[:2])
