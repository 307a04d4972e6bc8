"""DICOM SEG out and in: synthetic CT series made here with pydicom, and the real files of
../shared/realdata (a dcmqi SEG of 3 real CT slices; a real JPEG 2000 series), skipped where absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.errors import InputError
from training.io.volume import read_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DCMQI = REAL / "dcmqi"
REAL_CT = REAL / "totalsegmentator" / "example_ct_dicom"


def _oblique() -> np.ndarray:
    """An axial series tilted 15° in plane: slices 2.5 mm apart along S, rows 0.8 mm, columns 0.9 mm."""
    a = np.deg2rad(15)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, 0] = [0, 0, 2.5]
    aff[:3, 1] = rot @ [0, -0.8, 0]
    aff[:3, 2] = rot @ [-0.9, 0, 0]
    aff[:3, 3] = [40.5, 12.25, -70.0]
    return aff


def write_ct_series(folder: Path, arr: np.ndarray, affine: np.ndarray, series_uid: str, study_uid: str | None = None):
    """A CT Image Storage series as a scanner exports it (one file per slice, Frame of Reference,
    pixel spacing, positions in LPS): slice ``z`` of ``arr`` (D0, D1, D2) at ``affine``'s slice z."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    lps = np.array([-1.0, -1.0, 1.0])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    col_dir, row_dir = affine[:3, 2] / spacing[2] * lps, affine[:3, 1] / spacing[1] * lps
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    for z in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "Test^Phantom", "P1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 3, z + 1, "test"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*col_dir, *row_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (affine @ np.array([z, 0, 0, 1.0]))[:3] * lps]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
        ds.SliceThickness = f"{spacing[0]:.6f}"
        ds.Rows, ds.Columns = arr.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(arr[z].astype(np.int16)).tobytes()
        pydicom.dcmwrite(str(folder / f"{z:03d}.dcm"), ds, enforce_file_format=True)


SERIES_A = "1.2.826.0.1.3680043.8.498.101"
SERIES_B = "1.2.826.0.1.3680043.8.498.102"
CLASSES = ["background", "spleen", "liver", "tumour"]
COLOURS = ["#000000", "#911eb4", "#e6194b", "#4363d8"]


def _case(root: Path, uid: str = SERIES_A, shape=(6, 20, 24), seed: int = 0) -> tuple[Path, np.ndarray]:
    """A CT series in ``root/ct`` (oblique, anisotropic) and labels on its read_image grid."""
    rng = np.random.default_rng(seed)
    arr = (rng.normal(40, 30, shape)).astype(np.int16)
    write_ct_series(root / "ct", arr, _oblique(), uid)
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 3:12, 4:15] = 1
    labels[4, 10:18, 2:9] = 3  # class 2 ("liver") stays empty
    return root / "ct", labels


def _on_grid(array: np.ndarray, affine: np.ndarray, target: np.ndarray, shape) -> np.ndarray:
    """``array`` (on ``affine``) placed voxel by voxel on the grid (``target``, ``shape``), which
    differs from it by axis flips, permutations and whole-voxel shifts only (zeros elsewhere)."""
    m = np.linalg.inv(target) @ affine  # array index -> target index
    assert np.allclose(np.abs(m[:3, :3]).round(), np.abs(m[:3, :3]), atol=1e-3), m
    assert np.allclose(m[:3, 3], m[:3, 3].round(), atol=1e-3), m
    index = np.indices(array.shape).reshape(3, -1)
    target_index = np.rint(m[:3, :3] @ index + m[:3, 3:]).astype(int)
    out = np.zeros(shape, array.dtype)
    out[tuple(target_index)] = array.ravel()
    return out


def _highdicom_labels(path: Path, affine: np.ndarray, shape) -> np.ndarray:
    """The SEG read by highdicom alone (its own volume and affine, LPS), put on the grid ``affine``."""
    import highdicom as hd

    vol = hd.seg.segread(str(path)).get_volume(combine_segments=True)
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return _on_grid(np.asarray(vol.array), np.asarray(vol.affine), lps_affine, shape)


