"""A progress bar that never paints the window synchronously."""

from __future__ import annotations

from qtpy.QtWidgets import QProgressBar


class ProgressBar(QProgressBar):
    """``QProgressBar`` whose ``setValue`` schedules a paint instead of painting at once.

    Qt's ``setValue`` calls ``repaint()`` whenever the shown value changes; in napari's window that
    repaints the OpenGL canvas too, ≈ 45 ms on 2 cores under Xvfb, inside whatever event handler
    set the value (e.g. right after the result layer was inserted). With updates disabled around
    the call, re-enabling them only queues an ``update()``, which Qt merges into the next paint.
    """

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt's name
        if value == self.value():
            return
        self.setUpdatesEnabled(False)
        try:
            super().setValue(value)
        finally:
            self.setUpdatesEnabled(True)
