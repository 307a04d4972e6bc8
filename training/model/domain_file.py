"""One domain shared as one file (``.u2d``): export it from a model, import it into another.

Format, chosen for safety and reuse: a ``.u2d`` file **is a safetensors adapter file** — the
adapter's tensors exactly as stored (float16 stays float16, bit for bit) and its metadata under the
usual ``"u2net"`` header key, with its card frozen in (:func:`training.model.card.resolved_card`) and
its own sha256 checksum of tensors and metadata — plus one more header entry,
``"u2net_domain_file"``: the format version, the domain, the trunk's hash and architecture, where
and when it was exported and by which napari-u2net, and a sha256 ``digest`` of that entry bound to
the adapter's checksum. So

* loading never unpickles anything, and import reuses the model files' own verification
  (:func:`~training.model.modelfile.read_weights`: checksum, finite weights, metadata schema), then
  the entry's digest: a flipped byte anywhere (tensors, metadata, card, trunk hash) is refused;
* one small file (≈ 80 KB for a bundled domain) that any safetensors reader can inspect;
* no zip layer to parse or to protect against path tricks.

Import checks the file, then the target model's trunk (its hash must be the one the domain was
trained on: refused otherwise with **both** hashes), the name (an existing domain is replaced only
with ``overwrite``; ``new_name`` imports it under another name), loads the adapter onto the trunk
to be sure it fits, and only then renames it into ``adapters/`` (atomic: a failed import leaves the
model as it was).

The bundled model is read-only (it belongs to the installation and is replaced by an upgrade):
importing into it installs into the user's own model instead, ``<cache>/models/user`` (the folder
the Fine-tune panel trains into, listed as "Yours: user" in the plugin and ``user [user]`` by
``u2net info``), created from the bundled model (its trunk and domains) when absent — the same rule
as the Fine-tune panel's (``user-<hash>`` when ``user`` holds another trunk).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from training.errors import InputError
from training.io.atomic import atomic_output, atomic_write_bytes
from training.io.folders import BUNDLED_MODEL, bundled_model_dir
from training.model.card import ModelCard, card_from_meta, resolved_card
from training.model.layout import (
    ADAPTER_DIR,
    ADAPTER_SUFFIX,
    META_KEY,
    TRUNK_FILE,
    adapter_path,
    trunk_hash_of,
)
from training.model.user_models import ensure_user_model, user_model_dir

SUFFIX = ".u2d"
ENVELOPE_KEY = "u2net_domain_file"
FORMAT = 1


@dataclass
class DomainFile:
    """What a ``.u2d`` file holds, once verified."""

    path: Path
    domain: str
    trunk_hash: str
    arch: dict
    exported_from: str
    exported_at: str
    tool: str
    card: ModelCard
    meta: dict  # the adapter's metadata (with its checksum)


@dataclass
class Imported:
    domain: str
    model_dir: Path  # where it was installed (the user's model when the bundled one was named)
    replaced: bool
    note: str = ""  # why it went elsewhere than asked (the bundled model is read-only)


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _envelope_digest(envelope: dict, checksum: dict) -> str:
    """sha256 of the entry (without its digest) and the adapter's checksum (tensors + metadata)."""
    body = {k: v for k, v in envelope.items() if k != "digest"}
    return hashlib.sha256(_canonical(body) + _canonical(checksum)).hexdigest()


def _stamped(state: dict, meta: dict) -> dict:
    """``meta`` as a reader sees it, with a fresh checksum (as ``write_weights`` stamps files)."""
    from training.model.modelfile import CHECKSUM_KEY, metadata_digest, tensors_digest, validate_adapter_meta

    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM_KEY}))
    validate_adapter_meta(body)
    body[CHECKSUM_KEY] = {"algorithm": "sha256", "weights": tensors_digest(state), "metadata": metadata_digest(body)}
    return body


