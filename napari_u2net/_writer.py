"""npe2 writer: a Labels layer → NIfTI with the geometry of the image it was computed on.

napari's own save dialog asks before overwriting; the file is then written atomically (temporary
file + rename, :func:`training.io.volume.write_labels`), so a crash never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.volume import Volume, is_nifti, write_labels

from ._geometry import META_KEY, from_napari_affine


def _affine_from_attributes(attributes: dict) -> np.ndarray:
    from napari.utils.transforms import Affine

    ndim = len(attributes.get("scale", (1, 1, 1)))
    inner = Affine(
        scale=attributes.get("scale", np.ones(ndim)),
        translate=attributes.get("translate", np.zeros(ndim)),
        rotate=attributes.get("rotate", np.eye(ndim)),
        shear=attributes.get("shear", np.zeros(ndim * (ndim - 1) // 2)),
    )
    outer = attributes.get("affine")
    outer = np.eye(ndim + 1) if outer is None else np.asarray(getattr(outer, "affine_matrix", outer))
    return outer @ inner.affine_matrix


def write_labels_layer(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer; the source image's affine and header come from its metadata."""
    path = str(path)
    if not is_nifti(path):
        path = path + ".nii.gz"
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise InputError(f"only 3D labels can be saved as NIfTI; this layer has shape {labels.shape}")
    meta = (attributes.get("metadata") or {}).get(META_KEY, {})
    affine = meta.get("affine")
    shape = meta.get("shape")
    if affine is None or (shape is not None and tuple(shape) != labels.shape):
        affine, header = from_napari_affine(_affine_from_attributes(attributes)), None
    else:
        header = meta.get("header")
    like = Volume(np.empty((1, 0, 0, 0), np.uint8), np.asarray(affine), header=header)
    write_labels(Path(path), labels, np.asarray(affine), like=like)
    return [path]
