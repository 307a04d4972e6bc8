"""The domain selector lists registry models and downloads one (in a worker, with progress)."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")

from napari_u2net._models import ModelChoice, load_model_job, model_choices  # noqa: E402
from napari_u2net._widget import DomainSelectorWidget  # noqa: E402
from tests.test_registry import env, served  # noqa: E402,F401  (loopback server fixtures)


def test_registry_model_is_listed_downloaded_with_progress_then_cached(served, env):  # noqa: F811
    choices = {c.label: c for c in model_choices()}
    assert choices["Download: tiny"].kind == "registry"
    reports = []
    job = load_model_job(choices["Download: tiny"])
    try:
        while True:
            reports.append(next(job))
    except StopIteration as stop:
        model_dir, model = stop.value
    assert sorted(model.domains) == ["ct", "mr2"] and model_dir == env / "models" / "tiny"
    assert reports and reports[-1][0] == reports[-1][1] > 0  # bytes done == total at the end
    assert {c.label: c for c in model_choices()}["Downloaded: tiny"].kind == "cached"


@pytest.mark.qt
def test_picking_a_registry_model_in_the_widget_downloads_it(make_napari_viewer, qtbot, served, env):  # noqa: F811
    viewer = make_napari_viewer()
    widget = DomainSelectorWidget(viewer)
    combo = widget.gui.model_combo
    qtbot.waitUntil(lambda: combo.findText("Download: tiny") >= 0, timeout=30000)
    assert not (env / "models" / "tiny").exists()  # nothing is downloaded until the user picks it
    combo.setCurrentIndex(combo.findText("Download: tiny"))
    qtbot.waitUntil(lambda: widget.model is not None and widget.model_dir == env / "models" / "tiny", timeout=60000)
    assert widget.gui.domain_list.count() == 2
    assert (env / "models" / "tiny" / "trunk.safetensors").is_file()
    assert isinstance(widget._choices[combo.currentIndex()], ModelChoice)


def test_a_model_the_user_trained_is_offered_after_a_restart(model_dir, tmp_path, monkeypatch):
    """What the Fine-tune panel saved (<cache>/models/user) is a choice of its own, and loads."""
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.delenv("U2NET_REGISTRY", raising=False)
    shutil.copytree(model_dir, home / "models" / "user")
    choices = {c.label: c for c in model_choices()}
    assert choices["Yours: user"].kind == "user" and choices["Yours: user"].path == home / "models" / "user"
    job = load_model_job(choices["Yours: user"])
    try:
        while True:
            next(job)
    except StopIteration as stop:
        loaded_dir, model = stop.value
    assert loaded_dir == home / "models" / "user" and sorted(model.domains) == ["ct", "mr2"]
