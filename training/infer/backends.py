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
* ``openvino`` (CPU): converted to OpenVINO IR and compiled for this CPU; both are saved on disk,
  each with a sha256 sidecar (a damaged file is rebuilt, never loaded).
* ``auto`` (the default): :func:`resolve_backend` takes the fastest of these that is ready now,
  never one that must first be built (:mod:`training.infer.prepare` builds them on purpose).

OpenVINO runs in one of three *precisions* (:data:`training.infer.config.PRECISIONS`): f32; bf16
(the f32 graph compiled with bf16 inference precision, on CPUs with bf16 units); int8 (a graph
quantised by ``u2net prepare --precision int8``, used only when the check recorded beside it
accepted it). Precision ``auto`` takes INT8 where it was accepted, else f32.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.errors import InputError
from training.infer.config import validate_backend, validate_precision
from training.model.registry import sha256_of

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

    def contains(self, key) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


OPENVINO_CACHE = _CompiledCache()
COMPILED_CACHE = _CompiledCache()


def _weights_key(net: nn.Module, domain: str) -> str:
    """Digest of the weights a compiled graph baked in (a few MB: milliseconds to hash): the trunk
    and the domain's adapter of a U²-Net, all of any other network."""
    h = hashlib.sha1()
    adapters = getattr(net, "adapters", None)
    modules = (net.trunk, adapters[domain]) if hasattr(net, "trunk") and adapters is not None else (net,)
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# -- OpenVINO's files on disk ----------------------------------------------------------------------
# One graph per (weights, domain, patch, batch, OpenVINO version, machine) under
# ``compiled_dir()/openvino``: the converted IR (``KEY.xml`` + ``KEY.bin``, the slow part to make)
# and the model compiled for this CPU (``KEY-CPU.blob``, exported by OpenVINO; importing it takes
# milliseconds). Each file has a ``.sha256`` sidecar written atomically *after* it: a file without
# its sidecar, or whose bytes no longer match it (a truncated copy, a full disk, a bad sector), is
# discarded and rebuilt, never loaded.


def openvino_dir() -> Path:
    return compiled_dir() / "openvino"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _seal(path: Path) -> None:
    """Record ``path``'s sha256 beside it (atomically, once the file itself is complete)."""
    from training.io.atomic import atomic_write_text

    atomic_write_text(_sidecar(path), f"{sha256_of(path)}  {path.name}\n")


def _intact(*paths: Path) -> bool:
    """True if every file is there with a matching sidecar; otherwise the files and their sidecars
    are removed (a damaged or half-made entry is rebuilt, never loaded)."""
    try:
        if all(p.is_file() and _sidecar(p).read_text().split()[0] == sha256_of(p) for p in paths):
            return True
    except (OSError, IndexError):
        pass
    damaged = [p for p in paths if p.exists() or _sidecar(p).exists()]
    if damaged:
        log.warning("discarding a damaged OpenVINO cache entry (%s): it will be rebuilt",
                    ", ".join(p.name for p in damaged))
    _discard(*paths)
    return False


def _cpu_name(core) -> str:
    """Short id of this CPU's compiled-code flavour: an exported blob only fits the CPU it was made on."""
    parts = []
    for prop in ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES"):
        try:
            parts.append(str(core.get_property("CPU", prop)))
        except Exception:  # noqa: BLE001 - an older OpenVINO: the IR alone is cached then
            parts.append("?")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]


_CORE: tuple | None = None


