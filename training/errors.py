"""Errors a user can act on (the CLI prints their message as one line; the GUI as a notification),
and the cancel flag that long work checks between steps."""

from __future__ import annotations

import threading
from collections.abc import Callable

# What long work (inference, training) takes to be stopped: an Event, a callable, or None.
CancelFlag = threading.Event | Callable[[], bool] | None


class U2NetError(Exception):
    """Base class: the message names the problem and what to do about it."""


class InputError(U2NetError):
    """An image, label or argument that cannot be used as given."""


class DatasetError(U2NetError):
    """A dataset folder that does not follow the expected layout or content."""


class Cancelled(U2NetError):
    """Work stopped because the user asked; nothing partial was returned or written."""


def is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def check_cancel(cancel: CancelFlag, what: str = "inference") -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set."""
    if is_cancelled(cancel):
        raise Cancelled(f"{what} cancelled; nothing was written")
