"""``python -m napari_u2net`` (``make run``): napari with the domain selector and the CT sample.

Without a display it prints how to run headless instead of letting Qt abort.
"""

from __future__ import annotations

import os
import sys

PLUGIN = "napari-u2net"
# The reader's file patterns (napari.yaml). napari's built-in reader claims every file too, so
# without a preference napari asks which reader to use on every open (and its reader loses the
# geometry: identity affine).
FILE_PATTERNS = ("*.nii", "*.nii.gz", "*.dcm", "*.DCM")
# Folders: napari matches a folder's path with a trailing separator, and both readers accept
# folders, so a DICOM folder prompted too. This pattern prefers the plugin for every folder; its
# reader hands any folder that holds no DICOM to napari's own reader, so other folders (zarr, image
# stacks) open exactly as before. A more specific preference the user set (say "*.zarr/") wins.
FOLDER_PATTERN = "*" + os.sep
READER_PATTERNS = (*FILE_PATTERNS, FOLDER_PATTERN)


def has_display() -> bool:
    if sys.platform != "linux":
        return True
    if os.environ.get("QT_QPA_PLATFORM", "") not in ("", "xcb", "wayland"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def prefer_reader() -> list[str]:
    """Make this plugin napari's reader for NIfTI and DICOM files (no "choose reader" prompt),
    for each pattern for which the user has no preference yet: one set to another plugin (say
    ``*.gz`` or ``*.nii`` → napari) is kept. Returns the patterns set now."""
    try:
        from napari.plugins.utils import get_preferred_reader
        from napari.settings import get_settings
    except ImportError:  # napari not installed: nothing to prefer
        return []
    import tempfile

    plugins = get_settings().plugins
    prefs = dict(plugins.extension2reader)
    added = []
    with tempfile.TemporaryDirectory() as folder:  # napari matches folders by a real path
        for pattern in READER_PATTERNS:
            example = folder if pattern == FOLDER_PATTERN else os.path.join(folder, "scan" + pattern[1:])
            if get_preferred_reader(example) is None:
                prefs[pattern] = PLUGIN
                added.append(pattern)
    if added:
        plugins.extension2reader = prefs
    return added


def on_activate(_context=None) -> None:
    """npe2 calls this once per session when one of the plugin's contributions (widget, reader,
    sample, writer) is first used: from then on NIfTI/DICOM files open with this plugin."""
    try:
        prefer_reader()
    except Exception:  # a settings problem must never stop the plugin from loading
        import logging

        logging.getLogger(__name__).warning("could not set napari's reader preference", exc_info=True)


def main(argv: list[str] | None = None) -> int:
    if not has_display():
        print(
            "napari-u2net: no display found (DISPLAY is not set), so napari cannot open a window.\n"
            "  Run it on a desktop session, or check it headless with:  xvfb-run -a make run",
            file=sys.stderr,
        )
        return 2
    import napari

    from ._orientation import prepare_for_reading
    from ._reader import WORLD_AXES

    prefer_reader()  # .nii / .nii.gz / .dcm open with this plugin, no "choose reader" dialog
    viewer = napari.Viewer(title="napari-u2net")
    prepare_for_reading(viewer)  # radiological view, R/L and A/P markers
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    try:
        viewer.open_sample(PLUGIN, "synthetic_ct")
    except Exception as e:  # the GUI is still useful without the sample
        from napari.utils.notifications import show_warning

        show_warning(f"could not open the synthetic CT sample ({e})")
    if viewer.dims.ndim == 3:  # the sample's layers name them too; an empty viewer keeps napari's
        viewer.dims.axis_labels = WORLD_AXES
    if os.environ.get("U2NET_SMOKE"):  # `U2NET_SMOKE=1 xvfb-run -a make run`: open, then quit
        from qtpy.QtCore import QTimer

        QTimer.singleShot(int(float(os.environ["U2NET_SMOKE"]) * 1000), viewer.close)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
