"""What runs the network on a batch of tiles: eager PyTorch or an OpenVINO compiled graph.

A *runner* is a callable ``runner(tiles) -> logits`` for one domain, with tiles of shape
(B, C, Z, Y, X) and float32 logits (B, K, Z, Y, X) on ``runner.device``. The sliding window only
talks to runners, so backends stay interchangeable and the out-of-memory fall-back can ask a
torch runner to move to the CPU.

OpenVINO is an optional extra. Its compiled graphs bake the weights in, so one graph is compiled
per (network weights, domain, patch, batch) and kept in a small in-process cache; the first call
pays the conversion and compilation (seconds), later calls reuse it.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import nn

from .errors import InputError

BACKENDS = ("torch", "openvino")
OPENVINO_HINT = "pip install napari-u2net[openvino]"


class DomainNet(nn.Module):
    """The network with its domain fixed: a plain ``forward(x)`` that exporters can trace."""

    def __init__(self, net: nn.Module, domain: str):
        super().__init__()
        self.net = net
        self.domain = domain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.domain)


class TorchRunner:
    """Eager PyTorch: ``inference_mode``, ``channels_last_3d`` on CPU, float16 autocast on CUDA.

    The caller's network is never modified: when the device or memory layout differs it works on
    a copy (the weights are a few MB), otherwise it runs the network in eval mode and restores
    its training flag afterwards.
    """

    def __init__(self, net: nn.Module, domain: str, device: torch.device, amp: bool = True):
        self.source = net
        self.domain = domain
        self.amp = amp
        self.num_classes = net.domain_config(domain).num_classes
        self._set_device(torch.device(device))

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        self.channels_last = device.type == "cpu"
        ref = next(self.source.parameters())
        if ref.device == device and not self.channels_last:
            self.net = self.source
        else:
            net = copy.deepcopy(self.source).to(device)
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last_3d)
            self.net = net.eval()

    def to_cpu(self) -> None:
        """Last resort after GPU out-of-memory: run the remaining tiles on the CPU."""
        self._set_device(torch.device("cpu"))

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        use_amp = self.amp and self.device.type == "cuda"  # never autocast on CPU (bf16 is slow)
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
        was_training = self.net.training  # e.g. the trainer's own network during validation
        if was_training:
            self.net.eval()
        try:
            with torch.inference_mode(), autocast:
                out = self.net(x, self.domain)
        finally:
            if was_training:
                self.net.train()
        return out.float().contiguous()


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINORunner:
    """A domain's network compiled by OpenVINO for the CPU with a fixed batch and patch."""

    device = torch.device("cpu")

    def __init__(self, compiled, batch_size: int, num_classes: int):
        self.compiled = compiled
        self.batch_size = batch_size
        self.num_classes = num_classes
        self._request = compiled.create_infer_request()

    def to_cpu(self) -> None:  # already there
        pass

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        b = tiles.shape[0]
        x = tiles.detach().to("cpu", torch.float32)
        if b < self.batch_size:  # the graph is static: pad the last, partial batch
            pad = x.new_zeros((self.batch_size - b, *x.shape[1:]))
            x = torch.cat([x, pad])
        result = self._request.infer({0: x.contiguous().numpy()})
        out = torch.from_numpy(result[self.compiled.output(0)].copy())
        return out[:b]


class _CompiledCache:
    """Compiled OpenVINO graphs, least recently used first out; thread-safe."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


OPENVINO_CACHE = _CompiledCache()


def _weights_key(net: nn.Module, domain: str) -> str:
    """Digest of the weights a compiled graph baked in (a few MB: milliseconds to hash)."""
    h = hashlib.sha1()
    for module in (net.trunk, net.adapters[domain]):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def compile_openvino(net: nn.Module, domain: str, in_channels: int, patch_size, batch_size: int):
    """Convert and compile one domain's network; returns an OpenVINO ``CompiledModel``."""
    import openvino as ov

    module = DomainNet(copy.deepcopy(net).to("cpu").float().eval(), domain).eval()
    example = torch.zeros((batch_size, in_channels, *patch_size), dtype=torch.float32)
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing fixes the shape checks to this patch and batch, which is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
        model = ov.convert_model(module, example_input=example, input=[example.shape])
    core = ov.Core()
    # f32 on purpose: CPUs with bf16 units would otherwise default to bf16 and drift from torch.
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def make_runner(net: nn.Module, domain: str, backend: str, device: torch.device, *, amp: bool = True,
                patch_size=None, batch_size: int = 1):
    """Build the runner for ``backend`` (see :data:`BACKENDS`)."""
    if backend == "torch":
        return TorchRunner(net, domain, device, amp=amp)
    if backend == "openvino":
        if device.type != "cpu":
            raise InputError(f"the OpenVINO backend runs on the CPU only; use --device cpu (not {device})")
        if not openvino_available():
            raise InputError(f"the OpenVINO backend is not installed; {OPENVINO_HINT}")
        config = net.domain_config(domain)
        patch = tuple(int(p) for p in patch_size)
        key = (_weights_key(net, domain), domain, patch, batch_size)
        compiled = OPENVINO_CACHE.get(
            key, lambda: compile_openvino(net, domain, config.in_channels, patch, batch_size)
        )
        return OpenVINORunner(compiled, batch_size, config.num_classes)
    raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
