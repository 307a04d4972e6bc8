"""A small live training plot (loss and validation Dice) for a dock widget.

matplotlib's Qt canvas; redraws are throttled (at most one every ``min_interval_s``) and use
``draw_idle`` so that a fast stream of reports never keeps the GUI thread busy.
"""

from __future__ import annotations

import time

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QSizePolicy


class TrainingPlot(FigureCanvasQTAgg):
    """Loss per iteration (left axis, log scale) and validation Dice (right axis, 0–1)."""

    def __init__(self, parent=None, min_interval_s: float = 0.25) -> None:
        fig = Figure(figsize=(3.6, 2.2), dpi=90, layout="constrained")
        super().__init__(fig)
        self.setParent(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        self.min_interval_s = min_interval_s
        self.ax = fig.add_subplot(111)
        self.ax_dice = self.ax.twinx()
        self._loss_line, = self.ax.plot([], [], color="#1f77b4", lw=1.0, label="loss")
        self._dice_line, = self.ax_dice.plot([], [], "o-", color="#d62728", ms=3, lw=1.2, label="val Dice")
        self.ax.set_xlabel("iteration", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8, color="#1f77b4")
        self.ax_dice.set_ylabel("Dice", fontsize=8, color="#d62728")
        self.ax_dice.set_ylim(0, 1)
        for a in (self.ax, self.ax_dice):
            a.tick_params(labelsize=7)
        self.iterations: list[int] = []
        self.losses: list[float] = []
        self.val_iterations: list[int] = []
        self.val_dice: list[float] = []
        self._last_draw = 0.0
        self.clear()

    def clear(self, total: int | None = None) -> None:
        self.iterations.clear()
        self.losses.clear()
        self.val_iterations.clear()
        self.val_dice.clear()
        self._total = total
        self._redraw(force=True)

    def add(self, iteration: int, loss: float, val_dice: float | None = None) -> None:
        self.iterations.append(int(iteration))
        self.losses.append(float(loss))
        if val_dice is not None and val_dice == val_dice:
            self.val_iterations.append(int(iteration))
            self.val_dice.append(float(val_dice))
        self._redraw(force=val_dice is not None)

    def flush(self) -> None:
        """Draw whatever came in since the last throttled redraw (call at the end of a run)."""
        self._redraw(force=True)

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s:
            return
        self._last_draw = now
        self._loss_line.set_data(self.iterations, self.losses)
        self._dice_line.set_data(self.val_iterations, self.val_dice)
        right = max(self._total or 0, self.iterations[-1] if self.iterations else 1, 1)
        self.ax.set_xlim(0, right)
        if self.losses:
            lo, hi = min(self.losses), max(self.losses)
            self.ax.set_yscale("log" if lo > 0 and hi / lo > 20 else "linear")
            pad = 0.05 * (hi - lo or abs(hi) or 1)
            self.ax.set_ylim(max(lo - pad, 1e-4) if self.ax.get_yscale() == "log" else lo - pad, hi + pad)
        self.draw_idle()
