"""The domain selector's segmentation job, on the core's own types (no Qt).

The GUI builds a :class:`training.io.volume.Volume` and a :class:`training.infer.config.InferenceConfig`
and hands them over unchanged in a :class:`RunRequest`; the job yields :class:`RunReport` values
while :func:`training.infer.pipeline.predict` runs and returns its
:class:`~training.infer.result.Prediction`. torch is imported only inside the job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from training.errors import Cancelled, InputError, U2NetError
from training.infer.config import InferenceConfig
from training.io.volume import Volume

from ._jobs import iterate_callbacks

log = logging.getLogger(__name__)


@dataclass
class RunRequest:
    """Everything one segmentation run needs; built on the GUI thread, read in the worker."""

    model: object  # training.model.modelfile.Model
    volume: Volume  # its data may still be lazy (read in the worker)
    domains: list[str]
    config: InferenceConfig = field(default_factory=InferenceConfig)
    threads: int | None = None  # CPU threads for torch; None = all cores but one (the GUI's)


@dataclass
class RunReport:
    """Progress of a run: ``fraction`` over all domains, plus the current stage's own numbers."""

    domain: str
    done: int
    total: int
    stage: str
    fraction: float = 0.0
    backend: str = ""  # at the start: what runs the network and why ("openvino (auto: fastest here)")


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


def _backend_note(request: RunRequest, domains: list[str]) -> str:
    """What the run's backend setting takes for these domains now (empty if it cannot say:
    the run itself reports a bad device or a missing backend)."""
    from ._fastpath import backend_choices, describe

    try:
        return describe(backend_choices(request.model, domains, request.config))
    except Exception as e:  # noqa: BLE001 - only a note
        log.debug("no backend note: %s", e)
        return ""


def run_segmentation(request: RunRequest, cancel: threading.Event, predict_fn: Callable | None = None):
    """Yield :class:`RunReport` while predicting; return the core's :class:`Prediction`.

    ``predict_fn`` replaces :func:`training.infer.pipeline.predict` (same signature; tests,
    benchmarks). ``cancel`` is handed to the prediction, which stops at its next tile batch and
    raises :class:`Cancelled`; nothing partial is returned. Closing the generator early sets it too.
    """
    if predict_fn is None:
        from training.infer.pipeline import predict as predict_fn
    volume = request.volume
    if not isinstance(volume.data, np.ndarray):  # a lazy (dask, zarr) layer: read it here, not on the GUI thread
        volume = dataclasses.replace(volume, data=np.asarray(volume.data))
    domains = list(request.domains)
    order = {d: i for i, d in enumerate(domains)}
    n = max(len(domains), 1)

    def job(callback):
        import torch

        lower_thread_priority()
        before = torch.get_num_threads()
        torch.set_num_threads(worker_threads(request.threads))
        try:
            return predict_fn(request.model, volume, domains, config=request.config, progress=callback, cancel=cancel)
        finally:
            torch.set_num_threads(before)

    yield RunReport("", 0, 0, "starting", 0.0, backend=_backend_note(request, domains))
    gen = iterate_callbacks(job, stop=cancel.set)
    try:
        while True:
            (p,) = next(gen)  # an InferenceProgress
            part = p.done / p.total if p.total else 0.0
            fraction = min((order.get(p.domain, 0) + part) / n, 1.0)
            yield RunReport(p.domain, int(p.done), int(p.total), p.stage, fraction)
    except StopIteration as stop:
        prediction = stop.value
    finally:
        gen.close()
    if cancel.is_set():
        raise Cancelled("segmentation cancelled; no layer was added")
    missing = [d for d in domains if d not in prediction.results]
    if missing:
        raise U2NetError(f"the inference returned no labels for {', '.join(missing)}")
    yield RunReport("", 1, 1, "done", 1.0)
    return prediction
