"""What runs the network on a batch of tiles: eager PyTorch, a compiled graph, or OpenVINO.

A *runner* is a callable ``runner(tiles) -> logits`` for one domain, with tiles of shape
(B, C, Z, Y, X) and float32 logits (B, K, Z, Y, X) on ``runner.device``. The sliding window only
talks to runners, so backends stay interchangeable and the out-of-memory fall-back can ask a
torch runner to move to the CPU.

Compiled graphs bake the weights in, so one graph is built per (network weights, domain, patch,
batch) and kept in a small in-process cache and on disk (``<U2NET_HOME or OS cache>/compiled``):

* ``compiled`` (torch alone, CPU): the domain's network exported with ``torch.export`` and
  compiled ahead of time by TorchInductor (AOTInductor, weights frozen) into a ``.pt2`` package.
  The first run for a domain pays the compilation (minutes on a small CPU), every later run and
  process loads the package in milliseconds. Without a C++ compiler, or if compilation fails, it
  falls back to eager PyTorch with a warning.
* ``openvino`` (optional extra, CPU): converted to OpenVINO IR (saved on disk) and compiled with
  OpenVINO's own on-disk cache of compiled blobs.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from training.errors import InputError
from training.infer.config import validate_backend

log = logging.getLogger(__name__)

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

    def __init__(self, net: nn.Module, domain: str, device: torch.device, amp: bool = True,
                 channels_last: bool | None = None):
        self.source = net
        self.domain = domain
        self.amp = amp
        self.want_channels_last = channels_last  # None: on the CPU
        self.num_classes = net.domain_config(domain).num_classes
        self._set_device(torch.device(device))

    def _set_device(self, device: torch.device) -> None:
        self.device = device
        want = self.want_channels_last
        self.channels_last = device.type == "cpu" if want is None else bool(want)
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


class StaticGraphRunner:
    """A graph compiled for the CPU with a fixed batch and patch (subclasses run it in ``_run``)."""

    device = torch.device("cpu")

    def __init__(self, batch_size: int, num_classes: int):
        self.batch_size = batch_size
        self.num_classes = num_classes

    def to_cpu(self) -> None:  # already there
        pass

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        b = tiles.shape[0]
        x = tiles.detach().to("cpu", torch.float32)
        if b < self.batch_size:  # the graph is static: pad the last, partial batch
            x = torch.cat([x, x.new_zeros((self.batch_size - b, *x.shape[1:]))])
        return self._run(x.contiguous())[:b]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenVINORunner(StaticGraphRunner):
    """A domain's network compiled by OpenVINO."""

    def __init__(self, compiled, batch_size: int, num_classes: int):
        super().__init__(batch_size, num_classes)
        self.compiled = compiled
        self._request = compiled.create_infer_request()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        result = self._request.infer({0: x.numpy()})
        return torch.from_numpy(result[self.compiled.output(0)].copy())


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
COMPILED_CACHE = _CompiledCache()


def _weights_key(net: nn.Module, domain: str) -> str:
    """Digest of the weights a compiled graph baked in (a few MB: milliseconds to hash)."""
    h = hashlib.sha1()
    for module in (net.trunk, net.adapters[domain]):
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def compile_openvino(net: nn.Module, domain: str, in_channels: int, patch_size, batch_size: int,
                     weights_key: str | None = None):
    """Convert and compile one domain's network; returns an OpenVINO ``CompiledModel``."""
    import openvino as ov

    folder = compiled_dir() / "openvino"
    runtime = "openvino-" + ov.__version__
    ir = folder / f"{_graph_key(net, domain, patch_size, batch_size, runtime, weights_key)}.xml"
    core = ov.Core()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(folder / "blobs")})  # OpenVINO's own compiled-blob cache
    except OSError:  # a read-only cache folder: compile in memory only
        ir = None
    model = None
    if ir is not None and ir.is_file():
        try:
            model = core.read_model(str(ir))
        except Exception:  # noqa: BLE001 - a damaged IR, whatever the error: convert again
            model = None
    if model is None:
        module = DomainNet(copy.deepcopy(net).to("cpu").float().eval(), domain).eval()
        example = torch.zeros((batch_size, in_channels, *patch_size), dtype=torch.float32)
        with torch.inference_mode(), warnings.catch_warnings():
            # Tracing fixes the shape checks to this patch and batch, which is what we want.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
            model = ov.convert_model(module, example_input=example, input=[example.shape])
        if ir is not None:
            _save_openvino_ir(ov, model, ir)
    # f32 on purpose: CPUs with bf16 units would otherwise default to bf16 and drift from torch.
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _save_openvino_ir(ov, model, ir: Path) -> None:
    """Write the IR (.xml + .bin) under temporary names, then rename: never a half-written pair."""
    tmp = ir.with_name(f".{ir.stem}.{os.getpid()}.partial.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), ir.with_suffix(".bin"))
        os.replace(tmp, ir)
    except OSError as e:
        log.warning("could not cache the OpenVINO model in %s: %s", ir.parent, e)
    finally:
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)