def test_round_trip_references_every_slice_and_lines_up_voxel_by_voxel(tmp_path):
    import pydicom

    from training.io.dicom_seg import read_seg, write_seg

    folder, labels = _case(tmp_path / "case")
    labels[0, 0, :3] = 255  # unlabelled (sparse annotation): background in a SEG
    volume = read_image(folder)
    out = tmp_path / "case" / "seg" / "labels.dcm"  # a sibling folder of the series
    write_seg(out, labels, volume.affine, folder, CLASSES, COLOURS, domain="spleen-ct", version="9.9")
    expected = np.where(labels == 255, 0, labels)

    back = read_seg(out)
    assert back.series_uid == SERIES_A and back.image == folder
    assert np.array_equal(back.labels, expected) and back.labels.shape == volume.shape
    np.testing.assert_allclose(back.affine, volume.affine)
    assert back.names == CLASSES and back.colours[1:] == COLOURS[1:] and back.domain == "spleen-ct"
    assert np.array_equal(_highdicom_labels(out, volume.affine, volume.shape), expected)  # highdicom's own geometry agrees

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_A
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2, 3)] == CLASSES[1:]  # the empty class stays a segment
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"  # SNOMED CT spleen
    assert segments[3].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Abnormal Structure"
    algorithm = segments[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("napari-u2net", "9.9")
    assert "spleen-ct" in algorithm.AlgorithmParameters
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).ImagePositionPatient for f in folder.iterdir()}
    for frame in ds.PerFrameFunctionalGroupsSequence:  # each frame lies exactly on the slice it references
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient, sources[ref], atol=1e-4)


def test_all_background_labels_give_a_valid_seg_with_the_class_list(tmp_path):
    from training.io.dicom_seg import read_seg, write_seg

    folder, labels = _case(tmp_path)
    volume = read_image(folder)
    out = write_seg(tmp_path / "empty.dcm", np.zeros_like(labels), volume.affine, folder, CLASSES)
    back = read_seg(out)
    assert back.names == CLASSES and not back.labels.any() and back.labels.shape == volume.shape


def test_labels_not_on_the_series_grid_are_refused(tmp_path):
    from training.io.dicom_seg import write_seg

    folder, labels = _case(tmp_path)
    shifted = read_image(folder).affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(InputError, match="not on this series' grid"):
        write_seg(tmp_path / "x.dcm", labels, shifted, folder, CLASSES)
    assert not (tmp_path / "x.dcm").exists()


def test_a_seg_whose_series_is_elsewhere_names_both_series(tmp_path):
    import shutil

    from training.io.dicom_seg import read_seg, write_seg

    folder_a, labels = _case(tmp_path / "a", SERIES_A)
    write_seg(tmp_path / "a" / "seg.dcm", labels, read_image(folder_a).affine, folder_a, CLASSES)
    folder_b, _ = _case(tmp_path / "b", SERIES_B, seed=1)
    shutil.copy(tmp_path / "a" / "seg.dcm", tmp_path / "b" / "seg.dcm")  # beside series B only
    with pytest.raises(InputError, match=rf"refers to image series {SERIES_A}.*found only series {SERIES_B}") as e:
        read_seg(tmp_path / "b" / "seg.dcm")
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=rf"{SERIES_A}.*{SERIES_B}"):  # an image folder given that holds B
        read_seg(tmp_path / "a" / "seg.dcm", image=folder_b)


def _predict(args: list[str]) -> int:
    from training.commands.cli import main

    return main(["predict", *args, "--device", "cpu", "--quiet"])


