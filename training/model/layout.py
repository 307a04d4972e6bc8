"""A model folder's layout and its files' JSON headers, read without torch (listings, the GUI).

A model is a directory::

    MODEL_DIR/trunk.safetensors              shared weights + trunk metadata
    MODEL_DIR/adapters/<domain>.safetensors  one domain's weights + its metadata

Our metadata is one JSON document stored under the safetensors header key ``"u2net"``.
"""

from __future__ import annotations

import json
from pathlib import Path

TRUNK_FILE = "trunk.safetensors"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = ".safetensors"
META_KEY = "u2net"


def adapter_path(model_dir: Path, domain: str) -> Path:
    return Path(model_dir) / ADAPTER_DIR / f"{domain}{ADAPTER_SUFFIX}"


def read_header_meta(path: Path) -> dict:
    """Our metadata from a model file's header (no weights read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})[META_KEY])


def trunk_hash_of(model_dir: Path) -> str:
    """The trunk's weights hash from its file's header (no weights loaded); "" if it has none."""
    return str(read_header_meta(Path(model_dir) / TRUNK_FILE).get("trunk_hash", ""))


def model_dir_domains(model_dir: Path) -> tuple[list[dict], dict]:
    """(domains, trunk provenance) from the files' headers, without loading any weights."""
    model_dir = Path(model_dir)
    try:
        provenance = read_header_meta(model_dir / TRUNK_FILE).get("provenance", {})
    except Exception:  # damaged or missing: the listing still shows the model; loading will say why
        provenance = {}
    domains = []
    for f in sorted((model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}")):
        try:
            m = read_header_meta(f)
        except Exception:
            domains.append({"name": f.stem, "error": "unreadable adapter file"})
            continue
        domains.append(
            {
                "name": m.get("domain", f.stem),
                "modality": m.get("modality", ""),
                "modalities": m.get("modalities", []),
                "classes": [c.get("name") for c in m.get("classes", [])],
                "description": m.get("description", ""),
                "provenance": m.get("provenance", {}),
            }
        )
    return domains, provenance
