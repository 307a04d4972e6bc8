"""Finding models: the bundled default, a model directory, or a name in a download registry.

A registry is a JSON document listing downloadable models, each a set of files (the model
directory layout: ``trunk.safetensors`` and ``adapters/<domain>.safetensors``) with a URL, a
sha256 and a size per file. The package ships ``resources/registry.json``; the environment
variable ``U2NET_REGISTRY`` (a path or an http(s) URL of another registry file) adds entries.

Downloads go through pooch into a cache: ``$U2NET_HOME`` if set, else the OS cache folder
(``pooch.os_cache("napari-u2net")``); a model lives in ``<cache>/models/<name>/``. Every file is
fetched into a fresh staging folder in the cache (pooch streams it to a temporary file and moves
it only once its sha256 matches), then renamed into the model folder, so a file in the model
folder is always a whole, verified one. A cached file whose hash does not match (a damaged
disk, an edited file) is reported, never silently re-downloaded and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import InputError, U2NetError
from training.io.atomic import atomic_write_text
from training.io.folders import BUNDLED_MODEL, HOME_ENV, bundled_model_dir, cache_dir, resources_dir
from training.model.layout import TRUNK_FILE, model_dir_domains

REGISTRY_ENV = "U2NET_REGISTRY"
REGISTRY_FILE = "registry.json"
MANIFEST_FILE = "registry-entry.json"  # written into a cached model once all its files are verified
REGISTRY_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)


class RegistryError(U2NetError):
    """A registry, download or cached model that cannot be used; the message says what to do."""


# -- registry entries ---------------------------------------------------------------------------
@dataclass
class RemoteFile:
    path: str  # relative to the model directory, e.g. "adapters/liver-ct.safetensors"
    url: str
    sha256: str
    size: int | None = None


@dataclass
class RegistryEntry:
    name: str
    files: list[RemoteFile]
    description: str = ""
    version: str = ""
    domains: list[dict] = field(default_factory=list)  # [{name, modality, classes}], as published
    source: str = ""  # the registry file or URL the entry came from

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "domains": self.domains,
            "files": [f.__dict__.copy() for f in self.files],
        }


@dataclass
class Registry:
    """All entries known (later sources override earlier ones) and sources that could not be read."""

    entries: dict[str, RegistryEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class ModelEntry:
    """One model a user can pick: bundled, already in the cache, downloadable, or made by the user."""

    name: str
    source: str  # "bundled" | "cached" | "registry" | "user"
    path: Path | None
    description: str = ""
    domains: list[dict] = field(default_factory=list)  # [{name, modality, modalities, classes, ...}]
    version: str = ""
    provenance: dict = field(default_factory=dict)


def _parse_entry(d: dict, source: str, base_url: str | None) -> RegistryEntry:
    name = d.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    files = []
    for f in d.get("files") or []:
        rel = str(f["path"])
        parts = Path(rel).parts
        if Path(rel).is_absolute() or not parts or ".." in parts or "\\" in rel:
            raise ValueError(f"{name}: file path {rel!r} must be relative and inside the model folder")
        sha = str(f["sha256"]).lower().removeprefix("sha256:")
        if not _HASH_RE.match(sha):
            raise ValueError(f"{name}: {rel}: sha256 must be 64 hex digits, got {f['sha256']!r}")
        url = str(f["url"])
        if base_url:
            url = urllib.parse.urljoin(base_url, url)
        size = f.get("size")
        files.append(RemoteFile(rel, url, sha, int(size) if size is not None else None))
    if not any(f.path == "trunk.safetensors" for f in files):
        raise ValueError(f"{name}: the files must include trunk.safetensors")
    domains = [dm if isinstance(dm, dict) else {"name": str(dm)} for dm in d.get("domains") or []]
    return RegistryEntry(
        name, files, str(d.get("description", "")), str(d.get("version", "")), domains, source
    )


def parse_registry(doc: dict, source: str, base_url: str | None = None) -> dict[str, RegistryEntry]:
    """Entries of one registry document; relative URLs are resolved against ``base_url``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise RegistryError(f"registry {source}: expected a JSON object with a 'models' list")
    fmt = doc.get("format", REGISTRY_FORMAT)
    if not isinstance(fmt, int) or fmt > REGISTRY_FORMAT:
        raise RegistryError(
            f"registry {source}: format {fmt!r} is newer than this napari-u2net reads "
            f"({REGISTRY_FORMAT}); upgrade napari-u2net"
        )
    entries = {}
    for d in doc["models"]:
        try:
            entry = _parse_entry(d, source, base_url)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RegistryError(f"registry {source}: invalid model entry ({e}); fix or remove it") from e
        entries[entry.name] = entry
    return entries


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def read_registry(
    source: str | Path, cache: Path | None = None, timeout: float = 5.0
) -> dict[str, RegistryEntry]:
    """Read a registry file, or fetch it from an http(s) URL.

    A fetched registry is kept in ``<cache>/registries/`` and used from there when the URL
    cannot be reached, so a machine that was online once still knows the names offline.
    """
    source = str(source)
    if not _is_url(source):
        path = Path(source).expanduser()
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"registry {path}: no such file; check {REGISTRY_ENV}") from None
        except (OSError, ValueError) as e:
            raise RegistryError(f"registry {path}: cannot read it as JSON ({e})") from e
        return parse_registry(doc, str(path))

    import requests

    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    copy = (cache or cache_dir()) / "registries" / f"{key}.json"
    try:
        response = requests.get(source, timeout=timeout)
        response.raise_for_status()
        doc = json.loads(response.content)
    except (requests.RequestException, ValueError) as e:
        if copy.is_file():
            return parse_registry(json.loads(copy.read_text()), f"{source} (copy from {copy})", source)
        raise RegistryError(f"registry {source}: cannot fetch it ({e}) and there is no cached copy") from e
    entries = parse_registry(doc, source, source)
    atomic_write_text(copy, json.dumps(doc, indent=1))
    return entries


