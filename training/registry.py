"""Resolving a model argument (a directory, a registry name, or nothing) to a model directory."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .resources import bundled_model_dir


def resolve_model(spec: str | Path | None) -> Path:
    """``None`` → the bundled default model; an existing directory → itself."""
    if spec is None:
        path = bundled_model_dir()
        if not path.is_dir():
            raise InputError(
                f"the bundled model is missing ({path}); pass --model MODEL_DIR or reinstall"
            )
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise InputError(f"model {str(spec)!r} is neither a model directory nor a known model name")
