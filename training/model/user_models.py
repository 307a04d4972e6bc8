"""The user's own, writable model folder: where domains taught in napari or imported from a
``.u2d`` file go when the model they extend (the bundled one, a checksummed download) must not
be written to. One rule for the Fine-tune panel and ``u2net domain import``."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from training.errors import InputError
from training.io.folders import cache_dir
from training.model.layout import ADAPTER_DIR, ADAPTER_SUFFIX, TRUNK_FILE, trunk_hash_of

USER_MODEL = "user"  # <cache>/models/user


def user_model_dir(trunk_hash: str, home: Path | None = None) -> Path:
    """``<U2NET_HOME or OS cache>/models/user``, or ``user-<hash>`` when ``user`` already holds a
    model with another trunk (each trunk gets its own folder; nothing is mixed)."""
    base = (home or cache_dir()) / "models"
    first = base / USER_MODEL
    if not (first / TRUNK_FILE).exists() or trunk_hash_of(first) == trunk_hash:
        return first
    return base / f"{USER_MODEL}-{trunk_hash[:12]}"


def ensure_user_model(source: Path, target: Path) -> Path:
    """Make ``target`` a writable model folder with ``source``'s trunk and copy the adapters it
    lacks. A fresh target is filled in a temporary sibling and renamed into place, so an
    interrupted copy leaves nothing half-written; a target with another trunk, or a non-empty
    folder that holds no model, is refused."""
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        return target
    want = trunk_hash_of(source)
    if (target / TRUNK_FILE).exists():
        have = trunk_hash_of(target)
        if have != want:
            raise InputError(
                f"{target} holds a model with another trunk ({have[:12]} ≠ {want[:12]}); "
                "choose an empty folder (or that model's own folder)"
            )
        (target / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}")):
            if not (target / ADAPTER_DIR / f.name).exists():
                copy_atomic(f, target / ADAPTER_DIR / f.name)
        return target
    if target.exists() and any(p for p in target.iterdir() if not p.name.startswith(".")):
        raise InputError(f"{target} is not empty and holds no model; choose an empty folder or a model folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            (tmp / ADAPTER_DIR).mkdir(parents=True)
            shutil.copy2(source / TRUNK_FILE, tmp / TRUNK_FILE)
            for f in sorted((source / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}")):
                shutil.copy2(f, tmp / ADAPTER_DIR / f.name)
            if target.exists():
                target.rmdir()  # an empty folder only
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise InputError(f"cannot make the model folder {target} ({e}); choose a writable folder "
                         "(or set U2NET_HOME to one)") from e
    return target


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a hidden temporary sibling: ``dst`` is whole or absent."""
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