def load_registry(environ: Mapping[str, str] | None = None, cache: Path | None = None) -> Registry:
    """The shipped registry plus ``$U2NET_REGISTRY``; unreadable extra sources become ``problems``."""
    environ = os.environ if environ is None else environ
    registry = Registry()
    shipped = resources_dir() / REGISTRY_FILE
    sources = [str(shipped)] if shipped.is_file() else []
    if environ.get(REGISTRY_ENV):
        sources.append(environ[REGISTRY_ENV])
    for source in sources:
        try:
            registry.entries.update(read_registry(source, cache))
        except RegistryError as e:
            registry.problems.append(str(e))
    return registry


# -- the cache ------------------------------------------------------------------------------------

def model_cache_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(entry: RegistryEntry, f: RemoteFile, model_dir: Path) -> bool:
    """True if the cached file is present and verified, False if absent; raises if it is damaged."""
    path = model_dir / f.path
    if not path.is_file():
        return False
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        why = f"has {size} bytes instead of {f.size}" + (" (an interrupted copy?)" if size < f.size else "")
    elif sha256_of(path) != f.sha256:
        why = "does not match its sha256 (damaged or changed)"
    else:
        return True
    raise RegistryError(
        f"cached file {path} of model {entry.name!r} {why}; it was not used. Run "
        f"`u2net download {entry.name} --force` to replace it, or delete {model_dir}"
    )


def cached_status(entry: RegistryEntry, cache: Path | None = None) -> list[RemoteFile]:
    """Files of ``entry`` still to download (empty: cached and verified). Raises on a damaged file."""
    model_dir = model_cache_dir(entry.name, cache)
    return [f for f in entry.files if not _check_file(entry, f, model_dir)]


class _CallbackBar:
    """The small part of tqdm's interface pooch drives, turned into ``progress(done, total)``."""

    def __init__(self, progress: Progress, offset: int, expected: int, grand_total: int):
        self.progress, self.offset, self.expected, self.grand_total = progress, offset, expected, grand_total
        self.total = expected
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n
        done = self.offset + min(self.n, self.total or self.expected or self.n)
        self.progress(done, max(self.grand_total, done))

    def reset(self) -> None:
        self.n = 0

    def close(self) -> None:
        pass


