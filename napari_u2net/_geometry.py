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
"""

from __future__ import annotations

import numpy as np

from training.errors import InputError
from training.io.volume import Volume

META_KEY = "u2net"


_WORLD = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def to_napari_affine(affine: np.ndarray) -> np.ndarray:
    """Volume affine (index → R, A, S) → napari affine (index → S, A, R). Exact."""
    return _WORLD @ np.asarray(affine, dtype=np.float64)


from_napari_affine = to_napari_affine  # the row reversal is its own inverse


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
    return Volume(array, affine, header=meta.get("header"), source=str(meta.get("source", "")))


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