def openvino_core() -> tuple:
    """One OpenVINO ``Core`` per process (it is thread-safe) and this CPU's id (:func:`_cpu_name`)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        core = ov.Core()
        _CORE = (core, _cpu_name(core))
    return _CORE


class OpenVINOFiles:
    """Where one graph's IR and compiled blob live (see the comment above). ``precision`` "int8"
    has its own, quantised IR and a ``verdict`` (the check that accepted or refused it, JSON);
    "bf16" is the f32 IR compiled with bf16 inference precision (a blob of its own)."""

    def __init__(self, net: nn.Module, domain: str, patch_size, batch_size: int, weights_key: str | None = None,
                 precision: str = "f32"):
        import openvino as ov

        self.precision = precision
        self.core, cpu = openvino_core()
        runtime = "openvino-" + ov.__version__
        key = _graph_key(net, domain, patch_size, batch_size, runtime, weights_key)
        if precision == "int8":  # bf16 shares the f32 IR
            key += "-int8"
        folder = openvino_dir()
        self.ir = folder / f"{key}.xml"
        self.bin = self.ir.with_suffix(".bin")
        self.blob = folder / f"{key}-{cpu}{'-bf16' if precision == 'bf16' else ''}.blob"
        self.verdict = folder / f"{key}.verdict.json"

    def ready(self) -> bool:
        """A usable entry is on disk: the compiled blob, or at least the IR (compiling it takes a
        second, converting it is what takes long); for INT8 only an accepted one."""
        if self.precision == "int8" and not (read_verdict(self) or {}).get("accepted"):
            return False
        return _intact(self.blob) or _intact(self.ir, self.bin)


def read_verdict(files: OpenVINOFiles) -> dict | None:
    """The INT8 check's record (:func:`training.infer.prepare.prepare_domain` writes it), or None
    when there is none or it is damaged (then it is removed)."""
    if not _intact(files.verdict):
        return None
    try:
        verdict = json.loads(files.verdict.read_text())
        if isinstance(verdict, dict) and isinstance(verdict.get("accepted"), bool):
            return verdict
    except (OSError, ValueError):
        pass
    _discard(files.verdict)
    return None


def write_verdict(files: OpenVINOFiles, verdict: dict) -> None:
    """Record the INT8 check (sealed like the graphs; a stale sidecar never vouches for it)."""
    from training.io.atomic import atomic_write_text

    _discard(files.verdict)
    atomic_write_text(files.verdict, json.dumps(verdict, indent=1) + "\n")
    _seal(files.verdict)


def save_openvino_ir(model, files: OpenVINOFiles) -> bool:
    """Keep ``model`` as ``files``' IR (e.g. an INT8 graph just quantised); False when the cache
    cannot take it (read-only, full): a warning, and this run still has the graph in memory."""
    _save_openvino_ir(model, files)
    return _intact(files.ir, files.bin)


def bf16_supported() -> bool:
    """This CPU has bf16 units (OpenVINO lists "BF16" among its capabilities)."""
    if not openvino_available():
        return False
    core, _ = openvino_core()
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an OpenVINO that cannot say: not offered
        return False


def openvino_ready(net: nn.Module, domain: str, patch_size, batch_size: int, weights_key: str | None = None,
                   precision: str = "f32") -> bool:
    """True when this domain's OpenVINO graph can be had without converting the network: in this
    process's cache, or intact on disk (INT8: quantised and accepted). False without OpenVINO."""
    if not openvino_available():
        return False
    weights_key = weights_key or _weights_key(net, domain)
    patch = tuple(int(p) for p in patch_size)
    if OPENVINO_CACHE.contains((weights_key, domain, patch, batch_size, precision)):
        return True
    return OpenVINOFiles(net, domain, patch, batch_size, weights_key, precision).ready()


def prepare_int8_hint(domain: str) -> str:
    return (f"run `u2net prepare --precision int8 --domain {domain}` (it quantises the domain and keeps INT8 "
            "only if it loses at most 0.005 Dice and runs faster)")


