"""Both panels docked as the app docks them, in a 1366×768 window (a laptop screen): everything fits.

Before, the two docks stacked their full heights (window minimum ≈ 1400 px), so Train/Stop and the
fine-tune progress ended up below the screen. Now each panel's settings scroll and its buttons,
progress bar and status line stay pinned, visible whatever the dock's height.
"""

from __future__ import annotations

import pytest

pytest.importorskip("napari")

from qtpy.QtCore import QPoint, QRect  # noqa: E402

from napari_u2net.__main__ import PLUGIN  # noqa: E402
from training.io.folders import bundled_model_dir  # noqa: E402

pytestmark = pytest.mark.qt

WIDTH, HEIGHT = 1366, 768


def _both_docks(make_napari_viewer, qtbot):
    """The app's window: the selector docked and the sample opened (as ``python -m napari_u2net``),
    then the Fine-tune panel added from the Plugins menu (napari docks it below the selector)."""
    viewer = make_napari_viewer(show=True)
    _dock, selector = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    viewer.open_sample(PLUGIN, "synthetic_ct")
    _dock, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(WIDTH, HEIGHT)
    if (bundled_model_dir() / "trunk.safetensors").is_file():  # the domain list at its real length
        qtbot.waitUntil(lambda: selector.model is not None and selector.gui.domain_list.count() > 0, timeout=60000)
    qtbot.waitUntil(lambda: finetune.prefill_jobs == 0 and selector.hint_jobs == 0, timeout=20000)
    qtbot.wait(300)  # let the layouts settle
    return viewer, window, selector, finetune


def _fully_shown(widget, window) -> bool:
    """Shown, inside the window, and not clipped by a scroll area or another dock."""
    rect = QRect(widget.mapTo(window, QPoint(0, 0)), widget.size())
    visible = widget.visibleRegion().boundingRect()
    return widget.isVisible() and window.rect().contains(rect) and visible.size() == widget.size()


def test_both_docks_fit_a_1366x768_window(make_napari_viewer, qtbot):
    _viewer, window, selector, finetune = _both_docks(make_napari_viewer, qtbot)
    hint = window.minimumSizeHint()
    assert hint.height() <= HEIGHT and hint.width() <= WIDTH, hint
    assert window.height() <= HEIGHT and window.width() <= WIDTH, window.size()
    s, f = selector.gui, finetune.gui
    key = {"Run": s.run_button, "Cancel": s.cancel_button, "selector progress": s.progress_bar,
           "selector status": s.status_label, "Train": f.train_button, "Stop": f.stop_button,
           "fine-tune progress": f.progress_bar, "fine-tune status": f.status_label}
    hidden = [name for name, w in key.items() if not _fully_shown(w, window)]
    assert not hidden, f"not fully visible in the {WIDTH}×{HEIGHT} window: {hidden}"
    # the rest scrolls: each panel still shows some of its settings, starting with the first choice
    for gui, first in ((s, s.image_combo), (f, f.pairs_layout.itemAt(0).widget())):
        assert gui.scroll.viewport().height() >= 80, gui.scroll.viewport().size()
        assert not first.visibleRegion().isEmpty()


def test_training_scrolls_the_live_plot_into_view(make_napari_viewer, qtbot):
    _viewer, window, _selector, finetune = _both_docks(make_napari_viewer, qtbot)
    plot = finetune.gui.plot
    finetune.gui.show_plot()  # what Train does once the settings are locked
    qtbot.waitUntil(lambda: not plot.visibleRegion().isEmpty(), timeout=5000)
    visible = plot.visibleRegion().boundingRect()
    assert visible.height() >= min(plot.height(), finetune.gui.scroll.viewport().height()) - 1
    assert _fully_shown(finetune.gui.train_button, window)
