"""Model files: one shared trunk file plus one adapter file per domain.

A model is a directory::

    MODEL_DIR/trunk.safetensors              shared weights + trunk metadata
    MODEL_DIR/adapters/<domain>.safetensors  one domain's weights + its metadata

Files are safetensors: raw tensors and a JSON header, so loading never unpickles anything.
Our metadata is one JSON document stored under the header key ``"u2net"``. Every adapter records
the hash of the trunk weights it was trained against; pairing it with another trunk is refused.
Writes go to a temporary file in the same directory and are renamed into place, so a crash never
leaves a half-written model file behind.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from training.errors import U2NetError
from training.io.atomic import atomic_write_bytes, default_file_mode  # noqa: F401  (re-exported)
from training.model.layout import ADAPTER_DIR, ADAPTER_SUFFIX, META_KEY, TRUNK_FILE, adapter_path  # noqa: F401
from training.model.network import ArchConfig, DomainAdapter, DomainConfig, U2Net

FORMAT_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# A palette for classes without a colour of their own (background is transparent black).
DEFAULT_COLORS = [
    "#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
    "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324",
]


class ModelFileError(U2NetError):
    """A model file or directory that cannot be used; the message says why and what to do."""


@dataclass
class ClassInfo:
    name: str
    color: str


@dataclass
class AdapterMeta:
    """Everything inference and the GUI need to use a domain, stored beside its weights."""

    domain: str
    modalities: list[str]
    classes: list[ClassInfo]
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # z, y, x in mm
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])  # z, y, x voxels
    pool_counts: list[int] | None = None
    normalization: list[dict] = field(default_factory=list)  # one per modality
    modality: str = "CT"  # "CT" or "MR": what the user picks a domain by
    description: str = ""
    # per class, how many of its largest connected components post-processing keeps (0: all),
    # learned from the training labels (e.g. 2 for both kidneys); None: one per class (older files)
    components: list[int] | None = None
    trunk_hash: str = ""
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def kept_components(self) -> list[int]:
        if self.components is not None and len(self.components) == self.num_classes:
            return [int(n) for n in self.components]
        return default_counts(self.num_classes)

    def domain_config(self) -> DomainConfig:
        pools = tuple(self.pool_counts) if self.pool_counts is not None else None
        return DomainConfig(self.domain, self.in_channels, self.num_classes, pools)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["classes"] = [c.__dict__.copy() for c in self.classes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterMeta:
        d = dict(d)
        d["classes"] = [ClassInfo(**c) for c in d["classes"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def default_counts(num_classes: int) -> list[int]:
    """One component per foreground class: the rule for model files without learned counts."""
    return [0] + [1] * (num_classes - 1)


def make_classes(names: list[str], colors: list[str] | None = None) -> list[ClassInfo]:
    """Class list with background first; colours from the default palette unless given."""
    colors = colors or [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))]
    return [ClassInfo(n, c) for n, c in zip(names, colors)]


@dataclass
class TrunkMeta:
    arch: ArchConfig
    trunk_hash: str
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


@dataclass
class Model:
    """A loaded model: the network with every adapter, and each domain's metadata."""

    net: U2Net
    trunk: TrunkMeta
    adapters: dict[str, AdapterMeta]
    path: Path | None = None

    @property
    def domains(self) -> list[str]:
        return list(self.adapters)

    def meta(self, domain: str) -> AdapterMeta:
        if domain not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise KeyError(f"unknown domain {domain!r}; this model has: {known}")
        return self.adapters[domain]


