"""Orientation markers: the patient's direction at each edge of the canvas (R/L, A/P, S/I), as
every radiology viewer shows them.

Our layers place the image in napari's world as (S, A, R) mm (:mod:`._geometry`), so the letter
at an edge follows from which two world axes are on screen and which way the camera points them;
nothing depends on the image. The markers are napari text overlays on the canvas (napari ≥ 0.9
keeps several in ``viewer.canvas.overlays``); they show only in 2D, and only while the viewer holds
a layer with our geometry: another reader's layers have no anatomical world to name.
"""

from __future__ import annotations

import weakref

from ._geometry import META_KEY

_PREPARED: weakref.WeakSet = weakref.WeakSet()  # viewers set up once already

# World axes of our layers, last three of the viewer's: each one's positive and negative end.
POSITIVE = ("S", "A", "R")  # superior, anterior, the patient's right
NEGATIVE = ("I", "P", "L")  # inferior, posterior, the patient's left
# Canvas position of each edge's marker (napari's CanvasPosition values).
EDGES = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left", "right": "middle_right"}
KEY = "u2net_orientation_"  # our overlays' names in viewer.canvas.overlays
COLOR = (1.0, 0.85, 0.3, 1.0)  # amber: readable on a grey-scale image and beside label colours


def edge_letters(displayed: tuple[int, int], orientation2d: tuple[str, str], ndim: int) -> dict[str, str] | None:
    """``{edge: letter}`` for the 2D view showing world axes ``displayed`` (vertical, horizontal)
    with the camera's ``orientation2d`` (where each axis grows: "up"/"down", "left"/"right"), or
    None when an axis on screen is not one of the three spatial ones (a modality axis, say)."""
    spatial = [axis - (ndim - 3) for axis in displayed]
    if ndim < 3 or any(not 0 <= a < 3 for a in spatial):
        return None
    vertical, horizontal = spatial
    grows_up, grows_right = orientation2d[0] == "up", orientation2d[1] == "right"
    top, bottom = POSITIVE[vertical], NEGATIVE[vertical]
    right, left = POSITIVE[horizontal], NEGATIVE[horizontal]
    if not grows_up:
        top, bottom = bottom, top
    if not grows_right:
        left, right = right, left
    return {"top": top, "bottom": bottom, "left": left, "right": right}


def _anatomical(viewer) -> bool:
    """Whether some layer lies in our (S, A, R) world (read by this plugin, or one of its results)."""
    return any(isinstance(layer.metadata, dict) and META_KEY in layer.metadata for layer in viewer.layers)


def _camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def show_orientation_markers(viewer) -> bool:
    """Add the four markers to ``viewer`` once and keep them right as the view changes (another
    plane, a flipped camera, 3D, layers added or removed). False where napari has no room for
    several canvas overlays (before 0.9): the axis labels S, A, R still name the axes there."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is None:
        return False
    if KEY + "top" in overlays:
        return True
    from napari.components.overlays import TextOverlay

    for edge, position in EDGES.items():
        overlays[KEY + edge] = TextOverlay(
            text="", position=position, color=COLOR, font_size=14, visible=False, box=False,
        )

    def update(_event=None) -> None:
        letters = None
        if viewer.dims.ndisplay == 2 and _anatomical(viewer):
            letters = edge_letters(tuple(viewer.dims.displayed), tuple(_camera(viewer).orientation2d), viewer.dims.ndim)
        for edge in EDGES:
            overlay = overlays[KEY + edge]
            if letters is None:
                overlay.visible = False
            else:
                overlay.text = letters[edge]
                overlay.visible = True

    viewer.dims.events.order.connect(update)
    viewer.dims.events.ndisplay.connect(update)
    viewer.dims.events.ndim.connect(update)
    viewer.layers.events.inserted.connect(update)
    viewer.layers.events.removed.connect(update)
    _camera(viewer).events.orientation.connect(update)
    update()
    return True


def prepare_for_reading(viewer) -> None:
    """The first time a panel of this plugin opens in ``viewer``: the radiological view (anterior
    up, the patient's right on the left) and the orientation markers. Later calls change nothing,
    so a camera the user turned stays as it is."""
    if viewer in _PREPARED:
        return
    _PREPARED.add(viewer)
    from ._geometry import radiological_view

    radiological_view(viewer)
    show_orientation_markers(viewer)
