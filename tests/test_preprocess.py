"""Preprocessing: geometry in millimetres, CT statistics from foreground, the on-disk cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

from training.data import preprocess, synth
from training.data.datasets import load_dataset
from training.data.preprocess import (
    PreprocessPlan,
    plan_dataset,
    preprocess_case,
    preprocess_dataset,
    suggest_patch_size,
)
from training.io.volume import Volume, read_image, write_nifti

PLAN = PreprocessPlan(
    spacing=[2.0, 2.0, 2.0],
    normalization=[{"scheme": "zscore", "nonzero": False}],
    modality="MR",
    patch_size=[16, 16, 16],
    class_names=["background", "sphere", "marker"],
)


def _sphere_volume():
    """A 12 mm sphere on a 4 × 1 × 1 mm grid (axis 0 superior, 1 anterior, 2 right) + a marker."""
    shape, spacing = (14, 48, 48), np.array([4.0, 1.0, 1.0])
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = 4.0, 1.0, 1.0, 1.0
    affine[:3, 3] = [-20, 30, 5]
    idx = np.indices(shape).astype(float)
    mm = (idx - ((np.array(shape) - 1) / 2).reshape(3, 1, 1, 1)) * spacing.reshape(3, 1, 1, 1)
    label = ((mm**2).sum(0) <= 12.0**2).astype(np.uint8)
    label[-3:, -8:, -8:] = 2  # superior, anterior, right corner
    image = (label * 100.0 + 10.0)[None].astype(np.float32)
    return Volume(image, affine), label


def _flip_and_swap(vol: Volume, label: np.ndarray):
    """The same physical image stored with axes 1/2 swapped and axis 0 reversed."""
    data = np.flip(np.swapaxes(vol.data, 2, 3), axis=1).copy()
    lab = np.flip(np.swapaxes(label, 1, 2), axis=0).copy()
    a = vol.affine.copy()[:, [0, 2, 1, 3]]
    a[:3, 3] += a[:3, 0] * (vol.shape[0] - 1)
    a[:3, 0] *= -1
    return Volume(data, a), lab


def test_sphere_stays_a_sphere_in_mm_and_orientation_is_canonical():
    vol, label = _sphere_volume()
    out = preprocess_case(vol, label, PLAN, "s")
    sphere = out.label == 1
    assert out.image.dtype == np.float32 and out.image.shape[1:] == out.label.shape
    assert out.properties["resampled_shape"] == [28, 24, 24]
    idx = np.argwhere(sphere)
    extent_mm = (idx.max(0) - idx.min(0) + 1) * 2.0
    assert np.all(np.abs(extent_mm - 24.0) <= 4.0), extent_mm
    assert sphere.sum() * 8.0 == pytest.approx(4 / 3 * np.pi * 12.0**3, rel=0.15)
    marker = np.argwhere(out.label == 2).mean(0)
    assert np.all(marker > np.array(out.label.shape) * 0.8)  # superior, anterior, right
    # stored in another orientation: identical result on canonical axes
    other = preprocess_case(*_flip_and_swap(vol, label), PLAN, "s")
    assert np.array_equal(other.label, out.label)
    assert np.allclose(other.image, out.image, atol=1e-5)


def test_crop_to_nonzero_box_and_zscore():
    vol, label = _sphere_volume()
    label[label == 2] = 0
    vol.data[:, :, :10] = 0  # empty border, e.g. outside a skull-stripped brain
    vol.data[:, :, -10:] = 0
    out = preprocess_case(vol, label, PLAN, "s")
    assert out.properties["crop_box"][1] == [5, 19]  # 10 mm off each side at 2 mm
    assert out.image.shape[2] == 14 and out.label.shape[1] == 14
    # labelled voxels are never cropped away, even where the image is zero
    label[0:2, 2:4, 2:4] = 1
    assert preprocess_case(vol, label, PLAN, "s").properties["crop_box"][1][0] <= 2


def test_patch_size_suggestion():
    assert suggest_patch_size([24, 56, 60]) == [24, 48, 48]
    assert suggest_patch_size([200, 400, 300]) == [64, 128, 128]
    assert suggest_patch_size([5, 12, 40]) == [8, 8, 32]


@pytest.fixture(scope="module")
def ct_template(tmp_path_factory):
    return synth.write_dataset(tmp_path_factory.mktemp("ct") / "liver", "liver-ct", 2, 1, size_scale=0.3)


@pytest.fixture
def ct_dir(ct_template, tmp_path):
    import shutil

    return shutil.copytree(ct_template, tmp_path / "liver")


def test_ct_plan_uses_foreground_statistics(ct_dir, monkeypatch):
    from training.data import normalization

    ds = load_dataset(ct_dir)
    few = plan_dataset(ds, cache_dir=False).normalization[0]  # this dataset has fewer than 5 scans in HU:
    assert len(ds.training) < normalization.FEW_CT_CASES  # the soft-tissue window (test_normalization_ct.py)
    assert few["clip"][0] <= normalization.CT_SOFT_TISSUE_WINDOW[0] and few["clip"][1] >= normalization.CT_SOFT_TISSUE_WINDOW[1]
    monkeypatch.setattr(normalization, "FEW_CT_CASES", 1)  # as a dataset of many scans is planned
    plan = plan_dataset(ds, cache_dir=False)
    spec = plan.normalization[0]
    assert plan.modality == "CT" and spec["scheme"] == "ct"
    fg = []
    for c in ds.training:
        img, lab = read_image(c.images).data[0], read_image(c.label).data[0]
        fg.append(img[lab > 0].astype(np.float64))
    fg = np.concatenate(fg)
    assert len(fg) < 2 * preprocess.FG_SAMPLES_PER_CASE  # small cases: all voxels are used
    lo, hi = np.percentile(fg, [0.5, 99.5])
    assert spec["clip"] == pytest.approx([lo, hi])
    assert spec["mean"] == pytest.approx(np.clip(fg, lo, hi).mean())
    assert 20 < spec["mean"] < 80 and 5 < spec["std"] < 60  # liver and tumour HU, not air
    spacings = [read_image(c.images).spacing for c in ds.training]
    assert plan.spacing == pytest.approx(np.median(spacings, axis=0))
    cases = preprocess_dataset(ds, plan, cache_dir=False)
    inside = np.concatenate([c.image[0][c.label > 0] for c in cases])
    assert abs(inside.mean()) < 0.5
    assert cases[0].image.min() >= (lo - spec["mean"]) / spec["std"] - 1e-4


def test_cache_reused_and_invalidated(ct_dir, monkeypatch):
    calls = []
    real = preprocess.preprocess_case
    monkeypatch.setattr(preprocess, "preprocess_case", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    ds = load_dataset(ct_dir)
    plan = plan_dataset(ds)
    first = preprocess_dataset(ds, plan)
    assert len(calls) == 2
    second = preprocess_dataset(ds, plan)
    assert len(calls) == 2  # all from the cache
    assert all(
        np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) for a, b in zip(first, second)
    )
    assert second[0].properties == first[0].properties

    # a changed source file: only that case is recomputed
    path = ds.training[1].images[0]
    vol = read_image(path)
    write_nifti(path, (vol.data[0] + 5).astype(np.int16), vol.affine)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    third = preprocess_dataset(ds, plan)
    assert calls[2:] == [ds.training[1].id]
    assert not np.array_equal(third[1].image, first[1].image)

    # another plan: another cache folder
    other = PreprocessPlan.from_dict({**plan.to_dict(), "spacing": [s * 1.5 for s in plan.spacing]})
    assert other.hash() != plan.hash()
    preprocess_dataset(ds, other)
    assert len(calls) == 5


def test_plan_cached_and_no_cache_mode(ct_dir, monkeypatch):
    ds = load_dataset(ct_dir)
    reads = []
    real = preprocess.read_image
    monkeypatch.setattr(preprocess, "read_image", lambda p: reads.append(p) or real(p))
    p1 = plan_dataset(ds, cache_dir=False)
    n = len(reads)
    assert n > 0 and not (ct_dir / preprocess.CACHE_SUBDIR).exists()
    preprocess_dataset(ds, p1, cache_dir=False)
    assert not (ct_dir / preprocess.CACHE_SUBDIR).exists()
    p2 = plan_dataset(ds)
    p3 = plan_dataset(ds)
    assert p1 == p2 == p3
    assert len(reads) == 3 * n  # plan, preprocessing, plan again; the third plan came from the cache


def test_oblique_image_keeps_its_shape():
    """An oblique acquisition (20° about the body axis) is reoriented to the closest axes, not rotated."""
    vol, label = _sphere_volume()
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.eye(4)
    rot[:2, :2] = [[c, -s], [s, c]]
    out = preprocess_case(Volume(vol.data, rot @ vol.affine), label, PLAN, "s")
    assert (out.label == 1).sum() * 8.0 == pytest.approx(4 / 3 * np.pi * 12.0**3, rel=0.15)
    marker = np.argwhere(out.label == 2).mean(0)
    assert np.all(marker > np.array(out.label.shape) * 0.8)
