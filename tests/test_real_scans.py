"""The bundled model on real scans (../shared/realdata; skipped where absent) and what its real-CT
domain's card and provenance say (always)."""

from pathlib import Path

import pytest

from training.infer.config import InferenceConfig
from training.infer.pipeline import predict
from training.io.folders import bundled_model_dir
from training.io.resample import labels_on
from training.io.volume import read_image
from training.model.modelfile import load_model

TS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "totalsegmentator"
REAL = pytest.mark.skipif(not TS.is_dir(), reason="../shared/realdata is not on this machine")
DOMAIN = "abdomen-ct"
LIVER, SPLEEN = 5, 1  # TotalSegmentator's label values


@pytest.fixture(scope="module")
def model():
    return load_model(bundled_model_dir())


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_the_real_ct_domain_says_what_it_was_trained_on(model):
    meta = model.meta(DOMAIN)
    assert meta.card["data_kind"] == "real" and "ONE patient" in meta.card["data"] and "MR" in meta.card["data"]
    scans = meta.provenance["real_scans"]
    assert set(scans) == {"totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz",
                          "totalsegmentator/class_map.json", "totalsegmentator/example_mr_sm.nii.gz",
                          "totalsegmentator/example_seg_mr.nii.gz"}
    assert all(len(h) == 64 for h in scans.values())  # sha256 of each file trained on
    assert not any("dicom" in f for f in scans)  # patient B is never trained on
    assert meta.provenance["augmentation"]["enlarged_organs"]["organs"] == ["liver", "spleen"]
    held = meta.provenance["heldout_evaluation"]
    assert held["cases"] == 1 and set(held["mean_dice_per_class"]) == {"liver", "spleen"}
    assert meta.class_names == ["background", "liver", "spleen", "kidney right", "kidney left"]


@REAL
def test_held_out_patient_b_dicom_series_is_segmented(model):
    """Patient B (a JPEG 2000 DICOM series, 0.98×0.98×2 mm, 20 slices) was never trained on; its
    label file stores the rows flipped, so it is brought onto the image's grid by the affines."""
    image = read_image(TS / "example_ct_dicom")
    seg = read_image(TS / "example_seg_dicom.nii.gz")
    truth = labels_on(seg, image)
    labels = predict(model, image, [DOMAIN], InferenceConfig(device="cpu", backend="torch"))[DOMAIN].labels
    assert labels.shape == image.shape
    held = model.meta(DOMAIN).provenance["heldout_evaluation"]["mean_dice_per_class"]
    for value, cls, organ in ((1, "liver", LIVER), (2, "spleen", SPLEEN)):
        # what the model card states, within a little for other CPUs' arithmetic
        assert _dice(labels == value, truth == organ) > held[cls] - 0.02, cls


