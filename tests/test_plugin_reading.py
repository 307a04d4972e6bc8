"""Issue #16 items 7 and 9: NIfTI/DICOM files open with this plugin without a "choose reader"
prompt, CT opens in a soft-tissue window with presets in the domain selector, the ground truth
is drawn in other colours than a result, and the world axes are labelled anatomically."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_u2net._geometry import META_KEY  # noqa: E402
from napari_u2net._reader import CT_WINDOWS, window_limits  # noqa: E402

pytestmark = pytest.mark.qt


def ct_file(tmp_path, name="ct.nii.gz"):
    """A small CT-like NIfTI (air −1024 HU, soft tissue, bone), 2 × 1.5 × 1.5 mm."""
    data = np.full((20, 24, 16), -1024, np.int16)
    data[4:16, 4:20, 3:13] = 40
    data[8:12, 10:14, 6:10] = 700
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), path)
    return path


@pytest.fixture
def fresh_reader_preferences():
    """The reader preferences as a new napari installation has them (none), restored after."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    saved = dict(plugins.extension2reader)
    plugins.extension2reader = {}
    yield plugins
    plugins.extension2reader = saved


def test_nifti_opens_with_our_reader_without_a_prompt(
    make_napari_viewer, tmp_path, monkeypatch, fresh_reader_preferences
):
    """Before, napari's built-in reader also claims .nii.gz, so File › Open (and drag and drop)
    asked which reader to use, every time. The plugin now prefers itself for its patterns.

    (In napari 0.9 a script's ``viewer.open(path)`` means ``plugin="napari"``: the preference is
    what ``plugin=None`` uses, as the GUI does.)"""
    from napari._qt import qt_viewer as qt_viewer_module
    from napari.errors import MultipleReaderError

    from napari_u2net.__main__ import READER_PATTERNS, prefer_reader

    dialogs: list[list[str]] = []  # the "choose reader" dialog napari would show (and block on)
    monkeypatch.setattr(qt_viewer_module, "handle_gui_reading", lambda paths, *a, **k: dialogs.append(paths))
    viewer = make_napari_viewer()
    path = ct_file(tmp_path)
    with pytest.raises(MultipleReaderError):  # what a user met: napari could not choose
        viewer.open(path, plugin=None)
    viewer.window._qt_viewer._qt_open([str(path)], stack=False)  # File › Open
    assert dialogs and len(viewer.layers) == 0
    dialogs.clear()

    assert set(prefer_reader()) == set(READER_PATTERNS)
    viewer.window._qt_viewer._qt_open([str(path)], stack=False)  # File › Open: no dialog now
    assert not dialogs and len(viewer.layers) == 1
    layers = viewer.open(path, plugin=None)
    assert len(layers) == 1 and META_KEY in layers[0].metadata  # our reader's layer
    for layer in viewer.layers:
        assert META_KEY in layer.metadata
        assert not np.allclose(layer.affine.affine_matrix, np.eye(4))  # the file's geometry
    assert prefer_reader() == []  # already preferred: nothing changes


def test_a_dicom_folder_opens_without_a_prompt_and_other_folders_as_napari_opens_them(
    make_napari_viewer, tmp_path, monkeypatch, fresh_reader_preferences
):
    """Both readers accept folders, so File › Open Folder asked which reader to use for every DICOM
    folder. The plugin is now preferred for folders; a folder without DICOM (here a stack of .npy
    slices) still opens exactly as napari's own reader opens it."""
    from napari._qt import qt_viewer as qt_viewer_module

    from napari_u2net.__main__ import FOLDER_PATTERN, prefer_reader

    from .test_volume import write_dicom_series

    dicom = tmp_path / "series"
    write_dicom_series(dicom, np.arange(6 * 16 * 18, dtype=np.int16).reshape(6, 16, 18) % 500,
                       np.diag([0.8, 0.8, 2.5, 1.0]), "1.2.826.0.1.3680043.2.1125.7")
    stack = tmp_path / "stack"
    stack.mkdir()
    slices = np.random.default_rng(0).random((3, 9, 11)).astype(np.float32)
    for i, plane in enumerate(slices):
        np.save(stack / f"slice{i}.npy", plane)

    dialogs: list[list[str]] = []
    monkeypatch.setattr(qt_viewer_module, "handle_gui_reading", lambda paths, *a, **k: dialogs.append(paths))
    viewer = make_napari_viewer()
    viewer.window._qt_viewer._qt_open([str(dicom)], stack=False)  # File › Open Folder
    assert dialogs and len(viewer.layers) == 0  # before: napari could not choose
    dialogs.clear()

    assert FOLDER_PATTERN in prefer_reader()
    viewer.window._qt_viewer._qt_open([str(dicom)], stack=False)
    assert not dialogs and len(viewer.layers) == 1
    assert META_KEY in viewer.layers[0].metadata and viewer.layers[0].data.size == 6 * 16 * 18
    viewer.layers.clear()
    viewer.window._qt_viewer._qt_open([str(stack)], stack=False)
    assert not dialogs and len(viewer.layers) == 1
    (theirs,) = viewer.open(str(stack), plugin="napari")  # what napari's own reader makes of it
    np.testing.assert_array_equal(np.asarray(viewer.layers[0].data), np.asarray(theirs.data))
    np.testing.assert_array_equal(np.asarray(viewer.layers[0].data), slices)
    assert META_KEY not in viewer.layers[0].metadata


