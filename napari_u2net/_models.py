"""The domain selector's model sources: the choices it lists, and the job that downloads and loads one
(no Qt; torch is imported only inside the functions that need it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from training.errors import InputError, U2NetError

log = logging.getLogger(__name__)



@dataclass
class ModelChoice:
    """One entry of the model picker."""

    label: str
    kind: str  # "bundled" | "cached" | "registry" | "user" | "local"
    spec: str | None  # what training.model.registry.resolve_model takes (None = bundled)
    available: bool = True
    description: str = ""
    path: Path | None = None


def model_choices() -> list[ModelChoice]:
    """The bundled model (flagged when missing) and every registry, cached and user-made model
    (:func:`training.model.registry.list_models`, which lists the bundled one only when present)."""
    from training.io.folders import bundled_model_dir
    from training.model.registry import list_models

    try:
        entries = list_models()
    except U2NetError as e:  # an unreadable registry: the bundled model and local folders still work
        log.warning("could not list the registry's models: %s", e)
        entries = []
    choices: list[ModelChoice] = []
    for e in entries:
        if e.source == "bundled":
            choices.append(ModelChoice(f"Bundled: {e.name}", "bundled", None, True, e.description, e.path))
        elif e.source == "cached":
            choices.append(ModelChoice(f"Downloaded: {e.name}", "cached", e.name, True, e.description, e.path))
        elif e.source == "user":
            choices.append(ModelChoice(f"Yours: {e.name}", "user", e.name, True, e.description, e.path))
        else:
            choices.append(ModelChoice(f"Download: {e.name}", "registry", e.name, True, e.description, None))
    if not any(c.kind == "bundled" for c in choices):
        bundled = bundled_model_dir()
        ok = bundled.is_dir()
        label = "Bundled: default" + ("" if ok else " (missing)")
        choices.insert(0, ModelChoice(label, "bundled", None, ok, "the model shipped with napari-u2net", bundled))
    return choices


def resolve_choice(choice: ModelChoice, progress: Callable | None = None) -> Path:
    """The model directory of a choice; registry models are downloaded (with progress) first."""
    if choice.kind == "local":
        return Path(choice.spec)
    if not choice.available:
        raise InputError(
            "the bundled model is not installed in this copy of napari-u2net; pick a registry model "
            "or a local model folder (or run `make model` in a checkout)"
        )
    from training.model.registry import resolve_model

    return Path(resolve_model(choice.spec, progress=progress))


def load_model_cpu(model_dir: Path):
    """Load every adapter of a model directory on the CPU (inference moves it to its device)."""
    from training.model.modelfile import load_model

    from ._warmup import TORCH_LOCK

    with TORCH_LOCK:
        return load_model(model_dir, "cpu")


def load_model_job(choice: ModelChoice) -> Generator[tuple[int, int], None, tuple]:
    """Resolve (download if needed, yielding ``(done, total)`` bytes) and load a model on the CPU.

    Returns ``(model_dir, model)``.
    """
    from ._jobs import iterate_callbacks

    model_dir = yield from iterate_callbacks(lambda cb: resolve_choice(choice, progress=cb))
    return model_dir, load_model_cpu(model_dir)
