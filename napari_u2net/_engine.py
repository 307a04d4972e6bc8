"""The domain selector's engine: model sources, input checks and the segmentation job (no Qt).

The job is a generator (CellSeg3D's config → worker → report pattern): it yields
:class:`RunReport` values while the inference runs and returns ``{domain: labels}``. napari's
``thread_worker`` drives it in a worker thread; tests drive it directly. torch is imported only
inside the functions that need it, so importing this module (and opening the widget) stays fast.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import Cancelled, InputError, U2NetError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
# Building torch modules in two threads at once was seen to stall for minutes: one load at a time.
_LOAD_LOCK = threading.Lock()


# -- model sources -----------------------------------------------------------------------------
@dataclass
class ModelChoice:
    """One entry of the model picker."""

    label: str
    kind: str  # "bundled" | "cached" | "registry" | "local"
    spec: str | None  # what training.model.registry.resolve_model takes (None = bundled)
    available: bool = True
    description: str = ""
    path: Path | None = None


def model_choices() -> list[ModelChoice]:
    """The bundled model (flagged when missing) and every registry/cached model."""
    from training.io.folders import bundled_model_dir

    choices: list[ModelChoice] = []
    try:
        bundled = bundled_model_dir()
    except FileNotFoundError:
        bundled = None
    try:
        from training.model.registry import list_models
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
    from training.model.registry import resolve_model

    try:
        return Path(resolve_model(choice.spec, progress=progress))
    except TypeError:  # a resolve_model without a progress argument
        return Path(resolve_model(choice.spec))


def load_model_cpu(model_dir: Path):
    """Load every adapter of a model directory on the CPU (inference moves it to its device)."""
    from training.model.modelfile import load_model

    with _LOAD_LOCK:
        return load_model(model_dir, "cpu")


def available_devices() -> dict[str, bool]:
    """Which device names can run here (imports torch: call it from a worker)."""
    import torch

    from training.io.devices import mps_available

    return {"auto": True, "cpu": True, "cuda": bool(torch.cuda.is_available()), "mps": mps_available()}


def warm_up(kind: str = "inference") -> None:
    """Import now, from a background worker, what the first run would otherwise import mid-run.

    Executing a module's code holds the GIL, so an import inside a segmentation or training
    worker freezes napari's event loop. Measured on 2 cores: SimpleITK (first resampling)
    ≈ 330 ms of stalls at the first run; torch._dynamo (pulled in by the optimizer) ≈ 200 ms and
    nibabel + ITK's first filter ≈ 120 ms at the first Train; vispy's dash patterns ≈ 65 ms inside
    the first Labels layer insertion.
    """
    import nibabel  # noqa: F401  (training.io.resample imports both lazily)
    import SimpleITK  # noqa: F401

    import training.infer.pipeline  # noqa: F401
    import training.infer.postprocess  # noqa: F401
    from training.io.resample import canonical_orientation, resample

    # ITK's first filter run sets up its factories and thread pool with the GIL held (≈ 75 ms).
    eye = np.eye(4)
    canonical_orientation(eye)
    resample(np.zeros((4, 4, 4), np.float32), eye, eye, (4, 4, 4))
    resample(np.zeros((4, 4, 4), np.uint8), eye, eye, (4, 4, 4), linear=False)

    if kind == "training":
        import torch

        import training.train.adaptation  # noqa: F401
        import training.train.runs  # noqa: F401

        # One optimizer step finishes torch's lazy set-up (torch._dynamo, fused kernels' checks).
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=1e-3)
        p.sum().backward()
        opt.step()
    _warm_vispy_dash_patterns()


def _warm_vispy_dash_patterns() -> None:
    """Fill vispy's process-wide cache of line dash patterns (pure numpy, ≈ 65 ms); napari
    builds them for the polygon overlay of the first Labels layer otherwise, on the GUI thread."""
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas

        DashAtlas()
    except Exception:  # a vispy without this module: only the first insertion is slower
        pass


def probe_and_warm(kind: str = "inference") -> dict[str, bool]:
    """:func:`available_devices`, then :func:`warm_up` (one background job when a panel opens)."""
    devices = available_devices()
    try:
        warm_up(kind)
    except Exception as e:  # only a speed-up: the run itself reports real problems
        log.warning("warm-up imports failed: %s", e)
    return devices


# -- input checks --------------------------------------------------------------------------------
def guess_modality(data) -> str | None:
    """"CT" when an image holds air in Hounsfield units (≤ −500), "MR" when it has no negative
    values, None otherwise (or for lazy arrays, not read for a guess); from every 4th row and
    column (a few ms on a large scan)."""
    if not isinstance(data, np.ndarray):
        return None
    sample = data[..., ::4, ::4]
    if sample.size == 0:
        return None
    low = float(np.nanmin(sample))
    return "CT" if low <= -500 else "MR" if low >= 0 else None


def layer_channels(data) -> int:
    """Volumes in an image layer: a 4D layer is modality-first (as the reader opens it)."""
    return int(data.shape[0]) if data.ndim == 4 else 1


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

    model: object  # training.model.modelfile.Model
    data: np.ndarray  # (C, D0, D1, D2)
    affine: np.ndarray  # 4×4
    domains: list[str]
    device: str = "auto"
    overlap: float = 0.5
    postprocess: bool = True
    header: object | None = None
    source: str = ""
    threads: int | None = None  # CPU threads for torch; None = all cores but one (the GUI's)
    # Run the inference in a spawned child process instead of a thread (the model is reloaded
    # there from its folder). Off by default: measured here it gave no smoother GUI than a
    # thread, and the child's start-up (importing torch) costs seconds.
    subprocess: bool = False


def worker_threads(requested: int | None) -> int:
    """CPU threads for inference: leave one core to napari's event loop unless told otherwise."""
    if requested:
        return max(1, int(requested))
    return max(1, (os.cpu_count() or 2) - 1)


