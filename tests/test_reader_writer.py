"""Reader and writer: real NIfTI files keep their geometry exactly through napari layers."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from napari_u2net._geometry import META_KEY, from_napari_affine, layer_volume
from napari_u2net._reader import napari_get_reader, read_volume
from napari_u2net._writer import write_labels_layer
from training.io.volume import nifti_to_ours, read_image

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
OBLIQUE_4D = os.path.join(data_path, "example4d.nii.gz")


@pytest.mark.parametrize("path", [ANATOMICAL, OBLIQUE_4D])
def test_reader_layer_places_voxels_in_ras_mm(path):
    reader = napari_get_reader(path)
    assert reader is read_volume
    ((data, attrs, kind),) = reader(path)
    img = nib.load(path)
    assert kind == "image"
    meta = attrs["metadata"][META_KEY]
    np.testing.assert_array_equal(meta["affine"], nifti_to_ours(img.affine))
    spatial = np.asarray(attrs["affine"])
    if data.ndim == 4:  # the 2 volumes of the 4D file: one layer, modality first
        assert data.shape[0] == img.shape[3]
        assert spatial[0, 0] == 1 and not spatial[0, 1:].any()
        spatial = np.eye(4)
        spatial[:3, :3], spatial[:3, 3] = np.asarray(attrs["affine"])[1:4, 1:4], np.asarray(attrs["affine"])[1:4, 4]
    # A voxel (i, j, k) of the file is data[k, j, i]; napari's world is (S, A, R) mm.
    i, j, k = 3, 5, 2
    ras = img.affine @ [i, j, k, 1]
    world = spatial @ [k, j, i, 1]
    np.testing.assert_allclose(world[:3], ras[2::-1], atol=1e-9)
    np.testing.assert_array_equal(from_napari_affine(spatial), meta["affine"])


def test_reader_ignores_other_files(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"x")
    assert napari_get_reader(str(tmp_path / "a.tif")) is None
    # a folder without DICOM files goes to napari's own reader (the plugin is napari's preferred
    # reader for folders, so that DICOM folders open without a prompt; issue #16.7)
    builtin = pytest.importorskip("napari_builtins.io").napari_get_reader
    assert napari_get_reader(str(tmp_path)) is builtin(str(tmp_path))
    assert napari_get_reader(str(tmp_path)) is not read_volume


@pytest.mark.parametrize("path", [ANATOMICAL, OBLIQUE_4D])
def test_labels_round_trip_keeps_affine_and_header(path, tmp_path):
    ((data, attrs, _),) = read_volume(path)
    spatial = data.shape[-3:]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=spatial).astype(np.uint8)
    meta = dict(attrs["metadata"][META_KEY])
    meta["shape"] = tuple(spatial)
    out = write_labels_layer(str(tmp_path / "seg.nii.gz"), labels, {"metadata": {META_KEY: meta}})
    saved = nib.load(out[0])
    src = nib.load(path)
    np.testing.assert_array_equal(saved.affine, src.affine)
    assert int(saved.header["sform_code"]) == int(src.header["sform_code"])
    assert int(saved.header["qform_code"]) == int(src.header["qform_code"])
    back = read_image(out[0])
    np.testing.assert_array_equal(back.data[0], labels)
    assert list(tmp_path.iterdir()) == [tmp_path / "seg.nii.gz"]  # no temporary file left


def test_writer_without_source_uses_layer_transform(tmp_path):
    """A hand-made Labels layer is written with its own scale/translate as the grid."""
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 1
    attrs = {"scale": (3.0, 2.0, 1.0), "translate": (10.0, 20.0, 30.0), "metadata": {}}
    (out,) = write_labels_layer(str(tmp_path / "hand.nii"), labels, attrs)
    img = nib.load(out)
    # index (d0, d1, d2) = (1, 2, 3) is NIfTI (i, j, k) = (3, 2, 1) at world (S, A, R) = (13, 24, 33).
    np.testing.assert_allclose(img.affine @ [3, 2, 1, 1], [33, 24, 13, 1])


@pytest.mark.qt
def test_open_and_save_through_napari(make_napari_viewer, tmp_path):
    """napari's own open/save find our reader and writer; the saved file has the source's affine."""
    viewer = make_napari_viewer()
    (image,) = viewer.open(ANATOMICAL, plugin="napari-u2net")
    volume = layer_volume(image)
    np.testing.assert_array_equal(volume.affine, nifti_to_ours(nib.load(ANATOMICAL).affine))
    labels = viewer.add_labels(
        (np.asarray(image.data) > 50).astype(np.uint8), name="seg", affine=image.affine, metadata=image.metadata
    )
    out = tmp_path / "seg.nii.gz"
    viewer.layers.selection = {labels}
    saved = viewer.layers.save(str(out), selected=True, plugin="napari-u2net")
    assert saved == [str(out)]
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(ANATOMICAL).affine)
    np.testing.assert_array_equal(read_image(out).data[0], labels.data)


def test_dicom_folder_opens_as_one_layer_in_place(tmp_path):
    """A DICOM series folder (written here with SimpleITK) is claimed and read with its geometry."""
    from .test_volume import assert_same_image, write_dicom_series

    aff = np.array([[0.0, 0.0, -0.8, 40.0], [0.0, 0.9, 0.0, -30.0], [3.0, 0.0, 0.0, 12.0], [0, 0, 0, 1]])
    arr = (np.random.default_rng(1).random((5, 12, 10)) * 1000).astype(np.int16)
    folder = tmp_path / "series"
    write_dicom_series(folder, arr, aff, "1.2.826.0.1.3680043.2.1125.7")
    reader = napari_get_reader(str(folder))
    assert reader is read_volume
    ((data, attrs, _),) = reader(str(folder))
    affine = attrs["metadata"][META_KEY]["affine"]
    assert_same_image(data, affine, arr, aff)  # slices ordered along the normal: axis 0 may flip
    np.testing.assert_allclose(from_napari_affine(np.asarray(attrs["affine"])), affine, atol=1e-9)


def test_a_dicom_file_and_a_folder_of_several_series_are_claimed(tmp_path):
    """One slice file opens its whole series; a folder with two series opens one layer each,
    named by the series (before: a .dcm went to napari's built-in 2D reader, and a mixed folder
    silently opened its largest series)."""
    import shutil

    from .test_volume import write_dicom_series

    aff = np.diag([2.0, 0.8, 0.8, 1.0])
    for i, shape in enumerate([(5, 12, 10), (4, 8, 9)]):
        arr = (np.random.default_rng(i).random(shape) * 1000).astype(np.int16)
        write_dicom_series(tmp_path / f"s{i}", arr, aff, f"1.2.826.0.1.3680043.2.1125.{30 + i}")
    one = sorted((tmp_path / "s0").iterdir())[0]
    assert napari_get_reader(str(one)) is read_volume
    ((data, attrs, kind),) = read_volume(str(one))
    # diag(2, .8, .8) puts axis 0 along R: a sagittal series, shown transposed to (S, A, R) order.
    assert kind == "image" and attrs["metadata"][META_KEY]["source_shape"] == (5, 12, 10)
    assert data.shape == (10, 12, 5)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(2):
        for f in (tmp_path / f"s{i}").iterdir():
            shutil.copy(f, mixed / f"{i}{f.name}")
    assert napari_get_reader(str(mixed)) is read_volume
    layers = read_volume(str(mixed))
    assert [a["metadata"][META_KEY]["source_shape"] for _, a, _ in layers] == [(5, 12, 10), (4, 8, 9)]
    assert [a["name"] for _, a, _ in layers] == ["mixed 1.2.826.0.1.3680043.2.1125.30",
                                                 "mixed 1.2.826.0.1.3680043.2.1125.31"]