def compile_openvino(net: nn.Module, domain: str, in_channels: int, patch_size, batch_size: int,
                     weights_key: str | None = None, progress=None, precision: str = "f32"):
    """One domain's network compiled by OpenVINO (a ``CompiledModel``): imported from the blob on
    disk, else compiled from the IR on disk, else converted from the network first (the slow part:
    seconds to a minute). What was made is saved for the next run. ``progress(stage)`` hears
    "converting", "compiling", "loading". INT8 is never made here (it needs calibration:
    :mod:`training.infer.prepare`): without an accepted INT8 graph on disk, InputError."""
    say = progress or (lambda stage: None)
    patch = tuple(int(p) for p in patch_size)
    files = OpenVINOFiles(net, domain, patch, batch_size, weights_key, precision)
    core = files.core
    if precision == "int8" and not files.ready():
        raise InputError(f"no accepted INT8 graph of domain {domain!r} for these weights; {prepare_int8_hint(domain)}")
    # f32 unless bf16 is asked for: else CPUs with bf16 units drift from torch
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if _intact(files.blob):
        say("loading")
        try:
            with open(files.blob, "rb") as f:
                return core.import_model(f.read(), "CPU", config)
        except Exception as e:  # noqa: BLE001 - another OpenVINO build or CPU wrote it: make it again
            log.warning("OpenVINO could not import %s (%s); compiling it again", files.blob.name, e)
            _discard(files.blob)
    model = None
    if _intact(files.ir, files.bin):
        try:
            model = core.read_model(str(files.ir))
        except Exception as e:  # noqa: BLE001 - an IR this OpenVINO cannot read: convert again
            log.warning("OpenVINO could not read %s (%s); converting again", files.ir.name, e)
            _discard(files.ir, files.bin)
    if model is None and precision == "int8":  # damaged since the check above
        raise InputError(f"the INT8 graph of domain {domain!r} is damaged; {prepare_int8_hint(domain)}")
    if model is None:
        say("converting")
        model = _convert(net, domain, in_channels, patch, batch_size)
        _save_openvino_ir(model, files)
    say("compiling")
    compiled = core.compile_model(model, "CPU", config)
    _save_blob(compiled, files.blob)
    return compiled


def _discard(*paths: Path) -> None:
    """Remove files and their sidecars (what is already gone, or cannot go, is left)."""
    for p in paths:
        for f in (p, _sidecar(p)):
            try:
                f.unlink(missing_ok=True)
            except OSError:
                pass


def _convert(net: nn.Module, domain: str, in_channels: int, patch, batch_size: int):
    import openvino as ov

    module = DomainNet(copy.deepcopy(net).to("cpu").float().eval(), domain).eval()
    example = torch.zeros((batch_size, in_channels, *patch), dtype=torch.float32)
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing fixes the shape checks to this patch and batch, which is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace", category=DeprecationWarning)
        return ov.convert_model(module, example_input=example, input=[example.shape])


def _save_openvino_ir(model, files: OpenVINOFiles) -> None:
    """Write the IR (.xml + .bin) under temporary names, rename both, then seal them: a reader
    never takes a half-written pair (no sidecar yet, or one that does not match)."""
    import openvino as ov

    ir = files.ir
    tmp = ir.with_name(f".{ir.stem}.{os.getpid()}.{threading.get_ident()}.partial.xml")
    try:
        ir.parent.mkdir(parents=True, exist_ok=True)
        _discard(ir, files.bin)  # an old sidecar must not vouch for the new files mid-way
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), files.bin)
        os.replace(tmp, ir)
        _seal(files.bin)
        _seal(ir)
    except (OSError, InputError, RuntimeError) as e:  # a read-only or full cache (OpenVINO's own writer
        # raises RuntimeError "iostream error" on a full disk): this run still works, in memory
        log.warning("could not cache the OpenVINO model in %s: %s", ir.parent, e)
    finally:
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)


def _save_blob(compiled, blob: Path) -> None:
    from training.io.atomic import atomic_write_bytes

    try:
        _discard(blob)
        data = compiled.export_model()
        atomic_write_bytes(blob, data.getvalue() if hasattr(data, "getvalue") else data)
        _seal(blob)
    except (OSError, InputError, RuntimeError) as e:  # only a speed-up for the next run
        log.warning("could not cache the compiled OpenVINO model %s: %s", blob.name, e)


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


def compiled_package(net: nn.Module, domain: str, patch_size, batch_size: int, folder: Path | None = None,
                     weights_key: str | None = None) -> Path:
    """Where the domain's AOTInductor package is (or would be) kept."""
    runtime = "torch-" + torch.__version__
    return (folder or compiled_dir()) / f"{_graph_key(net, domain, patch_size, batch_size, runtime, weights_key)}.pt2"


def compile_aot(net: nn.Module, domain: str, patch_size, batch_size: int, folder: Path | None = None,
                weights_key: str | None = None) -> Path:
    """The domain's network as an AOTInductor package on disk (built once, then reused)."""
    folder = folder or compiled_dir()
    path = compiled_package(net, domain, patch_size, batch_size, folder, weights_key)
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


# -- choosing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """What runs a domain's network: the backend, its precision ("f32" but on OpenVINO), and why."""

    backend: str
    precision: str
    reason: str


