"""Preparing the fast CPU path (OpenVINO) of a domain ahead of its runs, and when that pays off.

The ``auto`` backend (:func:`training.infer.backends.resolve_backend`) only takes a fast path that
is ready: converting a domain's network to OpenVINO costs seconds to a minute once, and a run
must never wait for it unasked. This module builds it on purpose: ``u2net prepare``, the plugin's
background preparation (a separate process, so napari's event loop never waits for the
conversion), and ``u2net predict`` for a scan big enough that converting first is faster overall
(:func:`worth_preparing`).

Measured (``bench/bench_inference.py --case prepare``; the 2-core development machine, shared):
converting a shipped domain of the bundled model takes 4.6–18 s, and converting first pays off
(conversion / (eager tile − OpenVINO tile)) from 9 (``mni152-brain``) to 21 tiles (``heart-mr``),
median 16. :data:`PAYS_OFF_TILES` is set near the top of that range, so that a scan converted for
is at worst a few percent slower than eager, and every bigger one faster; the conversion also
serves every later run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.errors import InputError
from training.infer.backends import (
    OPENVINO_CACHE,
    OPENVINO_HINT,
    _weights_key,
    compile_openvino,
    openvino_available,
    openvino_ready,
)
from training.io.devices import default_batch_size, resolve_device

# a scan of at least this many tiles (per domain) is worth converting for before the run
PAYS_OFF_TILES = 20


@dataclass
class Prepared:
    """One domain's fast path: ``seconds`` it took now (``was_ready``: it was there already)."""

    domain: str
    backend: str
    seconds: float
    was_ready: bool


def cpu_batch(batch_size: int | None) -> int:
    """Tiles per batch on the CPU: what a run with this setting uses (the graph is fixed to it)."""
    return batch_size or default_batch_size(torch.device("cpu"))


def needs_preparing(model, domain: str, device: str = "auto", batch_size: int | None = None) -> bool:
    """True when an ``auto`` run of ``domain`` would be on eager torch only because its OpenVINO
    graph is not built yet (on the CPU, OpenVINO installed)."""
    if not openvino_available() or resolve_device(device).type != "cpu":
        return False
    patch = tuple(model.meta(domain).patch_size)
    try:
        return not openvino_ready(model.net, domain, patch, cpu_batch(batch_size))
    except (OSError, InputError):  # no usable cache folder: nothing to keep a prepared graph in
        return False


def prepare_domain(model, domain: str, batch_size: int | None = None,
                   progress: Callable[[str], None] | None = None) -> Prepared:
    """Build (or find) ``domain``'s OpenVINO graph for CPU runs with ``batch_size`` tiles per batch,
    on disk and in this process; ``progress(stage)`` hears "converting", "compiling", "loading"."""
    if not openvino_available():
        raise InputError(f"the fast CPU path needs OpenVINO; {OPENVINO_HINT}")
    meta = model.meta(domain)
    patch, batch = tuple(int(p) for p in meta.patch_size), cpu_batch(batch_size)
    weights = _weights_key(model.net, domain)
    was_ready = openvino_ready(model.net, domain, patch, batch, weights)
    start = time.perf_counter()
    OPENVINO_CACHE.get(
        (weights, domain, patch, batch),
        lambda: compile_openvino(model.net, domain, meta.in_channels, patch, batch, weights, progress=progress),
    )
    return Prepared(domain, "openvino", time.perf_counter() - start, was_ready)


def worth_preparing(tiles: int | None) -> bool:
    """Convert before the run when the scan has enough tiles for it to pay off (unknown: yes)."""
    return tiles is None or tiles >= PAYS_OFF_TILES
