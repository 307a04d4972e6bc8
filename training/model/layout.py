"""A model folder's layout and its files' JSON headers, read without torch (listings, the GUI).

A model is a directory::

    MODEL_DIR/trunk.safetensors              shared weights + trunk metadata
    MODEL_DIR/adapters/<domain>.safetensors  one domain's weights + its metadata

Our metadata is one JSON document stored under the safetensors header key ``"u2net"``.
Nothing here verifies a file (checksums, schema): listings stay tolerant, and loading a model
(:mod:`training.model.modelfile`) is where a damaged or altered file is refused.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

TRUNK_FILE = "trunk.safetensors"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".safetensors"
META_KEY = "u2net"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# What reading a damaged, truncated or foreign file's header can raise.
HEADER_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error)


def adapter_path(model_dir: Path, domain: str) -> Path:
    return Path(model_dir) / ADAPTER_DIR / f"{domain}{ADAPTER_SUFFIX}"


def read_header_meta(path: Path) -> dict:
    """Our metadata from a model file's header (no weights read; no torch, no safetensors).

    Raises one of :data:`HEADER_ERRORS` (ValueError when the header is not what we wrote).
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header of {length} bytes is too large; not a safetensors file")
        text = f.read(length)
    if len(text) != length:
        raise ValueError(f"{path}: file is truncated")
    meta = json.loads(json.loads(text)["__metadata__"][META_KEY])
    if not isinstance(meta, dict):
        raise TypeError(f"{path}: the '{META_KEY}' metadata is not a JSON object")
    return meta


def trunk_hash_of(model_dir: Path) -> str:
    """The trunk's weights hash from its file's header (no weights loaded); "" if it has none."""
    return str(read_header_meta(Path(model_dir) / TRUNK_FILE).get("trunk_hash", ""))


def _texts(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def model_dir_domains(model_dir: Path) -> tuple[list[dict], dict]:
    """(domains, trunk provenance) from the files' headers, without loading any weights."""
    model_dir = Path(model_dir)
    try:
        provenance = read_header_meta(model_dir / TRUNK_FILE).get("provenance", {})
    except HEADER_ERRORS:  # damaged or missing: the listing still shows the model; loading will say why
        provenance = {}
    if not isinstance(provenance, dict):
        provenance = {}
    domains = []
    for f in sorted((model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}")):
        try:
            m = read_header_meta(f)
        except HEADER_ERRORS:
            domains.append({"name": f.stem, "error": "unreadable adapter file"})
            continue
        classes = m.get("classes")
        domains.append(
            {
                "name": str(m.get("domain", f.stem)),
                "modality": str(m.get("modality", "")),
                "modalities": _texts(m.get("modalities")),
                "classes": [str(c.get("name")) if isinstance(c, dict) else str(c)
                            for c in (classes if isinstance(classes, list) else [])],
                "description": str(m.get("description", "")),
                "provenance": m.get("provenance") if isinstance(m.get("provenance"), dict) else {},
            }
        )
    return domains, provenance
