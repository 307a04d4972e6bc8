"""Reading and writing volumes keeps geometry exactly, with real NIfTI files from nibabel."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path

from training.data.normalization import normalize
from training.errors import InputError
from training.io.volume import from_sitk, read_image, to_sitk, write_labels, write_nifti

NIB_DATA = Path(data_path)


def _oblique_affine():
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 0.9, 3.0])
    aff[:3, 3] = [-40.5, 12.25, 7.0]
    return aff


@pytest.mark.parametrize("name", ["anatomical.nii", "example_nifti2.nii.gz", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_real_nifti_round_trip(tmp_path, name):
    src = NIB_DATA / name
    if not src.exists():
        pytest.skip(f"nibabel test file {name} not shipped")
    vol = read_image(src)
    assert vol.channels >= 1
    labels = (vol.data[0] > np.median(vol.data[0])).astype(np.uint8)
    out = write_labels(tmp_path / "lab.nii.gz", labels, vol.affine, like=vol)
    back = nib.load(str(out))
    ref = nib.load(str(src))
    assert back.shape[:3] == ref.shape[:3]
    assert np.array_equal(back.affine, ref.affine)
    assert np.array_equal(np.asarray(back.dataobj), np.transpose(labels, (2, 1, 0)))


@pytest.mark.parametrize("affine", ["ras", "lps", "oblique"])
def test_synthetic_round_trip_and_cube_position(tmp_path, affine):
    aff = {"ras": np.diag([1.0, 1.0, 2.5, 1]), "lps": np.diag([-0.7, -0.7, 1.5, 1]), "oblique": _oblique_affine()}[affine]
    data = np.zeros((9, 20, 30), np.float32)  # NIfTI (i, j, k)
    data[2:5, 5:9, 10:14] = 100
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "img.nii.gz"))
    vol = read_image(tmp_path / "img.nii.gz")
    assert vol.shape == (30, 20, 9)
    centre_ours = np.argwhere(vol.data[0] > 50).mean(axis=0)
    centre_world = vol.affine @ np.r_[centre_ours, 1]
    centre_file = aff @ np.r_[np.argwhere(data > 50).mean(axis=0), 1]
    assert np.allclose(centre_world, centre_file)
    write_labels(tmp_path / "lab.nii.gz", (vol.data[0] > 50).astype(np.uint8), vol.affine, like=vol)
    back = nib.load(str(tmp_path / "lab.nii.gz"))
    assert np.array_equal(back.affine, nib.load(str(tmp_path / "img.nii.gz")).affine)
    assert np.array_equal(np.asarray(back.dataobj) > 0, data > 50)


def test_sitk_conversion_is_exact_for_oblique():
    aff = _oblique_affine()
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    img = to_sitk(arr, aff)
    arr2, aff2 = from_sitk(img)
    assert np.array_equal(arr, arr2)
    assert np.allclose(aff, aff2, atol=1e-12)
    # The same physical point in both conventions (SimpleITK is LPS, index x,y,z).
    idx = (4, 3, 2)  # ours (d0, d1, d2)
    p_ras = aff @ np.r_[idx, 1]
    p_lps = np.array(img.TransformIndexToPhysicalPoint(idx[::-1]))
    assert np.allclose(p_lps, [-p_ras[0], -p_ras[1], p_ras[2]])


def test_4d_becomes_channels_and_several_files_stack(tmp_path):
    aff = np.diag([1.0, 1, 1, 1])
    four = np.random.default_rng(1).random((6, 7, 8, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(four, aff), str(tmp_path / "mm.nii.gz"))
    vol = read_image(tmp_path / "mm.nii.gz")
    assert vol.data.shape == (2, 8, 7, 6)
    for c in range(2):
        nib.save(nib.Nifti1Image(four[..., c], aff), str(tmp_path / f"c{c}.nii.gz"))
    stacked = read_image([tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"])
    assert np.array_equal(stacked.data, vol.data)
    nib.save(nib.Nifti1Image(four[:5, ..., 0], aff), str(tmp_path / "small.nii.gz"))
    with pytest.raises(InputError, match="share one grid"):
        read_image([tmp_path / "c0.nii.gz", tmp_path / "small.nii.gz"])


def test_bad_inputs(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="broken.nii.gz: cannot read"):
        read_image(tmp_path / "broken.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((10, 12), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(InputError, match="2D image"):
        read_image(tmp_path / "flat.nii")
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "x.png")
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)


def write_dicom_series(folder, arr, aff, series_uid):
    img = to_sitk(arr, aff)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir()
    direction = img.GetDirection()
    for z in range(arr.shape[0]):
        sl = img[:, :, z]
        sl.SetMetaData("0020|0037", "\\".join(f"{v:.10f}" for v in (*direction[0::3], *direction[1::3])))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in img.TransformIndexToPhysicalPoint((0, 0, z))))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|000e", series_uid)
        sl.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
        writer.SetFileName(str(folder / f"{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_matches_sitk_geometry(tmp_path):
    aff = _oblique_affine()
    arr = (np.random.default_rng(2).random((6, 16, 18)) * 1000).astype(np.int16)
    folder = tmp_path / "dcm"
    write_dicom_series(folder, arr, aff, "1.2.826.0.1.3680043.2.1125.1")
    vol = read_image(folder)
    assert vol.shape == arr.shape
    assert_same_image(vol.data[0], vol.affine, arr, aff)


def assert_same_image(data, affine, ref, ref_affine, atol=1e-4):
    """Equal as physical images: DICOM orders slices along the normal, which may flip axis 0."""
    m = np.linalg.inv(ref_affine) @ affine  # our index -> reference index
    signs = np.round(np.diag(m[:3, :3]))
    assert np.allclose(m[:3, :3], np.diag(signs), atol=atol), m
    flipped = ref[tuple(slice(None, None, -1) if s < 0 else slice(None) for s in signs)]
    assert np.array_equal(data, flipped)
    centre = (np.array(ref.shape) - 1) / 2
    assert np.allclose(affine @ np.r_[centre, 1], ref_affine @ np.r_[centre, 1], atol=atol)


def test_two_dicom_series_in_one_process_keep_their_geometry(tmp_path):
    """Each series opens the same way whatever was read before: axis 0 along the slice normal."""
    rot = _oblique_affine()
    other = np.array([[0.0, 0.0, -0.8, 40.0], [0.0, 0.9, 0.0, -30.0], [3.0, 0.0, 0.0, 12.0], [0, 0, 0, 1]])
    for i, (aff, shape) in enumerate([(other, (5, 12, 10)), (rot, (6, 16, 18)), (np.diag([-1.0, 1, 1, 1]) @ rot, (4, 9, 7))]):
        arr = (np.random.default_rng(i).random(shape) * 1000).astype(np.int16)
        folder = tmp_path / f"s{i}"
        write_dicom_series(folder, arr, aff, f"1.2.826.0.1.3680043.2.1125.{i + 10}")
        vol = read_image(folder)
        assert_same_image(vol.data[0], vol.affine, arr, aff)
        lps = np.diag([-1.0, -1.0, 1.0])
        row, col = lps @ vol.affine[:3, 2], lps @ vol.affine[:3, 1]  # sitk x, y directions
        assert np.dot(np.cross(row, col), lps @ vol.affine[:3, 0]) > 0


def test_write_refuses_other_suffix_and_is_atomic(tmp_path):
    with pytest.raises(InputError, match="must end in .nii"):
        write_nifti(tmp_path / "x.mha", np.zeros((2, 2, 2)), np.eye(4))
    write_labels(tmp_path / "l.nii", np.full((3, 3, 3), 300), np.eye(4))
    assert nib.load(str(tmp_path / "l.nii")).get_data_dtype() == np.uint16
    assert [p.name for p in tmp_path.iterdir()] == ["l.nii"]


def test_normalization_schemes():
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) * 100 - 1000
    ct = normalize(x, [{"scheme": "ct", "clip": [-500, 500], "mean": 0.0, "std": 250.0}])
    assert ct.min() == -2.0 and ct.max() == 2.0
    z = normalize(x, [{"scheme": "zscore"}])
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    const = normalize(np.full((1, 2, 2, 2), 7.0), [{"scheme": "zscore"}])
    assert np.array_equal(const, np.zeros_like(const))
    with pytest.raises(InputError, match="unknown normalisation"):
        normalize(x, [{"scheme": "magic"}])


def test_inputs_that_cannot_be_opened_say_why(tmp_path):
    (tmp_path / "loop.nii.gz").symlink_to(tmp_path / "loop.nii.gz")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name in ("loop.nii.gz", "a"):
        with pytest.raises(InputError, match="cannot open it \\(a symbolic-link loop\\)"):
            read_image(tmp_path / name)
    with pytest.raises(InputError, match="no such file or folder"):
        read_image(tmp_path / "gone.nii.gz")


def test_zscore_does_not_overflow_on_a_scaled_image():
    """A float32 image scaled by 1e20 (squares overflow float32) normalises like the original."""
    x = np.random.default_rng(0).normal(100, 20, (1, 6, 7, 8)).astype(np.float32)
    ref = normalize(x, [{"scheme": "zscore"}])
    with np.errstate(over="raise"):
        scaled = normalize(x * np.float32(1e20), [{"scheme": "zscore"}])
    np.testing.assert_allclose(scaled, ref, atol=1e-4)


def test_written_nifti_holds_the_array_on_nifti_axes(tmp_path):
    """3D and 4D arrays (ours: (C,) D0, D1, D2) land in the file on NIfTI's reversed axes, value
    for value, and read back as they were written."""
    import nibabel as nib

    from training.io.volume import read_nifti, write_nifti

    rng = np.random.default_rng(0)
    for shape in [(5, 7, 9), (2, 5, 7, 9)]:
        data = rng.integers(0, 200, shape).astype(np.int16)
        path = write_nifti(tmp_path / f"a{len(shape)}.nii.gz", data, np.diag([0.5, 0.7, 0.9, 1.0]))
        on_disk = np.asanyarray(nib.load(str(path)).dataobj)
        np.testing.assert_array_equal(on_disk, data.T if data.ndim == 3 else np.transpose(data, (3, 2, 1, 0)))
        back = read_nifti(path).data
        np.testing.assert_array_equal(back, data if data.ndim == 4 else data[None])


def test_labels_stored_in_another_row_order_come_onto_the_image_grid():
    """A label file whose rows run the other way than the image's (patient B's does) is brought
    onto the image's grid by the affines, not compared array to array; a matching grid is as is."""
    from training.io.resample import labels_on
    from training.io.volume import Volume

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (4, 6, 7)).astype(np.uint8)
    affine = np.diag([2.0, 0.8, 0.8, 1.0])
    affine[:3, 3] = (10.0, -4.0, 3.0)
    image = Volume(np.zeros((1, 4, 6, 7), np.float32), affine)
    flipped = affine.copy()
    flipped[1, 1] = -0.8  # rows stored last to first: row j of the file is row 5 - j of the image
    flipped[1, 3] = affine[1, 3] + 5 * 0.8
    out = labels_on(Volume(labels[:, ::-1, :][None].copy(), flipped), image)
    np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(labels_on(Volume(labels[None], affine), image), labels)