# -- hashing and atomic writes ------------------------------------------------------------
def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights as float32 (so a float16 file and its loaded copy agree)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# -- single files ---------------------------------------------------------------------------
def _to_storage(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return {k: v.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous() for k, v in state.items()}


def write_weights(path: Path, state: dict[str, torch.Tensor], meta: dict, dtype: str = "float32") -> None:
    data = st_save_bytes(_to_storage(state, dtype), metadata={META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, data)


def read_weights(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one model file; every failure becomes a :class:`ModelFileError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ModelFileError(f"{path}: file is empty or truncated ({len(raw)} bytes); re-download or re-save it")
    (header_len,) = struct.unpack("<Q", raw[:8])
    looks_like_safetensors = 8 + header_len <= len(raw) and raw[8:9] == b"{"
    if not looks_like_safetensors:
        # torch.save writes a zip archive ("PK\x03\x04"); older torch a bare pickle (0x80 + protocol).
        if raw[:4] == b"PK\x03\x04" or (raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise ModelFileError(
                f"{path}: this is a pickled PyTorch file, which is refused because loading it "
                "could run arbitrary code; convert it to a u2net model directory (safetensors)"
            )
        raise ModelFileError(f"{path}: file is truncated or not a safetensors model file")
    try:
        state = st_load_bytes(raw)
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError) as e:
        raise ModelFileError(f"{path}: file is truncated or corrupt ({e}); re-download or re-save it") from e
    try:
        meta = json.loads(header.get("__metadata__", {})[META_KEY])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: not a u2net model file (no '{META_KEY}' metadata)") from e
    if meta.get("kind") != kind:
        raise ModelFileError(f"{path}: expected a {kind} file, found {meta.get('kind')!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {version!r} is newer than this napari-u2net supports "
            f"({FORMAT_VERSION}); upgrade napari-u2net"
        )
    return state, meta


# -- trunk and adapters -----------------------------------------------------------------------
def save_trunk(path: Path, net: U2Net, provenance: dict | None = None, dtype: str = "float32") -> str:
    """Write the shared weights; returns the trunk hash adapters must carry."""
    state = _to_storage(net.trunk.state_dict(), dtype)
    trunk_hash = weights_hash(state)
    meta = {
        "kind": "trunk",
        "format_version": FORMAT_VERSION,
        "arch": net.arch.to_dict(),
        "trunk_hash": trunk_hash,
        "provenance": provenance or {},
    }
    write_weights(path, state, meta, dtype)
    return trunk_hash


def save_adapter(path: Path, net: U2Net, meta: AdapterMeta, trunk_hash: str, dtype: str = "float32") -> None:
    config = net.domain_config(meta.domain)
    if (config.in_channels, config.num_classes) != (meta.in_channels, meta.num_classes):
        raise ValueError(
            f"metadata of {meta.domain!r} says {meta.in_channels} modalities / {meta.num_classes} "
            f"classes, the network has {config.in_channels} / {config.num_classes}"
        )
    meta.trunk_hash = trunk_hash
    meta.pool_counts = list(config.pool_counts) if config.pool_counts is not None else None
    d = {"kind": "adapter", **meta.to_dict()}
    write_weights(path, net.adapters[meta.domain].state_dict(), d, dtype)



def save_model(
    model_dir: Path,
    net: U2Net,
    adapters: dict[str, AdapterMeta],
    provenance: dict | None = None,
    dtype: str = "float32",
) -> str:
    """Write a whole model directory (trunk first, then each adapter). Returns the trunk hash."""
    model_dir = Path(model_dir)
    trunk_hash = save_trunk(model_dir / TRUNK_FILE, net, provenance, dtype)
    for name, meta in adapters.items():
        save_adapter(adapter_path(model_dir, name), net, meta, trunk_hash, dtype)
    return trunk_hash


def load_trunk(path: Path, device: str | torch.device = "cpu") -> tuple[U2Net, TrunkMeta]:
    state, meta = read_weights(path, "trunk")
    try:
        arch = ArchConfig.from_dict(meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid architecture in metadata ({e})") from e
    with torch.device("meta"):  # built empty: the file's tensors are assigned, not copied
        net = U2Net(arch)
    _load_state(net.trunk, state, path, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"{path}: weights do not fit the architecture (missing {left[:3]})")
    trunk_hash = weights_hash(state)
    if meta.get("trunk_hash") and meta["trunk_hash"] != trunk_hash:
        raise ModelFileError(f"{path}: weights do not match the hash in their metadata; the file is corrupt")
    info = TrunkMeta(arch, trunk_hash, meta.get("provenance", {}), meta["format_version"])
    return net.to(device), info


def load_adapter(path: Path, net: U2Net, trunk_hash: str) -> AdapterMeta:
    """Add the adapter in ``path`` to ``net``; refuses one made for another trunk."""
    state, raw_meta = read_weights(path, "adapter")
    try:
        meta = AdapterMeta.from_dict(raw_meta)
        config = meta.domain_config()
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid adapter metadata ({e})") from e
    if meta.trunk_hash != trunk_hash:
        raise ModelFileError(
            f"{path}: adapter {meta.domain!r} was trained with another shared trunk "
            f"(hash {meta.trunk_hash[:12]}…, this model's is {trunk_hash[:12]}…); "
            "use it with the model it came from"
        )
    if meta.domain in net.adapters:
        net.remove_domain(meta.domain)
    try:  # built without random init; add_domain moves it to the trunk's device and dtype
        net.add_domain(meta.domain, config.in_channels, config.num_classes, pool_counts=config.pool_counts,
                       state=state)
    except RuntimeError:  # the tensors do not fit the architecture: say which
        with torch.device("meta"):
            _check_state(DomainAdapter(net.arch, config), state, path)
        raise
    return meta


def _check_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ModelFileError(
            f"{path}: weights do not fit the architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]})"
        )


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, assign: bool = False) -> None:
    _check_state(module, state, path)
    ref = next(iter(module.state_dict().values()))
    dtype = torch.float32 if ref.is_meta else ref.dtype
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=assign)


def load_model(model_dir: Path, device: str | torch.device = "cpu", domains: list[str] | None = None) -> Model:
    """Load a model directory (all adapters, or just ``domains``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: not a model directory")
    if not (model_dir / TRUNK_FILE).is_file():
        raise ModelFileError(f"{model_dir}: no {TRUNK_FILE} here; is this a u2net model directory?")
    net, trunk = load_trunk(model_dir / TRUNK_FILE)
    files = sorted((model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}"))
    if domains is not None:
        wanted = {adapter_path(model_dir, d) for d in domains}
        missing = [d for d in domains if adapter_path(model_dir, d) not in set(files)]
        if missing:
            have = ", ".join(f.stem for f in files) or "none"
            raise ModelFileError(f"{model_dir}: no adapter for domain(s) {', '.join(missing)}; "
                                 f"this model has: {have} (`u2net info` lists every model's domains)")
        files = [f for f in files if f in wanted]
    adapters = {}
    for f in files:
        meta = load_adapter(f, net, trunk.trunk_hash)
        if f.stem != meta.domain:
            raise ModelFileError(f"{f}: file name does not match its domain {meta.domain!r}")
        adapters[meta.domain] = meta
    return Model(net.to(device).eval(), trunk, adapters, model_dir)
