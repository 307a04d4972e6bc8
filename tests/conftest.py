"""Shared fixtures: small networks and model directories built in the test, never downloaded."""

from __future__ import annotations

import locale
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.model.modelfile import AdapterMeta, make_classes, save_model
from training.model.network import ArchConfig, DomainConfig, U2Net

SMALL_ARCH = ArchConfig(base_channels=4, levels=3, max_channels=16)
SMALL_PATCH = (16, 16, 16)  # the patch of small_model_dir's domains
needs_root = pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounts need root on Linux")


def small_net(seed: int = 0, domains=(("ct", 1, 2), ("mr2", 2, 3))) -> U2Net:
    torch.manual_seed(seed)
    return U2Net(SMALL_ARCH, [DomainConfig(n, c, k) for n, c, k in domains])


def adapter_meta(net: U2Net, name: str, modality: str = "CT", **kw) -> AdapterMeta:
    cfg = net.domain_config(name)
    names = ["background"] + [f"class{i}" for i in range(1, cfg.num_classes)]
    mods = [f"{modality}{i}" for i in range(cfg.in_channels)]
    return AdapterMeta(domain=name, modalities=mods, classes=make_classes(names), modality=modality, **kw)


@pytest.fixture(scope="session")
def _session_home(tmp_path_factory):
    return tmp_path_factory.mktemp("u2net_home")


@pytest.fixture(autouse=True)
def _restore_locale():
    """ITK's GDCM writer (the tests write DICOM series with it) sets the process locale to "C" and
    leaves it so, after which Python's default text encoding is ASCII for every later test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _isolated_u2net_home(_session_home, monkeypatch):
    """Caches (downloads, compiled graphs) go to a test folder, never to the user's own cache; the
    plugin prepares no fast path in the background (a test that wants it turns it back on)."""
    monkeypatch.setenv("U2NET_HOME", str(_session_home))
    monkeypatch.setenv("U2NET_PREPARE", "0")


@pytest.fixture
def model_dir(tmp_path):
    """A small random two-domain model directory (trunk + adapters)."""
    net = small_net()
    metas = {n: adapter_meta(net, n) for n in net.domains}
    save_model(tmp_path / "model", net, metas, provenance={"made_by": "test"})
    return tmp_path / "model"


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A small random two-domain model of 1 mm voxels and :data:`SMALL_PATCH` patches, one per module."""
    folder = tmp_path_factory.mktemp("small") / "model"
    net = small_net()
    metas = {n: adapter_meta(net, n, spacing=[1.0, 1.0, 1.0], patch_size=list(SMALL_PATCH)) for n in net.domains}
    save_model(folder, net, metas, provenance={"made_by": "test"})
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache of compiled graphs of its own (not the session's), and no graph in memory."""
    from training.infer import backends

    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "home"))
    backends.OPENVINO_CACHE.clear()
    backends.COMPILED_CACHE.clear()
    yield tmp_path / "home"
    backends.OPENVINO_CACHE.clear()
    backends.COMPILED_CACHE.clear()


@pytest.fixture
def small_mount(tmp_path):
    """A 64 kB tmpfs at tmp_path/fs (mount options per test), unmounted afterwards (root only:
    mark the test :data:`needs_root`)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / "fs"
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        # lazy: a failed write's file object may still be referenced by the test's traceback
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def messages(monkeypatch):
    """Notifications the domain selector shows, as (level, text)."""
    from napari_u2net import _widget

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(_widget, "show_error", lambda m: seen.append(("error", m)))
    monkeypatch.setattr(_widget, "show_warning", lambda m: seen.append(("warning", m)))
    monkeypatch.setattr(_widget, "show_info", lambda m: seen.append(("info", m)))
    return seen
