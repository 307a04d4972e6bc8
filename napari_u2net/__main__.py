"""``python -m napari_u2net`` (``make run``): napari with the domain selector and the CT sample.

Without a display it prints how to run headless instead of letting Qt abort.
"""

from __future__ import annotations

import os
import sys

PLUGIN = "napari-u2net"


def has_display() -> bool:
    if sys.platform != "linux":
        return True
    if os.environ.get("QT_QPA_PLATFORM", "") not in ("", "xcb", "wayland"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    if not has_display():
        print(
            "napari-u2net: no display found (DISPLAY is not set), so napari cannot open a window.\n"
            "  Run it on a desktop session, or check it headless with:  xvfb-run -a make run",
            file=sys.stderr,
        )
        return 2
    import napari

    from ._geometry import radiological_view

    viewer = napari.Viewer(title="napari-u2net")
    radiological_view(viewer)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Domain selector")
    try:
        viewer.open_sample(PLUGIN, "synthetic_ct")
    except Exception as e:  # the GUI is still useful without the sample
        from napari.utils.notifications import show_warning

        show_warning(f"could not open the synthetic CT sample ({e})")
    if os.environ.get("U2NET_SMOKE"):  # `U2NET_SMOKE=1 xvfb-run -a make run`: open, then quit
        from qtpy.QtCore import QTimer

        QTimer.singleShot(int(float(os.environ["U2NET_SMOKE"]) * 1000), viewer.close)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
