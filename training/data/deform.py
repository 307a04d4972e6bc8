"""Random smooth spatial deformations of 3D arrays (numpy/scipy only).

Used by the synthetic phantoms (random poses and elastic variation of anatomy) and by data
preparation that warps real volumes (e.g. the MNI152 template) into many plausible subjects.
Everything is expressed as a *sampling field*: for each output voxel, the (fractional) input
voxel index it takes its value from, shape ``(3, D0, D1, D2)``. One field warps an image
(linear interpolation) and its labels (nearest neighbour) identically, so they stay aligned.

API:

* ``random_smooth_displacement(shape, rng, magnitude_mm, smoothness_mm, spacing)`` →
  ``(3, D0, D1, D2)`` float32 displacement in *voxels*; each component has RMS
  ``magnitude_mm`` (converted per axis with ``spacing``) and varies over ~``smoothness_mm``.
* ``random_affine(rng, rotation_deg, scale_range, spacing=(1, 1, 1))`` → 3×3 matrix in voxel
  space (rotation about each axis uniform in ±``rotation_deg`` and an isotropic scale, both
  applied in millimetres so anisotropic voxels rotate correctly).
* ``sampling_field(shape, matrix=None, displacement=None, center=None)`` → the field
  ``center + matrix @ (x - center) + displacement``.
* ``warp(array, field, order, mode="nearest", cval=0.0)`` → warped array; ``array`` is
  ``(D0, D1, D2)`` or ``(C, D0, D1, D2)``; ``order`` 1 for images, 0 for labels.
* ``random_deformation(shape, spacing, rng, *, rotation_deg=15, scale=(0.9, 1.1),
  elastic_mm=6, smooth_mm=20)`` → :class:`Deformation` with ``.image(a)`` and ``.labels(l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def _spacing3(spacing) -> np.ndarray:
    s = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=np.float64).reshape(-1)
    if s.size == 1:
        s = np.repeat(s, 3)
    if s.size != 3 or np.any(s <= 0):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing!r}")
    return s


def random_smooth_displacement(
    shape, rng: np.random.Generator, magnitude_mm: float, smoothness_mm: float, spacing=(1.0, 1.0, 1.0)
) -> np.ndarray:
    """A smooth random displacement field ``(3, D0, D1, D2)`` in voxels.

    White noise on a coarse control grid (about ``smoothness_mm / 2`` apart) is Gaussian-smoothed
    and interpolated cubically to full resolution: cheap even for large volumes, and the result
    does not depend on the voxel size (only on millimetres).
    """
    shape = tuple(int(n) for n in shape)
    spacing = _spacing3(spacing)
    if magnitude_mm <= 0:
        return np.zeros((3, *shape), dtype=np.float32)
    smooth_vox = max(float(smoothness_mm), 1e-3) / spacing
    step = np.maximum(1.0, smooth_vox / 2.0)  # control points per smoothing length: ~2
    coarse = tuple(int(np.ceil((n - 1) / s)) + 4 for n, s in zip(shape, step))
    grids = np.meshgrid(
        *[np.arange(n, dtype=np.float32) / s + 1.5 for n, s in zip(shape, step)], indexing="ij"
    )
    out = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        noise = rng.standard_normal(coarse)
        noise = ndimage.gaussian_filter(noise, sigma=smooth_vox / step, mode="reflect")
        field = ndimage.map_coordinates(noise, grids, order=3, mode="nearest")
        field -= field.mean()
        out[axis] = field * (magnitude_mm / spacing[axis] / max(float(field.std()), 1e-12))
    return out


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation about axes 0, 1, 2 (in that order) by the given angles, in radians."""
    a, b, c = angles_rad
    r0 = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    r1 = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    r2 = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return r2 @ r1 @ r0


def random_affine(
    rng: np.random.Generator, rotation_deg: float, scale_range=(1.0, 1.0), spacing=(1.0, 1.0, 1.0)
) -> np.ndarray:
    """A random rotation + isotropic scale as a 3×3 matrix acting on voxel offsets.

    The rotation is built in millimetres and conjugated with the voxel size, so with
    anisotropic voxels a sphere stays a sphere (``S⁻¹ R S`` with ``S = diag(spacing)``).
    """
    spacing = _spacing3(spacing)
    angles = np.radians(rng.uniform(-rotation_deg, rotation_deg, size=3))
    scale = rng.uniform(*scale_range) if scale_range[0] != scale_range[1] else scale_range[0]
    m_mm = rotation_matrix(angles) / scale  # sampling maps output → input: shrink = zoom in
    return np.diag(1.0 / spacing) @ m_mm @ np.diag(spacing)


def sampling_field(shape, matrix=None, displacement=None, center=None) -> np.ndarray:
    """Input voxel coordinates for every output voxel: ``center + M (x - center) + d``."""
    shape = tuple(int(n) for n in shape)
    center = np.asarray(center if center is not None else [(n - 1) / 2 for n in shape], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    if matrix is not None:
        offsets = grid - center.reshape(3, 1, 1, 1).astype(np.float32)
        grid = np.einsum("ij,j...->i...", np.asarray(matrix, dtype=np.float32), offsets)
        grid += center.reshape(3, 1, 1, 1).astype(np.float32)
    if displacement is not None:
        grid = grid + displacement
    return grid.astype(np.float32, copy=False)


def warp(
    array: np.ndarray, field: np.ndarray, order: int, mode: str = "nearest", cval: float = 0.0
) -> np.ndarray:
    """Sample ``array`` (3D, or 4D channel-first) at ``field`` (see :func:`sampling_field`).

    ``order`` 1 for images (linear), 0 for labels (nearest, so no new label values appear).
    """
    array = np.asarray(array)
    if array.ndim == 4:
        return np.stack([warp(a, field, order, mode, cval) for a in array])
    if array.ndim != 3:
        raise ValueError(f"expected a 3D or (C, D0, D1, D2) array, got shape {array.shape}")
    out_dtype = array.dtype if order == 0 else np.result_type(array.dtype, np.float32)
    src = array if order == 0 else array.astype(out_dtype, copy=False)
    return ndimage.map_coordinates(src, field, order=order, mode=mode, cval=cval, output=out_dtype)


@dataclass
class Deformation:
    """One random spatial transform; warps images and labels of one grid consistently."""

    field: np.ndarray  # (3, D0, D1, D2) input voxel coordinates

    def image(self, array: np.ndarray, mode: str = "nearest", cval: float = 0.0) -> np.ndarray:
        return warp(array, self.field, order=1, mode=mode, cval=cval)

    def labels(self, array: np.ndarray, cval: int = 0) -> np.ndarray:
        return warp(array, self.field, order=0, mode="constant", cval=cval)

    __call__ = image


def random_deformation(
    shape,
    spacing,
    rng: np.random.Generator,
    *,
    rotation_deg: float = 15.0,
    scale=(0.9, 1.1),
    elastic_mm: float = 6.0,
    smooth_mm: float = 20.0,
) -> Deformation:
    """Random rotation/scale about the volume centre plus a smooth elastic displacement."""
    matrix = random_affine(rng, rotation_deg, scale, spacing)
    disp = random_smooth_displacement(shape, rng, elastic_mm, smooth_mm, spacing) if elastic_mm > 0 else None
    return Deformation(sampling_field(shape, matrix, disp))
