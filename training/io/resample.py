"""Grids for inference and training: exact reorientation and SimpleITK resampling.

Every image is first brought to one *canonical* axis order without interpolation: axis 0 runs
towards superior, axis 1 towards anterior, axis 2 towards the patient's right (the closest
match for oblique images; a permutation and flips only, so it is exact and reversible). A
domain's ``spacing`` (z, y, x) refers to these canonical axes. Resampling keeps the image's
direction cosines and field-of-view centre and changes only the voxel size, so an oblique image
stays oblique and the way back onto the original grid is a resampling with the original grid as
reference (linear, nearest-neighbour extrapolation at the border).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.io.volume import from_sitk, spacing_of, to_sitk

CANONICAL_WORLD_AXES = (2, 1, 0)  # our axis 0 -> S, axis 1 -> A, axis 2 -> R (RAS world indices)


@dataclass(frozen=True)
class Orientation:
    """New axis ``i`` is old axis ``perm[i]``, reversed when ``flip[i]``."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)


def canonical_orientation(affine: np.ndarray) -> Orientation:
    """The axis permutation and flips that bring an image closest to (S, A, R) axes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ValueError("the image affine is degenerate; its orientation cannot be determined")
    perm = tuple(int(np.flatnonzero(ornt[:, 0] == w)[0]) for w in CANONICAL_WORLD_AXES)
    flip = tuple(bool(ornt[p, 1] < 0) for p in perm)
    return Orientation(perm, flip)


def reorient_array(array: np.ndarray, o: Orientation) -> np.ndarray:
    """Apply ``o`` to the last three axes (a view; no copy, no interpolation)."""
    lead = array.ndim - 3
    out = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in o.perm))
    for i, f in enumerate(o.flip):
        if f:
            out = np.flip(out, axis=lead + i)
    return out


def undo_reorient_array(array: np.ndarray, o: Orientation) -> np.ndarray:
    """Inverse of :func:`reorient_array` (a view)."""
    lead = array.ndim - 3
    out = array
    for i, f in enumerate(o.flip):
        if f:
            out = np.flip(out, axis=lead + i)
    inverse = tuple(int(i) for i in np.argsort(o.perm))
    return np.transpose(out, tuple(range(lead)) + tuple(lead + p for p in inverse))


def reorient_affine(affine: np.ndarray, shape, o: Orientation) -> np.ndarray:
    """The affine of the reoriented grid (``shape`` is the original spatial shape)."""
    affine = np.asarray(affine, dtype=np.float64)
    out = np.eye(4)
    out[:3, 3] = affine[:3, 3]
    for i, (p, f) in enumerate(zip(o.perm, o.flip)):
        col = affine[:3, p]
        if f:
            out[:3, 3] += col * (shape[p] - 1)
            col = -col
        out[:3, i] = col
    return out


def needs_resampling(affine: np.ndarray, spacing, rtol: float = 1e-3) -> bool:
    return not np.allclose(spacing_of(affine), np.asarray(spacing, dtype=np.float64), rtol=rtol, atol=0)


def resampled_grid(affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Same directions and field-of-view centre, voxel size ``spacing`` (mm, per array axis)."""
    affine = np.asarray(affine, dtype=np.float64)
    old = spacing_of(affine)
    new = np.asarray(spacing, dtype=np.float64)
    shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(np.round(shape * old / new), 1).astype(int)
    scale = new / old  # new index step in old index units
    # index maps: old_index = scale * new_index + offset, centres of the two grids coincide
    offset = (shape - 1) / 2 - scale * (new_shape - 1) / 2
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = offset
    return affine @ m, tuple(int(s) for s in new_shape)


def resample(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape,
             linear: bool = True) -> np.ndarray:
    """Resample a 3D array from its grid onto another grid (float32 result for linear)."""
    import SimpleITK as sitk

    src = to_sitk(np.asarray(array, dtype=np.float32 if linear else array.dtype), affine)
    ref = to_sitk(np.zeros((1, 1, 1), dtype=np.uint8), target_affine)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in reversed(tuple(target_shape))])
    f.SetOutputOrigin(ref.GetOrigin())
    f.SetOutputSpacing(ref.GetSpacing())
    f.SetOutputDirection(ref.GetDirection())
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetUseNearestNeighborExtrapolator(True)
    out, _ = from_sitk(f.Execute(src))
    return out


def labels_on(labels, image) -> np.ndarray:
    """A label Volume's array on ``image``'s grid, by the two affines (nearest neighbour); as it is
    when the grids already match. Label files often store their rows in another order than the
    image (patient B's does), so the arrays alone cannot be compared."""
    data = np.asarray(labels.data[0])
    if data.shape == tuple(image.shape) and np.allclose(labels.affine, image.affine, atol=1e-3):
        return data
    return resample(data, labels.affine, image.affine, tuple(image.shape), linear=False)