def test_a_preference_for_another_reader_is_kept(fresh_reader_preferences):
    from napari_u2net.__main__ import on_activate

    fresh_reader_preferences.extension2reader = {"*.gz": "napari"}  # the user chose napari for .gz
    on_activate()
    prefs = fresh_reader_preferences.extension2reader
    assert "*.nii.gz" not in prefs and prefs["*.gz"] == "napari"
    assert prefs["*.nii"] == "napari-u2net" and prefs["*.dcm"] == "napari-u2net"


def test_the_manifest_prefers_the_reader_when_the_plugin_is_activated():
    import npe2

    manifest = npe2.PluginManager.instance().get_manifest("napari-u2net")
    assert manifest.on_activate == "napari_u2net.__main__:on_activate"


def test_ct_opens_in_the_soft_tissue_window_and_presets_apply(make_napari_viewer, qtbot, tmp_path):
    from napari_u2net._widget import DomainSelectorWidget

    viewer = make_napari_viewer(show=True)
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert window_limits("soft tissue") == (-160.0, 240.0) and window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("bone") == (-700.0, 1300.0) and window_limits("brain") == (0.0, 80.0)
    (layer,) = viewer.open(ct_file(tmp_path), plugin="napari-u2net")
    assert tuple(layer.contrast_limits) == window_limits("soft tissue")  # not −1024…700
    assert layer.metadata[META_KEY]["modality"] == "CT"
    combo = widget.gui.window_combo
    assert combo.isEnabled() and combo.currentData() == "soft tissue"
    for name in CT_WINDOWS:
        combo.setCurrentIndex(combo.findData(name))
        combo.activated.emit(combo.currentIndex())
        np.testing.assert_allclose(layer.contrast_limits, window_limits(name))
    # an MR image: no window presets
    mr = viewer.add_image(np.random.default_rng(0).random((8, 10, 12), np.float32) * 500, name="mr")
    assert widget.image_layer() is mr and not combo.isEnabled()
    viewer.layers.selection.active = layer
    assert combo.isEnabled() and combo.currentData() == "brain"  # the window it was left in


def test_sample_truth_is_not_drawn_in_the_result_colours():
    from napari_u2net._sample_data import synthetic_ct, synthetic_domain
    from training.data.synth import domain_info

    (_img, img_attrs, _k), (labels, attrs, _kind) = synthetic_ct()
    assert tuple(img_attrs["contrast_limits"]) == window_limits("soft tissue")
    result_colours = {c.lower() for c in domain_info(synthetic_domain()).colors[1:]}
    cmap = attrs["colormap"]
    truth_colours = {tuple(np.round(cmap.map(np.array([i]))[0][:3], 3)) for i in np.unique(labels) if i}
    from napari.utils.colormaps.standardize_color import transform_color

    result_rgb = {tuple(np.round(transform_color(c)[0][:3], 3)) for c in result_colours}
    assert truth_colours and not truth_colours & result_rgb
    assert attrs["metadata"][META_KEY]["reference"] is True


def test_world_axes_are_labelled_anatomically(make_napari_viewer, tmp_path):
    """napari has no anatomical markers: the world axes get S/A/R names when our reader opens a file."""
    viewer = make_napari_viewer()
    viewer.open(ct_file(tmp_path), plugin="napari-u2net")
    assert tuple(viewer.dims.axis_labels[-3:]) == ("S", "A", "R")
