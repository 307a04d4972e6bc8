"""Geometry between napari layers and our :class:`training.io.volume.Volume` (no Qt here).

A volume's ``affine`` maps an array index ``(d0, d1, d2)`` to RAS millimetres. napari slices
world axes with the data axes of the same position, so a world in (R, A, S) order would pair
the slice axis d0 (≈ S for an axial scan) with R, and the displayed 2D transform would be
singular. napari's world is therefore RAS with its axes reversed, ``(S, A, R)`` mm: the layer
affine is the volume affine with its first three rows reversed (:func:`to_napari_affine`), axial
slices show by default, and the conversion back is exact (a row permutation). Multi-modal volumes become one 4D layer
(modality first, identity on that axis) so that one layer is one case the domain selector can run.
Result layers copy the image layer's scale/translate/rotate/shear/affine exactly, so they overlay
the image wherever the user has moved it.

Sagittal and coronal acquisitions: napari draws the two displayed world axes from the sub-block of
the layer's data→world matrix for the two displayed *data* axes (``set_slice(displayed).inverse``
in ``Layer._update_draw``). For a sagittal file (axis 0 ≈ R) that block is a pure permutation's
off-diagonal part: singular, and the exception inside vispy's paint aborts napari. The reader
therefore shows the array with its axes *permuted* to napari's world order (S, A, R)
(:func:`display_orientation`: the axis permutation of :func:`training.io.resample.canonical_orientation`,
without its flips: a reversed axis is a negative diagonal entry, which napari draws fine, and
keeping it leaves axial files untouched). Only the residual small rotation of an oblique scan
stays in the layer affine. The displayed grid is an exact transpose of the file's, so runs
segment the displayed grid (the core takes any orientation) and results overlay the image; the
writer transposes labels back to the file's array order (:func:`to_source_order`) and writes the
file's own affine and header. ``layer.metadata["u2net"]`` holds both grids: ``affine``/``shape``
of the displayed data, ``source_affine``/``source_shape`` of the file and ``orientation`` (the
permutation, display axis i = file axis ``orientation[i]``).
"""

from __future__ import annotations

import numpy as np

from training.errors import InputError
from training.io.resample import Orientation, canonical_orientation, reorient_affine, undo_reorient_array
from training.io.volume import Volume, nifti_to_ours

META_KEY = "u2net"


_WORLD = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def to_napari_affine(affine: np.ndarray) -> np.ndarray:
    """Volume affine (index → R, A, S) → napari affine (index → S, A, R). Exact."""
    return _WORLD @ np.asarray(affine, dtype=np.float64)


from_napari_affine = to_napari_affine  # the row reversal is its own inverse


IDENTITY = Orientation((0, 1, 2), (False, False, False))
GRID_ATOL = 1e-4  # mm: two grids closer than this are the same grid (float32 header round trip)


def display_orientation(affine: np.ndarray) -> Orientation:
    """The axis permutation (no flips) that orders the array axes as napari's world (S, A, R):
    the identity for axial scans, a transpose for sagittal and coronal ones (closest axes for
    oblique scans). A degenerate affine keeps its order."""
    try:
        o = canonical_orientation(affine)
    except ValueError:
        return IDENTITY
    return Orientation(o.perm, (False, False, False))


def display_grid(affine: np.ndarray, shape) -> tuple[Orientation, np.ndarray, tuple[int, int, int]]:
    """(orientation, affine, spatial shape) of the displayed grid of a volume on ``affine``/``shape``."""
    o = display_orientation(affine)
    shape = tuple(int(s) for s in shape)
    return o, reorient_affine(affine, shape, o), tuple(shape[p] for p in o.perm)


def same_grid(affine_a, shape_a, affine_b, shape_b, atol: float = GRID_ATOL) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(
        np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64), atol=atol, rtol=0
    )


def source_grid(meta: dict) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """The file's own grid (RAS affine, spatial shape in our (d0, d1, d2) order) from a layer's
    ``u2net`` metadata: ``source_affine``/``source_shape`` as the reader stores them, else the NIfTI
    header's (result layers of the domain selector carry the image's header). ``None``: unknown."""
    if not isinstance(meta, dict):
        return None
    if meta.get("source_affine") is not None and meta.get("source_shape") is not None:
        return np.asarray(meta["source_affine"], dtype=np.float64), tuple(int(s) for s in meta["source_shape"])
    header = meta.get("header")
    if header is not None and hasattr(header, "get_best_affine") and hasattr(header, "get_data_shape"):
        dims = tuple(int(s) for s in header.get_data_shape()[:3])
        if len(dims) == 3:
            return nifti_to_ours(header.get_best_affine()), dims[::-1]
    return None


def to_source_order(labels: np.ndarray, affine: np.ndarray, source_affine, source_shape):
    """``labels`` on the grid ``affine`` (the displayed grid) in the file's array order, or
    ``None`` when that grid is not the displayed grid of the file's (``source_affine``,
    ``source_shape``). Exact: a transpose."""
    o, shown_affine, shown_shape = display_grid(source_affine, source_shape)
    if not same_grid(affine, labels.shape, shown_affine, shown_shape):
        return None
    return undo_reorient_array(labels, o)