def choose(backend: str, device: torch.device, net: nn.Module | None = None, domain: str | None = None,
           patch_size=None, batch_size: int = 1, amp: bool = True, weights_key: str | None = None,
           precision: str = "auto") -> Choice:
    """The backend and precision that run, and why.

    An explicit backend is checked (installed, on a device it runs on) and kept. ``auto`` takes
    the fastest path that is ready *now*, never one that must first be built: on CUDA torch with
    mixed precision, on MPS torch, on the CPU OpenVINO when its graph for these weights, domain,
    patch and batch is in memory or intact on disk, else a compiled (AOTInductor) package already
    on disk, else eager torch. (Building the fast path is :mod:`training.infer.prepare`'s job.)
    Precision bf16 or int8 means OpenVINO on the CPU (``auto`` backend included); int8 needs an
    accepted INT8 graph. Precision ``auto`` on OpenVINO takes INT8 where one was accepted.
    Without ``net`` and ``domain`` only the device (and the settings) decide.
    """
    device = torch.device(device)
    validate_precision(precision)
    if backend != "auto":
        validate_backend(backend)
        if backend != "torch" and device.type != "cpu":
            raise InputError(f"the {backend} backend runs on the CPU only; use --device cpu (not {device})")
        if backend == "openvino" and not openvino_available():
            raise InputError(f"the OpenVINO backend is not installed; {OPENVINO_HINT}")
    if precision in ("bf16", "int8"):
        return _reduced_precision(backend, device, net, domain, patch_size, batch_size, weights_key, precision)
    if backend != "auto":
        return Choice(backend, "f32", "asked for")
    name, reason = _auto_backend(device, net, domain, patch_size, batch_size, amp, weights_key)
    if name == "openvino" and precision == "auto":
        patch = tuple(int(p) for p in patch_size)
        weights_key = weights_key or _weights_key(net, domain)
        try:
            int8 = openvino_ready(net, domain, patch, batch_size, weights_key, "int8")
        except (OSError, InputError):  # an unusable cache folder: f32, as found above
            int8 = False
        if int8:
            return Choice(name, "int8", f"{reason}, INT8 (accepted by its check)")
    return Choice(name, "f32", reason)


def resolve_backend(backend: str, device: torch.device, net: nn.Module | None = None, domain: str | None = None,
                    patch_size=None, batch_size: int = 1, amp: bool = True, weights_key: str | None = None,
                    precision: str = "auto") -> tuple[str, str]:
    """``(backend, reason)`` of :func:`choose` (the reason names a precision other than f32)."""
    c = choose(backend, device, net, domain, patch_size, batch_size, amp, weights_key, precision)
    return c.backend, c.reason


def _reduced_precision(backend: str, device: torch.device, net, domain, patch_size, batch_size: int,
                       weights_key, precision: str) -> Choice:
    """bf16 or int8, asked for: OpenVINO on the CPU, with what that needs, or one line why not."""
    if backend in ("torch", "compiled"):
        raise InputError(f"precision {precision} runs on the OpenVINO backend only; use --backend openvino "
                         f"(or auto), or --precision f32 with {backend}")
    if device.type != "cpu":
        raise InputError(f"precision {precision} runs on the CPU only (OpenVINO); use --device cpu (not {device})")
    if not openvino_available():
        raise InputError(f"precision {precision} needs the OpenVINO backend, which is not installed; {OPENVINO_HINT}")
    if precision == "bf16" and not bf16_supported():
        raise InputError("this CPU has no bf16 units (OpenVINO does not list BF16 for it); use --precision f32")
    reason = "asked for" if backend == "openvino" else f"auto: precision {precision} asked for"
    if precision == "int8" and net is not None and domain is not None:
        patch = tuple(int(p) for p in patch_size)
        weights_key = weights_key or _weights_key(net, domain)
        verdict = read_verdict(OpenVINOFiles(net, domain, patch, batch_size, weights_key, "int8"))
        if verdict is not None and not verdict["accepted"]:
            raise InputError(f"INT8 was refused for domain {domain!r} ({verdict.get('why', 'its check failed')}); "
                             "use --precision f32 (or auto)")
        if not openvino_ready(net, domain, patch, batch_size, weights_key, "int8"):
            raise InputError(f"no INT8 graph of domain {domain!r} is prepared for these weights; "
                             f"{prepare_int8_hint(domain)}")
        reason += f" ({verdict['why']})" if verdict and verdict.get("why") else ""
    return Choice("openvino", precision, reason)


