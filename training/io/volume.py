"""3D (multi-channel) images with their geometry, and reading/writing them.

One in-memory convention everywhere (inference, training, the napari layers):

* ``data`` has shape ``(C, D0, D1, D2)``. For NIfTI input the spatial axes are the file's
  ``(k, j, i)`` and for DICOM/SimpleITK ``(z, y, x)``, so axis 0 is the slice axis and napari
  shows axial slices by default.
* ``affine`` is a 4×4 matrix mapping an array index ``(d0, d1, d2, 1)`` to RAS+ millimetres
  (nibabel's world convention). It is exactly the NIfTI affine with its columns reordered, so
  labels written back get the input's affine bit for bit.

SimpleITK (DICOM, resampling) works in LPS with ``(x, y, z)`` indices; :func:`to_sitk` and
:func:`from_sitk` convert exactly.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.atomic import atomic_output

# Reverses the three spatial axes: our (d0, d1, d2) <-> NIfTI (i, j, k) / SimpleITK (x, y, z).
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """An image: channel-first voxel data and the affine of its grid (see module docstring)."""

    data: np.ndarray
    affine: np.ndarray
    header: object | None = None  # the source NIfTI header, reused when writing labels
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 4:
            raise ValueError(f"Volume data must be (C, D0, D1, D2), got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4×4, got {self.affine.shape}")

    @property
    def channels(self) -> int:
        return self.data.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (d0, d1, d2)."""
        return spacing_of(self.affine)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def nifti_to_ours(affine: np.ndarray) -> np.ndarray:
    """NIfTI affine (index i, j, k) → ours (index d0=k, d1=j, d2=i). Exact (column swap)."""
    return np.asarray(affine, dtype=np.float64) @ _REVERSE


ours_to_nifti = nifti_to_ours  # the permutation is its own inverse


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


# Other single-file 3D formats that research tools write (3D Slicer, ITK-SNAP, pyradiomics), read
# through SimpleITK with their geometry.
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def is_itk_image(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def case_name(path: str | Path) -> str:
    """``/data/case_001_0000.nii.gz`` → ``case_001_0000``; a DICOM folder → its name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", *ITK_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- reading ------------------------------------------------------------------------------------
def read_itk_image(path: str | Path) -> Volume:
    """A 3D NRRD or MetaImage file (one channel, or a vector image's components as channels)."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read this image ({str(e).strip().splitlines()[-1]}); "
                         "is it complete and not corrupt?") from None
    if img.GetDimension() != 3:
        raise InputError(f"{path}: a {img.GetDimension()}D image (size {img.GetSize()}); the model segments 3D volumes")
    if img.GetNumberOfComponentsPerPixel() > 1:
        channels = [sitk.VectorIndexSelectionCast(img, i) for i in range(img.GetNumberOfComponentsPerPixel())]
    else:
        channels = [img]
    arrays = []
    for ch in channels:
        arr, affine = from_sitk(ch)
        arrays.append(arr)
    if min(arrays[0].shape) == 1:
        raise InputError(f"{path}: this is a 2D image (shape {arrays[0].shape}); the model segments 3D volumes")
    return Volume(np.ascontiguousarray(np.stack(arrays)), affine, source=str(path))


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D or 4D NIfTI file; a 4th axis becomes channels (the MSD multi-modal layout)."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: cannot read this NIfTI file ({e}); is it complete and not corrupt?") from e
    arr = np.asarray(arr)
    if arr.ndim == 5 and arr.shape[3] == 1:  # (i, j, k, 1, c): NIfTI's vector-valued layout
        arr = arr[:, :, :, 0, :]
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 or (arr.ndim == 3 and min(arr.shape) == 1):
        raise InputError(
            f"{path}: this is a 2D image (shape {arr.shape}); the model segments 3D volumes"
        )
    if arr.ndim not in (3, 4):
        raise InputError(f"{path}: expected a 3D or 4D image, got {arr.ndim} dimensions {arr.shape}")
    if arr.ndim == 3:
        arr = arr[..., None]
    data = np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))  # (c, k, j, i)
    return Volume(data, nifti_to_ours(img.affine), header=img.header.copy(), source=str(path))


def read_image(paths: str | Path | list[str | Path], series: str | None = None) -> Volume:
    """Read a NIfTI file, a DICOM folder or file, an NRRD/MetaImage file, or several
    single-modality files (stacked as channels). ``series`` picks one series (its UID) of a DICOM folder that holds several."""
    from training.io.dicom import is_dicom_file, read_dicom

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image given")
    vols = []
    for p in paths:
        _check_readable(p)
        if p.is_dir() or is_dicom_file(p):
            vols.append(read_dicom(p, series))
        elif is_nifti(p):
            vols.append(read_nifti(p))
        elif not p.exists():
            raise InputError(f"{p}: no such file or folder")
        elif is_itk_image(p):
            vols.append(read_itk_image(p))
        else:
            raise InputError(f"{p}: unsupported file type; give a .nii/.nii.gz file, a DICOM file or folder, "
                             "or an .nrrd/.mha/.mhd file")
    if len(vols) == 1:
        return vols[0]
    first = vols[0]
    for p, v in zip(paths[1:], vols[1:]):
        differs = grid_difference(v, first)
        if differs:
            raise InputError(
                f"{p}: its grid differs from {paths[0]}'s ({differs}); all modalities of one case "
                "must share one grid: resample them onto one first"
            )
    data = np.concatenate([v.data for v in vols], axis=0)
    return Volume(data, first.affine, first.header, source=str(paths[0]), meta={"files": [str(p) for p in paths]})


