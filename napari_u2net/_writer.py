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

Saved as ``.dcm``, a Labels layer whose image came from a DICOM series becomes a DICOM SEG that
references that series (:func:`training.io.dicom_seg.write_seg`): the source is found as above,
and its ``source`` folder and ``info["dicom_series"]`` (the reader's metadata) name the series;
segments are the layer's classes (``classes`` metadata, else its ``features``) with its colours.
A result untouched since the domain selector made it is recorded as AUTOMATIC, a corrected one as
SEMIAUTOMATIC, a hand-drawn layer as MANUAL. Labels of a NIfTI image are refused (a SEG must
reference DICOM instances): save them as NIfTI.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.dicom import is_dicom_file
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
    except Exception:  # noqa: BLE001 - no Qt / no viewer: nothing to look at
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


def _source_of(labels: np.ndarray, affine: np.ndarray, meta: dict, attributes: dict, want=None):
    """(labels in the source's order, its affine, its header, the source's metadata) or ``None``
    (see module docstring). ``want``: only sources whose metadata it accepts."""
    hint = meta.get("image") or attributes.get("name")
    in_viewer = (m for m, a, s in _viewer_image_metas(hint) if same_grid(a, s, affine, labels.shape))
    own = [meta] if source_grid(meta) is not None else []
    for candidate in itertools.chain(own, in_viewer):  # the viewer is looked at only if needed
        if want is not None and not want(candidate):
            continue
        grid = source_grid(candidate)
        if grid is None:  # an image without a known file grid (e.g. made by hand): its own grid
            return labels, affine, candidate.get("header"), candidate
        back = to_source_order(labels, affine, *grid)
        if back is not None:
            return back, grid[0], candidate.get("header"), candidate
    return None


def _layer_labels(data, attributes: dict, want=None):
    """(3D labels in the source file's order, its affine, header, source metadata or None, own metadata)."""
    labels = np.asarray(data)
    meta = (attributes.get("metadata") or {}).get(META_KEY, {})
    meta = meta if isinstance(meta, dict) else {}
    labels, affine = _spatial_labels(labels, _affine_from_attributes(attributes, labels.ndim))
    header = None
    if meta.get("affine") is not None and (meta.get("shape") is None or tuple(meta["shape"]) == labels.shape):
        affine, header = np.asarray(meta["affine"], dtype=np.float64), meta.get("header")
    found = _source_of(labels, affine, meta, attributes, want)
    if found is not None:
        return (*found, meta)
    return labels, affine, header, None, meta


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer in its source file's array order, affine and header."""
    path = str(path)
    if not is_nifti(path):
        path = path + ".nii.gz"
    labels, affine, header, _, _ = _layer_labels(data, attributes)
    like = Volume(np.empty((1, 0, 0, 0), np.uint8), np.asarray(affine), header=header)
    write_labels(Path(path), labels, np.asarray(affine), like=like)
    return [path]


def _is_dicom_source(meta: dict) -> bool:
    source = str(meta.get("source") or "")
    return bool(source) and (Path(source).is_dir() or is_dicom_file(source))


def _class_names(meta: dict, attributes: dict) -> list[str]:
    if meta.get("classes"):
        return [str(c) for c in meta["classes"]]
    features = attributes.get("features")
    if features is not None and "class" in getattr(features, "columns", ()) and len(features):
        index = features["index"] if "index" in features.columns else range(len(features))
        names = {int(i): str(c) for i, c in zip(index, features["class"])}
        return [names.get(v, f"label {v}") for v in range(max(names) + 1)]
    return []


def _colours(attributes: dict, count: int) -> list[str | None]:
    """The layer's colour of each label value 0..count ("#rrggbb"), None where napari has none."""
    colormap = attributes.get("colormap")
    try:
        rgba = np.asarray(colormap.map(np.arange(count + 1)), dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return []
    return [None if a[3] == 0 else "#" + "".join(f"{round(float(c) * 255):02x}" for c in a[:3]) for a in rgba]


def _algorithm_type(meta: dict, data) -> str:
    if not meta.get("domain"):
        return "MANUAL"
    from ._widget import labels_hash

    untouched = meta.get("result_hash") and meta["result_hash"] == labels_hash(np.asarray(data))
    return "AUTOMATIC" if untouched else "SEMIAUTOMATIC"


def write_seg_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer of a DICOM image as a DICOM SEG referencing the image's series."""
    from training import __version__
    from training.io.dicom_seg import write_seg

    path = str(path)
    if not path.lower().endswith(".dcm"):
        path = path + ".dcm"
    labels, affine, _, source, meta = _layer_labels(data, attributes, want=_is_dicom_source)
    if source is None or (meta.get("source") and not _is_dicom_source(meta)):  # its own image is not DICOM
        raise InputError(
            f"layer {attributes.get('name', '')!r}: its image is not a DICOM series (or is not open), and a "
            "DICOM SEG must reference the series it segments; save the labels as NIfTI (.nii.gz) instead"
        )
    classes = _class_names(meta, attributes)
    count = max(len(classes) - 1, int(labels.max()) if labels.size else 0)
    write_seg(Path(path), labels, affine, source["source"], classes, _colours(attributes, count),
              domain=str(meta.get("domain") or ""), series=(source.get("info") or {}).get("dicom_series"),
              algorithm_type=_algorithm_type(meta, data), version=__version__)
    return [path]
