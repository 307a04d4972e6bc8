"""Issue #17.4: the uncertainty layer and the Measurements dock, in a shown viewer (Xvfb).

A stand-in predict (a threshold, with class probabilities and an uncertainty map as the core
returns them when asked) feeds the real domain selector; the dock must list each structure's volume
(voxels × voxel volume of the image's own grid), the model's expected volume and interval, and
follow a hand edit with the brush; its CSV export must hold what it shows.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_u2net._measurements import MeasurementsWidget  # noqa: E402

from .test_plugin_widget import ThresholdPredict, blob_image, make_widget, run_and_wait  # noqa: E402

pytestmark = pytest.mark.qt

SCALE = (2.0, 1.5, 1.0)  # mm: one voxel is 3 mm³ = 0.003 mL
VOXEL_ML = 0.003


def probabilities(img):
    p = np.where(img > img.mean(), 0.8, 0.1)
    return np.stack([1 - p, p]).astype(np.float16)


def uncertainty(img):
    return np.where(img > img.mean(), 0.7, 0.3).astype(np.float16)


def cell(widget, row: int, column: str) -> str:
    from napari_u2net._measurements import COLUMNS

    return widget.table.item(row, COLUMNS.index(column)).text()


@pytest.fixture
def segmented(make_napari_viewer, qtbot, model_dir):
    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1366, 768)
    viewer.window._qt_window.show()
    qtbot.waitExposed(viewer.window._qt_window)
    viewer.add_image(blob_image(), name="scan", scale=SCALE)
    predict = ThresholdPredict(maps={"probabilities": probabilities, "uncertainty": uncertainty})
    widget = make_widget(viewer, qtbot, model_dir, predict)
    widget.gui.uncertainty_check.setChecked(True)
    dock = MeasurementsWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Measurements")
    run_and_wait(widget, qtbot)
    qtbot.waitUntil(lambda: "scan ct uncertainty" in viewer.layers, timeout=5000)  # follows its result
    return viewer, widget, dock, predict


def test_uncertainty_layer_and_measurements_of_a_result(segmented):
    viewer, _widget, dock, predict = segmented
    config = predict.calls[-1]["config"]
    assert config.uncertainty and config.probabilities  # the checkbox asks the core for both
    layer = viewer.layers["scan ct uncertainty"]
    assert layer.colormap.name == "inferno" and tuple(layer.contrast_limits) == (0.0, 1.0)
    assert layer.blending == "additive"
    np.testing.assert_array_equal(layer.affine.affine_matrix, viewer.layers["scan"].affine.affine_matrix)
    np.testing.assert_array_equal(layer.scale, viewer.layers["scan"].scale)
    assert "scan ct probabilities" not in viewer.layers  # only the measurements use them

    img = blob_image()
    inside = img > img.mean()
    assert dock.table.rowCount() == 2  # the result's row, then its structure
    assert dock.table.item(0, 0).text() == "scan ct" and cell(dock, 1, "Structure") == "class1"
    assert float(cell(dock, 1, "Volume (mL)")) == pytest.approx(inside.sum() * VOXEL_ML, abs=0.05)
    expected = (0.8 * inside.sum() + 0.1 * (~inside).sum()) * VOXEL_ML
    shown, interval = cell(dock, 1, "Model (mL)").rstrip(")").split(" (")
    assert float(shown) == pytest.approx(expected, abs=0.05)
    low, high = (float(v) for v in interval.split("–"))
    assert low < expected < high
    mean = float(cell(dock, 1, "Mean ± SD").split(" ± ")[0])
    assert mean == pytest.approx(img[inside].mean(), abs=0.5)


def test_measurements_follow_a_hand_edit_and_export_csv(segmented, qtbot, tmp_path):
    viewer, _widget, dock, _predict = segmented
    labels = viewer.layers["scan ct"]
    before = int((labels.data == 1).sum())
    model_before = cell(dock, 1, "Model (mL)")
    labels.brush_size = 3
    labels.paint((0, 0, 0), 1)  # a brush stroke in a corner, outside the structure
    after = int((labels.data == 1).sum())
    assert after > before
    qtbot.waitUntil(lambda: dock.table.item(0, 0).text() == "scan ct (edited)", timeout=10000)
    assert float(cell(dock, 1, "Volume (mL)")) == pytest.approx(after * VOXEL_ML, abs=0.05)
    assert cell(dock, 1, "Model (mL)") == model_before  # the model's figure stays the model's

    written = dock.export_csv(tmp_path / "volumes.csv")
    with open(written, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    assert (rows[0]["case"], rows[0]["domain"], rows[0]["name"]) == ("scan", "ct", "class1")
    assert int(rows[0]["voxels"]) == after
    assert float(rows[0]["volume_ml"]) == pytest.approx(after * VOXEL_ML)

    viewer.layers.remove(labels)
    assert dock.table.rowCount() == 0