def _auto_backend(device: torch.device, net, domain, patch_size, batch_size: int, amp: bool,
                  weights_key) -> tuple[str, str]:
    if device.type == "cuda":
        return "torch", "auto: CUDA GPU" + (", mixed precision" if amp else "")
    if device.type != "cpu":
        return "torch", f"auto: {device.type.upper()}"
    if not openvino_available():
        hint = f"auto: OpenVINO is not installed ({OPENVINO_HINT}: about 8x faster on a CPU)"
    else:
        hint = "auto: the fast path is not prepared for this domain yet"
    if net is None or domain is None:
        return "torch", hint
    patch = tuple(int(p) for p in patch_size)
    weights_key = weights_key or _weights_key(net, domain)
    try:
        if openvino_ready(net, domain, patch, batch_size, weights_key):
            return "openvino", "auto: fastest here"
        if compiled_package(net, domain, patch, batch_size, weights_key=weights_key).is_file():
            return "compiled", "auto: compiled graph cached"
    except (OSError, InputError) as e:  # an unusable cache folder (U2NET_HOME a file…): eager still works
        return "torch", f"auto: the cache of fast paths cannot be used ({e})"
    return "torch", hint


def make_runner(net: nn.Module, domain: str, backend: str, device: torch.device, *, amp: bool = True,
                patch_size=None, batch_size: int = 1, channels_last: bool | None = None, precision: str = "auto"):
    """Build the runner for ``backend`` (one of :data:`training.infer.config.BACKENDS`; ``auto`` as
    :func:`choose` says) and ``precision``; ``channels_last`` (torch only): None = on the CPU, which
    works on a copy of the network. The runner's ``backend``, ``precision`` and ``reason`` say what
    runs and why."""
    validate_backend(backend)
    device = torch.device(device)
    config = net.domain_config(domain)
    patch = None if patch_size is None else tuple(int(p) for p in patch_size)
    weights = _weights_key(net, domain) if device.type == "cpu" and backend != "torch" else None
    c = choose(backend, device, net if patch else None, domain, patch, batch_size, amp, weights, precision)
    chosen, reason = c.backend, c.reason
    runner = None
    if chosen == "openvino":
        weights = weights or _weights_key(net, domain)
        compiled = OPENVINO_CACHE.get(
            (weights, domain, patch, batch_size, c.precision),
            lambda: compile_openvino(net, domain, config.in_channels, patch, batch_size, weights,
                                     precision=c.precision),
        )
        runner = OpenVINORunner(compiled, batch_size, config.num_classes)
    elif chosen == "compiled":
        load = load_compiled if backend == "compiled" else _load_cached_package  # auto never compiles
        try:
            fn = COMPILED_CACHE.get((weights, domain, patch, batch_size),
                                    lambda: load(net, domain, patch, batch_size, weights))
            runner = CompiledRunner(fn, batch_size, config.num_classes)
        except Exception as e:  # noqa: BLE001 - no compiler, an unsupported op, a full disk: eager still works
            log.warning("the compiled backend is unavailable (%s: %s); running eager PyTorch instead",
                        type(e).__name__, e)
            chosen, reason = "torch", f"the compiled backend failed ({type(e).__name__})"
    if runner is None:
        runner = TorchRunner(net, domain, device, amp=amp, channels_last=channels_last)
    runner.backend, runner.reason = chosen, reason
    runner.precision = c.precision if chosen == "openvino" else "f32"
    return runner


def _load_cached_package(net: nn.Module, domain: str, patch_size, batch_size: int, weights_key: str):
    """A package already on disk (``auto``): a damaged one is removed, not compiled again here."""
    path = compiled_package(net, domain, patch_size, batch_size, weights_key=weights_key)
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception:
        path.unlink(missing_ok=True)
        raise


def unavailable_backends() -> dict[str, str]:
    """The backends that cannot run here, each with what to install."""
    missing = {}
    if not openvino_available():
        missing["openvino"] = f"needs OpenVINO: {OPENVINO_HINT}"
    if not compiler_available():
        missing["compiled"] = "needs a C++ compiler (g++, e.g. apt-get install g++)"
    return missing
