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

It also makes the reduced precisions: ``bf16`` (the f32 graph compiled with bf16 inference
precision) and ``int8``: the f32 graph quantised by NNCF on calibration tiles (synthetic cases of a
shipped domain, or the user's scans), then checked on whole cases
(:func:`training.infer.quantize.check_int8`): held-out synthetic cases against their truth, or
the user's last scan (held out when there are several) against f32's labels.
The verdict is kept beside the graph; an INT8 graph the check refused is not kept, and no run
takes it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.errors import InputError
from training.infer.backends import (
    OPENVINO_CACHE,
    OPENVINO_HINT,
    OpenVINOFiles,
    _convert,
    _discard,
    _intact,
    _save_blob,
    _weights_key,
    bf16_supported,
    compile_openvino,
    openvino_available,
    openvino_ready,
    read_verdict,
    save_openvino_ir,
    write_verdict,
)
from training.infer.config import validate_precision
from training.io.devices import default_batch_size, resolve_device

# a scan of at least this many tiles (per domain) is worth converting for before the run
PAYS_OFF_TILES = 20
CALIBRATION_TILES = 64  # tiles NNCF calibrates INT8 on (its default subset is 300; 64 is minutes on a CPU)
CHECK_CASES = 4  # held-out synthetic cases the INT8 graph is checked on

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One domain's fast path: ``seconds`` it took now (``was_ready``: it was there already)."""

    domain: str
    backend: str
    seconds: float
    was_ready: bool
    precision: str = "f32"
    verdict: dict | None = None  # INT8: the check (accepted, agreement, speedup, why, …)


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
                   progress: Callable[[str], None] | None = None, precision: str = "f32",
                   calibration: Sequence | None = None, truth=None, calibration_tiles: int = CALIBRATION_TILES,
                   check: int = CHECK_CASES, max_drop: float | None = None, min_speedup: float = 1.0) -> Prepared:
    """Build (or find) ``domain``'s OpenVINO graph for CPU runs with ``batch_size`` tiles per batch,
    on disk and in this process; ``progress(stage)`` hears "converting", "compiling", "loading"
    (and for INT8 "calibrating", "quantising", "checking").

    ``precision`` "int8" quantises the graph (``calibration``: the user's scans, as Volumes, for a
    domain without synthetic cases; ``truth``: a label Volume of the last of them, which the check
    then scores against) and keeps it only if :func:`~training.infer.quantize.check_int8`
    accepts it (``check`` synthetic cases; ``max_drop``: its Dice bar, by default
    :data:`~training.infer.quantize.MAX_DICE_DROP`); the result's ``verdict`` says how it went. An INT8 verdict already on disk is
    reported as it is unless new ``calibration`` scans are given."""
    if not openvino_available():
        raise InputError(f"the fast CPU path needs OpenVINO; {OPENVINO_HINT}")
    validate_precision(precision)
    if precision == "auto":
        raise InputError("prepare a precision: f32, bf16 or int8 (auto is what a run chooses among them)")
    if calibration and precision != "int8":
        raise InputError("calibration scans are for --precision int8 only")
    if truth is not None and not calibration:
        raise InputError("labels for the INT8 check go with the scan they label (--calibrate FILE --check-labels LABELS)")
    if precision == "bf16" and not bf16_supported():
        raise InputError("this CPU has no bf16 units (OpenVINO does not list BF16 for it); prepare f32 or int8")
    meta = model.meta(domain)
    patch, batch = tuple(int(p) for p in meta.patch_size), cpu_batch(batch_size)
    weights = _weights_key(model.net, domain)
    if precision == "int8":
        return _prepare_int8(model, domain, patch, batch, weights, progress, calibration, truth,
                             calibration_tiles, check, max_drop, min_speedup)
    was_ready = openvino_ready(model.net, domain, patch, batch, weights, precision)
    start = time.perf_counter()
    OPENVINO_CACHE.get(
        (weights, domain, patch, batch, precision),
        lambda: compile_openvino(model.net, domain, meta.in_channels, patch, batch, weights, progress=progress,
                                 precision=precision),
    )
    return Prepared(domain, "openvino", time.perf_counter() - start, was_ready, precision)


