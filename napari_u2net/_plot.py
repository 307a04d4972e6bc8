"""A small live training plot (loss and validation Dice) for a dock widget.

matplotlib's Qt canvas. A full redraw of even this small figure costs 100–200 ms on a busy
CPU — a visible freeze if done per report — so the axes are drawn once (x to the planned
iterations, y to the first losses) and each update only *blits* the two lines onto the saved
background (a few ms). The axes are redrawn only when a loss leaves the y range or the widget is
resized.
"""

from __future__ import annotations

import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy

LOSS_COLOR = "#1f77b4"
DICE_COLOR = "#d62728"


class TrainingPlot(FigureCanvasQTAgg):
    """Loss per iteration (left axis) and validation Dice (right axis, 0–1)."""

    def __init__(self, parent=None, min_interval_s: float = 0.2) -> None:
        fig = Figure(figsize=(3.6, 2.2), dpi=90)
        fig.subplots_adjust(left=0.16, right=0.84, bottom=0.2, top=0.93)
        super().__init__(fig)
        self.setParent(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.min_interval_s = min_interval_s
        self.ax = fig.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        self._loss_line, = self.ax.plot([], [], color=LOSS_COLOR, lw=1.0, animated=True)
        self._dice_line, = self.ax_dice.plot([], [], "o-", color=DICE_COLOR, ms=3, lw=1.2, animated=True)
        self.ax.set_xlabel("iteration", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8, color=LOSS_COLOR)
        self.ax_dice.set_ylabel("val Dice", fontsize=8, color=DICE_COLOR)
        self.ax_dice.set_ylim(0, 1)
        for a in (self.ax, self.ax_dice):
            a.tick_params(labelsize=7)
        self.iterations: list[int] = []
        self.losses: list[float] = []
        self.val_iterations: list[int] = []
        self.val_dice: list[float] = []
        self._background = None
        self._last_draw = 0.0
        self._total = None
        self.mpl_connect("draw_event", self._on_draw)
        self.clear()

    def clear(self, total: int | None = None) -> None:
        self.iterations.clear()
        self.losses.clear()
        self.val_iterations.clear()
        self.val_dice.clear()
        self._total = total
        limits = ((0, max(total or 1, 1)), (0, 2.0))  # Dice + cross-entropy starts near 1
        self._update_lines()
        if self._background is not None and (self.ax.get_xlim(), self.ax.get_ylim()) == limits:
            self.restore_region(self._background)  # same axes: no full redraw (a freeze on a busy CPU)
            self.update()  # painted with the next frame; blit() would repaint the window right here
            return
        self.ax.set_xlim(*limits[0])
        self.ax.set_ylim(*limits[1])
        self.draw_idle()

    def record(self, iteration: int, loss: float, val_dice: float | None = None) -> None:
        """Store a point without drawing (``flush`` shows it)."""
        self.iterations.append(int(iteration))
        self.losses.append(float(loss))
        if val_dice is not None and val_dice == val_dice:
            self.val_iterations.append(int(iteration))
            self.val_dice.append(float(val_dice))

    def add(self, iteration: int, loss: float, val_dice: float | None = None) -> None:
        """Store a point and draw (throttled: at most every ``min_interval_s``, always at a validation)."""
        self.record(iteration, loss, val_dice)
        self._refresh(force=val_dice is not None)

    def flush(self) -> None:
        """Show whatever came in since the last throttled update (call at the end of a run)."""
        self._refresh(force=True)

    # -- drawing ---------------------------------------------------------------------------------
    def _update_lines(self) -> None:
        self._loss_line.set_data(self.iterations, self.losses)
        self._dice_line.set_data(self.val_iterations, self.val_dice)

    def _on_draw(self, event=None) -> None:
        """After a full draw: keep the empty axes as background, paint the lines over it."""
        self._background = self.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        self.ax.draw_artist(self._loss_line)
        self.ax_dice.draw_artist(self._dice_line)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self._update_lines()
        top = max(self.losses) if self.losses else 1.0
        right = max(self._total or 0, self.iterations[-1] if self.iterations else 1, 1)
        lo, hi = self.ax.get_ylim()
        if top > hi or hi > 4 * top or right > self.ax.get_xlim()[1] or self._background is None:
            self.ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
            self.ax.set_xlim(0, right)
            self.draw_idle()  # full redraw (rare): the background is taken again in _on_draw
            return
        self.restore_region(self._background)
        self._draw_lines()
        self.update()  # queued paint of the updated buffer (matplotlib's blit() repaints synchronously)