def download_model(
    name: str,
    *,
    force: bool = False,
    progress: Progress | bool | None = None,
    cache: Path | None = None,
    registry: Registry | None = None,
) -> Path:
    """Put registry model ``name`` into the cache (only missing files unless ``force``); its folder.

    ``progress`` is ``True`` for a terminal progress bar, or ``progress(done_bytes, total_bytes)``.
    """
    import pooch
    import requests

    registry = registry if registry is not None else load_registry(cache=cache)
    entry = registry.entries.get(name)
    if entry is None:
        raise _unknown(name, registry, cache)
    cache = cache or cache_dir()
    model_dir = model_cache_dir(name, cache)
    if force:
        todo = list(entry.files)
    else:
        todo = cached_status(entry, cache)
    if todo:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".download-{name}-"))
        grand_total = sum(f.size or 0 for f in todo)
        offset = 0
        logger = pooch.get_logger()
        level = logger.level
        logger.setLevel("WARNING")  # its "Downloading ... to <staging path>" line would mislead
        try:
            for f in todo:
                if callable(progress):
                    bar = _CallbackBar(progress, offset, f.size or 0, grand_total)
                    downloader = pooch.HTTPDownloader(progressbar=bar)
                else:
                    downloader = pooch.HTTPDownloader(progressbar=bool(progress))
                target = staging / f.path
                try:
                    pooch.retrieve(
                        f.url,
                        known_hash=f"sha256:{f.sha256}",
                        fname=target.name,
                        path=target.parent,
                        downloader=downloader,
                    )
                except ValueError as e:  # pooch: hash mismatch (its temporary file is already gone)
                    raise RegistryError(
                        f"download of {f.path} for model {name!r} from {f.url} does not match the "
                        f"registry's sha256 ({e}); nothing was kept. The file on the server or the "
                        f"registry entry ({entry.source}) is wrong: tell whoever publishes it"
                    ) from e
                except requests.RequestException as e:
                    raise RegistryError(
                        f"cannot download {f.path} for model {name!r} from {f.url} ({e}); nothing was "
                        f"kept. Try again; without internet here, run `u2net download {name}` on a "
                        f"computer that has it and "
                        f"copy {model_dir} to the same place here (or point {HOME_ENV} at a copy)"
                    ) from e
                if f.size is not None and target.stat().st_size != f.size:
                    raise RegistryError(
                        f"download of {f.path} for model {name!r} has {target.stat().st_size} bytes, "
                        f"the registry ({entry.source}) says {f.size}; nothing was kept"
                    )
                offset += f.size or 0
            for f in todo:  # every file verified: move them into the model folder
                final = model_dir / f.path
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / f.path, final)
        finally:
            logger.setLevel(level)
            shutil.rmtree(staging, ignore_errors=True)
    manifest = json.dumps(entry.to_dict(), indent=1)
    manifest_path = model_dir / MANIFEST_FILE
    if not manifest_path.is_file() or manifest_path.read_text() != manifest:
        atomic_write_text(manifest_path, manifest)
    return model_dir