def lower_thread_priority(increment: int = 10) -> None:
    """Nice the calling thread (Linux: per thread) so napari's event loop wins the CPU from it.

    With one torch thread the convolutions run on this very thread, so the GUI thread is
    scheduled first whenever it has work. Best effort: ignored where unsupported.
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        pass


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
    from training.infer.pipeline import predict

    return predict(model, volume, domains, config=config, progress=progress, cancel=cancel)


def make_config(request: RunRequest):
    from training.infer.pipeline import InferenceConfig

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


def _child_predict(model_dir, domains, data, affine, header, source, config, threads, events, cancel) -> None:
    """Child-process side of :func:`predict_in_subprocess` (module level: spawn pickles it by name)."""
    try:
        import torch

        torch.set_num_threads(threads)
        from training.infer.pipeline import predict
        from training.io.volume import Volume
        from training.model.modelfile import load_model

        model = load_model(model_dir, "cpu", domains=list(domains))
        volume = Volume(data, affine, header=header, source=source)

        def progress(p) -> None:
            events.put(("progress", (p.domain, int(p.done), int(p.total), str(p.stage))))

        result = predict(model, volume, list(domains), config=config, progress=progress, cancel=cancel.is_set)
        events.put(("result", {d: np.asarray(v) for d, v in result.items()}))
    except BaseException as e:  # sent to the parent; a type that does not pickle is sent as text
        try:
            import pickle

            pickle.dumps(e)
            events.put(("error", e))
        except Exception:
            events.put(("error", U2NetError(f"{type(e).__name__}: {e}")))


@dataclass
class _Progress:
    domain: str
    done: int
    total: int
    stage: str


def predict_in_subprocess(request: RunRequest, config, progress: Callable, cancel: threading.Event) -> dict:
    """:func:`training.infer.pipeline.predict` in a spawned child process, with progress and cancel."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    stop = ctx.Event()
    args = (
        str(request.model.path), list(request.domains), np.ascontiguousarray(request.data),
        np.asarray(request.affine), request.header, request.source, config,
        worker_threads(request.threads), events, stop,
    )
    child = ctx.Process(target=_child_predict, args=args, name="u2net-predict", daemon=True)
    child.start()
    try:
        while True:
            if cancel.is_set():
                stop.set()
            try:
                kind, payload = events.get(timeout=0.05)
            except queue.Empty:
                if not child.is_alive():
                    raise U2NetError(
                        f"the inference process ended unexpectedly (exit code {child.exitcode}); "
                        "this is often too little memory: choose a smaller volume or close other programs"
                    ) from None
                continue
            if kind == "progress":
                progress(_Progress(*payload))
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        stop.set()
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()


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
    from training.io.volume import Volume

    predict_fn = predict_fn or default_predict
    if config is None and predict_fn is default_predict:
        config = make_config(request)
    volume = Volume(request.data, request.affine, header=request.header, source=request.source)
    n = max(len(request.domains), 1)
    order = {d: i for i, d in enumerate(request.domains)}

    in_child = request.subprocess and predict_fn is default_predict and getattr(request.model, "path", None)

    def job(callback):
        lower_thread_priority()
        if in_child:
            return predict_in_subprocess(request, config, callback, cancel)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(worker_threads(request.threads))
        try:
            return predict_fn(
                request.model, volume, list(request.domains), config=config, progress=callback, cancel=cancel
            )
        finally:
            torch.set_num_threads(before)

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
    result = getattr(result, "labels", result)  # interim: a Prediction from the core
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