def _model_label(model_dir: Path) -> str:
    try:
        if model_dir.resolve() == bundled_model_dir().resolve():
            return BUNDLED_MODEL
    except FileNotFoundError:
        pass
    return model_dir.name


def export_domain(model_dir: Path, domain: str, out_path: Path, overwrite: bool = False) -> DomainFile:
    """Write ``domain`` of ``model_dir`` as one ``.u2d`` file (atomic; never replaces a file
    unless ``overwrite``). The adapter and trunk are verified first; the weights are copied bit for bit."""
    from training import __version__
    from training.model.modelfile import read_weights, weights_hash

    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.suffix != SUFFIX:
        raise InputError(f"{out_path}: a shared domain file is named NAME{SUFFIX} (e.g. {domain}{SUFFIX})")
    if out_path.exists() and not overwrite:
        raise InputError(f"{out_path}: already exists; choose another name or allow overwriting (--overwrite)")
    src = adapter_path(model_dir, domain)
    if not src.is_file():
        have = ", ".join(sorted(p.stem for p in (model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}"))) or "none"
        raise InputError(f"{model_dir}: no domain {domain!r} here; this model has: {have}")
    trunk_state, trunk_meta = read_weights(model_dir / TRUNK_FILE, "trunk")
    trunk_hash = weights_hash(trunk_state)
    state, meta = read_weights(src, "adapter")
    if meta.get("trunk_hash") != trunk_hash:
        raise InputError(f"{src}: this adapter was trained on another trunk ({meta.get('trunk_hash')}) than "
                         f"{model_dir}'s ({trunk_hash}); it cannot be used with this model, so it is not exported")
    meta = _stamped(state, {**meta, "card": resolved_card(meta)})
    envelope = {
        "format": FORMAT,
        "domain": meta["domain"],
        "trunk_hash": trunk_hash,
        "arch": trunk_meta.get("arch", {}),
        "exported_from": _model_label(model_dir),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": f"napari-u2net {__version__}",
    }
    envelope["digest"] = _envelope_digest(envelope, meta["checksum"])
    from safetensors.torch import save as st_save_bytes

    data = st_save_bytes(state, metadata={META_KEY: json.dumps(meta), ENVELOPE_KEY: json.dumps(envelope)})
    atomic_write_bytes(out_path, data, overwrite=overwrite)
    return _info(out_path, envelope, meta)


def _info(path: Path, envelope: dict, meta: dict) -> DomainFile:
    return DomainFile(Path(path), str(meta["domain"]), str(envelope["trunk_hash"]), dict(envelope.get("arch") or {}),
                      str(envelope.get("exported_from", "")), str(envelope.get("exported_at", "")),
                      str(envelope.get("tool", "")), card_from_meta(meta), meta)


def _damaged(path: Path, why: str):
    from training.model.modelfile import ModelFileError

    return ModelFileError(f"{path}: {why}; the file was altered or damaged: ask for it again (re-export it)")


def read_domain_file(path: Path) -> tuple[DomainFile, dict]:
    """Verify a ``.u2d`` file and return (what it holds, its tensors). Anything damaged, edited or
    not a domain file raises :class:`~training.model.modelfile.ModelFileError` (nothing is used)."""
    from training.model.modelfile import ModelFileError, read_weights

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    state, meta = read_weights(path, "adapter")  # safetensors, checksum, finite weights, schema
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        text = header["__metadata__"].get(ENVELOPE_KEY)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise _damaged(path, f"unreadable header ({e})") from e
    if text is None:
        raise ModelFileError(f"{path}: not a shared domain file (no '{ENVELOPE_KEY}' entry): an adapter file "
                             f"belongs in its own model's {ADAPTER_DIR}/ folder; share a domain with "
                             f"`u2net domain export`")
    try:
        envelope = json.loads(text)
        ok = isinstance(envelope, dict) and isinstance(envelope.get("digest"), str)
    except ValueError:
        ok = False
    if not ok:
        raise _damaged(path, f"its '{ENVELOPE_KEY}' entry is malformed")
    fmt = envelope.get("format")
    if not (isinstance(fmt, int) and fmt >= 1):
        raise _damaged(path, f"invalid format {fmt!r}")
    if fmt > FORMAT:
        raise ModelFileError(f"{path}: domain file format {fmt} is newer than this napari-u2net reads "
                             f"({FORMAT}); upgrade napari-u2net")
    if "checksum" not in meta or envelope["digest"] != _envelope_digest(envelope, meta["checksum"]):
        raise _damaged(path, "its description does not match its digest")
    if envelope.get("domain") != meta["domain"] or envelope.get("trunk_hash") != meta.get("trunk_hash"):
        raise _damaged(path, "its description and its adapter disagree")
    return _info(path, envelope, meta), state


# -- where it goes -------------------------------------------------------------------------------
def _is_bundled(model_dir: Path) -> bool:
    try:
        return Path(model_dir).resolve() == bundled_model_dir().resolve()
    except FileNotFoundError:
        return False


def writable_model(model_dir: Path, home: Path | None = None) -> tuple[Path, str]:
    """(the model to install into, a note): ``model_dir`` itself, or for the read-only bundled
    model the user's own model, made from it (trunk and domains, copied atomically) if absent."""
    model_dir = Path(model_dir)
    if not _is_bundled(model_dir):
        return model_dir, ""
    target = ensure_user_model(model_dir, user_model_dir(trunk_hash_of(model_dir), home))
    note = (f"the bundled model is read-only, so the domain went into your own model {target.name!r} "
            f"({target}; it holds the bundled domains too)")
    return target, note


def import_domain(path: Path, model_dir: Path, overwrite: bool = False, new_name: str | None = None,
                  home: Path | None = None) -> Imported:
    """Verify ``path`` (a ``.u2d`` file) and install its domain into ``model_dir`` (see the module doc)."""
    from training.model.modelfile import load_adapter, load_trunk
    from training.model.network import DOMAIN_NAME

    shared, state = read_domain_file(path)
    model_dir = Path(model_dir)
    if not (model_dir / TRUNK_FILE).is_file():
        raise InputError(f"{model_dir}: no {TRUNK_FILE} here; is this a u2net model directory?")
    name = new_name or shared.domain
    if not DOMAIN_NAME.match(name):
        raise InputError(f"domain name {name!r}: use 1–64 letters, digits, '_', '-' or '.'")
    have = trunk_hash_of(model_dir)
    if have != shared.trunk_hash:
        raise InputError(
            f"{path}: domain {shared.domain!r} was trained on the trunk {shared.trunk_hash} "
            f"(exported from model {shared.exported_from!r}); model {_model_label(model_dir)!r} ({model_dir}) has "
            f"the trunk {have}. Import it into a model with that trunk, e.g. the one it came from"
        )
    target, note = writable_model(model_dir, home)
    dest = adapter_path(target, name)
    replaced = dest.exists()
    if replaced and not overwrite:
        raise InputError(f"model {_model_label(target)!r} ({target}) already has a domain {name!r}; import it "
                         "under another name (--as NEWNAME) or replace it (--overwrite)")
    meta = dict(shared.meta)
    meta["domain"] = name
    meta["provenance"] = {**meta.get("provenance", {}), "imported": {
        "file": Path(path).name, "as": name, "original_name": shared.domain, "exported_from": shared.exported_from,
        "exported_at": shared.exported_at, "tool": shared.tool}}
    meta = _stamped(state, meta)
    from safetensors.torch import save as st_save_bytes

    data = st_save_bytes(state, metadata={META_KEY: json.dumps(meta)})
    net, trunk = load_trunk(target / TRUNK_FILE)  # verified: the trunk the adapter will run on
    with atomic_output(dest, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        load_adapter(Path(tmp), net, trunk.trunk_hash)  # fits the trunk, or nothing is installed
    return Imported(name, target, replaced, note)