def test_predict_writes_a_seg_with_the_labels_of_the_nifti_run(tmp_path, model_dir):
    from training.io.dicom_seg import read_seg

    folder, _ = _case(tmp_path)  # tmp/ct; outputs beside it and in a sibling folder
    common = [str(folder), "--domain", "ct", "--model", str(model_dir)]
    assert _predict([*common, "-o", str(tmp_path / "ct.nii.gz")]) == 0
    assert _predict([*common, "-o", str(tmp_path / "ct.dcm")]) == 0
    assert _predict([*common, "-o", str(tmp_path / "out"), "--format", "dicom-seg"]) == 0
    nifti = read_image(tmp_path / "ct.nii.gz")
    for path in (tmp_path / "ct.dcm", tmp_path / "out" / "ct_ct.dcm"):
        seg = read_seg(path)
        assert np.array_equal(seg.labels, nifti.data[0]) and seg.domain == "ct" and seg.series_uid == SERIES_A
        assert seg.names == ["background", "class1"]
        np.testing.assert_allclose(seg.affine, nifti.affine, atol=1e-5)


@pytest.mark.parametrize("how", [["-o", "seg.dcm"], ["-o", "out", "--format", "dicom-seg"]])
def test_a_seg_of_a_nifti_image_is_refused_before_any_work(tmp_path, capsys, how):
    from training.io.volume import write_nifti

    image = write_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(6, 8, 9)).astype(np.float32),
                        np.eye(4))
    out = [str(tmp_path / a) if a in ("seg.dcm", "out") else a for a in how]
    # a model that does not exist: the refusal comes before it is even looked for
    rc = _predict([str(image), "--domain", "ct", "--model", str(tmp_path / "no-model"), *out])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "not DICOM" in err and "write NIfTI" in err
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "out").exists()


def test_format_and_suffix_that_disagree_are_refused(tmp_path, capsys):
    folder, _ = _case(tmp_path)
    rc = _predict([str(folder), "--domain", "ct", "-o", str(tmp_path / "x.nii.gz"), "--format", "dicom-seg"])
    assert rc == 2 and "--format dicom-seg writes .dcm" in capsys.readouterr().err


# -- real files (../shared/realdata; skipped where absent) -----------------------------------------
@pytest.mark.skipif(not (DCMQI / "liver.dcm").is_file(), reason="../shared/realdata is not on this machine")
def test_real_dcmqi_seg_matches_its_nrrd_voxel_by_voxel():
    import SimpleITK as sitk

    from training.io.dicom_seg import read_seg
    from training.io.volume import from_sitk

    seg = read_seg(DCMQI / "liver.dcm")
    assert seg.image == DCMQI / "ct-3slice" and seg.names == ["background", "Liver"]
    mask, affine = from_sitk(sitk.ReadImage(str(DCMQI / "liver_seg.nrrd")))
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    assert seg.labels.shape == (3, 512, 512) == read_image(DCMQI / "ct-3slice").shape
    assert np.array_equal(seg.labels, mask) and mask.sum() > 100_000


@pytest.mark.skipif(not REAL_CT.is_dir(), reason="../shared/realdata is not on this machine")
def test_real_jpeg2000_series_seg_of_its_31_organ_labels(tmp_path):
    """Patient B's compressed Siemens series (anonymised: its Study/Series UIDs are blank, so the
    SEG references UIDs derived from its instances): TotalSegmentator's NIfTI labels written as a
    SEG, read back by highdicom alone and by read_seg, equal voxel by voxel."""
    import json

    from training.io.dicom_seg import read_seg, write_seg

    volume = read_image(REAL_CT)
    nifti = read_image(REAL_CT.parent / "example_seg_dicom.nii.gz")
    labels = _on_grid(nifti.data[0], nifti.affine, volume.affine, volume.shape).astype(np.uint8)
    names = json.loads((REAL_CT.parent / "class_map.json").read_text())["total"]
    classes = ["background"] + [names.get(str(v), f"label {v}") for v in range(1, int(labels.max()) + 1)]
    out = write_seg(tmp_path / "organs.dcm", labels, volume.affine, REAL_CT, classes, domain="total")
    assert len(np.unique(labels)) > 25
    assert np.array_equal(_highdicom_labels(out, volume.affine, volume.shape), labels)
    back = read_seg(out, image=REAL_CT)
    assert np.array_equal(back.labels, labels) and back.names == classes
    assert back.names[5] == "liver"


