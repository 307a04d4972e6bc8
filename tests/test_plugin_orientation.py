"""Issue #16.1 and #16.11: sagittal, coronal and oblique scans in a shown napari viewer (Xvfb).

Before the fix, opening a sagittal or coronal file aborted napari (``LinAlgError: Singular
matrix`` in vispy's paint: napari inverts the displayed 2×2 block of the layer affine, which a
permutation makes singular), and hand-drawn Labels layers were saved without the image's
qform/sform codes. Each test opens a file written here, forces a real paint, segments it with the
domain selector (stand-in predict: a threshold) and saves through napari's writer: the file must
have the SAME array order, affine and qform/sform codes as the source, voxel by voxel.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

pytest.importorskip("napari")

from napari_u2net._geometry import META_KEY, radiological_view, spatial_part  # noqa: E402
from napari_u2net._writer import write_labels_layer  # noqa: E402
from training.io.volume import ours_to_nifti, read_image  # noqa: E402

from .test_inference import rotation  # noqa: E402
from .test_plugin_widget import ThresholdPredict, make_widget, run_and_wait  # noqa: E402

pytestmark = pytest.mark.qt

SHAPE = (30, 34, 22)  # (i, j, k) of the axial file: R, A, S


def blob_values(shape=SHAPE, seed=0) -> np.ndarray:
    """Integer image: noise 0..9, an off-centre ellipsoid 100..109 (so a threshold at the mean is
    exact whatever the summation order, and orientation mistakes show)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = ((grids[0] - 0.3) ** 2 + (grids[1] + 0.2) ** 2 / 0.6 + grids[2] ** 2 / 0.8) < 0.35
    return (rng.integers(0, 10, shape) + 100 * inside).astype(np.int16)


def rotation4(deg: float, axis: int) -> np.ndarray:
    """:func:`tests.test_inference.rotation` as a 4×4 affine."""
    m = np.eye(4)
    m[:3, :3] = rotation(axis, deg)
    return m


def write_scan(path, kind: str, channels: int = 1) -> str:
    """A NIfTI scan (qform and sform code 2), acquired in the direction ``kind``."""
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    affine[:3, 3] = [-22.0, -20.0, -21.0]
    if kind.startswith("oblique"):
        affine = rotation4(17.0, 0) @ rotation4(-11.0, 2) @ affine
    data = blob_values()
    if channels > 1:
        data = np.stack([data, (data * 2 + 1).astype(np.int16)], axis=-1)
    img = nib.Nifti1Image(data, affine)
    codes = {"axial": "RAS", "sagittal": "PSR", "coronal": "LSA", "oblique": "PSR", "oblique-axial": "RAS"}[kind]
    img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes))))
    img.set_qform(img.affine, code=2)
    img.set_sform(img.affine, code=2)
    nib.save(img, str(path))
    return str(path)


def shown_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    radiological_view(viewer)
    viewer.window._qt_window.show()
    qtbot.waitExposed(viewer.window._qt_window)
    return viewer


def paint(viewer):
    """A real paint of the canvas: the vispy draw that aborted napari."""
    image = viewer.window._qt_viewer.canvas.native.grab()
    assert image.width() > 0


def napari_world(affine_ras: np.ndarray, ijk) -> np.ndarray:
    """World point (S, A, R) of NIfTI voxel (i, j, k)."""
    return (affine_ras @ np.r_[ijk, 1.0])[2::-1]


def assert_shows_file_voxels(layer, src: nib.Nifti1Image, spatial_first: int = 0):
    """Every sampled voxel of the file is where the layer says, with its value (independent of
    how the reader arranges the array: found back through the layer's own data→world map)."""
    values = np.asanyarray(src.dataobj)
    rng = np.random.default_rng(5)
    for ijk in rng.integers(0, src.shape[:3], size=(25, 3)):
        index = np.asarray(layer.world_to_data(napari_world(src.affine, ijk)))
        np.testing.assert_allclose(index, np.round(index), atol=1e-4)
        index = tuple(int(v) for v in np.round(index))
        if values.ndim == 4:
            assert layer.data[(0, *index[1:])] == values[(*ijk, 0)]
        else:
            assert layer.data[index] == values[tuple(ijk)]


