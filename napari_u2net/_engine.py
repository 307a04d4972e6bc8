"""The domain selector's engine: model sources, input checks and the segmentation job (no Qt).

The job is a generator (CellSeg3D's config → worker → report pattern): it yields
:class:`RunReport` values while the inference runs and returns ``{domain: labels}``. napari's
``thread_worker`` drives it in a worker thread; tests drive it directly. torch is imported only
inside the functions that need it, so importing this module (and opening the widget) stays fast.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import Cancelled, InputError, U2NetError

DEVICES = ("auto", "cpu", "cuda", "mps")
# Building torch modules in two threads at once was seen to stall for minutes: one load at a time.
_LOAD_LOCK = threading.Lock()


# -- model sources -----------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """One entry of the model picker."""

    label: str
    kind: str  # "bundled" | "cached" | "registry" | "local"
    spec: str | None  # what training.registry.resolve_model takes (None = bundled)
    available: bool = True
    description: str = ""
    path: Path | None = None


def model_choices() -> list[ModelChoice]:
    """The bundled model (flagged when missing) and every registry/cached model."""
    from training.resources import bundled_model_dir

    choices: list[ModelChoice] = []
    try:
        bundled = bundled_model_dir()
    except FileNotFoundError:
        bundled = None
    try:
        from training.registry import list_models
    except ImportError:
        list_models = None
    entries = []
    if list_models is not None:
        try:
            entries = list(list_models())
        except U2NetError:
            entries = []
    seen_bundled = False
    for e in entries:
        source = getattr(e, "source", "registry")
        if source == "bundled":
            seen_bundled = True
            path = Path(e.path) if getattr(e, "path", None) else bundled
            ok = path is not None and Path(path).is_dir()
            label = f"Bundled: {e.name}" + ("" if ok else " (missing)")
            choices.append(ModelChoice(label, "bundled", None, ok, getattr(e, "description", ""), path))
        elif source == "cached":
            choices.append(ModelChoice(f"Downloaded: {e.name}", "cached", e.name, True, e.description, e.path))
        else:
            choices.append(ModelChoice(f"Download: {e.name}", "registry", e.name, True, e.description, None))
    if not seen_bundled:
        ok = bundled is not None and bundled.is_dir()
        label = "Bundled: default" + ("" if ok else " (missing)")
        choices.insert(0, ModelChoice(label, "bundled", None, ok, "the model shipped with napari-u2net", bundled))
    return choices


def resolve_choice(choice: ModelChoice, progress: Callable | None = None) -> Path:
    """The model directory of a choice; registry models are downloaded (with progress) first."""
    if choice.kind == "local":
        return Path(choice.spec)
    if choice.kind == "bundled" and not choice.available:
        raise InputError(
            "the bundled model is not installed in this copy of napari-u2net; pick a registry model "
            "or a local model folder (or run `make model` in a checkout)"
        )
    from training.registry import resolve_model

    try:
        return Path(resolve_model(choice.spec, progress=progress))
    except TypeError:  # a resolve_model without a progress argument
        return Path(resolve_model(choice.spec))


def load_model_cpu(model_dir: Path):
    """Load every adapter of a model directory on the CPU (inference moves it to its device)."""
    from training.modelfile import load_model

    with _LOAD_LOCK:
        return load_model(model_dir, "cpu")


def available_devices() -> dict[str, bool]:
    """Which device names can run here (imports torch: call it from a worker)."""
    import torch

    from training.devices import mps_available

    return {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()), "mps": mps_available()}


# -- input checks --------------------------------------------------------------------------------
def check_case(channels: int, layer_name: str, metas: list) -> None:
    """Refuse a case whose modality count does not fit a chosen domain, before any work starts."""
    for meta in metas:
        need = meta.in_channels
        if need == channels:
            continue
        if need == 1:
            raise InputError(
                f"layer {layer_name!r} is 4D ({channels} volumes) but domain {meta.domain!r} takes one "
                f"{meta.modality} volume; open a single 3D volume (or split the 4D layer with "
                "'Split Stack' and pick one)"
            )
        mods = ", ".join(meta.modalities)
        raise InputError(
            f"domain {meta.domain!r} needs {need} modalities ({mods}) as one 4D layer "
            f"(modality first), but layer {layer_name!r} has {channels}; open a 4D NIfTI with "
            f"exactly these {need} modalities"
        )


# -- the job ---------------------------------------------------------------------------------------
@dataclass
class RunRequest:
    """Everything one segmentation run needs; built on the GUI thread, read in the worker."""

    model: object  # training.modelfile.Model
    data: np.ndarray  # (C, D0, D1, D2)
    affine: np.ndarray  # 4×4
    domains: list[str]
    device: str = "auto"
    overlap: float = 0.5
    postprocess: bool = True
    header: object | None = None
    source: str = ""


@dataclass
class RunReport:
    """Progress of a run: ``fraction`` over all domains, plus the current stage's own numbers."""

    domain: str
    done: int
    total: int
    stage: str
    fraction: float = 0.0
    messages: list[str] = field(default_factory=list)


def default_predict(model, volume, domains, config=None, progress=None, cancel=None):
    from training.inference import predict

    return predict(model, volume, domains, config=config, progress=progress, cancel=cancel)