# -- the plugin ---------------------------------------------------------------------------------------
def _sagittal() -> np.ndarray:
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = [2.5, 0, 0], [0, 0, -0.8], [0, -0.9, 0]
    aff[:3, 3] = [-10.0, 30.0, 40.0]
    return aff


@pytest.mark.qt
@pytest.mark.parametrize("orientation", ["axial oblique", "sagittal"])
def test_a_seg_opens_as_labels_on_its_image_grid_in_the_viewer(make_napari_viewer, tmp_path, orientation):
    """Opened with napari (a shown viewer): the SEG is a Labels layer with its segment names and
    colours, exactly on the image layer's grid; a folder holding the series and a SEG opens both."""
    import shutil

    from napari.layers import Image, Labels

    from napari_u2net._geometry import META_KEY, layer_data_to_world
    from training.io.dicom_seg import write_seg

    rng = np.random.default_rng(3)
    write_ct_series(tmp_path / "ct", rng.normal(40, 30, (6, 20, 24)).astype(np.int16),
                    _oblique() if orientation == "axial oblique" else _sagittal(), SERIES_A)
    volume = read_image(tmp_path / "ct")
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 3:12, 4:15], labels[4, 10:18, 2:9] = 1, 3
    write_seg(tmp_path / "seg" / "organs.dcm", labels, volume.affine, tmp_path / "ct", CLASSES, COLOURS, domain="d")

    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(tmp_path / "ct"), plugin="napari-u2net")
    (seg,) = viewer.open(str(tmp_path / "seg" / "organs.dcm"), plugin="napari-u2net")
    assert isinstance(image, Image) and isinstance(seg, Labels)
    assert seg.data.shape == image.data.shape
    np.testing.assert_allclose(layer_data_to_world(seg), layer_data_to_world(image), atol=1e-9)
    order = seg.metadata[META_KEY]["orientation"]  # displayed axis i = file axis order[i]
    assert np.array_equal(np.asarray(seg.data), np.transpose(labels, order))
    assert list(seg.features["class"]) == CLASSES
    np.testing.assert_allclose(seg.colormap.map(np.array([1]))[0, :3], [0x91 / 255, 0x1E / 255, 0xB4 / 255], atol=0.02)
    # a labelled voxel of the SEG is, in world coordinates, the same voxel of the image
    voxel = np.argwhere(np.asarray(seg.data) == 3)[0]
    world = seg.data_to_world(voxel)
    np.testing.assert_allclose(image.world_to_data(world), voxel, atol=1e-6)

    shutil.copy(tmp_path / "seg" / "organs.dcm", tmp_path / "ct" / "organs.dcm")
    both = viewer.open(str(tmp_path / "ct"), plugin="napari-u2net")
    assert [type(la).__name__ for la in both] == ["Image", "Labels"]


