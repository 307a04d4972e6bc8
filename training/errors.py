"""Errors a user can act on. The CLI prints their message as one line; the GUI as a notification."""


class U2NetError(Exception):
    """Base class: the message names the problem and what to do about it."""


class InputError(U2NetError):
    """An image, label or argument that cannot be used as given."""


class DatasetError(U2NetError):
    """A dataset folder that does not follow the expected layout or content."""


class Cancelled(U2NetError):
    """Work stopped because the user asked; nothing partial was returned or written."""