def make_config(request: RunRequest):
    from training.inference import InferenceConfig

    return InferenceConfig(device=request.device, overlap=request.overlap, postprocess=request.postprocess)


def iterate_callbacks(fn: Callable, stop: Callable | None = None) -> Generator[tuple, None, object]:
    """Run ``fn(callback)`` in a helper thread; yield each callback's arguments; return its result.

    This turns a blocking function with a progress callback into a generator a napari
    ``thread_worker`` can drive. If the consumer closes the generator early, ``stop()`` is called
    and the helper thread is joined before the generator ends; an exception in ``fn`` is re-raised.
    """
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = fn(lambda *args: events.put(("progress", args)))
        except BaseException as e:  # re-raised in the consumer's thread
            outcome["error"] = e
        finally:
            events.put(("end", None))

    thread = threading.Thread(target=target, name="u2net-job", daemon=True)
    thread.start()
    try:
        while True:
            kind, args = events.get()
            if kind == "end":
                break
            yield args
    finally:
        if thread.is_alive():
            if stop is not None:
                stop()
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def drain(gen: Generator):
    """Run a job generator to its end on this thread (tests, scripts); returns its value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def run_segmentation(
    request: RunRequest,
    cancel: threading.Event,
    predict_fn: Callable | None = None,
    config=None,
) -> Generator[RunReport, None, dict[str, np.ndarray]]:
    """Yield :class:`RunReport` while predicting; return ``{domain: labels (D0, D1, D2)}``.

    ``cancel`` is handed to the prediction, which stops at its next tile batch and raises
    :class:`Cancelled`; nothing partial is returned. Closing the generator early sets it too.
    """
    from training.volume import Volume

    predict_fn = predict_fn or default_predict
    if config is None and predict_fn is default_predict:
        config = make_config(request)
    volume = Volume(request.data, request.affine, header=request.header, source=request.source)
    n = max(len(request.domains), 1)
    order = {d: i for i, d in enumerate(request.domains)}

    def job(callback):
        return predict_fn(request.model, volume, list(request.domains), config=config, progress=callback, cancel=cancel)

    yield RunReport("", 0, 0, "starting", 0.0)
    gen = iterate_callbacks(job, stop=cancel.set)
    try:
        while True:
            (p, *_rest) = next(gen)
            domain = getattr(p, "domain", "") or ""
            done, total = int(getattr(p, "done", 0)), int(getattr(p, "total", 0))
            part = done / total if total else 0.0
            fraction = min((order.get(domain, 0) + part) / n, 1.0)
            yield RunReport(domain, done, total, str(getattr(p, "stage", "")), fraction)
    except StopIteration as stop:
        result = stop.value or {}
    finally:
        gen.close()
    if cancel.is_set():
        raise Cancelled("segmentation cancelled; no layer was added")
    missing = [d for d in request.domains if d not in result]
    if missing:
        raise U2NetError(f"the inference returned no labels for {', '.join(missing)}")
    yield RunReport("", 1, 1, "done", 1.0)
    return {d: np.asarray(result[d]) for d in request.domains}


def load_model_job(choice: ModelChoice) -> Generator[tuple[int, int], None, tuple]:
    """Resolve (download if needed, yielding ``(done, total)`` bytes) and load a model on the CPU.

    Returns ``(model_dir, model)``.
    """
    gen = iterate_callbacks(lambda cb: resolve_choice(choice, progress=cb))
    try:
        while True:
            args = next(gen)
            done, total = _progress_numbers(args)
            yield done, total
    except StopIteration as stop:
        model_dir = stop.value
    return model_dir, load_model_cpu(model_dir)


def _progress_numbers(args: tuple) -> tuple[int, int]:
    """Accept ``cb(done, total)``, ``cb(obj)`` with done/total attributes, or anything else."""
    if len(args) >= 2 and all(isinstance(a, (int, float)) for a in args[:2]):
        return int(args[0]), int(args[1] or 0)
    if args:
        obj = args[0]
        return int(getattr(obj, "done", 0) or 0), int(getattr(obj, "total", 0) or 0)
    return 0, 0


@dataclass
class Failure:
    """A job's exception, *returned* rather than raised: napari's workers would otherwise show
    every exception with its traceback; the widget turns this into a plain notification."""

    error: BaseException


def guarded(job: Callable, *args, **kwargs) -> Generator:
    """Run a job generator; an exception becomes a returned :class:`Failure`."""
    try:
        return (yield from job(*args, **kwargs))
    except Exception as e:
        return Failure(e)


def guarded_call(fn: Callable, *args, **kwargs):
    """Call ``fn``; an exception becomes a returned :class:`Failure`."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        return Failure(e)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__
    return name in ("OutOfMemoryError",) or "out of memory" in str(error).lower()


def user_message(error: BaseException) -> tuple[str, str]:
    """(level, text) for a notification: our errors say what to do; others get a generic hint."""
    if isinstance(error, Cancelled):
        return "info", str(error) or "cancelled; nothing was added"
    if isinstance(error, U2NetError):
        return "error", str(error)
    if is_out_of_memory(error):
        return "error", (
            "out of memory even after falling back to fewer tiles and CPU accumulation; "
            "choose the CPU device, lower the overlap, close other programs, or crop the volume"
        )
    return "error", (
        f"segmentation failed unexpectedly ({type(error).__name__}: {error}); "
        "the details are in napari's log — please report them"
    )
