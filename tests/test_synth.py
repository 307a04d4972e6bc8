"""Synthetic phantoms: reproducible, realistic intensities and geometry, every class present."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from training.commands.cli import main
from training.data import synth
from training.data.datasets import load_dataset
from training.errors import DatasetError

SMALL = 0.3  # size scale for fast tests


def test_domains_cover_ct_mr_and_multimodal():
    names = synth.list_domains()
    assert len(names) >= 6 and len(set(names)) == len(names)
    infos = [synth.SYNTH_DOMAINS[n] for n in names]
    assert {i.modality for i in infos} == {"CT", "MR"}
    assert any(len(i.modalities) == 2 for i in infos)
    assert all(i.classes[0] == "background" and len(i.colors) == len(i.classes) for i in infos)


@pytest.mark.parametrize("domain", synth.list_domains())
def test_every_domain_generates_all_classes(domain):
    info = synth.SYNTH_DOMAINS[domain]
    vol, lab = synth.generate_case(domain, 7, SMALL)
    assert vol.channels == len(info.modalities)
    assert lab.shape == vol.shape and lab.dtype == np.uint8
    assert set(np.unique(lab)) == set(range(len(info.classes)))
    # organ-like shapes, not boxes: each class fills clearly less than its bounding box
    for c in range(1, len(info.classes)):
        idx = np.argwhere(lab == c)
        box = np.prod(idx.max(0) - idx.min(0) + 1)
        assert len(idx) < 0.9 * box


def test_same_seed_same_bytes_other_seed_differs():
    a, la = synth.generate_case("prostate-mr", 11, SMALL)
    b, lb = synth.generate_case("prostate-mr", 11, SMALL)
    c, _ = synth.generate_case("prostate-mr", 12, SMALL)
    assert a.data.tobytes() == b.data.tobytes() and la.tobytes() == lb.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert a.data.shape != c.data.shape or not np.array_equal(a.data, c.data)
    assert not np.array_equal(a.affine, c.affine)


def test_ct_in_hounsfield_units_with_anisotropic_slices():
    vol, lab = synth.generate_case("liver-ct", 3, 0.5)
    img = vol.data[0].astype(np.float64)
    assert vol.data.dtype == np.int16
    sp = vol.spacing
    assert sp[0] > 1.3 * sp[1] and sp[1] == pytest.approx(sp[2])
    assert abs(np.median(img[:, :3, :3]) + 1000) < 40  # air in the corners
    liver, tumour = img[lab == 1], img[lab == 2]
    assert 40 < np.median(liver) < 80
    assert np.median(tumour) < np.median(liver) - 10
    assert 8 < np.std(img[:, :3, :3]) < 30  # noise of 10-20 HU in air
    assert img.max() > 300  # bone


def test_spleen_close_to_liver_contrast():
    vol, lab = synth.generate_case("spleen-ct", 5, 0.5)
    from scipy import ndimage

    core = ndimage.binary_erosion(lab == 1, iterations=1)
    assert 30 < np.median(vol.data[0][core]) < 70


def test_size_scale_keeps_field_of_view():
    a, _ = synth.generate_case("heart-mr", 2, 0.25)
    b, _ = synth.generate_case("heart-mr", 2, 0.5)
    assert b.shape[1] > 1.8 * a.shape[1]
    fov_a, fov_b = np.array(a.shape) * a.spacing, np.array(b.shape) * b.spacing
    assert np.allclose(fov_a, fov_b, rtol=0.05)


def test_cli_list_prints_only_names(capsys):
    assert main(["synth", "--list"]) == 0
    assert capsys.readouterr().out.split("\n") == synth.list_domains() + [""]


def test_cli_writes_loadable_multimodal_dataset(tmp_path, capsys):
    out = tmp_path / "prostate"
    args = [
        "synth",
        str(out),
        "--domain",
        "prostate-mr",
        "--cases",
        "2",
        "--test-cases",
        "1",
        "--seed",
        "4",
        "--size-scale",
        str(SMALL),
    ]
    assert main(args) == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["modality"] == {"0": "T2", "1": "ADC"} and doc["numTraining"] == 2 and doc["numTest"] == 1
    ds = load_dataset(out)
    assert ds.modality == "MR" and ds.class_names == ["background", "PZ", "TZ"]
    assert len(ds.training) == 2 and len(ds.test) == 1
    img = nib.load(str(ds.training[0].images[0]))
    assert img.ndim == 4 and img.shape[3] == 2  # MSD: 4th NIfTI axis = modality
    lab = nib.load(str(ds.training[0].label))
    assert lab.shape == img.shape[:3] and np.allclose(lab.affine, img.affine)
    # same seed → same data as generate_case
    _, labels = synth.generate_case("prostate-mr", synth.case_seed(4, 0), SMALL)
    assert np.array_equal(np.asarray(lab.dataobj), labels.transpose(2, 1, 0))

    capsys.readouterr()
    assert main(args) == 2  # never overwrite silently
    assert "not empty" in capsys.readouterr().err
    assert main(args[:4] + ["--cases", "1", "--size-scale", "0.2", "--force"]) == 0
    assert load_dataset(out).training.__len__() == 1 and not (out / "imagesTs").exists()


def test_force_refuses_foreign_data(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="notes.txt"):
        synth.write_dataset(tmp_path, "hippocampus-mr", 1, 0, size_scale=0.2, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _best_window_dice(img: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the best intensity window [lo, hi] for a class, chosen knowing the answer."""
    qs = np.percentile(img[mask], np.linspace(0, 100, 11))
    best = 0.0
    for i, lo in enumerate(qs):
        for hi in qs[i + 1 :]:
            pred = (img >= lo) & (img <= hi)
            best = max(best, 2 * (pred & mask).sum() / (pred.sum() + mask.sum()))
    return best


@pytest.mark.parametrize("domain", ["spleen-ct", "pancreas-ct", "heart-mr", "prostate-mr"])
def test_intensity_alone_does_not_segment(domain):
    """Neighbours of similar intensity: a model must use shape and position."""
    vol, lab = synth.generate_case(domain, 1, 0.4)
    for c in range(1, int(lab.max()) + 1):
        assert _best_window_dice(vol.data[0].astype(np.float64), lab == c) < 0.4


def _world_centroid(vol, mask):
    idx = np.argwhere(mask).mean(0)
    return vol.affine[:3, :3] @ idx + vol.affine[:3, 3]


def test_anatomy_sits_where_the_affine_says():
    """CT is stored posterior/left (like DICOM-derived files); the anatomy is right in world mm."""
    liver, lab_l = synth.generate_case("liver-ct", 2, SMALL)
    spleen, lab_s = synth.generate_case("spleen-ct", 2, SMALL)  # same seed, different domain
    assert liver.affine[0, 2] < 0 and liver.affine[1, 1] < 0  # axis 2 → left, axis 1 → posterior
    centre = liver.affine[:3, :3] @ ((np.array(liver.shape) - 1) / 2) + liver.affine[:3, 3]
    assert _world_centroid(liver, lab_l == 1)[0] > centre[0] + 20  # liver on the patient's right
    centre_s = spleen.affine[:3, :3] @ ((np.array(spleen.shape) - 1) / 2) + spleen.affine[:3, 3]
    assert _world_centroid(spleen, lab_s == 1)[0] < centre_s[0] - 40  # spleen on the left
    assert _world_centroid(spleen, lab_s == 1)[1] < centre_s[1]  # and posterior
    mr, _ = synth.generate_case("heart-mr", 2, SMALL)
    assert mr.affine[0, 2] > 0 and mr.affine[1, 1] > 0
