"""Model registry: downloads from a loopback HTTP server started here, verified, cached, reported."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from training.commands.cli import main
from training.model.modelfile import load_model
from training.model.registry import (
    MANIFEST_FILE,
    RegistryError,
    cache_dir,
    download_model,
    list_models,
    load_registry,
    make_entry,
    read_registry,
    resolve_model,
    sha256_of,
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class Server:
    """Serves ``root`` on 127.0.0.1 (a free port) from a thread until ``stop()``."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def served(model_dir, tmp_path):
    """The tiny model published on a loopback server, plus a registry file describing it."""
    root = tmp_path / "www"
    shutil.copytree(model_dir, root / "tiny")
    server = Server(root)
    entry = make_entry(root / "tiny", "tiny", server.url + "tiny", "a tiny random test model", "1")
    files = [f["path"] for f in entry["files"]]
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"format": 1, "models": [entry]}))
    yield {"server": server, "root": root, "registry": reg, "entry": entry, "files": files}
    server.stop()


@pytest.fixture
def env(served, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.setenv("U2NET_REGISTRY", str(served["registry"]))
    return home


def _leftovers(home: Path) -> list[Path]:
    return [p for p in (home / "models").rglob("*") if p.is_file()] if (home / "models").exists() else []


def test_download_verify_and_load(served, env):
    calls = []
    path = resolve_model("tiny", progress=lambda done, total: calls.append((done, total)))
    assert path == env / "models" / "tiny"  # U2NET_HOME respected
    for f in served["files"]:
        assert sha256_of(path / f) == sha256_of(served["root"] / "tiny" / f)
    assert (path / MANIFEST_FILE).is_file()
    model = load_model(path)
    assert sorted(model.domains) == ["ct", "mr2"]
    total = sum(f["size"] for f in served["entry"]["files"])
    assert calls and calls[-1] == (total, total)
    assert all(0 <= d <= t == total for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # monotone
    # No staging folders or pooch temporary files are left beside the model.
    assert sorted(p.name for p in (env / "models").iterdir()) == ["tiny"]


def test_cache_reused_without_network(served, env):
    first = resolve_model("tiny")
    served["server"].stop()
    assert resolve_model("tiny") == first
    # Also when the registry naming it is gone: the manifest written at download time is enough.
    assert resolve_model("tiny", registry=load_registry(environ={})) == first
    listed = {m.name: m for m in list_models()}
    assert listed["tiny"].source == "cached"
    assert sorted(d["name"] for d in listed["tiny"].domains) == ["ct", "mr2"]
    assert listed["tiny"].domains[0]["classes"] == ["background", "class1"]
    assert listed["tiny"].provenance == {"made_by": "test"}


def test_offline_and_not_cached_says_to_download_elsewhere(served, env):
    served["server"].stop()
    with pytest.raises(RegistryError, match=r"u2net download tiny") as e:
        resolve_model("tiny")
    assert "cannot download" in str(e.value)
    assert _leftovers(env) == []


def test_hash_mismatch_is_an_error_and_keeps_nothing(served, env):
    entry = served["entry"]
    entry["files"][0]["sha256"] = "0" * 64
    served["registry"].write_text(json.dumps({"models": [entry]}))
    with pytest.raises(RegistryError, match="does not match the registry's sha256") as e:
        download_model("tiny")
    assert entry["files"][0]["path"] in str(e.value)
    assert _leftovers(env) == []
    assert [p.name for p in (env / "models").iterdir()] == []  # no staging folder either


def test_damaged_cached_file_is_reported_not_used_nor_redownloaded(served, env):
    path = resolve_model("tiny")
    trunk = path / "trunk.safetensors"
    good = trunk.read_bytes()
    trunk.write_bytes(good[: len(good) // 2])  # an interrupted copy
    with pytest.raises(RegistryError, match=r"bytes instead of .*--force"):
        resolve_model("tiny")
    assert trunk.stat().st_size == len(good) // 2  # not silently replaced
    # Same size, different content: caught by the hash.
    trunk.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RegistryError, match="does not match its sha256"):
        resolve_model("tiny")
    with pytest.raises(RegistryError):  # a plain download refuses it too (no silent re-download)
        download_model("tiny")
    # --force replaces it with a verified copy.
    assert main(["download", "tiny", "--force", "--quiet"]) == 0
    assert trunk.read_bytes() == good
    load_model(resolve_model("tiny"))


def test_missing_file_is_fetched_on_resolve(served, env):
    path = resolve_model("tiny")
    adapter = path / served["files"][0]
    adapter.unlink()
    assert resolve_model("tiny") == path
    assert adapter.is_file()


def test_unknown_name_lists_known_names(served, env):
    with pytest.raises(RegistryError, match=r"unknown model .nope.*known: .*tiny"):
        resolve_model("nope")
    assert main(["info", "--model", "nope"]) == 2


def test_u2net_home_and_os_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h"
    monkeypatch.delenv("U2NET_HOME")
    assert cache_dir().name == "napari-u2net"


def test_existing_dir_is_used_as_is(model_dir):
    assert resolve_model(model_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir


def test_registry_over_http_with_relative_urls_and_offline_copy(served, tmp_path):
    entry = dict(served["entry"])
    entry["files"] = [dict(f, url="tiny/" + f["path"]) for f in entry["files"]]  # relative to the registry
    (served["root"] / "registry.json").write_text(json.dumps({"models": [entry]}))
    home = tmp_path / "home2"
    entries = read_registry(served["server"].url + "registry.json", cache=home)
    assert entries["tiny"].files[0].url.startswith(served["server"].url + "tiny/")
    reg = load_registry(environ={"U2NET_REGISTRY": served["server"].url + "registry.json"}, cache=home)
    path = download_model("tiny", cache=home, registry=reg)
    served["server"].stop()
    reg2 = load_registry(environ={"U2NET_REGISTRY": served["server"].url + "registry.json"}, cache=home)
    assert reg2.problems == [] and "tiny" in reg2.entries  # the copy kept in the cache
    assert resolve_model("tiny", cache=home, registry=reg2) == path


def test_bad_registry_entries_are_refused(tmp_path):
    reg = tmp_path / "r.json"
    bad = {"name": "x", "files": [{"path": "../evil", "url": "http://127.0.0.1/x", "sha256": "0" * 64}]}
    reg.write_text(json.dumps({"models": [bad]}))
    with pytest.raises(RegistryError, match="inside the model folder"):
        read_registry(reg)
    reg.write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read it as JSON"):
        read_registry(reg)
    r = load_registry(environ={"U2NET_REGISTRY": str(tmp_path / "missing.json")})
    assert r.problems and "no such file" in r.problems[0]


def test_cli_download_and_info_listing(served, env, capsys):
    assert main(["download", "tiny", "--quiet"]) == 0
    assert "ready in" in capsys.readouterr().out
    assert main(["info"]) == 0  # compact: a header per model, a table of its domains
    out = capsys.readouterr().out
    assert "tiny v1  [cached]" in out and "ct" in out and "mr2" in out and "made_by=test" not in out
    assert main(["info", "--verbose"]) == 0  # the provenance is behind --verbose
    assert "made_by=test" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    tiny = next(m for m in doc["models"] if m["name"] == "tiny")
    assert tiny["source"] == "cached" and tiny["path"] == str(env / "models" / "tiny")
    assert main(["info", "--model", "tiny", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(d["name"] for d in summary["domains"]) == ["ct", "mr2"]


def test_registry_only_model_is_listed_for_download(served, env, capsys):
    listed = {m.name: m for m in list_models()}
    assert listed["tiny"].source == "registry" and listed["tiny"].path is None
    assert listed["tiny"].domains[0]["name"] == "ct"
    assert main(["info"]) == 0
    assert "u2net download tiny" in capsys.readouterr().out


class _TruncatingHandler(_QuietHandler):
    """Announces the whole file, sends half of it, and hangs up: an interrupted download."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


def test_interrupted_download_keeps_nothing(served, env):
    server = Server(served["root"])
    server.httpd.RequestHandlerClass = functools.partial(_TruncatingHandler, directory=str(served["root"]))
    entry = served["entry"]
    entry["files"] = [dict(f, url=f["url"].replace(served["server"].url, server.url)) for f in entry["files"]]
    served["registry"].write_text(json.dumps({"models": [entry]}))
    try:
        with pytest.raises(RegistryError, match="tiny") as e:
            resolve_model("tiny")
    finally:
        server.stop()
    assert "nothing was kept" in str(e.value)
    assert _leftovers(env) == []
    assert [p.name for p in (env / "models").iterdir()] == []
    # Once the server sends whole files again, the same call succeeds.
    entry["files"] = [dict(f, url=f["url"].replace(server.url, served["server"].url)) for f in entry["files"]]
    served["registry"].write_text(json.dumps({"models": [entry]}))
    load_model(resolve_model("tiny"))


def test_cancelled_from_the_progress_callback_keeps_nothing(served, env):
    from training.errors import Cancelled

    def progress(done, total):
        raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        resolve_model("tiny", progress=progress)
    assert _leftovers(env) == []
    assert [p.name for p in (env / "models").iterdir()] == []


def test_make_entry_describes_the_model_dir(model_dir):
    entry = make_entry(model_dir, "tiny", "https://example.org/models/tiny")
    assert [f["path"] for f in entry["files"]] == [
        "trunk.safetensors", "adapters/ct.safetensors", "adapters/mr2.safetensors"
    ]
    trunk = entry["files"][0]
    assert trunk["url"] == "https://example.org/models/tiny/trunk.safetensors"
    assert trunk["sha256"] == sha256_of(model_dir / "trunk.safetensors")
    assert trunk["size"] == (model_dir / "trunk.safetensors").stat().st_size
    assert entry["domains"] == [
        {"name": "ct", "modality": "CT", "classes": ["background", "class1"]},
        {"name": "mr2", "modality": "CT", "classes": ["background", "class1", "class2"]},
    ]


def test_a_model_the_user_made_is_listed_and_resolved_by_name(model_dir, tmp_path, monkeypatch, capsys):
    """The Fine-tune panel writes <cache>/models/user: after a restart it is still there, in the
    listing, in `u2net info`, and as `--model user`."""
    home = tmp_path / "home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.delenv("U2NET_REGISTRY", raising=False)
    shutil.copytree(model_dir, home / "models" / "user")
    (home / "models" / "half").mkdir()  # no trunk: not a model, not listed
    listed = {m.name: m for m in list_models()}
    assert listed["user"].source == "user" and listed["user"].path == home / "models" / "user"
    assert sorted(d["name"] for d in listed["user"].domains) == ["ct", "mr2"]
    assert "half" not in listed
    assert resolve_model("user") == home / "models" / "user"
    assert main(["info"]) == 0
    assert "user  [user]" in capsys.readouterr().out
    assert main(["info", "--model", "user", "--json"]) == 0
    assert sorted(d["name"] for d in json.loads(capsys.readouterr().out)["domains"]) == ["ct", "mr2"]
    with pytest.raises(RegistryError, match=r"known: .*user"):
        resolve_model("nobody")
