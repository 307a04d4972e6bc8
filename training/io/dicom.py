"""DICOM in: series folders, single slice files and multi-frame files, with checked slice geometry.

SimpleITK (GDCM) decodes the pixels, including compressed transfer syntaxes such as JPEG 2000.
What GDCM does not check we do before stacking: slices are ordered along the normal of their
orientation, and a series whose slices are not evenly spaced (a missing or duplicated slice) is
refused with the gap named, instead of being stacked on a regular grid it does not have. A
folder holding several series is never read as "one of them": the caller names the series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.volume import Volume, from_sitk

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Relative tolerance on slice gaps: scanners write positions rounded to 0.001–0.01 mm.
GAP_TOLERANCE = 0.05
_TAGS = {
    "series": "0020|000e", "description": "0008|103e", "modality": "0008|0060", "frames": "0028|0008",
    "position": "0020|0032", "orientation": "0020|0037", "sop_class": "0008|0016",
}
_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class SeriesInfo:
    """One series of a folder, as a user would pick it."""

    uid: str
    description: str
    modality: str
    files: list[str]

    def label(self) -> str:
        what = self.description or self.modality or "series"
        return f"{what} ({len(self.files)} files, series {self.uid})"


def is_dicom_file(path: str | Path) -> bool:
    """A file with a DICOM suffix, or with the ``DICM`` marker at byte 128 (files named without one)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _header(path: str | Path):
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.LoadPrivateTagsOff()
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{path}: not a readable DICOM file ({_first_line(e)})") from None
    return r


def _tag(reader, name: str) -> str:
    key = _TAGS[name]
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Every DICOM series directly in ``folder`` (GDCM's grouping), largest first."""
    import SimpleITK as sitk

    folder = Path(folder)
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise InputError(f"{folder}: cannot scan for DICOM files ({_first_line(e)})") from None
    found = []
    for uid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        first = _header(files[0])
        found.append(SeriesInfo(uid, _tag(first, "description"), _tag(first, "modality"), files))
    return sorted(found, key=lambda s: -len(s.files))


def read_dicom(path: str | Path, series: str | None = None) -> Volume:
    """Read a DICOM series folder, one slice file (its whole series is read), or a multi-frame file.

    A folder with several series needs ``series`` (a series UID, or a unique start of one);
    without it the error lists them.
    """
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    all_series = list_series(path)
    if not all_series:
        raise InputError(f"{path}: no DICOM series found in this folder")
    return _read_series(path, _choose(path, all_series, series))


def _choose(folder: Path, all_series: list[SeriesInfo], wanted: str | None) -> SeriesInfo:
    if wanted is not None:
        hits = [s for s in all_series if s.uid == wanted] or [s for s in all_series if s.uid.startswith(wanted)]
        if len(hits) == 1:
            return hits[0]
        listing = "; ".join(s.label() for s in all_series)
        how = "matches several" if hits else "is not"
        raise InputError(f"{folder}: series {wanted!r} {how} in this folder; it holds: {listing}")
    if len(all_series) == 1:
        return all_series[0]
    listing = "; ".join(s.label() for s in all_series)
    raise InputError(
        f"{folder}: this folder holds {len(all_series)} DICOM series ({listing}); choose one "
        "(the series UID, or a folder with only that series)"
    )


def _read_file(path: Path) -> Volume:
    head = _header(path)
    if _tag(head, "sop_class") == _SEG_SOP_CLASS or _tag(head, "modality") == "SEG":
        raise InputError(f"{path}: this is a DICOM Segmentation (labels), not an image; open the image it refers to")
    frames = _tag(head, "frames")
    if frames and int(float(frames)) > 1:
        return _read_multiframe(path)
    # One slice: read the series it belongs to, from its folder.
    for info in list_series(path.parent):
        if any(Path(f).resolve() == path.resolve() for f in info.files):
            return _read_series(path.parent, info)
    raise InputError(f"{path}: this DICOM file belongs to no series GDCM can read in its folder")


def _read_multiframe(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read this multi-frame DICOM file ({_first_line(e)})") from None
    return _volume(img, path, {"dicom_file": str(path)})


def _read_series(folder: Path, info: SeriesInfo) -> Volume:
    import SimpleITK as sitk

    files = _sorted_checked(info.files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(
            f"{folder}: cannot read DICOM series {info.uid} ({_first_line(e)}); a slice file may be "
            "truncated or damaged"
        ) from None
    meta = {"dicom_series": info.uid, "series_description": info.description, "files": len(files)}
    return _volume(img, folder, meta)


def _volume(img, source: Path, meta: dict) -> Volume:
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: colour (RGB) DICOM images cannot be segmented")
    if img.GetDimension() != 3 or min(img.GetSize()) < 2:
        raise InputError(f"{source}: this DICOM image is 2D (size {img.GetSize()}); a 3D volume is needed")
    array, affine = from_sitk(img)
    return Volume(array[None], affine, source=str(source), meta=meta)


def _sorted_checked(files: list[str], folder: Path) -> list[str]:
    """Slice files ordered along the slice normal, refused when their spacing is not even.

    GDCM's own sort gives a physically consistent volume too, but its direction depends on
    which series the process sorted before (seen with SimpleITK 2.5): the same folder could open
    with axis 0 reversed. This order is always the same. Files without geometry tags keep GDCM's
    order (nothing to check them by).
    """
    keyed, orientations = [], set()
    for f in files:
        head = _header(f)
        try:
            iop = [float(v) for v in _tag(head, "orientation").split("\\")]
            ipp = [float(v) for v in _tag(head, "position").split("\\")]
        except ValueError:
            return list(files)
        normal = np.cross(iop[:3], iop[3:6])
        orientations.add(tuple(np.round(iop, 4)))
        keyed.append((float(np.dot(normal, ipp)), str(f)))
    if len(orientations) > 1:
        raise InputError(f"{folder}: the slices of this series have {len(orientations)} different orientations; "
                         "it is not one volume (a localiser mixed in?): export the volume's slices alone")
    keyed.sort()
    check_slice_positions([p for p, _ in keyed], folder)
    return [f for _, f in keyed]


def check_slice_positions(positions: list[float], where: str | Path) -> None:
    """Refuse duplicated or unevenly spaced slice positions (mm along the normal, sorted)."""
    if len(positions) < 3:
        return
    pos = np.asarray(positions, dtype=np.float64)
    gaps = np.diff(pos)
    step = float(np.median(gaps))
    if step <= 1e-6 or np.any(gaps <= 1e-3 * max(step, 1e-3)):
        i = int(np.argmin(gaps))
        raise InputError(
            f"{where}: two slices share the position {pos[i]:.2f} mm (a duplicated slice, or two "
            "series in one); remove the duplicate or export the series again"
        )
    off = np.abs(gaps - step) > GAP_TOLERANCE * step
    if np.any(off):
        i = int(np.argmax(np.abs(gaps - step)))
        raise InputError(
            f"{where}: slices are not evenly spaced: a gap of {gaps[i]:.2f} mm between positions "
            f"{pos[i]:.2f} and {pos[i + 1]:.2f} mm, where the others are {step:.2f} mm apart "
            "(a slice is missing?); export the complete series, or resample it to even spacing first"
        )
