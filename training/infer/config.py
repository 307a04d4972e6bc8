"""How a segmentation runs: :class:`InferenceConfig`, the one home of its defaults (torch-free, so
the CLI's ``--help`` and the plugin read the defaults without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import InputError

# What runs the network (training.infer.backends implements each).
BACKENDS = ("torch", "compiled", "openvino")
DEVICES = ("auto", "cpu", "cuda", "mps")  # cuda:N is accepted too


@dataclass
class InferenceConfig:
    device: str = "auto"  # auto (CUDA > MPS > CPU) | cpu | cuda | cuda:N | mps
    overlap: float = 0.5  # fraction of a tile shared with its neighbour, in [0, 1)
    batch_size: int | None = None  # tiles per batch; None = sensible default per device
    postprocess: bool = True  # keep each class's usual number of connected components (the domain's)
    backend: str = "torch"  # one of BACKENDS
    amp: bool = True  # mixed precision on CUDA only; never bf16 on CPU


def validate_config(config: InferenceConfig) -> None:
    if not 0 <= config.overlap < 1:
        raise InputError(f"overlap must be ≥ 0 and < 1, got {config.overlap}")
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError(f"batch size must be ≥ 1, got {config.batch_size}")
    if config.backend not in BACKENDS:
        raise InputError(f"unknown backend {config.backend!r}; use one of {', '.join(BACKENDS)}")