def test_the_recipe_imitates_contrast_phases_and_short_series():
    """scripts/real_domains: enhancement by structure (textbook ranges), air, fat and bone kept;
    slabs of 8–30 slices through the organs, each with its own origin."""
    import numpy as np

    from scripts.real_domains import ENHANCEMENT, SLAB_SLICES, enhanced, training_cases
    from training.io.volume import Volume

    rng = np.random.default_rng(0)
    hu = np.full((60, 16, 16), -1000.0, np.float32)  # air
    hu[:, 4:12, 4:12] = -100.0  # fat
    seg = np.zeros(hu.shape, np.int32)
    hu[20:40, 6:10, 6:10], seg[20:40, 6:10, 6:10] = 50.0, 5  # liver
    hu[20:40, 10:12, 10:12], seg[20:40, 10:12, 10:12] = 700.0, 29  # a vertebra
    names = {5: "liver", 29: "vertebrae_L3"}
    out = enhanced(hu, seg, names, 1.0, rng)
    lo, hi = ENHANCEMENT["liver"]
    rise = out[seg == 5] - hu[seg == 5]
    assert np.allclose(rise, rise[0]) and lo <= rise[0] <= hi
    assert np.array_equal(out[seg != 5], hu[seg != 5])  # air, fat and bone unchanged
    assert np.array_equal(enhanced(hu, seg, names, 0.0, rng), hu)

    labels = (seg == 5).astype(np.uint8)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    cases = training_cases(Volume(hu[None], affine), seg, labels, names, seed=1)
    whole = [c for c in cases if c[1].shape[0] == 60]
    slabs = [c for c in cases if c[1].shape[0] < 60]
    assert len(whole) >= 2 and len(slabs) >= 2
    assert np.array_equal(whole[0][0].data[0], hu)  # one copy exactly as scanned
    for image, lab in slabs:
        n = lab.shape[0]
        assert SLAB_SLICES[0] <= n <= SLAB_SLICES[1] and lab.any()
        z0 = int(round(image.affine[0, 3] / 3.0))
        assert np.array_equal(lab, labels[z0:z0 + n])
        assert np.array_equal(image.data[0] == -1000.0, hu[z0:z0 + n] == -1000.0)
    # the recipe's --seed: the same seed draws the same copies, another seed others
    again = training_cases(Volume(hu[None], affine), seg, labels, names, seed=1)
    other = training_cases(Volume(hu[None], affine), seg, labels, names, seed=2)
    assert all(np.array_equal(a[0].data, b[0].data) and np.array_equal(a[1], b[1]) for a, b in zip(cases, again))
    assert any(a[1].shape != b[1].shape or not np.array_equal(a[0].data, b[0].data) for a, b in zip(cases, other))


def test_the_recipe_widens_the_field_of_view_without_moving_the_anatomy():
    """scripts/real_domains.wider_field_of_view: air around the scan, up to MAX_FOV_MM wide in
    each in-plane axis, and every voxel of the scan still at its world position."""
    import numpy as np

    from scripts.real_domains import AIR_HU, MAX_FOV_MM, wider_field_of_view
    from training.io.volume import Volume

    rng = np.random.default_rng(0)
    hu = rng.uniform(-200, 300, (5, 40, 50)).astype(np.float32)
    labels = rng.integers(0, 5, hu.shape).astype(np.uint8)
    affine = np.array([[0, 0, 3.0, -60], [0, -3.0, 0, 80], [2.0, 0, 0, -20], [0, 0, 0, 1]])  # permuted, flipped
    grew = False
    for _ in range(20):
        wide, wide_labels = wider_field_of_view(Volume(hu[None], affine), labels, rng)
        shape = wide.data.shape[1:]
        assert shape[0] == 5 and 40 <= shape[1] <= MAX_FOV_MM / 3 and 50 <= shape[2] <= MAX_FOV_MM / 3
        grew |= shape[1:] != (40, 50)
        # where does voxel (0, 0, 0) of the scan sit in the wide grid? the same world point
        at = np.linalg.solve(wide.affine, affine @ np.array([0, 0, 0, 1.0]))[:3]
        z, y, x = np.round(at).astype(int)
        assert np.allclose(at, (z, y, x))
        np.testing.assert_array_equal(wide.data[0, z:z + 5, y:y + 40, x:x + 50], hu)
        np.testing.assert_array_equal(wide_labels[z:z + 5, y:y + 40, x:x + 50], labels)
        assert (wide.data[0] == AIR_HU).sum() == wide.data[0].size - hu.size
        assert wide_labels.sum() == labels.sum()
    assert grew