def _prepare_int8(model, domain: str, patch, batch: int, weights: str, progress, calibration, truth,
                  calibration_tiles: int, check: int, max_drop: float | None, min_speedup: float) -> Prepared:
    from training.infer import quantize as q

    if calibration_tiles < 1 or check < 1:
        raise InputError(f"INT8 needs calibration tiles and check cases, got {calibration_tiles} and {check}")
    if not q.nncf_available():
        raise InputError(f"INT8 quantisation needs NNCF; {q.NNCF_HINT}")
    say = progress or (lambda stage: None)
    meta = model.meta(domain)
    files = OpenVINOFiles(model.net, domain, patch, batch, weights, "int8")
    start = time.perf_counter()
    verdict = read_verdict(files)
    if not calibration and verdict is not None and (not verdict["accepted"] or files.ready()):
        if verdict["accepted"]:
            OPENVINO_CACHE.get((weights, domain, patch, batch, "int8"),
                               lambda: compile_openvino(model.net, domain, meta.in_channels, patch, batch, weights,
                                                        progress=progress, precision="int8"))
        return Prepared(domain, "openvino", time.perf_counter() - start, True, "int8", verdict)
    if not calibration and not has_synthetic_cases(domain):
        raise InputError(f"domain {domain!r} has no synthetic cases to calibrate INT8 on: give scans of the kind it "
                         "segments (--calibrate FILE)")
    fp32_compiled = OPENVINO_CACHE.get(
        (weights, domain, patch, batch, "f32"),
        lambda: compile_openvino(model.net, domain, meta.in_channels, patch, batch, weights, progress=progress),
    )
    f32_files = OpenVINOFiles(model.net, domain, patch, batch, weights)
    fp32 = (f32_files.core.read_model(str(f32_files.ir)) if _intact(f32_files.ir, f32_files.bin)
            else _convert(model.net, domain, meta.in_channels, patch, batch))
    say("calibrating")
    scans = list(calibration or [])
    held_out = scans[-1:]  # the check's case; the calibration's too when it is the only scan
    calib = q.calibration_patches(model, domain, calibration_tiles, volumes=scans[:-1] or held_out)
    if len(calib) < batch:
        raise InputError(f"{len(calib)} tile(s) are too few to calibrate INT8 with batches of {batch}: "
                         "give more or larger scans")
    cases = q.check_cases(model, domain, check, volumes=held_out, truth=truth)
    say("quantising")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the command's own lines
        int8 = q.quantize_openvino(fp32, calib)
    say("checking")
    int8_compiled = files.core.compile_model(int8, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = q.check_int8(fp32_compiled, int8_compiled, cases, meta, batch,
                          q.MAX_DICE_DROP if max_drop is None else max_drop, min_speedup)
    verdict = _verdict(result, scans, len(calib))
    _discard(files.verdict)  # no reader pairs the old verdict with the new graph
    if result.accepted:
        if save_openvino_ir(int8, files):
            _save_blob(int8_compiled, files.blob)
        OPENVINO_CACHE.get((weights, domain, patch, batch, "int8"), lambda: int8_compiled)
    else:
        _discard(files.ir, files.bin, files.blob)
    try:
        write_verdict(files, verdict)
    except (OSError, InputError) as e:  # a read-only or full cache: only this process knows
        log.warning("could not keep the INT8 check in %s: %s", files.verdict.parent, e)
    return Prepared(domain, "openvino", time.perf_counter() - start, False, "int8", verdict)


def has_synthetic_cases(domain: str) -> bool:
    """The domain's calibration and check cases can be generated (the synthetic generator's
    domains, MNI152); any other needs the user's scans."""
    from training.data.mni152 import DOMAIN as BRAIN
    from training.data.synth import SYNTH_DOMAINS

    return domain in {*SYNTH_DOMAINS, BRAIN}


def _verdict(result, scans: list, n_calibration: int) -> dict:
    import nncf
    import openvino

    def num(x):
        return None if x is None or np.isnan(x) else round(float(x), 5)

    names = [str(getattr(v, "source", "?")) for v in scans]
    if not scans:
        calibration = "synthetic cases (training.infer.quantize.CALIBRATION_SEED)"
        checked_on = "held-out synthetic cases (training.infer.quantize.CHECK_SEED), against their truth"
    else:
        calibration = names[:-1] or names
        against = "its labels" if result.reference == "truth" else "f32's labels"
        checked_on = f"{names[-1]}{'' if len(names) > 1 else ' (also calibrated on)'}, against {against}"
    return {"accepted": result.accepted, "why": result.why, "drop": num(result.drop), "reference": result.reference,
            "agreement": num(result.agreement), "dice_f32": num(result.dice_f32), "dice_int8": num(result.dice_int8),
            "speedup": round(result.speedup, 3), "check_cases": result.cases, "checked_on": checked_on,
            "calibration_tiles": n_calibration, "calibration": calibration, "nncf": nncf.__version__,
            "openvino": openvino.__version__, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def worth_preparing(tiles: int | None) -> bool:
    """Convert before the run when the scan has enough tiles for it to pay off (unknown: yes)."""
    return tiles is None or tiles >= PAYS_OFF_TILES
