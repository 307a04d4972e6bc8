"""Where files live: those shipped with the package (bundled model, registry) and the user's cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from training.errors import InputError

BUNDLED_MODEL = "default"
HOME_ENV = "U2NET_HOME"  # overrides the cache folder (downloads, compiled graphs, user models)


def resources_dir() -> Path:
    """``training/resources`` in an installed wheel; the repository's ``resources/`` otherwise."""
    here = Path(__file__).resolve().parent.parent  # training/
    for candidate in (here / "resources", here.parent / "resources"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"napari-u2net's resources folder is missing (looked in {here / 'resources'} and "
        f"{here.parent / 'resources'}); reinstall the package"
    )


def bundled_model_dir() -> Path:
    return resources_dir() / "models" / BUNDLED_MODEL


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$U2NET_HOME`` if set, else the OS cache folder for napari-u2net."""
    environ = os.environ if environ is None else environ
    if environ.get(HOME_ENV):
        home = Path(environ[HOME_ENV]).expanduser()
        if home.exists() and not home.is_dir():
            raise InputError(f"{HOME_ENV}={home} is a file, not a folder; point it at a folder (or unset it)")
        return home
    import pooch

    return Path(pooch.os_cache("napari-u2net"))
