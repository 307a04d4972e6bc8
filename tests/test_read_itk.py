"""NRRD and MetaImage files (3D Slicer, ITK-SNAP, pyradiomics) open with their geometry."""

import numpy as np
import pytest
import SimpleITK as sitk

from napari_u2net._reader import napari_get_reader
from training.errors import InputError
from training.io.volume import case_name, read_image, read_nifti, write_nifti


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_metaimage_read_like_the_same_nifti(tmp_path, suffix):
    data = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)  # (k, j, i)
    affine = np.array([[0.0, 0.0, -0.8, 100.0], [0.0, 0.8, 0.0, -20.0], [2.5, 0.0, 0.0, 40.0], [0, 0, 0, 1]])
    nifti = tmp_path / "a.nii.gz"
    write_nifti(nifti, data, affine)
    ref = read_nifti(nifti)
    img = sitk.ReadImage(str(nifti))  # SimpleITK writes the same image and geometry as NRRD / MHA
    other = tmp_path / f"a{suffix}"
    sitk.WriteImage(img, str(other))
    vol = read_image(other)
    assert vol.shape == ref.shape and np.array_equal(vol.data, ref.data)
    assert np.allclose(vol.affine, ref.affine, atol=1e-5)
    assert case_name(other) == "a" and napari_get_reader(str(other)) is not None


def test_a_2d_or_broken_nrrd_is_one_clear_error(tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(flat))
    with pytest.raises(InputError, match="3D volumes"):
        read_image(flat)
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n\x00\x01")
    with pytest.raises(InputError, match="cannot read this image"):
        read_image(broken)