def _manifest_entry(model_dir: Path) -> RegistryEntry | None:
    try:
        doc = json.loads((model_dir / MANIFEST_FILE).read_text())
        return _parse_entry(doc, str(model_dir / MANIFEST_FILE), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _unknown(name: str, registry: Registry, cache: Path | None) -> RegistryError:
    bundled = [BUNDLED_MODEL] if bundled_model_dir().is_dir() else []
    known = sorted({*bundled, *registry.entries, *(e.name for e in _cached_entries(cache)),
                    *(d.name for d in _user_models(cache))})
    msg = (
        f"unknown model {name!r}: not a model directory nor a known name "
        f"(known: {', '.join(known) or 'none'})"
    )
    if registry.problems:
        msg += "; note: " + "; ".join(registry.problems)
    return RegistryError(msg)


def make_entry(model_dir: Path, name: str, base_url: str, description: str = "", version: str = "") -> dict:
    """A registry entry (JSON-ready) publishing ``model_dir`` at ``base_url`` (files keep their paths)."""
    from training.model.modelfile import ADAPTER_DIR, ADAPTER_SUFFIX, TRUNK_FILE

    model_dir = Path(model_dir)
    if not (model_dir / TRUNK_FILE).is_file():
        raise InputError(f"{model_dir}: no {TRUNK_FILE} here; is this a u2net model directory?")
    if not _NAME_RE.match(name):
        raise InputError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    paths = [model_dir / TRUNK_FILE, *sorted((model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}"))]
    base = base_url if base_url.endswith("/") else base_url + "/"
    files = []
    for path in paths:
        rel = path.relative_to(model_dir).as_posix()
        files.append({"path": rel, "url": base + rel, "sha256": sha256_of(path), "size": path.stat().st_size})
    domains, _ = model_dir_domains(model_dir)
    summary = [{k: d.get(k) for k in ("name", "modality", "classes")} for d in domains]
    return {"name": name, "description": description, "version": version, "domains": summary, "files": files}


# -- resolving and listing -------------------------------------------------------------------------
def resolve_model(
    spec: str | Path | None,
    progress: Progress | bool | None = None,
    *,
    cache: Path | None = None,
    registry: Registry | None = None,
) -> Path:
    """The model directory for ``spec``.

    ``None`` or ``"default"`` → the bundled model; an existing directory → itself; a registry
    name → its cached folder once every file is verified, downloading missing files first.
    """
    if spec is None or (str(spec) == BUNDLED_MODEL and not Path(spec).is_dir()):
        path = bundled_model_dir()
        if not path.is_dir():
            raise InputError(f"the bundled model is missing ({path}); pass --model MODEL_DIR or reinstall")
        return path
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    name = str(spec)
    if not _NAME_RE.match(name):
        raise InputError(f"model {name!r}: no such model directory")
    registry = registry if registry is not None else load_registry(cache=cache)
    if name in registry.entries:
        return download_model(name, progress=progress, cache=cache, registry=registry)
    model_dir = model_cache_dir(name, cache)
    entry = _manifest_entry(model_dir)
    if entry is None and _is_user_model(model_dir):
        return model_dir
    if entry is not None:  # downloaded earlier from a registry that is no longer configured
        missing = cached_status(entry, cache)
        if not missing:
            return model_dir
        raise RegistryError(
            f"cached model {name!r} in {model_dir} is incomplete ({missing[0].path} is missing) and "
            f"no registry lists it now; set {REGISTRY_ENV} to its registry and run `u2net download {name}`"
        )
    raise _unknown(name, registry, cache)



def _cached_entries(cache: Path | None) -> list[RegistryEntry]:
    root = (cache or cache_dir()) / "models"
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            entry = _manifest_entry(d)
            if entry is not None and entry.name == d.name:
                found.append(entry)
    return found


def _is_user_model(model_dir: Path) -> bool:
    """A model folder in the cache that no registry made: one the user trained (the Fine-tune
    panel writes ``<cache>/models/user``), or copied there by hand."""
    return (model_dir / TRUNK_FILE).is_file() and not (model_dir / MANIFEST_FILE).exists()


def _user_models(cache: Path | None) -> list[Path]:
    root = (cache or cache_dir()) / "models"
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".") and _is_user_model(d)]


def _looks_complete(entry: RegistryEntry, model_dir: Path) -> bool:
    """Presence and sizes only (cheap, for listings); resolving a model checks every hash."""
    for f in entry.files:
        p = model_dir / f.path
        if not p.is_file() or (f.size is not None and p.stat().st_size != f.size):
            return False
    return True


def list_models(cache: Path | None = None, registry: Registry | None = None) -> list[ModelEntry]:
    """Bundled model, cached models and downloadable registry models (each name once)."""
    registry = registry if registry is not None else load_registry(cache=cache)
    models: list[ModelEntry] = []
    bundled = bundled_model_dir()
    if bundled.is_dir():
        domains, prov = model_dir_domains(bundled)
        models.append(
            ModelEntry(BUNDLED_MODEL, "bundled", bundled, "bundled default model (works offline)", domains,
                       provenance=prov)
        )
    cached = {}
    for entry in _cached_entries(cache):
        model_dir = model_cache_dir(entry.name, cache)
        if entry.name in registry.entries:
            entry = registry.entries[entry.name]
        if _looks_complete(entry, model_dir):
            domains, prov = model_dir_domains(model_dir)
            cached[entry.name] = ModelEntry(
                entry.name, "cached", model_dir, entry.description, domains, entry.version, prov
            )
    for name in sorted(set(cached) | set(registry.entries)):
        if name == BUNDLED_MODEL:
            continue
        if name in cached:
            models.append(cached[name])
        else:
            e = registry.entries[name]
            models.append(ModelEntry(name, "registry", None, e.description, e.domains, e.version))
    taken = {m.name for m in models}
    for model_dir in _user_models(cache):
        if model_dir.name in taken:  # a registry name wins; the folder is still usable by its path
            continue
        domains, prov = model_dir_domains(model_dir)
        models.append(ModelEntry(model_dir.name, "user", model_dir, "your model (trained in napari or copied into the cache)",
                                 domains, provenance=prov))
    return models
