"""What both dock panels share: a scrolling body above controls pinned at the bottom, and following
the layers the user opens, renames and selects."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)


class VerticalScrollArea(QScrollArea):
    """Scrolls its content vertically only: as wide as the content needs, and as tall as the dock
    allows (down to ``min_height``), so a dock shares a small screen without pushing the window."""

    def __init__(self, body: QWidget, min_height: int = 80, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.min_height = min_height
        self.setWidget(body)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
        body.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:
        # the content's size hints changed (e.g. a longer model name): let the dock re-read ours,
        # or the content would be wider than the area and clipped on the right
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _extra_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:
        return QSize(self.widget().minimumSizeHint().width() + self._extra_width(), self.min_height)

    def sizeHint(self) -> QSize:
        # at most ~18 lines tall: when a second panel is docked below, napari's window then shares
        # the height between both instead of leaving the newcomer only its minimum
        hint = self.widget().sizeHint()
        height = min(hint.height() + 2 * self.frameWidth(), 18 * self.fontMetrics().lineSpacing())
        return QSize(hint.width() + self._extra_width(), height)


class ScrollingPanel(QWidget):
    """A panel whose settings (``body_layout``) scroll, while its footer (:meth:`add_footer`: start
    and stop buttons, progress bar, status line) stays visible whatever the dock's height."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # fill the dock (napari adds a stretch below a panel that does not want vertical space)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
        self.root = QVBoxLayout(self)
        self.root.setContentsMargins(0, 0, 0, 0)
        self.root.setSpacing(4)
        body = QWidget()
        self.body_layout = QVBoxLayout(body)
        self.body_layout.setContentsMargins(6, 6, 6, 0)
        self.scroll = VerticalScrollArea(body, min_height=90)
        self.root.addWidget(self.scroll, stretch=1)


    def add_footer(self, start: str, stop: str, status_lines: int) -> tuple:
        """Pin (start button, stop button, progress bar, status label) below the scroll area.

        The status line has room for ``status_lines`` lines from the start, so that a longer
        message never resizes the dock (and with it napari's canvas: a full repaint)."""
        from ._progress_bar import ProgressBar

        footer = QVBoxLayout()
        footer.setContentsMargins(6, 0, 6, 6)
        self.root.addLayout(footer)
        buttons = QHBoxLayout()
        start_button, stop_button = QPushButton(start), QPushButton(stop)
        stop_button.setEnabled(False)
        buttons.addWidget(start_button)
        buttons.addWidget(stop_button)
        footer.addLayout(buttons)
        bar = ProgressBar()
        bar.setRange(0, 1000)
        bar.setValue(0)  # (a bar without a value shows no text)
        bar.setTextVisible(True)
        bar.setFormat("idle")
        footer.addWidget(bar)
        status = QLabel("")
        status.setWordWrap(True)
        status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        status.setMinimumHeight(status_lines * status.fontMetrics().lineSpacing())
        status.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        footer.addWidget(status)
        return start_button, stop_button, bar, status


def follow_layers(viewer, refresh: Callable[[], None], follow: Callable[[object], bool]) -> None:
    """Call ``refresh`` whenever a layer is added, removed or renamed, and ``follow(layer)`` for a
    layer the user opens or selects in the layer list (the panel decides whether to take it)."""

    def changed(event) -> None:
        inserted = event.value if event.type == "inserted" else None
        if inserted is not None:
            inserted.events.name.connect(refresh)
        refresh()
        if inserted is not None:
            follow(inserted)

    def active(event) -> None:
        if event.value is not None:
            follow(event.value)

    viewer.layers.events.inserted.connect(changed)
    viewer.layers.events.removed.connect(changed)
    viewer.layers.selection.events.active.connect(active)
    for layer in viewer.layers:
        layer.events.name.connect(refresh)