def assert_saved_like_source(out, src_path, expected_ijk: np.ndarray):
    saved, src = nib.load(out), nib.load(src_path)
    assert saved.shape == src.shape[:3]
    np.testing.assert_array_equal(saved.affine, src.affine)
    assert int(saved.header["qform_code"]) == int(src.header["qform_code"])
    assert int(saved.header["sform_code"]) == int(src.header["sform_code"])
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), expected_ijk)


def save(viewer, layer, path) -> str:
    viewer.layers.selection = {layer}
    (out,) = viewer.layers.save(str(path), selected=True, plugin="napari-u2net")
    return out


@pytest.mark.parametrize("kind", ["sagittal", "coronal", "oblique", "axial"])
def test_scan_opens_draws_segments_and_saves_in_its_own_order(kind, make_napari_viewer, qtbot, model_dir, tmp_path):
    path = write_scan(tmp_path / f"{kind}.nii.gz", kind)
    src = nib.load(path)
    viewer = shown_viewer(make_napari_viewer, qtbot)
    (image,) = viewer.open(path, plugin="napari-u2net")
    paint(viewer)  # aborted napari for sagittal and coronal files
    assert_shows_file_voxels(image, src)
    assert viewer.dims.ndisplay == 2 and tuple(viewer.dims.displayed) == (1, 2)  # axial: world (A, R)
    # Each data axis runs (nearly) along the world axis of its position: the slider steps through
    # axial slices and the displayed plane is one (only a residual oblique rotation is left).
    directions = np.abs(image._data_to_world.affine_matrix[:3, :3])
    assert list(np.argmax(directions, axis=0)) == [0, 1, 2]

    predict = ThresholdPredict()
    widget = make_widget(viewer, qtbot, model_dir, predict)
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    labels = viewer.layers[f"{image.name} ct"]
    paint(viewer)
    np.testing.assert_array_equal(labels._data_to_world.affine_matrix, image._data_to_world.affine_matrix)
    shown = np.asarray(image.data)
    np.testing.assert_array_equal(labels.data, shown > shown.mean())
    values = np.asanyarray(src.dataobj)
    assert_saved_like_source(save(viewer, labels, tmp_path / "seg.nii.gz"), path, values > values.mean())


