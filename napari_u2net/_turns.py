"""Inserting result layers a little at a time, so napari's window never freezes for long.

Inserting a layer into a shown napari viewer on 2 cores and a software GL (Xvfb, llvmpipe) holds
the GUI thread for 40-60 ms (its vispy visual, its layer controls, its thumbnail), and the layer's
first draw (shader compilation, texture upload) for 50-60 ms more. Done back to back, with the
selection, the tool overlays and the uncertainty map after them, that was one 130-230 ms freeze
(``bench/bench_ui.py``). Here each piece is a step of its own, and the next step is scheduled
only once the previous one has *finished*: steps given fixed delays up front all came due
together behind a long one and ran in a single turn.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace

from qtpy.QtCore import QTimer

log = logging.getLogger(__name__)

# napari's per-Labels-layer overlays (polygon tool, brush stroke): their vispy visuals are built
# only once visible, and building them was about half of inserting a result layer.
DEFERRED_OVERLAYS = ("polygon", "brush_stroke")
# The pause after a step: it lets the step's paint and pending input through before the next step.
STEP_DELAY_MS = 30


class Turns:
    """GUI steps run in order, each on an event-loop turn of its own, ``delay_ms`` after the
    previous one returned. Its timer is a child of ``parent``: steps left when the widget goes
    are dropped with it. A step that raises is logged and the rest still run (an exception out of
    a Qt slot can abort the whole application under PyQt)."""

    def __init__(self, parent=None, delay_ms: int = STEP_DELAY_MS) -> None:
        self._steps: deque[Callable[[], object]] = deque()
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.setInterval(delay_ms)
        self._timer.timeout.connect(self._next)

    def add(self, *steps: Callable[[], object]) -> None:
        self._steps.extend(steps)
        if self._steps and not self._timer.isActive():
            self._timer.start()

    @property
    def busy(self) -> bool:
        """Steps are still to run (tests and benchmarks wait for this)."""
        return bool(self._steps) or self._timer.isActive()

    def _next(self) -> None:
        try:
            if self._steps:
                self._steps.popleft()()
        except Exception:  # one layer's set-up failing must not stop the others
            log.exception("setting up a result layer failed")
        finally:
            if self._steps:
                self._timer.start()  # counted from now: from the end of the step


class _ControlsOnDemand(dict):
    """napari's layer → controls map that builds a layer's controls when napari first asks for them
    (the user selected or removed a layer whose controls were still to come)."""

    def __init__(self, container, items) -> None:
        super().__init__(items)
        self.container = container

    def __missing__(self, layer):
        self.container._add(SimpleNamespace(value=layer))
        return dict.__getitem__(self, layer)


def _controls_container(viewer):
    """napari's layer-controls panel, its map made to build controls on demand; None when it
    does not exist yet (nothing to defer) or does not look as this module expects."""
    qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
    controls = getattr(qt_viewer, "_controls", None)
    if controls is None or not callable(getattr(controls, "_add", None)):
        return None
    widgets = getattr(controls, "widgets", None)
    if type(widgets) is dict:
        controls.widgets = _ControlsOnDemand(controls, widgets)
    return controls if isinstance(controls.widgets, _ControlsOnDemand) else None


def insert_layer_steps(viewer, index: Callable[[], int | None], layer, select: bool = True) -> list[Callable[[], object]]:
    """The steps of ``viewer.layers.insert(index(), layer)`` (and selecting it), for :class:`Turns`.

    The layer goes in hidden, without its tool overlays and without its layer controls (napari
    slices, uploads and draws nothing for a hidden layer; the controls were a third of an
    insertion). The following steps build its controls, show it, select it and give its overlays
    back one per step. Should the user select or delete the layer before its controls are built,
    they are built when napari looks for them. ``index`` is asked when the insertion runs;
    ``None`` means "do not insert" (what it was to go under has gone).

    This uses napari internals (``LayerList._activate_on_insert``, ``Layer._overlays``, the
    controls panel's ``_add``/``widgets``); a napari without them gets a plainer insertion.
    """
    layers = viewer.layers
    show = bool(layer.visible)
    hidden: list = []
    controls = _controls_container(viewer)

    def build_controls() -> None:
        if controls is not None and layer in layers and layer not in controls.widgets:
            controls._add(SimpleNamespace(value=layer))

    def insert() -> None:
        at = index()
        if at is None:
            return
        overlays = getattr(layer, "_overlays", None)
        try:
            for key in DEFERRED_OVERLAYS:
                overlay = overlays[key] if overlays is not None and key in overlays else None
                if overlay is not None and overlay.visible:
                    overlay.visible = False
                    hidden.append(overlay)
        except Exception:  # noqa: BLE001 - an unknown napari: no deferral
            hidden.clear()
        layer.visible = False
        defer_selection = isinstance(getattr(layers, "_activate_on_insert", None), bool)
        if defer_selection:
            layers._activate_on_insert = False
        with contextlib.ExitStack() as stack:
            if controls is not None:  # built by the next step, or when napari first asks for them
                stack.enter_context(layers.events.inserted.blocker(controls._add))
            try:
                layers.insert(at, layer)
            finally:
                if defer_selection:
                    layers._activate_on_insert = True

    def shown() -> None:
        if layer in layers:
            layer.visible = show

    def select_it() -> None:
        if select and layer in layers:
            layers.selection.active = layer

    def overlays_back() -> None:
        if hidden:
            hidden.pop(0).visible = True

    return [insert, build_controls, shown, select_it, *([overlays_back] * len(DEFERRED_OVERLAYS))]