# -- compiled (AOTInductor) ---------------------------------------------------------------------
def compiled_dir() -> Path:
    """Where compiled graphs are kept: ``<U2NET_HOME or OS cache>/compiled``."""
    from training.io.folders import cache_dir

    return cache_dir() / "compiled"


def _graph_key(net: nn.Module, domain: str, patch_size, batch_size: int, runtime: str,
               weights_key: str | None = None) -> str:
    """File name for one compiled graph: weights (``weights_key`` when the caller hashed them
    already), domain, shapes, runtime and machine."""
    parts = [weights_key or _weights_key(net, domain), domain, "x".join(str(int(p)) for p in patch_size),
             str(batch_size), str(net.domain_config(domain).in_channels), runtime, platform.machine()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:24]


def compiler_available() -> bool:
    """AOTInductor needs a C++ compiler (``$CXX`` or g++/clang++/c++ on the PATH)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


def compile_aot(net: nn.Module, domain: str, patch_size, batch_size: int, folder: Path | None = None,
                weights_key: str | None = None) -> Path:
    """The domain's network as an AOTInductor package on disk (built once, then reused)."""
    folder = folder or compiled_dir()
    runtime = "torch-" + torch.__version__
    path = folder / f"{_graph_key(net, domain, patch_size, batch_size, runtime, weights_key)}.pt2"
    if path.is_file():
        return path
    if not compiler_available():
        raise RuntimeError("no C++ compiler found (install g++, e.g. apt-get install g++)")
    folder.mkdir(parents=True, exist_ok=True)
    in_channels = net.domain_config(domain).in_channels
    module = DomainNet(copy.deepcopy(net).to("cpu").float().eval(), domain).eval()
    example = torch.zeros((batch_size, in_channels, *(int(p) for p in patch_size)), dtype=torch.float32)
    log.warning("compiling domain %r for patch %s, batch %d (once; kept in %s): this takes minutes",
                domain, tuple(example.shape[2:]), batch_size, folder)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")
    try:
        with torch.no_grad():
            exported = torch.export.export(module, (example,))
            torch._inductor.aoti_compile_and_package(
                exported, package_path=str(tmp), inductor_configs={"freezing": True}
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class CompiledRunner(StaticGraphRunner):
    """An AOTInductor package for one domain."""

    def __init__(self, fn, batch_size: int, num_classes: int):
        super().__init__(batch_size, num_classes)
        self.fn = fn

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.fn(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().contiguous()


def load_compiled(net: nn.Module, domain: str, patch_size, batch_size: int, weights_key: str | None = None):
    """Load (building it first if needed) the domain's package; a damaged file is rebuilt once."""
    weights_key = weights_key or _weights_key(net, domain)
    path = compile_aot(net, domain, patch_size, batch_size, weights_key=weights_key)
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged package, whatever the error: rebuild it
        log.warning("compiled package %s could not be loaded (%s); compiling it again", path, e)
        path.unlink(missing_ok=True)
        return torch._inductor.aoti_load_package(str(compile_aot(net, domain, patch_size, batch_size,
                                                                 weights_key=weights_key)))


def make_runner(net: nn.Module, domain: str, backend: str, device: torch.device, *, amp: bool = True,
                patch_size=None, batch_size: int = 1, channels_last: bool | None = None):
    """Build the runner for ``backend`` (one of :data:`training.infer.config.BACKENDS`);
    ``channels_last`` (torch only): None = on the CPU, which works on a copy of the network."""
    validate_backend(backend)
    if backend == "torch":
        return TorchRunner(net, domain, device, amp=amp, channels_last=channels_last)
    if device.type != "cpu":
        raise InputError(f"the {backend} backend runs on the CPU only; use --device cpu (not {device})")
    if backend == "openvino" and not openvino_available():
        raise InputError(f"the OpenVINO backend is not installed; {OPENVINO_HINT}")
    config = net.domain_config(domain)
    patch = tuple(int(p) for p in patch_size)
    weights = _weights_key(net, domain)  # hashed once: the in-memory and on-disk keys share it
    key = (weights, domain, patch, batch_size)
    if backend == "openvino":
        compiled = OPENVINO_CACHE.get(
            key, lambda: compile_openvino(net, domain, config.in_channels, patch, batch_size, weights)
        )
        return OpenVINORunner(compiled, batch_size, config.num_classes)
    try:
        fn = COMPILED_CACHE.get(key, lambda: load_compiled(net, domain, patch, batch_size, weights))
    except Exception as e:  # noqa: BLE001 - no compiler, an unsupported op, a full disk: eager still works
        log.warning("the compiled backend is unavailable (%s: %s); running eager PyTorch instead",
                    type(e).__name__, e)
        return TorchRunner(net, domain, device, amp=amp, channels_last=channels_last)
    return CompiledRunner(fn, batch_size, config.num_classes)
