"""The domain selector's backend: auto by default, what is missing greyed out with what to
install, and the fast path prepared in the background while a run started meanwhile is eager."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt

from napari_u2net._widget import DomainSelectorWidget
from training.infer import backends
from training.model.modelfile import save_model

from .conftest import adapter_meta, small_net
from .test_plugin_widget import ThresholdPredict, blob_image, make_widget, run_and_wait

pytestmark = pytest.mark.qt


def test_backend_combo_defaults_to_auto_and_greys_what_is_missing(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setattr(backends, "compiler_available", lambda: False)
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    viewer = make_napari_viewer()
    widget = DomainSelectorWidget(viewer, predict_fn=ThresholdPredict())
    viewer.window.add_dock_widget(widget)
    combo = widget.gui.backend_combo
    assert combo.currentData() == "auto" and combo.currentText() == "auto (fastest ready)"
    assert "OpenVINO once it is prepared" in combo.itemData(0, Qt.ToolTipRole)
    qtbot.waitUntil(lambda: widget.warmed_up, timeout=30000)  # after the probe, which imports torch
    for name, needs in (("compiled", "needs a C++ compiler"), ("openvino", "pip install napari-u2net[openvino]")):
        i = combo.findData(name)
        assert not combo.model().item(i).isEnabled(), name
        assert needs in combo.itemData(i, Qt.ToolTipRole)
    assert combo.model().item(combo.findData("torch")).isEnabled()
    assert combo.currentData() == "auto"
    assert not widget.prepares_fast_path  # a stand-in predict runs no backend: nothing to prepare


def real_widget(make_napari_viewer, qtbot, tmp_path, monkeypatch, prepare: bool):
    """A shown viewer with a 24³ scan and the domain selector running the real inference with a
    small model saved in ``tmp_path``, an empty cache of fast paths of its own, and the background
    preparation on or off."""
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("U2NET_PREPARE", "1" if prepare else "0")
    backends.OPENVINO_CACHE.clear()
    net = small_net()
    metas = {n: adapter_meta(net, n, spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16]) for n in net.domains}
    save_model(tmp_path / "model", net, metas, provenance={"made_by": "test"})
    viewer = make_napari_viewer()
    viewer.add_image(blob_image((24, 24, 24)), name="scan")
    return viewer, make_widget(viewer, qtbot, tmp_path / "model", None)  # None: the real inference


@pytest.mark.skipif(not backends.openvino_available(), reason="openvino is not installed")
def test_a_run_while_preparing_is_eager_and_the_next_one_on_openvino(make_napari_viewer, qtbot, tmp_path,
                                                                      monkeypatch):
    """Real inference with a small model: ticking a domain starts its preparation in the
    background (``u2net prepare`` in its own process); a run started meanwhile does not wait and
    runs eager PyTorch; once prepared, the next run is on OpenVINO, with the same labels."""
    viewer, widget = real_widget(make_napari_viewer, qtbot, tmp_path, monkeypatch, prepare=True)
    g = widget.gui
    qtbot.waitUntil(lambda: widget.prep_worker is not None, timeout=30000)  # once the ticks settled
    qtbot.waitUntil(lambda: "Preparing the fast path for ct, once" in g.fast_label.text(), timeout=30000)

    run_and_wait(widget, qtbot, timeout=60000)
    assert widget.prep_worker is not None  # the run did not wait for it
    assert "on torch (auto: the fast path is not prepared for this domain yet)" in g.status_label.text()
    eager = viewer.layers["scan ct"].data.copy()

    qtbot.waitUntil(lambda: widget.prep_worker is None, timeout=120000)
    assert g.fast_label.text() == "Fast path ready: ct now run on OpenVINO"
    assert any((tmp_path / "home").rglob("*.blob"))
    run_and_wait(widget, qtbot, timeout=60000)
    assert "on openvino (auto: fastest here)" in g.status_label.text()
    assert (viewer.layers["scan ct"].data == eager).mean() > 0.999
    backends.OPENVINO_CACHE.clear()


@pytest.mark.skipif(not backends.openvino_available(), reason="openvino is not installed")
def test_precision_control_runs_what_it_says_or_says_why_not(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                              messages):
    """The panel's Precision: auto by default (f32 with nothing prepared); INT8 with nothing
    prepared is refused in one line that names the command to run, and no layer is added;
    bf16 runs on OpenVINO where the CPU has bf16 units and is greyed out where it has none."""
    from training.infer.config import PRECISIONS

    viewer, widget = real_widget(make_napari_viewer, qtbot, tmp_path, monkeypatch, prepare=False)
    qtbot.waitUntil(lambda: widget.warmed_up, timeout=30000)
    combo = widget.gui.precision_combo
    assert [combo.itemData(i) for i in range(combo.count())] == list(PRECISIONS)
    assert combo.currentData() == "auto" and "INT8" in combo.itemData(0, Qt.ToolTipRole)
    bf16 = combo.model().item(combo.findData("bf16"))
    assert bf16.isEnabled() == backends.bf16_supported()

    combo.setCurrentIndex(combo.findData("int8"))
    run_and_wait(widget, qtbot, timeout=60000)
    assert "scan ct" not in viewer.layers
    errors = [text for level, text in messages if level == "error"]
    assert any("u2net prepare --precision int8 --domain ct" in e for e in errors), messages

    if backends.bf16_supported():
        combo.setCurrentIndex(combo.findData("bf16"))
        run_and_wait(widget, qtbot, timeout=60000)
        assert "on openvino (auto: precision bf16 asked for)" in widget.gui.status_label.text()
        assert "scan ct" in viewer.layers
    backends.OPENVINO_CACHE.clear()