@pytest.mark.parametrize("kind", ["sagittal", "oblique", "axial"])
def test_new_labels_drawn_by_hand_keep_the_source_header(kind, make_napari_viewer, qtbot, tmp_path):
    """#16.11: napari's New Labels copies the image's transform but not our metadata; the saved
    file still gets the source's header (qform/sform code 2, not 1), affine and array order."""
    path = write_scan(tmp_path / f"{kind}.nii.gz", kind)
    src = nib.load(path)
    viewer = shown_viewer(make_napari_viewer, qtbot)
    (image,) = viewer.open(path, plugin="napari-u2net")
    viewer.layers.selection.active = image
    viewer._new_labels()  # layer list ▸ New Labels
    drawn = viewer.layers[-1]
    assert drawn.metadata == {} and drawn.data.shape == image.data.shape
    ijk = (src.shape[0] // 5, 2 * src.shape[1] // 3, src.shape[2] // 3)  # an asymmetric voxel
    index = tuple(int(round(v)) for v in drawn.world_to_data(napari_world(src.affine, ijk)))
    drawn.brush_size = 1
    drawn.paint(index, 3, refresh=True)
    paint(viewer)
    expected = np.zeros(src.shape, np.uint8)
    expected[ijk] = 3
    out = save(viewer, drawn, tmp_path / "hand.nii.gz")
    assert_saved_like_source(out, path, expected)


def test_sagittal_dicom_series(make_napari_viewer, qtbot, model_dir, tmp_path):
    """A sagittal DICOM series opens, draws, segments; saved labels have the CLI's array order
    (``read_image``'s) and the series' geometry."""
    from .test_volume import write_dicom_series

    sagittal = np.array(  # our index (d0, d1, d2) → RAS: slices along R, rows along -S, columns along A
        [[3.0, 0.0, 0.0, -30.0], [0.0, 0.0, 0.9, -40.0], [0.0, -0.8, 0.0, 50.0], [0, 0, 0, 1]]
    )
    arr = blob_values((8, 24, 20), seed=3)
    folder = tmp_path / "sag"
    write_dicom_series(folder, arr, sagittal, "1.2.826.0.1.3680043.2.1125.77")
    source = read_image(folder)
    viewer = shown_viewer(make_napari_viewer, qtbot)
    (image,) = viewer.open(str(folder), plugin="napari-u2net")
    paint(viewer)
    assert image.data.shape == (24, 20, 8)  # shown as (S, A, R)
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["ct"])
    run_and_wait(widget, qtbot)
    labels = viewer.layers[f"{image.name} ct"]
    paint(viewer)
    np.testing.assert_array_equal(labels._data_to_world.affine_matrix, image._data_to_world.affine_matrix)
    values = source.data[0]
    saved = nib.load(save(viewer, labels, tmp_path / "seg.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.transpose(values > values.mean(), (2, 1, 0)))
    np.testing.assert_allclose(saved.affine, ours_to_nifti(source.affine), atol=1e-4)
    # With the image layer closed (a series has no header to fall back on), the result's own
    # metadata still knows the series' grid.
    viewer.layers.remove(image)
    saved = nib.load(save(viewer, labels, tmp_path / "seg2.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), np.transpose(values > values.mean(), (2, 1, 0)))
    np.testing.assert_allclose(saved.affine, ours_to_nifti(source.affine), atol=1e-4)


def test_multimodal_sagittal_file(make_napari_viewer, qtbot, model_dir, tmp_path):
    """A 4D sagittal file: one modality-first layer, segmented by a 2-modality domain; results
    and hand-drawn 4D labels are saved in the file's order with its header."""
    path = write_scan(tmp_path / "mm.nii.gz", "sagittal", channels=2)
    src = nib.load(path)
    viewer = shown_viewer(make_napari_viewer, qtbot)
    (image,) = viewer.open(path, plugin="napari-u2net")
    paint(viewer)
    assert image.ndim == 4 and image.data.shape[0] == 2
    assert_shows_file_voxels(image, src)
    widget = make_widget(viewer, qtbot, model_dir, ThresholdPredict())
    widget.set_checked_domains(["mr2"])
    run_and_wait(widget, qtbot)
    labels = viewer.layers[f"{image.name} mr2"]
    paint(viewer)
    np.testing.assert_array_equal(
        labels._data_to_world.affine_matrix, spatial_part(image._data_to_world.affine_matrix)
    )
    first = np.asanyarray(src.dataobj)[..., 0]
    assert_saved_like_source(save(viewer, labels, tmp_path / "seg.nii.gz"), path, first > first.mean())

    viewer.layers.selection.active = image
    viewer._new_labels()
    drawn = viewer.layers[-1]
    assert drawn.ndim == 4
    ijk = (2 * src.shape[0] // 3, src.shape[1] // 5, src.shape[2] // 3)
    index = np.round(drawn.world_to_data((1, *napari_world(src.affine, ijk)))).astype(int)
    drawn.data[tuple(index)] = 2
    expected = np.zeros(src.shape[:3], np.uint8)
    expected[ijk] = 2
    assert_saved_like_source(save(viewer, drawn, tmp_path / "hand.nii.gz"), path, expected)


def test_writer_restores_order_from_a_result_layers_header(tmp_path):
    """No viewer: a result layer's metadata (displayed grid + the image's NIfTI header, as the
    domain selector writes it) is enough to write the sagittal file's own order."""
    from napari_u2net._reader import read_volume

    path = write_scan(tmp_path / "sag.nii.gz", "sagittal")
    ((data, attrs, _),) = read_volume(path)
    meta = attrs["metadata"][META_KEY]
    result_meta = {"affine": meta["affine"], "header": meta["header"], "shape": data.shape, "source": path}
    labels = (data > data.mean()).astype(np.uint8)
    (out,) = write_labels_layer(str(tmp_path / "r.nii.gz"), labels, {"metadata": {META_KEY: result_meta}})
    values = np.asanyarray(nib.load(path).dataobj)
    assert_saved_like_source(out, path, values > values.mean())


def test_radiological_view_of_a_sagittal_scan(make_napari_viewer, qtbot, tmp_path):
    """In the axial view a bright spot at the patient's anterior right shows top left."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -10.0]
    data = np.zeros((41, 41, 21), np.int16)
    data[30:36, 30:36, 8:13] = 1000  # R > 0, A > 0: anterior right
    img = nib.Nifti1Image(data, affine)
    img = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(("P", "S", "R"))))
    nib.save(img, str(tmp_path / "spot.nii.gz"))
    viewer = shown_viewer(make_napari_viewer, qtbot)
    viewer.open(str(tmp_path / "spot.nii.gz"), plugin="napari-u2net")
    viewer.dims.set_point(0, 0.0)  # the axial slice through the spot (S = 0 mm)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).sum(axis=-1)
    rows, cols = np.nonzero(shot > 0.5 * shot.max())
    height, width = shot.shape
    assert rows.mean() < height / 2, "anterior must be up"
    assert cols.mean() < width / 2, "the patient's right must be on the left"


# -- orientation markers (issue #16.9) ------------------------------------------------------------
def test_edge_letters_follow_the_plane_and_the_camera():
    from napari_u2net._orientation import edge_letters

    # axial (A vertical, R horizontal), radiological camera: anterior up, the patient's right left
    assert edge_letters((1, 2), ("up", "left"), 3) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    # napari's default camera (axes grow down and right) on the same plane
    assert edge_letters((1, 2), ("down", "right"), 3) == {"top": "P", "bottom": "A", "left": "L", "right": "R"}
    # coronal (S vertical, R horizontal) and sagittal (S vertical, A horizontal)
    assert edge_letters((0, 2), ("up", "left"), 3) == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    assert edge_letters((0, 1), ("up", "left"), 3) == {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    # a 4D layer (modality, S, A, R): the modality axis on screen has no anatomical name
    assert edge_letters((2, 3), ("up", "left"), 4) == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert edge_letters((0, 3), ("up", "left"), 4) is None


def amber_pixels(shot: np.ndarray) -> np.ndarray:
    """Where the canvas shows the markers' amber (red and green high, blue low)."""
    r, g, b = (shot[..., i].astype(int) for i in range(3))
    return (r > 200) & (g > 150) & (b < 130) & (r - b > 100)


def test_orientation_markers_on_a_sagittal_scan(make_napari_viewer, qtbot, tmp_path):
    """Docking the domain selector sets up the radiological view with R/L, A/P markers drawn at
    the canvas edges; they follow the plane shown and hide in 3D and for layers without anatomy."""
    from napari_u2net._orientation import EDGES, KEY
    from napari_u2net._widget import DomainSelectorWidget

    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1366, 768)
    viewer.window._qt_window.show()
    qtbot.waitExposed(viewer.window._qt_window)
    viewer.window.add_dock_widget(DomainSelectorWidget(viewer, predict_fn=ThresholdPredict()))
    overlays = viewer.canvas.overlays

    def letters():
        return {e: overlays[KEY + e].text for e in EDGES if overlays[KEY + e].visible}

    viewer.add_image(np.zeros((5, 6, 7)), name="plain")  # no geometry of ours: nothing to name
    assert letters() == {}
    viewer.layers.clear()
    viewer.open(write_scan(tmp_path / "sag.nii.gz", "sagittal"), plugin="napari-u2net")
    assert letters() == {"top": "A", "bottom": "P", "left": "R", "right": "L"}  # axial, radiological
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    amber = amber_pixels(shot)
    height, width = amber.shape
    assert amber[:, : width // 10].any(), "the R marker is drawn at the left edge"
    assert amber[: height // 10].any(), "the A marker is drawn at the top edge"
    viewer.dims.order = (1, 0, 2)  # coronal: S vertical, R horizontal
    assert letters() == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    viewer.dims.ndisplay = 3
    assert letters() == {}
    viewer.dims.ndisplay = 2
    assert letters() == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
