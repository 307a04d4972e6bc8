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


# The core's stage ids (``training.infer.sliding_window.InferenceProgress.stage``, plus the job's own
# "starting") in the words a radiologist reads on the progress bar. The only place they are mapped.
STAGE_WORDS = {
    "starting": "starting",
    "preprocess": "preparing",
    "sliding-window": "segmenting",
    "tiles": "segmenting",
    "resample": "resampling",
    "postprocess": "cleaning up",
    "done": "done",
}


def stage_words(stage: str | None) -> str:
    """Plain words for a stage id; an unknown id is shown without its hyphens ("working" if empty)."""
    if not stage:
        return "working"
    return STAGE_WORDS.get(stage, stage.replace("-", " ").replace("_", " "))