@pytest.mark.qt
def test_labels_drawn_on_a_dicom_image_save_as_seg_through_the_plugin(make_napari_viewer, tmp_path):
    """A hand-drawn Labels layer (napari's New Labels: the image's transform, no metadata) on a
    sagittal DICOM series saves as .dcm with our writer: a SEG of the series, in the file's order."""
    from napari_u2net._writer import write_seg_layer
    from training.io.dicom_seg import read_seg

    arr = np.random.default_rng(4).normal(40, 30, (6, 20, 24)).astype(np.int16)
    write_ct_series(tmp_path / "ct", arr, _sagittal(), SERIES_A)
    viewer = make_napari_viewer(show=True)
    (image,) = viewer.open(str(tmp_path / "ct"), plugin="napari-u2net")
    drawn = np.zeros(image.data.shape, np.uint8)
    drawn[2:9, 5:15, 1:4] = 2
    labels = viewer.add_labels(drawn, name="drawn", affine=image.affine)
    viewer.layers.selection = {labels}
    out = tmp_path / "drawn.dcm"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-u2net") == [str(out)]
    seg = read_seg(out)
    order = image.metadata["u2net"]["orientation"]
    assert np.array_equal(np.transpose(seg.labels, order), drawn)  # on the file's grid, transposed back
    assert seg.series_uid == SERIES_A and seg.names == ["background", "label 1", "label 2"]

    from training.io.volume import write_nifti

    nifti = write_nifti(tmp_path / "t1.nii.gz", arr.astype(np.float32), _sagittal())
    (other,) = viewer.open(str(nifti), plugin="napari-u2net")
    with pytest.raises(InputError, match="not a DICOM series.*save the labels as NIfTI"):
        write_seg_layer(str(tmp_path / "no.dcm"), np.zeros(other.data.shape, np.uint8),
                        {"name": "x", "affine": other.affine, "metadata": {"u2net": dict(other.metadata["u2net"])}})
    assert not (tmp_path / "no.dcm").exists()


def test_a_domain_result_saves_as_automatic_and_a_corrected_one_as_semiautomatic(tmp_path):
    """A result layer's metadata (classes, domain, the hash of what the model gave) names the
    segments; it carries the image folder but not the series, found among two by geometry."""
    import shutil

    import pydicom

    from napari_u2net._reader import read_volume
    from napari_u2net._widget import labels_hash
    from napari_u2net._writer import write_seg_layer
    from training.io.dicom_seg import read_seg

    folder, labels = _case(tmp_path / "a", SERIES_A)
    other, _ = _case(tmp_path / "b", SERIES_B, shape=(5, 16, 18), seed=2)
    for f in other.iterdir():
        shutil.copy(f, folder / f"b{f.name}")
    layers = read_volume(str(folder))
    (data, attrs, _) = next(la for la in layers if la[1]["metadata"]["u2net"]["info"]["dicom_series"] == SERIES_A)
    assert data.shape == labels.shape  # axial: shown as stored
    meta = {k: v for k, v in attrs["metadata"]["u2net"].items() if k != "info"}
    meta.update(classes=CLASSES, domain="spleen-ct", result_hash=labels_hash(labels))
    layer = {"name": "a spleen-ct", "affine": attrs["affine"], "metadata": {"u2net": meta}}
    write_seg_layer(str(tmp_path / "auto.dcm"), labels, layer)
    corrected = labels.copy()
    corrected[0, :2, :2] = 1
    write_seg_layer(str(tmp_path / "fixed"), corrected, layer)  # the suffix is added
    for name, want, kind in (("auto.dcm", labels, "AUTOMATIC"), ("fixed.dcm", corrected, "SEMIAUTOMATIC")):
        seg = read_seg(tmp_path / name, image=folder)
        assert np.array_equal(seg.labels, want) and seg.names == CLASSES and seg.series_uid == SERIES_A
        assert {s.SegmentAlgorithmType for s in pydicom.dcmread(tmp_path / name).SegmentSequence} == {kind}


def test_a_seg_of_files_without_frame_of_reference_is_refused_before_any_work(tmp_path):
    """GDCM's secondary captures (the other DICOM tests' series) have no Frame of Reference or
    pixel spacing for a SEG to reference: refused up front, with what to do."""
    from training.io.dicom_seg import check_seg_source

    from .test_volume import write_dicom_series

    write_dicom_series(tmp_path / "sc", np.zeros((4, 8, 9), np.int16), np.eye(4), "1.2.826.0.1.3680043.2.1125.5")
    with pytest.raises(InputError, match=r"lack FrameOfReferenceUID.*write NIfTI"):
        check_seg_source(tmp_path / "sc")
    check_seg_source(_case(tmp_path / "ok")[0])  # a CT series as scanners write it passes
