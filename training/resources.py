"""Where the files shipped with the package (bundled model, sample data) are found."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL = "default"


def resources_dir() -> Path:
    """``training/resources`` in an installed wheel; the repository's ``resources/`` otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "resources", here.parent / "resources"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"napari-u2net's resources folder is missing (looked in {here / 'resources'} and "
        f"{here.parent / 'resources'}); reinstall the package"
    )


def bundled_model_dir() -> Path:
    return resources_dir() / "models" / BUNDLED_MODEL
