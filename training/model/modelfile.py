"""Model files: one shared trunk file plus one adapter file per domain.

A model is a directory::

    MODEL_DIR/trunk.safetensors              shared weights + trunk metadata
    MODEL_DIR/adapters/<domain>.safetensors  one domain's weights + its metadata

Files are safetensors: raw tensors and a JSON header, so loading never unpickles anything.
Our metadata is one JSON document stored under the header key ``"u2net"``. Every adapter records
the hash of the trunk weights it was trained against; pairing it with another trunk is refused.
Writes go to a temporary file in the same directory and are renamed into place, so a crash never
leaves a half-written model file behind.

Integrity: every file written by :func:`write_weights` carries ``"checksum"`` in its metadata,
``{"algorithm": "sha256", "weights": …, "metadata": …}``: a sha256 of the stored tensors (names,
dtypes, shapes and raw bytes, in name order) and one of the canonical JSON of the rest of the
metadata. :func:`read_weights` verifies both, refuses NaN/inf weights, and checks the metadata
against a small schema (:func:`validate_adapter_meta`, :func:`validate_trunk_meta`) before any
weight is used. Files written before checksums existed still load: they get the schema and the
finite-weights checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from training.data.normalization import SCHEMES as NORMALIZATION_SCHEMES
from training.errors import U2NetError
from training.io.atomic import atomic_write_bytes, default_file_mode  # noqa: F401  (re-exported)
from training.model.layout import ADAPTER_DIR, ADAPTER_SUFFIX, META_KEY, TRUNK_FILE, adapter_path
from training.model.network import DOMAIN_NAME, ArchConfig, DomainAdapter, DomainConfig, U2Net

FORMAT_VERSION = 1
CHECKSUM_KEY = "checksum"  # in our metadata: {"algorithm": "sha256", "weights": hex, "metadata": hex}
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# A palette for classes without a colour of their own (background is transparent black).
DEFAULT_COLORS = [
    "#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4",
    "#46f0f0", "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324",
]


class ModelFileError(U2NetError):
    """A model file or directory that cannot be used; the message says why and what to do."""


class MetadataError(ModelFileError, ValueError):
    """Model metadata that fails the schema (wrong type, absurd value); the message says which."""


_DAMAGED = "the file was altered or damaged: re-download or re-save it"


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
    # the model card's own words (training/model/card.py: "data", "intended_use", "limits", …);
    # empty in older files, whose card is derived from the provenance
    card: dict = field(default_factory=dict)
    # temperature scaling fitted on validation cases (training/train/calibration.py): {"temperature",
    # "ece_before", "ece_after", "cases", "mean_uncertainty_fg", "volume_interval"}; None in older
    # files, whose probabilities are used as the network gives them (temperature 1)
    calibration: dict | None = None

    @property
    def temperature(self) -> float:
        """What inference divides the logits by before the softmax (1: not calibrated)."""
        return float(self.calibration["temperature"]) if self.calibration else 1.0

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
        """From a file's metadata; raises :class:`MetadataError` if it fails the schema."""
        validate_adapter_meta(d)
        d = dict(d)
        d["classes"] = [ClassInfo(str(c["name"]), str(c["color"])) for c in d["classes"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def default_counts(num_classes: int) -> list[int]:
    """One component per foreground class: the rule for model files without learned counts."""
    return [0] + [1] * (num_classes - 1)


def make_classes(names: list[str], colors: list[str] | None = None) -> list[ClassInfo]:
    """Class list with background first; colours from the default palette unless given."""
    colors = colors or [DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(len(names))]
    return [ClassInfo(n, c) for n, c in zip(names, colors)]


# -- metadata schema ---------------------------------------------------------------------------
SPACING_RANGE_MM = (0.05, 50.0)  # per axis
PATCH_RANGE = (1, 1024)  # voxels per axis
MAX_CHANNELS_IN = 64  # modalities per domain
MAX_CLASSES = 256  # classes per domain, background included (labels fit in uint8)
MAX_POOL_COUNT = 16
MAX_COMPONENTS = 100_000
ARCH_RANGES = {"base_channels": (1, 1024), "levels": (1, 12), "max_channels": (1, 8192)}


def _short(value, limit: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite JSON number (ints are exact, however large: math.isfinite would overflow)."""
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


def _int_list(d: dict, key: str, n: int | None, lo: int, hi: int, what: str) -> None:
    v = d.get(key)
    if (not isinstance(v, list) or (n is not None and len(v) != n)
            or not all(_is_int(x) and lo <= x <= hi for x in v)):
        count = f"{n} " if n is not None else ""
        raise MetadataError(f"{key} must be a list of {count}whole numbers from {lo} to {hi} ({what}), "
                            f"got {_short(v)}")


def _str_field(d: dict, key: str, limit: int = 100_000) -> None:
    if key in d and not (isinstance(d[key], str) and len(d[key]) <= limit):
        raise MetadataError(f"{key} must be text, got {_short(d[key])}")


def _normalization_spec(i: int, spec) -> None:
    where = f"normalization[{i}]"
    if not isinstance(spec, dict):
        raise MetadataError(f"{where} must be an object like {{\"scheme\": \"zscore\"}}, got {_short(spec)}")
    scheme = spec.get("scheme", "zscore")  # as normalize_channel reads it
    if scheme not in NORMALIZATION_SCHEMES:
        raise MetadataError(f"{where}: unknown normalisation scheme {_short(scheme)}; expected one of "
                            f"{', '.join(NORMALIZATION_SCHEMES)}")
    if scheme == "ct":
        clip = spec.get("clip")
        if not (isinstance(clip, list) and len(clip) == 2 and all(_is_number(x) for x in clip)
                and clip[0] <= clip[1]):
            raise MetadataError(f"{where}: a CT normalisation needs clip = [low, high] (finite numbers, "
                                f"low ≤ high), got {_short(clip)}")
        for key in ("mean", "std"):
            if not _is_number(spec.get(key)):
                raise MetadataError(f"{where}: a CT normalisation needs a finite number {key}, "
                                    f"got {_short(spec.get(key))}")
        if spec["std"] < 0:
            raise MetadataError(f"{where}: std must be ≥ 0, got {_short(spec['std'])}")
    elif scheme == "zscore" and not isinstance(spec.get("nonzero", False), bool):
        raise MetadataError(f"{where}: nonzero must be true or false, got {_short(spec.get('nonzero'))}")


def _common_fields(d: dict) -> None:
    version = d.get("format_version", FORMAT_VERSION)
    if not (_is_int(version) and 1 <= version):
        raise MetadataError(f"format_version must be a whole number ≥ 1, got {_short(version)}")
    _str_field(d, "trunk_hash", 256)
    if not isinstance(d.get("provenance", {}), dict):
        raise MetadataError(f"provenance must be an object, got {_short(d.get('provenance'))}")


def validate_adapter_meta(d) -> None:
    """Check an adapter's metadata (a dict as stored in its file) against the schema.

    Raises :class:`MetadataError` naming the first offending field. Rules: ``domain`` a valid
    domain name; ``modalities`` 1–64 strings; ``classes`` 2–256 ``{name, color}`` objects with
    text values; ``spacing`` 3 finite numbers in 0.05–50 mm; ``patch_size`` 3 integers in
    1–1024; ``pool_counts`` null or 3 integers in 0–16; ``normalization`` empty or one spec per
    modality, each a known scheme with its statistics (CT: clip [lo ≤ hi], mean, std ≥ 0, all
    finite; zscore: nonzero a boolean); ``components`` null or one integer ≥ 0 per class;
    ``modality``/``description``/``trunk_hash`` text; ``provenance`` an object; ``card`` an
    object of texts, numbers or lists of texts; ``calibration`` null or an object with a
    temperature in 0.05–20 (:func:`_calibration_field`);
    ``format_version`` an integer ≥ 1. Unknown keys are allowed (newer writers may add some).
    """
    if not isinstance(d, dict):
        raise MetadataError(f"metadata must be a JSON object, got {_short(d)}")
    for key in ("domain", "modalities", "classes"):
        if key not in d:
            raise MetadataError(f"required field {key!r} is missing")
    if not (isinstance(d["domain"], str) and DOMAIN_NAME.match(d["domain"])):
        raise MetadataError(f"domain must be a name of 1–64 letters, digits, '_', '-' or '.', "
                            f"got {_short(d['domain'])}")
    mods = d["modalities"]
    if not (isinstance(mods, list) and 1 <= len(mods) <= MAX_CHANNELS_IN
            and all(isinstance(m, str) and len(m) <= 256 for m in mods)):
        raise MetadataError(f"modalities must be a list of 1–{MAX_CHANNELS_IN} names, got {_short(mods)}")
    classes = d["classes"]
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES):
        raise MetadataError(f"classes must be a list of 2–{MAX_CLASSES} {{name, color}} objects "
                            f"(background first), got {_short(classes)}")
    for c in classes:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("color"), str)
                and len(c["name"]) <= 256 and len(c["color"]) <= 64):
            raise MetadataError(f"each class must be an object {{\"name\": text, \"color\": text}}, "
                                f"got {_short(c)}")
    spacing = d.get("spacing", [1.0, 1.0, 1.0])
    lo, hi = SPACING_RANGE_MM
    if not (isinstance(spacing, list) and len(spacing) == 3
            and all(_is_number(x) and lo <= x <= hi for x in spacing)):
        raise MetadataError(f"spacing must be 3 numbers from {lo:g} to {hi:g} mm (z, y, x), got {_short(spacing)}")
    _int_list({"patch_size": [64, 64, 64], **d}, "patch_size", 3, *PATCH_RANGE, "voxels, z, y, x")
    if d.get("pool_counts") is not None:
        _int_list(d, "pool_counts", 3, 0, MAX_POOL_COUNT, "downsamplings per axis")
    norm = d.get("normalization", [])
    if not (isinstance(norm, list) and len(norm) in (0, len(mods))):
        raise MetadataError(f"normalization must be a list with one spec per modality ({len(mods)}), "
                            f"got {_short(norm)}")
    for i, spec in enumerate(norm):
        _normalization_spec(i, spec)
    if d.get("components") is not None:
        _int_list(d, "components", len(classes), 0, MAX_COMPONENTS, "components kept per class")
    for key in ("modality", "description"):
        _str_field(d, key)
    _card_field(d)
    _calibration_field(d, len(classes))
    _common_fields(d)


def _card_field(d: dict) -> None:
    """``card``: an object of short texts, numbers or lists of texts (no nesting: it is shown as is)."""
    card = d.get("card", {})
    ok = isinstance(card, dict) and len(card) <= 64 and all(
        isinstance(k, str) and len(k) <= 64 and (
            v is None or isinstance(v, (bool, str)) or _is_number(v)
            or (isinstance(v, list) and len(v) <= 256 and all(isinstance(x, str) for x in v)))
        and len(json.dumps(v)) <= 20_000
        for k, v in card.items())
    if not ok:
        raise MetadataError(f"card must be an object of texts, numbers or lists of texts, got {_short(card)}")


TEMPERATURE_RANGE = (0.05, 20.0)  # beyond it a "calibration" only says the fit went wrong


def _calibration_field(d: dict, num_classes: int) -> None:
    """``calibration``: null, or an object with ``temperature`` (a number in 0.05–20), optional
    fractions ``ece_before``/``ece_after``/``mean_uncertainty_fg`` in 0–1, ``cases`` ≥ 0 and
    ``volume_interval`` {``nominal`` in (0, 1), ``scale``: one number ≥ 0 per foreground class}."""
    cal = d.get("calibration")
    if cal is None:
        return
    if not isinstance(cal, dict):
        raise MetadataError(f"calibration must be an object with a temperature, got {_short(cal)}")
    t = cal.get("temperature")
    lo, hi = TEMPERATURE_RANGE
    if not (_is_number(t) and lo <= t <= hi):
        raise MetadataError(f"calibration.temperature must be a number from {lo:g} to {hi:g}, got {_short(t)}")
    for key in ("ece_before", "ece_after", "mean_uncertainty_fg"):
        v = cal.get(key)
        if v is not None and not (_is_number(v) and 0 <= v <= 1):
            raise MetadataError(f"calibration.{key} must be a number from 0 to 1, got {_short(v)}")
    if cal.get("cases") is not None and not (_is_int(cal["cases"]) and cal["cases"] >= 0):
        raise MetadataError(f"calibration.cases must be a whole number ≥ 0, got {_short(cal['cases'])}")
    vi = cal.get("volume_interval")
    if vi is not None:
        scale = vi.get("scale") if isinstance(vi, dict) else None
        nominal = vi.get("nominal") if isinstance(vi, dict) else None
        if not (isinstance(scale, list) and len(scale) == num_classes - 1
                and all(_is_number(x) and 0 <= x <= 1e6 for x in scale)
                and _is_number(nominal) and 0 < nominal < 1):
            raise MetadataError(f"calibration.volume_interval must be {{\"nominal\": a fraction, \"scale\": one "
                                f"number ≥ 0 per foreground class ({num_classes - 1})}}, got {_short(vi)}")


def validate_trunk_meta(d) -> None:
    """Check a trunk's metadata: ``arch`` with integer base_channels (1–1024), levels (1–12) and
    max_channels (base_channels–8192), plus the fields every model file has (see
    :func:`validate_adapter_meta`). Raises :class:`MetadataError`."""
    if not isinstance(d, dict):
        raise MetadataError(f"metadata must be a JSON object, got {_short(d)}")
    arch = d.get("arch")
    if not isinstance(arch, dict):
        raise MetadataError(f"arch must be an object with base_channels, levels, max_channels, got {_short(arch)}")
    for key, (lo, hi) in ARCH_RANGES.items():
        v = arch.get(key)
        if not (_is_int(v) and lo <= v <= hi):
            raise MetadataError(f"arch.{key} must be a whole number from {lo} to {hi}, got {_short(v)}")
    if arch["max_channels"] < arch["base_channels"]:
        raise MetadataError(f"arch.max_channels ({arch['max_channels']}) is below base_channels "
                            f"({arch['base_channels']})")
    _common_fields(d)


_VALIDATORS = {"adapter": validate_adapter_meta, "trunk": validate_trunk_meta}


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


# -- checksums ---------------------------------------------------------------------------------
def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of tensors exactly as stored: name, dtype, shape and raw bytes of each, in name order.

    Unlike :func:`weights_hash` nothing is converted, so it is cheap and sees every stored bit.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(json.dumps([key, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metadata_digest(meta: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``meta`` without its checksum."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _verify_checksum(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    checksum = meta[CHECKSUM_KEY]
    if not (isinstance(checksum, dict) and checksum.get("algorithm") == "sha256"
            and isinstance(checksum.get("weights"), str) and isinstance(checksum.get("metadata"), str)):
        raise ModelFileError(f"{path}: the file's checksum entry is malformed ({_short(checksum)}); {_DAMAGED}")
    if checksum["metadata"] != metadata_digest(meta):
        raise ModelFileError(f"{path}: the file's metadata do not match its checksum; {_DAMAGED}")
    if checksum["weights"] != tensors_digest(state):
        raise ModelFileError(f"{path}: the file's weights do not match its checksum; {_DAMAGED}")


def _non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or ±inf, else None."""
    for key in sorted(state):
        t = state[key].detach()
        if not t.is_floating_point():
            continue
        if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS:  # numpy: ~30× faster than torch on float16
            finite = bool(np.isfinite(t.numpy()).all())
        else:
            finite = bool(torch.isfinite(t).all())
        if not finite:
            return key
    return None


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


# -- single files ---------------------------------------------------------------------------
def _to_storage(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return {k: v.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous() for k, v in state.items()}


def write_weights(path: Path, state: dict[str, torch.Tensor], meta: dict, dtype: str = "float32") -> None:
    """Write one model file with ``meta`` under our header key, stamped with a fresh checksum.

    Any checksum already in ``meta`` is replaced (``meta`` itself is not modified). Refuses to write
    NaN/inf weights, which no reader would accept (e.g. float32 values beyond the float16 range).
    """
    stored = _to_storage(state, dtype)
    bad = _non_finite(stored)
    if bad is not None:
        why = ("the training diverged" if _non_finite({bad: state[bad]}) is not None
               else f"its values do not fit {dtype}: save as float32")
        raise ModelFileError(f"{path}: refusing to write weight {bad!r} with NaN or infinite values; {why}")
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_KEY}))  # as a reader sees it
    body[CHECKSUM_KEY] = {"algorithm": "sha256", "weights": tensors_digest(stored), "metadata": metadata_digest(body)}
    data = st_save_bytes(stored, metadata={META_KEY: json.dumps(body)})
    atomic_write_bytes(path, data)


def read_weights(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one model file; every failure becomes a :class:`ModelFileError` naming the file.

    Before returning anything it checks the file's checksum (files from before checksums existed
    have none and skip that step), that every weight is finite, and that the metadata pass the
    schema of ``kind`` ("trunk" or "adapter"). The metadata returned include the verified checksum.
    """
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
        msg = " ".join(str(e).split())[:200]
        raise ModelFileError(f"{path}: file is truncated or corrupt ({msg}); re-download or re-save it") from e
    try:
        meta = json.loads(header.get("__metadata__", {})[META_KEY])
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise ModelFileError(f"{path}: not a u2net model file (no '{META_KEY}' metadata)") from e
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: not a u2net model file ('{META_KEY}' metadata is not a JSON object)")
    if meta.get("kind") != kind:
        raise ModelFileError(f"{path}: expected a {kind} file, found {_short(meta.get('kind'))}")
    version = meta.get("format_version")
    if not (_is_int(version) and version >= 1):
        raise ModelFileError(f"{path}: invalid model format version {_short(version)}; {_DAMAGED}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {_short(version)} is newer than this napari-u2net supports "
            f"({FORMAT_VERSION}); upgrade napari-u2net"
        )
    if CHECKSUM_KEY in meta:
        _verify_checksum(path, state, meta)
    bad = _non_finite(state)
    if bad is not None:
        raise ModelFileError(f"{path}: weight {bad!r} holds NaN or infinite values; {_DAMAGED}")
    try:
        _VALIDATORS.get(kind, lambda m: None)(meta)
    except MetadataError as e:
        raise ModelFileError(f"{path}: invalid {kind} metadata: {e}; {_DAMAGED}") from e
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
    try:
        validate_trunk_meta(meta)
    except MetadataError as e:
        raise MetadataError(f"{path}: refusing to write invalid trunk metadata: {e}") from e
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
    d = json.loads(json.dumps({"kind": "adapter", **meta.to_dict()}))  # as it will be read back
    try:
        validate_adapter_meta(d)
    except MetadataError as e:
        raise MetadataError(f"{path}: refusing to write invalid metadata for {meta.domain!r}: {e}") from e
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
    state, meta = read_weights(path, "trunk")  # checksum, finite weights and schema checked
    try:
        arch = ArchConfig.from_dict(meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid architecture in metadata ({e}); {_DAMAGED}") from e
    with torch.device("meta"):  # built empty: the file's tensors are assigned, not copied
        net = U2Net(arch)
    _load_state(net.trunk, state, path, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(f"{path}: weights do not fit the architecture (missing {left[:3]})")
    trunk_hash = weights_hash(state)
    if meta.get("trunk_hash") and meta["trunk_hash"] != trunk_hash:
        raise ModelFileError(f"{path}: weights do not match the hash in their metadata; {_DAMAGED}")
    info = TrunkMeta(arch, trunk_hash, meta.get("provenance", {}), meta["format_version"])
    return net.to(device), info


def load_adapter(path: Path, net: U2Net, trunk_hash: str) -> AdapterMeta:
    """Add the adapter in ``path`` to ``net``; refuses one made for another trunk."""
    state, raw_meta = read_weights(path, "adapter")  # checksum, finite weights and schema checked
    try:
        meta = AdapterMeta.from_dict(raw_meta)
        config = meta.domain_config()
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid adapter metadata ({e}); {_DAMAGED}") from e
    levels = net.arch.levels
    if config.pool_counts is not None and max(config.pool_counts) > levels - 1:
        raise ModelFileError(f"{path}: invalid adapter metadata: pool_counts {list(config.pool_counts)} exceed "
                             f"the trunk's {levels - 1} downsamplings; {_DAMAGED}")
    conv = state.get("input_conv.weight")
    if conv is not None and (conv.ndim != 5 or conv.shape[1] != meta.in_channels):
        channels = conv.shape[1] if conv.ndim == 5 else "?"
        raise ModelFileError(f"{path}: the metadata list {meta.in_channels} modalities but the weights take "
                             f"{channels} input channels; {_DAMAGED}")
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
