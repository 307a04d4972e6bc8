"""Re-take the README's and docs' screenshots of the plugin, as a user sees it (real inference
with the bundled model, a 1366×768 window).

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python -m scripts.screenshots [NAME ...]

NAME is one of the shots below (default: all); each is written to docs/screenshots/NAME.png.
The sagittal shot needs nilearn's MNI152 template (the `nilearn` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
SIZE = (1366, 768)
PLUGIN = "napari-u2net"


def _viewer():
    import napari

    from napari_u2net._orientation import prepare_for_reading

    viewer = napari.Viewer(title="napari-u2net")
    prepare_for_reading(viewer)
    viewer.window._qt_window.resize(*SIZE)
    viewer.window._qt_window.show()
    return viewer


def _wait(condition, timeout: float = 300.0) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the plugin did not finish in time")
        QApplication.processEvents()
        time.sleep(0.02)


def _settle(viewer, seconds: float = 1.0) -> None:
    import time

    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def _segment(viewer, widget, domains: list[str]) -> None:
    _wait(lambda: widget.model is not None)
    widget.set_checked_domains(domains)
    widget.run()
    _wait(lambda: widget.worker is None and not widget.turns.busy)


def _finish(viewer, name: str, settle_s: float = 1.0) -> Path:
    """Frame the data, let the window settle, save the shot and close the viewer."""
    viewer.reset_view()
    _settle(viewer, settle_s)
    path = _save(viewer, name)
    viewer.close()
    return path


def _save(viewer, name: str) -> Path:
    path = OUT / f"{name}.png"
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path}")
    return path


def domain_selector() -> None:
    """The CT sample segmented with spleen-ct: the first screenshot of the README."""
    viewer = _viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    viewer.open_sample(PLUGIN, "synthetic_ct")
    _segment(viewer, widget, ["spleen-ct"])
    _finish(viewer, "domain_selector")


def sagittal_segmented() -> None:
    """The MNI152 T1 saved as a sagittal (PSR) acquisition, shown axially and segmented."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from training.data.mni152 import mni152_files

    t1 = nib.load(str(mni152_files()["t1"]))
    psr = t1.as_reoriented(ornt_transform(io_orientation(t1.affine), axcodes2ornt(("P", "S", "R"))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mni152_psr.nii.gz"
        nib.save(psr, str(path))
        viewer = _viewer()
        _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
        viewer.open(str(path), plugin=PLUGIN)
        _segment(viewer, widget, ["mni152-brain"])
        _finish(viewer, "sagittal_segmented")


def both_docks_1366x768() -> None:
    """Both panels docked in a laptop-sized window."""
    viewer = _viewer()
    viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    viewer.open_sample(PLUGIN, "synthetic_ct")
    _finish(viewer, "both_docks_1366x768", 2.0)


def measurements() -> None:
    """The CT sample segmented with uncertainty on: the uncertainty layer over the image and the
    Measurements dock beside the domain selector."""
    viewer = _viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    viewer.window.add_plugin_dock_widget(PLUGIN, "Measurements")
    viewer.open_sample(PLUGIN, "synthetic_ct")
    widget.gui.uncertainty_check.setChecked(True)
    _segment(viewer, widget, ["spleen-ct"])
    for layer in viewer.layers:
        if layer.name.endswith("truth"):
            layer.visible = False  # the result and its uncertainty, not the reference
    _finish(viewer, "measurements", 1.5)


def real_ct() -> None:
    """Patient A's real CT (../shared/realdata, never shipped) segmented with abdomen-ct, with the
    Measurements dock: the README's real-scan figure. Skipped where the real scans are absent."""
    scan = ROOT.parent / "shared" / "realdata" / "totalsegmentator" / "example_ct.nii.gz"
    if not scan.is_file():
        print(f"real_ct skipped: {scan} is absent")
        return
    viewer = _viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    viewer.window.add_plugin_dock_widget(PLUGIN, "Measurements")
    viewer.open(str(scan), plugin=PLUGIN)
    widget.gui.uncertainty_check.setChecked(False)
    _segment(viewer, widget, ["abdomen-ct"])
    viewer.dims.set_current_step(0, 90)  # an axial slice through liver, spleen and kidneys
    _finish(viewer, "real_ct", 1.5)


SHOTS = {f.__name__: f for f in (domain_selector, sagittal_segmented, both_docks_1366x768, measurements, real_ct)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"shots to take: {', '.join(SHOTS)} (default: all)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in args.names if n not in SHOTS]
    if unknown:
        parser.error(f"unknown shot {unknown[0]!r}; choose from {', '.join(SHOTS)}")
    for name in args.names or SHOTS:
        SHOTS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
