"""DICOM in: single files, multi-frame files, folders with several series, uneven or duplicated
slices, and the real compressed series of ../shared/realdata (skipped where it is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from training.errors import InputError
from training.io.dicom import is_dicom_file, list_series, read_dicom
from training.io.volume import Volume, read_image

from .test_volume import _oblique_affine, assert_same_image, write_dicom_series

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
REAL_CT = REAL / "totalsegmentator" / "example_ct_dicom"
REAL_SEG = REAL / "dcmqi" / "liver.dcm"


def _series(tmp_path, name="dcm", shape=(6, 16, 18), uid="1.2.826.0.1.3680043.2.1125.1", seed=2, aff=None):
    aff = _oblique_affine() if aff is None else aff
    arr = (np.random.default_rng(seed).random(shape) * 1000).astype(np.int16)
    write_dicom_series(tmp_path / name, arr, aff, uid)
    return tmp_path / name, arr, aff


def test_one_slice_file_opens_its_whole_series(tmp_path):
    folder, arr, aff = _series(tmp_path)
    one = sorted(folder.iterdir())[2]
    assert is_dicom_file(one)
    vol = read_image(one)
    assert vol.shape == arr.shape
    assert_same_image(vol.data[0], vol.affine, arr, aff)
    assert np.array_equal(vol.affine, read_image(folder).affine)


def test_a_dicom_file_without_suffix_is_recognised_by_its_marker(tmp_path):
    folder, arr, _ = _series(tmp_path)
    bare = folder / "IM0001"
    shutil.move(sorted(folder.glob("*.dcm"))[0], bare)
    assert is_dicom_file(bare)
    assert read_image(bare).shape == arr.shape
    (tmp_path / "notes").write_text("not an image")
    assert not is_dicom_file(tmp_path / "notes")


def test_multiframe_file_keeps_its_geometry(tmp_path):
    arr = (np.arange(4 * 5 * 6).reshape(4, 5, 6) * 7).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "mf.dcm"))
    vol = read_image(tmp_path / "mf.dcm")
    assert vol.shape == (4, 5, 6)
    assert np.array_equal(vol.data[0], arr)
    assert np.allclose(vol.spacing, (2.5, 0.8, 0.7))
    # LPS (10, 20, 30) is RAS (-10, -20, 30)
    assert np.allclose(vol.affine[:3, 3], (-10.0, -20.0, 30.0))


def test_folder_with_several_series_names_them_and_reads_the_one_chosen(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _, arr_a, aff = _series(tmp_path, "a", (6, 16, 18), "1.2.826.0.1.3680043.2.1125.21", seed=1)
    _, arr_b, _ = _series(tmp_path, "b", (4, 10, 12), "1.2.826.0.1.3680043.2.1125.22", seed=2)
    for name in ("a", "b"):
        for f in (tmp_path / name).iterdir():
            shutil.copy(f, mixed / f"{name}{f.name}")
    series = list_series(mixed)
    assert [len(s.files) for s in series] == [6, 4]
    with pytest.raises(InputError, match=r"holds 2 DICOM series .*1125\.21.*1125\.22.*choose one") as e:
        read_image(mixed)
    assert "\n" not in str(e.value)
    vol_b = read_image(mixed, series="1.2.826.0.1.3680043.2.1125.22")
    assert_same_image(vol_b.data[0], vol_b.affine, arr_b, aff)
    assert read_dicom(mixed, series="1.2.826.0.1.3680043.2.1125.21").shape == arr_a.shape
    with pytest.raises(InputError, match="matches several"):
        read_dicom(mixed, series="1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(InputError, match="is not in this folder"):
        read_dicom(mixed, series="9.9")


def test_missing_slice_is_refused_with_the_gap_named(tmp_path):
    folder, _, _ = _series(tmp_path, aff=np.diag([2.0, 1.0, 1.0, 1.0]), shape=(7, 8, 9))  # slices 2 mm apart
    gone = sorted(folder.iterdir())[3]
    gone.unlink()
    with pytest.raises(InputError, match=r"not evenly spaced: a gap of 4\.00 mm between positions .* 2\.00 mm apart"):
        read_image(folder)
    with pytest.raises(InputError, match="not evenly spaced"):  # through one of its files too
        read_image(sorted(folder.iterdir())[0])


def test_duplicated_slice_is_refused(tmp_path):
    folder, _, _ = _series(tmp_path, shape=(5, 8, 9))
    first = sorted(folder.iterdir())[1]
    img = sitk.ReadImage(str(first))
    r = sitk.ImageFileReader()
    r.SetFileName(str(first))
    r.ReadImageInformation()
    for k in r.GetMetaDataKeys():
        img.SetMetaData(k, r.GetMetaData(k))
    img.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.99")  # another instance, same place
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "dup.dcm"))
    writer.Execute(img)
    with pytest.raises(InputError, match="share the position"):
        read_image(folder)


def test_modalities_with_the_same_shape_say_what_differs(tmp_path):
    from training.io.volume import write_nifti

    data = np.zeros((6, 7, 8), np.float32)
    write_nifti(tmp_path / "t1.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    write_nifti(tmp_path / "t2.nii.gz", data, np.diag([1.0, 1.0, 1.5, 1.0]))
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[:3, 3] = (0, 0, 4)
    write_nifti(tmp_path / "t3.nii.gz", data, shifted)
    with pytest.raises(InputError, match=r"voxel size .* vs .* mm"):
        read_image([tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"])
    with pytest.raises(InputError, match=r"origin \(0, 0, 4\) vs \(0, 0, 0\) mm"):
        read_image([tmp_path / "t1.nii.gz", tmp_path / "t3.nii.gz"])


@pytest.mark.skipif(not REAL_SEG.is_file(), reason="../shared/realdata is not on this machine")
def test_a_dicom_seg_is_not_read_as_an_image():
    with pytest.raises(InputError, match="DICOM Segmentation"):
        read_image(REAL_SEG)


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="../shared/realdata is not on this machine")
def test_real_jpeg2000_ct_series_opens_on_its_labels_grid():
    """Patient B's compressed Siemens series (read only, never trained on): its geometry is the
    grid of TotalSegmentator's labels for it, from a slice file as from the folder."""
    vol = read_image(REAL_CT)
    seg = nib.load(str(REAL_CT.parent / "example_seg_dicom.nii.gz"))
    assert vol.shape == seg.shape[::-1] == (20, 512, 512)
    assert np.allclose(vol.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-4)
    centre = (np.array(vol.shape) - 1) / 2
    seg_vol = Volume(np.zeros((1, *vol.shape)), seg.affine @ np.eye(4)[[2, 1, 0, 3]])
    assert np.allclose(vol.affine @ np.r_[centre, 1], seg_vol.affine @ np.r_[centre, 1], atol=1e-2)
    hu = vol.data[0]
    assert hu.min() <= -900 and 0 < np.median(hu[:, 200:300, 200:300]) < 200  # air and soft tissue
    assert np.array_equal(read_image(sorted(REAL_CT.iterdir())[5]).data, vol.data)