# Label value of voxels nobody labelled (sparse annotations: a few painted slices). They count in no
# loss, metric or statistic; so label maps hold at most 254 classes.
IGNORE_INDEX = 255


# -- writing ------------------------------------------------------------------------------------
def _check_readable(path: Path) -> None:
    """One line for an input that cannot be opened at all: missing, a link loop, no permission."""
    try:
        path.resolve(strict=True)
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: permission denied; make it readable for this user")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or folder") from None
    except (RuntimeError, OSError) as e:  # Python reports a symbolic-link loop as RuntimeError
        why = "a symbolic-link loop" if "loop" in str(e).lower() or getattr(e, "errno", 0) == errno.ELOOP else e
        raise InputError(f"{path}: cannot open it ({why})") from None


def grid_difference(a: Volume, b: Volume, atol: float = 1e-4) -> str:
    """What differs between two volumes' grids, in words ("" when they are the same grid)."""
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    sa, sb = spacing_of(a.affine), spacing_of(b.affine)
    if not np.allclose(sa, sb, atol=atol):
        return f"voxel size {_mm(sa)} vs {_mm(sb)} mm"
    if not np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=atol):
        return f"origin {_mm(a.affine[:3, 3])} vs {_mm(b.affine[:3, 3])} mm"
    if not np.allclose(a.affine, b.affine, atol=atol):
        return "axis directions (orientation) differ"
    return ""


def _mm(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def label_dtype(max_label: int) -> np.dtype:
    return np.dtype(np.uint8) if max_label < 256 else np.dtype(np.uint16)


def write_nifti(
    path: str | Path, array: np.ndarray, affine: np.ndarray, like: Volume | None = None, overwrite: bool = True
) -> Path:
    """Write a 3D ``(D0, D1, D2)`` or 4D ``(C, D0, D1, D2)`` array as NIfTI, atomically
    (:func:`training.io.atomic.atomic_output`; ``overwrite=False`` never replaces a file that
    appeared meanwhile).

    With ``like`` (the image the array was computed from) its header is reused, so qform/sform
    codes and the affine come back exactly as they were read.
    """
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise InputError(f"{path}: output must end in .nii or .nii.gz")
    arr = np.ascontiguousarray(array)
    # NIfTI's axes reversed: a Fortran-ordered view whose bytes are the C-ordered array's, which
    # nibabel writes as they are (a C-contiguous copy made it transpose again: 0.49 s instead of
    # 0.10 s for a 300×512×512 label map)
    arr = arr.T
    header = like.header.copy() if like is not None and like.header is not None else None
    img = nib.Nifti1Image(arr, ours_to_nifti(affine), header=header)
    img.set_data_dtype(arr.dtype)
    if header is None:
        img.set_sform(img.affine, code=1)
        img.set_qform(img.affine, code=1)
    else:
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
        img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    suffix = ".tmp.nii.gz" if str(path).lower().endswith(".gz") else ".tmp.nii"
    with atomic_output(path, suffix=suffix, overwrite=overwrite) as tmp:
        nib.save(img, tmp)
    return path


def write_labels(
    path: str | Path, labels: np.ndarray, affine: np.ndarray, like: Volume | None = None, overwrite: bool = True
) -> Path:
    """Write an integer label map (uint8, or uint16 beyond 255 classes) with the given geometry."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"labels must be 3D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0):
        raise InputError("labels must be ≥ 0")
    top = int(labels.max()) if labels.size else 0
    return write_nifti(path, labels.astype(label_dtype(top), copy=False), affine, like, overwrite)


# -- SimpleITK geometry ---------------------------------------------------------------------------
def to_sitk(array: np.ndarray, affine: np.ndarray):
    """A 3D array (D0, D1, D2) and our affine → a SimpleITK image with the same physical grid."""
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=np.float64)
    m_lps = _LPS @ affine[:3, :3]
    m_xyz = m_lps[:, ::-1]  # sitk index (x, y, z) = our (d2, d1, d0)
    spacing = np.sqrt((m_xyz**2).sum(axis=0))
    if np.any(spacing <= 0):
        raise InputError("the image affine has a zero-length axis; its geometry is invalid")
    direction = m_xyz / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError("the image affine is sheared (not a rotation with voxel sizes); it cannot be resampled")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    img.SetOrigin(tuple(float(v) for v in _LPS @ affine[:3, 3]))
    return img


def from_sitk(img) -> tuple[np.ndarray, np.ndarray]:
    """A 3D SimpleITK image → (array (D0, D1, D2), our RAS affine)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img)
    spacing = np.array(img.GetSpacing(), dtype=np.float64)
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    m_xyz = direction * spacing
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ m_xyz[:, ::-1]
    affine[:3, 3] = _LPS @ np.array(img.GetOrigin(), dtype=np.float64)
    return array, affine
