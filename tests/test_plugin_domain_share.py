"""Sharing a domain in the domain selector (shown viewer): its card, Export…, Import… (.u2d files)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt

from napari_u2net import _domain_share
from napari_u2net._widget import DomainSelectorWidget
from tests.conftest import adapter_meta, small_net
from training.io.folders import bundled_model_dir
from training.model.domain_file import export_domain
from training.model.layout import ADAPTER_DIR, TRUNK_FILE, adapter_path, read_header_meta
from training.model.modelfile import save_model

pytestmark = pytest.mark.qt


def _dock(make_napari_viewer, qtbot, model_dir=None, count=None):
    viewer = make_napari_viewer(show=True)
    widget = DomainSelectorWidget(viewer)
    viewer.window.add_dock_widget(widget)
    if model_dir is not None:
        widget.set_model_dir(model_dir)
        qtbot.waitUntil(lambda: widget.model is not None and widget.model_dir == model_dir
                        and widget.gui.domain_list.count() == count, timeout=30000)
    return viewer, widget


def _wait(widget, qtbot, count):
    qtbot.waitUntil(lambda: widget.share.jobs == 0 and widget.model is not None
                    and widget.gui.domain_list.count() == count, timeout=30000)


def _items(widget) -> dict:
    lst = widget.gui.domain_list
    return {lst.item(i).data(Qt.UserRole): lst.item(i) for i in range(lst.count())}


def test_card_export_and_import_through_the_dock(make_napari_viewer, qtbot, model_dir, tmp_path, messages,
                                                monkeypatch):
    _viewer, widget = _dock(make_napari_viewer, qtbot, model_dir, count=2)
    assert "Held-out Dice" in _items(widget)["ct"].toolTip() and "Limits:" in _items(widget)["ct"].toolTip()
    widget.set_checked_domains(["ct"])
    qtbot.mouseClick(widget.gui.card_button, Qt.LeftButton)
    dialog = widget.share.dialog
    assert dialog is not None and dialog.isVisible() and dialog.text_view.isReadOnly()
    assert "Domain: ct" in dialog.text_view.toPlainText() and "Intended use:" in dialog.text_view.toPlainText()
    dialog.close()

    out = tmp_path / "ct.u2d"
    widget.share.export_to(out)
    qtbot.waitUntil(lambda: widget.share.jobs == 0 and out.is_file(), timeout=30000)
    assert messages[-1][0] == "info" and "Exported 'ct'" in messages[-1][1]

    colleague = tmp_path / "colleague"  # same trunk, only mr2
    (colleague / ADAPTER_DIR).mkdir(parents=True)
    shutil.copy2(model_dir / TRUNK_FILE, colleague / TRUNK_FILE)
    shutil.copy2(adapter_path(model_dir, "mr2"), adapter_path(colleague, "mr2"))
    widget.set_model_dir(colleague)
    qtbot.waitUntil(lambda: widget.model_dir == colleague and widget.gui.domain_list.count() == 1, timeout=30000)
    widget.share.import_from(out)
    _wait(widget, qtbot, 2)
    assert widget.checked_domains() == ["ct"] and adapter_path(colleague, "ct").is_file()

    # The button as clicked: the file dialog gives the same file, whose name is taken: renamed on asking.
    monkeypatch.setattr(_domain_share.QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: (str(out), "")))
    monkeypatch.setattr(_domain_share.QInputDialog, "getText", staticmethod(lambda *a, **k: ("ct-copy", True)))
    qtbot.mouseClick(widget.gui.import_button, Qt.LeftButton)
    _wait(widget, qtbot, 3)
    assert widget.checked_domains() == ["ct-copy"] and read_header_meta(adapter_path(colleague, "ct-copy"))["domain"] == "ct-copy"
    assert not [m for m in messages if m[0] == "error"], messages


def test_a_domain_of_another_trunk_is_refused_in_the_dock(make_napari_viewer, qtbot, model_dir, tmp_path, messages):
    other = tmp_path / "other"
    net = small_net(seed=1)
    save_model(other, net, {"mr2": adapter_meta(net, "mr2")})
    export_domain(model_dir, "ct", tmp_path / "ct.u2d")
    _viewer, widget = _dock(make_napari_viewer, qtbot, other, count=1)
    widget.share.import_from(tmp_path / "ct.u2d")
    qtbot.waitUntil(lambda: widget.share.jobs == 0 and any(m[0] == "error" for m in messages), timeout=30000)
    text = next(m[1] for m in messages if m[0] == "error")
    assert read_header_meta(model_dir / TRUNK_FILE)["trunk_hash"] in text
    assert read_header_meta(other / TRUNK_FILE)["trunk_hash"] in text
    assert list(_items(widget)) == ["mr2"] and not adapter_path(other, "ct").exists()
    assert widget.gui.import_button.isEnabled()


def test_importing_into_the_bundled_model_switches_to_yours(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                           messages):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "home"))
    bundled = bundled_model_dir()
    export_domain(bundled, "spleen-ct", tmp_path / "spleen.u2d")
    _viewer, widget = _dock(make_napari_viewer, qtbot)
    qtbot.waitUntil(lambda: widget.model is not None and widget.model_dir == bundled, timeout=30000)
    count = widget.gui.domain_list.count()
    widget.share.import_from(tmp_path / "spleen.u2d", new_name="spleen-2")
    _wait(widget, qtbot, count + 1)
    assert widget.model_dir == tmp_path / "home" / "models" / "user"
    assert widget.gui.model_combo.currentText() == "Yours: user"  # as it is listed after a restart
    assert widget.checked_domains() == ["spleen-2"] and "read-only" in messages[-1][1]
