"""npe2 writer: a Labels layer → NIfTI with the geometry of the image it was computed on.

The file gets the SOURCE file's array order, affine and header (qform/sform codes included), so it
compares voxel by voxel with the scan in any tool. Sagittal and coronal scans are shown in napari
with their axes permuted (:mod:`._geometry`); their labels are transposed back here, exactly.
Where the source comes from, first match wins:

1. the layer's own ``metadata["u2net"]``: the reader's ``source_affine``/``source_shape`` (a layer
   that copied the image's metadata), else the NIfTI header a result layer of the domain selector
   carries;
2. an image layer of the current viewer on exactly the labels' grid (same spatial shape and
   data→world transform; the image named in the metadata first, then the selected layers, then
   the others): napari's *New Labels* copies the image's scale and affine but none of its metadata,
   and a writer gets only the layer's data and attributes, so this is how a hand-drawn layer finds
   its header (issue #16.11). With several matching images (e.g. co-registered modalities of one
   file set) the first in that order is used; their grids are the same, only the header may differ;
3. otherwise the layer's own transform, with qform/sform code 1 (scanner).

A Labels layer napari made on a 4D (modality-first) image has a modality axis too: it is saved as
one 3D label map, the highest label painted at a voxel over all modalities.

napari's own save dialog asks before overwriting; the file is then written atomically (temporary
file + rename, :func:`training.io.volume.write_labels`), so a crash never leaves half a file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.volume import Volume, is_nifti, write_labels

from ._geometry import (
    META_KEY,
    from_napari_affine,
    layer_data_to_world,
    same_grid,
    source_grid,
    spatial_part,
    to_source_order,
)


def _affine_from_attributes(attributes: dict, ndim: int) -> np.ndarray:
    """The layer's full data→world matrix (``affine`` · scale/translate/rotate/shear)."""
    from napari.utils.transforms import Affine

    ndim = len(attributes.get("scale", np.ones(ndim)))
    inner = Affine(
        scale=attributes.get("scale", np.ones(ndim)),
        translate=attributes.get("translate", np.zeros(ndim)),
        rotate=attributes.get("rotate", np.eye(ndim)),
        shear=attributes.get("shear", np.zeros(ndim * (ndim - 1) // 2)),
    )
    outer = attributes.get("affine")
    outer = np.eye(ndim + 1) if outer is None else np.asarray(getattr(outer, "affine_matrix", outer))
    return outer @ inner.affine_matrix


def _spatial_labels(labels: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(3D labels, 4×4 RAS affine) of a 3D layer, or of a 4D one whose first axis is a modality
    axis without geometry (a Labels layer napari made on a modality-first image)."""
    if labels.ndim == 3:
        return labels, from_napari_affine(matrix)
    if labels.ndim == 4 and matrix.shape == (5, 5):
        first = np.eye(5)[0]
        if np.allclose(matrix[0], first) and np.allclose(matrix[:, 0], first):
            return labels.max(axis=0), from_napari_affine(spatial_part(matrix))
    raise InputError(f"only 3D labels can be saved as NIfTI; this layer has shape {labels.shape}")


def _viewer_image_metas(name_hint: str | None):
    """``u2net`` metadata and spatial grid of the current viewer's image layers, best guess first."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt / no viewer: nothing to look at
        return
    if viewer is None:
        return
    layers = list(viewer.layers)
    selected = set(viewer.layers.selection)
    layers.sort(key=lambda la: (la.name != name_hint, la not in selected))
    for layer in layers:
        meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        if getattr(layer, "_type_string", "") != "image" or not isinstance(meta, dict) or layer.ndim not in (3, 4):
            continue
        matrix = layer_data_to_world(layer)
        if layer.ndim == 4:
            matrix = spatial_part(matrix)
        yield meta, from_napari_affine(matrix), tuple(int(s) for s in layer.data.shape[-3:])


def _source_of(labels: np.ndarray, affine: np.ndarray, meta: dict, attributes: dict):
    """(labels in the source's order, its affine, its header) or ``None`` (see module docstring)."""
    hint = meta.get("image") or attributes.get("name")
    in_viewer = (m for m, a, s in _viewer_image_metas(hint) if same_grid(a, s, affine, labels.shape))
    own = [meta] if source_grid(meta) is not None else []
    for candidate in itertools.chain(own, in_viewer):  # the viewer is looked at only if needed
        grid = source_grid(candidate)
        if grid is None:  # an image without a known file grid (e.g. made by hand): its own grid
            return labels, affine, candidate.get("header")
        back = to_source_order(labels, affine, *grid)
        if back is not None:
            return back, grid[0], candidate.get("header")
    return None


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer in its source file's array order, affine and header."""
    path = str(path)
    if not is_nifti(path):
        path = path + ".nii.gz"
    labels = np.asarray(data)
    meta = (attributes.get("metadata") or {}).get(META_KEY, {})
    meta = meta if isinstance(meta, dict) else {}
    labels, affine = _spatial_labels(labels, _affine_from_attributes(attributes, labels.ndim))
    header = None
    if meta.get("affine") is not None and (meta.get("shape") is None or tuple(meta["shape"]) == labels.shape):
        affine, header = np.asarray(meta["affine"], dtype=np.float64), meta.get("header")
    found = _source_of(labels, affine, meta, attributes)
    if found is not None:
        labels, affine, header = found
    like = Volume(np.empty((1, 0, 0, 0), np.uint8), np.asarray(affine), header=header)
    write_labels(Path(path), labels, np.asarray(affine), like=like)
    return [path]
