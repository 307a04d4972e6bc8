"""The model both panels of one viewer work on: which model folder is loaded, and the domains the
fine-tune panel adds to it (the panels talk through this, never through each other's widgets)."""

from __future__ import annotations

import weakref
from pathlib import Path

from psygnal import Signal


class ModelSession:
    """The current model folder of one viewer, and what happens to it.

    ``model_changed(folder)``: the domain selector loaded another model. ``domain_added(folder,
    name)``: the fine-tune panel saved a new domain into ``folder``; the selector shows (and ticks) it.
    """

    model_changed = Signal(object)
    domain_added = Signal(object, str)

    def __init__(self) -> None:
        self.model_dir: Path | None = None

    def set_model(self, folder: str | Path) -> None:
        folder = Path(folder)
        if folder != self.model_dir:
            self.model_dir = folder
            self.model_changed.emit(folder)

    def add_domain(self, folder: str | Path, name: str) -> None:
        self.domain_added.emit(Path(folder), name)


_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session_for(viewer) -> ModelSession:
    """The :class:`ModelSession` of ``viewer``, made on first use.

    A per-viewer registry is needed because napari constructs each dock widget separately (from
    the manifest, with only the viewer as argument): the registry is how two panels of the same
    viewer find the same session. Weak keys: a closed viewer takes its session with it.
    """
    session = _SESSIONS.get(viewer)
    if session is None:
        session = _SESSIONS[viewer] = ModelSession()
    return session
