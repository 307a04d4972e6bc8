"""The distribution installs both packages, the manifest and the resources, from a wheel or a checkout."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("napari_u2net-*.whl")
    return whl


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        manifest = yaml.safe_load(z.read("napari_u2net/napari.yaml"))
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert manifest == yaml.safe_load((ROOT / "napari.yaml").read_text())
    assert "training/__init__.py" in names and "napari_u2net/__init__.py" in names
    assert "training/model/network.py" in names and "training/model/modelfile.py" in names
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "resources").rglob("*") if p.is_file()}
    assert shipped and {f"training/{s}" for s in shipped} <= names
    assert not any(n.startswith(("tests/", "resources/", ".venv")) for n in names)
    assert "napari-u2net = napari_u2net:napari.yaml" in entry_points
    assert "u2net = training.commands.cli:main" in entry_points


def test_installed_wheel_finds_manifest_and_resources(wheel, tmp_path):
    """Unpacked alone on sys.path (no checkout beside it), npe2 and training find their files."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    code = textwrap.dedent(
        """
        import sys, json
        from importlib.util import find_spec
        from training.io.folders import resources_dir
        spec = find_spec("napari_u2net")
        from pathlib import Path
        loc = Path(spec.submodule_search_locations[0])
        print(json.dumps({"res": str(resources_dir()), "manifest": (loc / "napari.yaml").is_file()}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["manifest"] is True
    assert Path(info["res"]) == target / "training" / "resources"


def test_editable_install_manifest_validates():
    npe2 = shutil.which("npe2", path=str(Path(sys.executable).parent))
    out = subprocess.run([npe2, "validate", "napari-u2net"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in (out.stdout + out.stderr).lower()


def test_every_python_name_in_manifest_imports():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(ROOT / "napari.yaml")
    for cmd in pm.contributions.commands or []:
        if cmd.python_name:
            module, attr = cmd.python_name.split(":")
            obj = __import__(module, fromlist=[attr])
            for part in attr.split("."):
                obj = getattr(obj, part)
            assert callable(obj), cmd.python_name


def test_training_imports_without_qt_or_napari(tmp_path):
    """The headless core must work on machines with no GUI stack at all."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        textwrap.dedent(
            """
            import sys
            class _Block:
                BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in self.BLOCKED:
                        raise ImportError(f"blocked in this test: {name}")
                    return None
            sys.meta_path.insert(0, _Block())
            """
        )
    )
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import training
        for m in pkgutil.walk_packages(training.__path__, "training."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
        from training.commands.cli import main
        assert main(["info", "--params", "--json"]) == 0
        bad = [m for m in sys.modules if m.split(".")[0] in ("napari", "qtpy", "PyQt5", "magicgui", "superqt")]
        assert not bad, bad
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"shared": 5849344' in out.stdout


def test_console_script_info_params():
    exe = shutil.which("u2net", path=str(Path(sys.executable).parent))
    out = subprocess.run([exe, "info", "--params", "--json"], capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["shared"] == 5849344
    assert set(counts) == {"shared", "per_domain", "independent"}