def volume_layer_affine(affine: np.ndarray, channels: int) -> np.ndarray:
    """The napari ``affine`` for a volume: 4×4, or 5×5 with identity on the modality axis."""
    affine = to_napari_affine(affine)
    if channels == 1:
        return affine.copy()
    full = np.eye(5)
    full[1:, 1:] = affine
    return full


def layer_data_to_world(layer) -> np.ndarray:
    """The full data→world matrix of a layer: ``affine · (translate, rotate, shear, scale)``."""
    from napari.utils.transforms import Affine

    inner = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ inner.affine_matrix


def spatial_part(matrix: np.ndarray) -> np.ndarray:
    """The 4×4 spatial block of a 5×5 data→world matrix whose first axis is the modality."""
    out = np.eye(4)
    out[:3, :3] = matrix[1:4, 1:4]
    out[:3, 3] = matrix[1:4, 4]
    return out


def layer_volume(layer) -> Volume:
    """An Image layer as the core's :class:`Volume` (channel-first data, spatial 4×4 affine in RAS);
    raises :class:`InputError` for layers no domain can take.

    Only the layer's shape and transform are looked at: the data stays what the layer holds (a view,
    or a lazy array that the job reads in its worker), so this is cheap on the GUI thread."""
    name = layer.name
    if getattr(layer, "rgb", False):
        raise InputError(
            f"layer {name!r} is an RGB colour image; the model segments grey-value 3D scans "
            "(CT or MR). Open the scan itself (NIfTI or DICOM)"
        )
    if getattr(layer, "multiscale", False):
        raise InputError(f"layer {name!r} is multiscale; open the full-resolution volume as a plain layer")
    data = layer.data
    if layer.ndim == 2:
        raise InputError(
            f"layer {name!r} is a 2D image (shape {tuple(data.shape)}); the model segments 3D volumes. "
            "Open a 3D scan (NIfTI or a DICOM series folder)"
        )
    if layer.ndim not in (3, 4):
        raise InputError(
            f"layer {name!r} has {layer.ndim} dimensions {tuple(data.shape)}; expected a 3D volume "
            "or a 4D stack of modalities (modality first)"
        )
    matrix = layer_data_to_world(layer)
    if layer.ndim == 3:
        array, affine = data[None], from_napari_affine(matrix)
    else:
        array, affine = data, from_napari_affine(spatial_part(matrix))
    if min(array.shape[1:]) < 2:
        raise InputError(f"layer {name!r} is flat (shape {tuple(data.shape)}); a 3D volume is needed")
    meta = layer.metadata.get(META_KEY, {}) if isinstance(layer.metadata, dict) else {}
    # The file's grid, for whoever writes results of this volume in the file's order (the writer
    # also finds it from a NIfTI header or the viewer's image layer).
    source = {k: meta[k] for k in ("source_affine", "source_shape", "orientation") if k in meta}
    return Volume(array, affine, header=meta.get("header"), source=str(meta.get("source", "")), meta=source)


def result_geometry(image_layer) -> dict:
    """Layer keyword arguments that put a 3D result array (labels, a map) exactly on the image's grid."""
    if image_layer.ndim == 3:
        return {
            "scale": np.array(image_layer.scale),
            "translate": np.array(image_layer.translate),
            "rotate": np.array(image_layer.rotate),
            "shear": np.array(image_layer.shear),
            "affine": np.array(image_layer.affine.affine_matrix),
            "units": tuple(image_layer.units),
        }
    # A modality-first 4D image: its spatial transform, composed into one matrix.
    return {"affine": spatial_part(layer_data_to_world(image_layer)), "units": tuple(image_layer.units)[1:]}


def with_leading_axes(geometry: dict, extra: int) -> dict:
    """:func:`result_geometry`'s keywords for an array with ``extra`` leading axes (e.g. one per
    class) that carry no geometry: the 3D transform composed into one matrix, identity before it."""
    if not extra:
        return geometry
    from napari.utils.transforms import Affine

    matrix = np.asarray(geometry["affine"], dtype=np.float64)
    if "scale" in geometry:
        parts = Affine(scale=geometry["scale"], translate=geometry["translate"], rotate=geometry["rotate"],
                       shear=geometry["shear"])
        matrix = matrix @ parts.affine_matrix
    full = np.eye(matrix.shape[0] + extra)
    full[extra:, extra:] = matrix
    return {"affine": full, "units": ("pixel",) * extra + tuple(geometry["units"])}


def radiological_view(viewer) -> None:
    """Show axial slices as radiologists read them: anterior up, the patient's right on the left.

    napari's world here is (S, A, R) mm, so this makes the vertical (A) axis point up and the
    horizontal (R) axis point left. Only the camera changes; data and coordinates do not.
    """
    scene = getattr(viewer, "scene", None)  # napari ≥ 0.9; older versions: viewer.camera
    camera = scene.camera if scene is not None else viewer.camera
    camera.orientation2d = ("up", "left")