@REAL
def test_the_recipe_draws_a_pseudo_ct_from_the_mr_outlines():
    """scripts/real_domains.mr_anatomy: the MR's liver, spleen and kidneys as labels 1..4, its
    liver at patient A's liver value (plus texture), air outside the body, fat inside it."""
    import numpy as np

    from scripts.real_domains import AIR_HU, FAT_HU, mr_anatomy, training_pair

    image, _, seg, names = training_pair(TS.parent)
    hu = np.asarray(image.data[0])
    mr, _, organs, pseudo_ct = mr_anatomy(TS.parent, hu, seg, names)
    assert organs.shape == mr.shape and set(np.unique(organs)) == {0, 1, 2, 3, 4}
    ct = pseudo_ct(np.random.default_rng(0))
    liver_a = float(np.median(hu[seg == LIVER]))
    assert abs(float(np.median(ct[organs == 1])) - liver_a) < 5
    assert ct[0, 0, 0] == AIR_HU  # a corner: outside the body
    assert (np.abs(ct - FAT_HU) < 40).mean() > 0.05  # the MR's bright unlabelled tissue
    assert not np.array_equal(ct, pseudo_ct(np.random.default_rng(1)))  # each copy its own texture


def test_the_recipe_enlarges_an_organ_in_place_and_pushes_its_neighbour_aside():
    """scripts/real_domains.enlarged: the organ grows about its centre, the neighbour beside it is
    moved outward (not overwritten), far tissue and the scan's frame stay; factor 1 changes nothing."""
    import numpy as np

    from scripts.real_domains import ENLARGE_P, enlarged, with_enlarged_organs
    from training.io.volume import Volume

    shape, spacing = (40, 72, 72), (2.0, 1.5, 1.5)
    z, y, x = np.indices(shape)
    mm = [(z - 20) * spacing[0], (y - 36) * spacing[1], (x - 30) * spacing[2]]
    labels = np.zeros(shape, np.uint8)
    labels[mm[0] ** 2 + mm[1] ** 2 + mm[2] ** 2 <= 15.0 ** 2] = 2  # a spleen, 15 mm radius
    labels[(mm[0] ** 2 + mm[1] ** 2 + (mm[2] - 27) ** 2) <= 6.0 ** 2] = 3  # a kidney beside it
    hu = np.where(labels == 2, 100.0, np.where(labels == 3, 200.0, 0.0)).astype(np.float32)
    hu[0, 0, 0] = -1000.0  # a far corner
    volume = Volume(hu[None], np.diag([*spacing, 1.0]))

    big, big_labels = enlarged(volume, labels, 2, 1.3)
    assert np.array_equal(big.affine, volume.affine)
    grown = (big_labels == 2).sum() / (labels == 2).sum()
    assert 1.4 < grown < 1.3 ** 3, grown
    assert np.allclose(np.argwhere(big_labels == 2).mean(0), np.argwhere(labels == 2).mean(0), atol=0.5)
    kidney, big_kidney = np.argwhere(labels == 3), np.argwhere(big_labels == 3)
    assert 0.5 < len(big_kidney) / len(kidney) < 1.5  # moved, not swallowed
    assert big_kidney[:, 2].min() > kidney[:, 2].min()  # its near side pushed outward (by ≈ 2.4 mm)
    assert big_kidney[:, 2].mean() > kidney[:, 2].mean() + 0.5
    assert abs(big.data[0, 0, 0, 0] + 1000.0) < 1 and big_labels[0, 0, 0] == 0  # far: moved by < 0.01 voxel
    inside = big.data[0][big_labels == 2]  # the image moves with the labels (its edge interpolated)
    assert np.median(inside) == 100.0 and inside.mean() > 90.0
    same, same_labels = enlarged(volume, labels, 2, 1.0)
    np.testing.assert_allclose(same.data, volume.data, atol=1e-3)
    np.testing.assert_array_equal(same_labels, labels)

    cases = [(volume, labels)] * 40 + [(volume, np.where(labels == 2, 3, labels).astype(np.uint8))]
    out = with_enlarged_organs(cases, np.random.default_rng(0))
    changed = [not np.array_equal(o[1], c[1]) for o, c in zip(out, cases)]
    assert abs(np.mean(changed[:40]) - ENLARGE_P) < 0.25
    assert not changed[40]  # no liver or spleen: nothing to enlarge
