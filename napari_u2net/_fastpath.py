"""The domain selector's fast path (no Qt): what a run's ``auto`` backend takes, and the background
job that prepares a domain's OpenVINO graph once.

The preparation runs ``u2net prepare`` in a separate, lower-priority process: converting a network
holds Python's GIL for long stretches (stalls of 100–160 ms measured on napari's event loop with
an in-process conversion), a separate process holds none of napari's. It writes the graph to the
disk cache (:mod:`training.infer.backends`) where the next run's ``auto`` finds it; a run started
meanwhile does not wait: it finds no graph yet and runs eager PyTorch.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from training.errors import U2NetError
from training.infer.config import InferenceConfig

# how far each stage of ``u2net prepare``'s output lines gets one domain (converting is the long part)
STAGE_FRACTION = {"starting": 0.0, "converting": 0.05, "compiling": 0.85, "loading": 0.9, "ready": 1.0}

_LIVE: set[subprocess.Popen] = set()  # preparations under way: stopped when napari exits
_LIVE_LOCK = threading.Lock()


@dataclass
class PrepareReport:
    """Progress of a preparation: the domain, its stage, and the fraction over all its domains."""

    domain: str
    stage: str
    fraction: float


def backend_choices(model, domains: list[str], config: InferenceConfig) -> dict[str, tuple[str, str]]:
    """``{domain: (backend, reason)}``: what a run with ``config`` takes for each domain now."""
    import torch

    from training.infer.backends import resolve_backend
    from training.infer.prepare import cpu_batch
    from training.io.devices import default_batch_size, resolve_device

    device = resolve_device(config.device)
    batch = cpu_batch(config.batch_size) if device.type == "cpu" else (config.batch_size or default_batch_size(device))
    return {d: resolve_backend(config.backend, torch.device(device), model.net, d, model.meta(d).patch_size,
                               batch, config.amp, precision=config.precision) for d in domains}


def describe(choices: dict[str, tuple[str, str]]) -> str:
    """One line for the status: "openvino (auto: fastest here)", or per domain when they differ."""
    if not choices:
        return ""
    if len(set(choices.values())) == 1:
        name, reason = next(iter(choices.values()))
        return f"{name} ({reason})"
    return "; ".join(f"{d}: {name} ({reason})" for d, (name, reason) in choices.items())


def pending(model, domains: list[str], config: InferenceConfig) -> list[str]:
    """The domains an ``auto`` run would take eager only for want of their OpenVINO graph."""
    if config.backend != "auto":
        return []
    from training.infer.prepare import needs_preparing

    return [d for d in domains if needs_preparing(model, d, config.device, config.batch_size)]


def prepare_command(model_dir: Path, domains: list[str], batch_size: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "training.commands.cli", "prepare", "--model", str(model_dir), "--low-priority"]
    for d in domains:
        cmd += ["--domain", d]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


def prepare_job(model, model_dir: Path, domains: list[str], config: InferenceConfig, stop: threading.Event):
    """Yield :class:`PrepareReport` while ``u2net prepare`` builds the graphs of those ``domains``
    that need one (:func:`pending`); return the domains prepared ([] if none needed it). ``stop``
    ends the process (its files are written atomically: nothing half-made is left)."""
    todo = pending(model, domains, config)
    if not todo:
        return []
    n = len(todo)
    yield PrepareReport(todo[0], "starting", 0.0)
    proc = subprocess.Popen(prepare_command(model_dir, todo, config.batch_size), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    errors: deque[str] = deque(maxlen=5)
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    finished = threading.Event()

    def watch() -> None:  # ``stop`` ends the process
        while not finished.wait(0.2):
            if stop.is_set() and proc.poll() is None:
                proc.terminate()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for line in proc.stdout:  # "DOMAIN: converting…", "DOMAIN: ready in 12.3 s"
            domain, _, rest = line.strip().partition(": ")
            stage = rest.split()[0].rstrip("…") if rest else ""
            if domain in todo and stage in STAGE_FRACTION:
                yield PrepareReport(domain, stage, (todo.index(domain) + STAGE_FRACTION[stage]) / n)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        with _LIVE_LOCK:
            _LIVE.discard(proc)
        finished.set()
    reader.join(timeout=5)
    if code != 0 and not (stop.is_set() and code < 0):
        last = [e.strip() for e in errors if e.strip()]
        raise U2NetError(f"preparing the fast path failed: {last[-1] if last else f'exit code {code}'}")
    return todo


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        for proc in list(_LIVE):
            if proc.poll() is None:
                proc.terminate()
