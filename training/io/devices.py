"""Choosing a compute device and recognising GPU out-of-memory errors.

"auto" prefers CUDA, then Apple's MPS, then the CPU, so the same call works on a workstation,
a Mac and a CPU-only laptop. A named device that is not there is a user error, not a crash.
"""

from __future__ import annotations

import torch

from training.errors import InputError

DEVICE_HELP = "auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def device_names() -> list[str]:
    """The devices this machine has, as ``--device`` takes them (CUDA ones with their name)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if mps_available():
        names.append("mps")
    return names


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a device spec into a usable :class:`torch.device` (or raise :class:`InputError`)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r}; use {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise InputError(f"device {spec!r} asked for, but no CUDA GPU is available{build}; "
                             f"devices here: {', '.join(device_names())}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist; "
                f"devices here: {', '.join(device_names())}"
            )
    elif device.type == "mps":
        if not mps_available():
            raise InputError(f"device {spec!r} asked for, but Apple MPS is not available; "
                             f"devices here: {', '.join(device_names())}; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {spec!r}; use {DEVICE_HELP}")
    return device


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward pass: several on a GPU (fills it), one on a CPU (no gain, more memory)."""
    return {"cuda": 4, "mps": 2}.get(device.type, 1)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (their type changed across torch versions)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    """Give cached GPU blocks back after an out-of-memory error or a cancelled run."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and mps_available():
        torch.mps.empty_cache()
