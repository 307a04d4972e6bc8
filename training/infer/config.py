"""How a segmentation runs: :class:`InferenceConfig`, the one home of its defaults, and the checks
of its settings (torch-free, so the CLI's ``--help`` and the plugin read them without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import InputError

# What runs the network (training.infer.backends implements each). "auto" takes the fastest one
# that is ready now (training.infer.backends.resolve_backend): torch with mixed precision on CUDA,
# torch on MPS, OpenVINO on the CPU once prepared for the domain, else eager torch.
BACKENDS = ("auto", "torch", "compiled", "openvino")
DEVICES = ("auto", "cpu", "cuda", "mps")  # cuda:N is accepted too
# Number formats of the OpenVINO backend (the CPU; training.infer.backends). "auto": INT8 where
# ``u2net prepare --precision int8`` quantised the domain and its check accepted it
# (training.infer.prepare), else f32. "bf16" needs a CPU with bf16 units. torch and compiled run
# f32 (with float16 autocast on CUDA: ``amp``); asking them for bf16 or int8 is refused.
PRECISIONS = ("auto", "f32", "bf16", "int8")


@dataclass
class InferenceConfig:
    device: str = "auto"  # auto (CUDA > MPS > CPU) | cpu | cuda | cuda:N | mps
    overlap: float = 0.5  # fraction of a tile shared with its neighbour, in [0, 1)
    batch_size: int | None = None  # tiles per batch; None = sensible default per device
    postprocess: bool = True  # keep each class's usual number of connected components (the domain's)
    backend: str = "auto"  # one of BACKENDS
    precision: str = "auto"  # one of PRECISIONS
    amp: bool = True  # mixed precision on CUDA only; never bf16 on CPU
    # per-voxel outputs besides the labels (DomainResult.maps), off by default because they cost
    # time and memory: "uncertainty" (Z, Y, X) float16 normalised entropy of the calibrated class
    # probabilities, 0 = sure, 1 = uniform; "probabilities" (C, Z, Y, X) float16, calibrated
    uncertainty: bool = False
    probabilities: bool = False


def validate_overlap(overlap: float) -> None:
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be ≥ 0 and < 1, got {overlap}")


def validate_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def validate_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def validate_config(config: InferenceConfig) -> None:
    """Refuse settings that cannot work, before any computation starts."""
    validate_overlap(config.overlap)
    if config.batch_size is not None and config.batch_size < 1:
        raise InputError(f"batch size must be ≥ 1, got {config.batch_size}")
    validate_backend(config.backend)
    validate_precision(config.precision)
