"""DICOM Segmentation objects (SEG): labels out to a PACS, and back in on the image's grid.

A SEG is how hospitals store labels: a DICOM object that references the image series it was
drawn on, instance by instance. highdicom builds and parses it (pydicom underneath); what is ours:

* **Which source instance each slice is.** Labels live on :func:`~training.io.volume.read_image`'s
  grid of the series (slices along their normal). Each slice ``d0`` is matched to the source file
  whose Image Position (Patient) is that slice's origin, and the file's orientation, rows and
  columns must be the grid's: the SEG's frames then match the source geometry slice by slice,
  and a SEG read back gives labels that line up voxel by voxel with ``read_image``. Only the
  headers are read (pydicom ``stop_before_pixels``), so compressed series cost nothing here.
* **Segments.** BINARY segmentation, one segment per foreground class, segment number = label
  value, named after the class, with a SNOMED CT anatomic property where one fits
  (:data:`ANATOMY`, looked up by class name, then by the domain's name) and a generic "Tissue"
  otherwise; the class colour as the recommended display colour; the algorithm "napari-u2net",
  its version and the domain. Empty classes are kept as segments without frames (valid DICOM,
  highdicom omits empty frames): a reader sees the domain's full class list and the numbers stay
  the label values. Voxels marked unlabelled (:data:`~training.io.volume.IGNORE_INDEX`) count as
  background: DICOM has no "not looked at". All-background labels still give a valid SEG (highdicom
  then stores every frame, all empty, since a SEG needs frames).
* **Finding the image of a SEG.** The referenced series is looked for in the SEG's folder, its
  sub-folders, its parent and the parent's other sub-folders; a SEG whose series is not there
  (or an image folder given that holds another series) is refused naming both series.

Source series must be single-slice files (CT/MR as scanners and PACS export them) with a Frame of
Reference and pixel spacing; a multi-frame source is refused (write NIfTI for it). A series whose
Study/Series Instance UIDs an anonymiser blanked (the real JPEG 2000 example of ../shared/realdata)
is referenced by UIDs derived from its instances' UIDs, the same each time, so the SEG finds it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import InputError
from training.io.atomic import atomic_output
from training.io.dicom import is_dicom_file, list_series, read_dicom
from training.io.volume import IGNORE_INDEX, Volume

ALGORITHM_NAME = "napari-u2net"
_LPS = np.array([-1.0, -1.0, 1.0])
# A slice's origin may differ from the grid's by the scanner's rounding of positions; slices are a
# whole spacing apart, so a quarter of it tells them apart safely.
_POSITION_TOLERANCE = 0.25
_ORIENTATION_TOLERANCE = 1e-3

# Class (or domain) name words → (segmented property type, category) as concept names of pydicom's
# code dictionary: the type in SNOMED CT (``codes.SCT``), the category in DICOM's CID 7150.
ANATOMY: dict[str, tuple[str, str]] = {  # looked up in this order: "kidney tumour" is a tumour
    "tumour": ("Neoplasm", "MorphologicallyAbnormalStructure"),
    "tumor": ("Neoplasm", "MorphologicallyAbnormalStructure"),
    "lesion": ("Lesion", "MorphologicallyAbnormalStructure"),
    "liver": ("Liver", "AnatomicalStructure"),
    "spleen": ("Spleen", "AnatomicalStructure"),
    "kidney": ("Kidney", "AnatomicalStructure"),
    "pancreas": ("Pancreas", "AnatomicalStructure"),
    "prostate": ("Prostate", "AnatomicalStructure"),
    "heart": ("Heart", "AnatomicalStructure"),
    "leftatrium": ("LeftAtrium", "AnatomicalStructure"),
    "hippocampus": ("Hippocampus", "AnatomicalStructure"),
    "greymatter": ("GrayMatter", "Tissue"),
    "graymatter": ("GrayMatter", "Tissue"),
    "whitematter": ("WhiteMatter", "Tissue"),
    "brain": ("Brain", "AnatomicalStructure"),
    "lung": ("Lung", "AnatomicalStructure"),
    "aorta": ("Aorta", "AnatomicalStructure"),
    "stomach": ("Stomach", "AnatomicalStructure"),
    "gallbladder": ("Gallbladder", "AnatomicalStructure"),
    "colon": ("Colon", "AnatomicalStructure"),
    "esophagus": ("Esophagus", "AnatomicalStructure"),
    "bladder": ("Bladder", "AnatomicalStructure"),
    "urinarybladder": ("Bladder", "AnatomicalStructure"),
    "bone": ("Bone", "Tissue"),
    "muscle": ("Muscle", "Tissue"),
}


@dataclass
class SegLabels:
    """A SEG read back: labels on the referenced series' grid (what ``read_image`` gives for it)."""

    labels: np.ndarray  # (D0, D1, D2), value = segment number, 0 background
    affine: np.ndarray  # the referenced image's affine (RAS mm, as read_image)
    series_uid: str  # the referenced image series
    image: Path  # the folder that holds it
    names: list[str]  # by label value; names[0] == "background"
    colours: list[str | None] = field(default_factory=list)  # "#rrggbb" by label value, None unknown
    domain: str = ""  # the napari-u2net domain that made it, when it says so
    path: Path | None = None  # the SEG file
    seg_series_uid: str = ""
    image_meta: dict = field(default_factory=dict)  # the image Volume's meta (series description…)
    description: str = ""  # the SEG's series description


# -- source series --------------------------------------------------------------------------------
def _read_header(path: str | Path):
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise InputError(f"{path}: not a readable DICOM file ({e})") from None
    meta = getattr(ds, "file_meta", None)
    for own, copy in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not ds.get(own) and meta is not None and meta.get(copy):  # the file meta repeats them
            setattr(ds, own, meta.get(copy))
    return ds


def _complete_uids(datasets: list) -> list:
    """Give a series whose Study/Series Instance UIDs were blanked (some anonymisers do) UIDs
    derived from its instances' UIDs: the same every time, so a SEG and its series still find each
    other (:func:`series_uid_of`)."""
    from pydicom.uid import generate_uid

    instances = sorted(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(not ds.get(key) for ds in datasets):
            derived = generate_uid(entropy_srcs=[key, *instances])
            for ds in datasets:
                if not ds.get(key):
                    setattr(ds, key, derived)
    return datasets


def series_uid_of(files: list[str], gdcm_uid: str) -> str:
    """A series' UID as a SEG references it: its own, or for blanked UIDs the derived one."""
    if gdcm_uid:
        return gdcm_uid
    return str(_complete_uids([_read_header(f) for f in files])[0].SeriesInstanceUID)


def is_seg_file(path: str | Path) -> bool:
    """A DICOM file whose SOP class is Segmentation (reads only the first tags)."""
    import pydicom
    from pydicom.uid import SegmentationStorage

    if not is_dicom_file(path):
        return False
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a SEG
        return False
    return str(ds.get("SOPClassUID", "")) == SegmentationStorage or str(ds.get("Modality", "")) == "SEG"


def _series_files(source: Path, series: str | None) -> list[tuple[str, list[str]]]:
    """(series UID, files) of the candidate image series: the named one, or every series of the
    folder (a slice file: its folder's series that holds it). SEG series are not images."""
    folder = source if source.is_dir() else source.parent
    found = [(s.uid, s.files) for s in list_series(folder)]
    found = [(uid, files) for uid, files in found if not is_seg_file(files[0])]
    if source.is_file():
        found = [(uid, files) for uid, files in found if any(Path(f).resolve() == source.resolve() for f in files)]
    if series is not None:
        hits = [s for s in found if s[0] == series] or [s for s in found if s[0].startswith(series)]
        found = hits if len(hits) == 1 else []
    if not found:
        what = f"series {series}" if series else "an image series"
        raise InputError(f"{source}: holds no DICOM {what}; a DICOM SEG references the DICOM series the labels "
                         "were made on")
    return found


def check_seg_source(source: str | Path, series: str | None = None) -> None:
    """Raise :class:`InputError` now (before any inference) if no DICOM SEG can be written for
    labels of the image ``source``: not DICOM, a multi-frame file, or files without the geometry a
    SEG references. A folder of several series with none chosen is left to the reader's error."""
    source = Path(source)
    if not (source.is_dir() or is_dicom_file(source)):
        raise InputError(
            f"{source}: a DICOM SEG references the DICOM series it segments, and this input is not DICOM; "
            "write NIfTI (-o OUT.nii.gz) or give the DICOM series folder"
        )
    candidates = _series_files(source, series)
    if len(candidates) > 1:
        return  # read_image names the series to choose from
    _check_source_header(_read_header(candidates[0][1][0]), candidates[0][1][0])


def _check_source_header(ds, path) -> None:
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"{path}: a DICOM SEG can be written for series of single-slice files, not for this "
                         "multi-frame file; write NIfTI (.nii.gz) instead")
    missing = [k for k in ("SOPInstanceUID", "FrameOfReferenceUID", "PixelSpacing", "ImageOrientationPatient",
                           "ImagePositionPatient") if not ds.get(k)]
    if missing:
        raise InputError(f"{path}: these DICOM files lack {', '.join(missing)}, which a DICOM SEG must reference "
                         "(a secondary capture?); write NIfTI (.nii.gz) instead")


def slice_instances(affine: np.ndarray, shape, datasets: list) -> list:
    """The source dataset of each slice ``d0`` of the grid (``affine``, ``shape``), matched by
    position; raises :class:`InputError` if the series' files are not exactly that grid."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    cols, rows = (affine[:3, 2] / spacing[2]) * _LPS, (affine[:3, 1] / spacing[1]) * _LPS
    origins = np.array([(affine @ np.array([z, 0.0, 0.0, 1.0]))[:3] * _LPS for z in range(shape[0])])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    chosen = []
    for z, origin in enumerate(origins):
        dist = np.linalg.norm(positions - origin, axis=1)
        best = int(np.argmin(dist))
        if dist[best] > _POSITION_TOLERANCE * spacing[0]:
            raise InputError(f"slice {z} of the labels (at {np.round(origin, 2).tolist()} mm, LPS) has no file "
                             "in the DICOM series; the labels are not on this series' grid")
        ds = datasets[best]
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        if (int(ds.Rows), int(ds.Columns)) != tuple(shape[1:]) or not (
            np.allclose(iop[:3], cols, atol=_ORIENTATION_TOLERANCE) and np.allclose(iop[3:], rows, atol=_ORIENTATION_TOLERANCE)
        ):
            raise InputError(f"{getattr(ds, 'filename', 'a file')}: its orientation or size differs from the labels' "
                             "grid; the labels are not on this series' grid")
        chosen.append(ds)
    if len({ds.SOPInstanceUID for ds in chosen}) != len(chosen):
        raise InputError("two slices of the labels fall on one DICOM file; the labels are not on this series' grid")
    return chosen


def source_instances(source: str | Path, affine: np.ndarray, shape, series: str | None = None) -> list:
    """The headers of the series the grid (``affine``, ``shape``) was read from, one per slice. A
    folder of several series with none named: the one whose files are this grid."""
    source = Path(source)
    errors = []
    for uid, files in _series_files(source, series):
        datasets = _complete_uids([_read_header(f) for f in files])
        _check_source_header(datasets[0], files[0])
        try:
            return slice_instances(affine, shape, datasets)
        except InputError as e:
            errors.append(f"series {uid}: {e}")
    raise InputError(f"{source}: {'; '.join(errors)}")


# -- writing --------------------------------------------------------------------------------------
def _words(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def anatomy_codes(name: str, domain: str = ""):
    """(category, type) codes for a class: by its name, then by the domain's words, else Tissue."""
    from pydicom.sr.codedict import codes

    key = _words(name)
    hit = next((v for k, v in ANATOMY.items() if k in key), None)
    if hit is None:
        domain_words = [_words(w) for w in re.split(r"[-_ ]", domain)]
        hit = next((ANATOMY[w] for w in domain_words if w in ANATOMY), None)
    if hit is None:
        return codes.cid7150.Tissue, codes.SCT.Tissue
    type_name, category_name = hit
    return getattr(codes.cid7150, category_name), getattr(codes.SCT, type_name)


def _lab_colour(colour: str | None):
    import highdicom as hd

    if not colour or not re.fullmatch(r"#[0-9a-fA-F]{6}", str(colour)):
        return None
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return hd.color.CIELabColor.from_rgb(r, g, b)


def build_seg(
    labels: np.ndarray,
    datasets: list,
    classes: list[str],
    colours: list[str | None] | None = None,
    domain: str = "",
    algorithm_type: str = "AUTOMATIC",
    version: str = "",
):
    """A highdicom Segmentation of ``labels`` (D0, D1, D2) whose slice ``z`` is ``datasets[z]``.

    ``classes`` names label values (``classes[0]`` is the background); values without a name get
    "label N". ``algorithm_type``: AUTOMATIC (a model's output), SEMIAUTOMATIC (corrected by
    hand), MANUAL (drawn; no algorithm recorded).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != len(datasets):
        raise InputError(f"labels of shape {labels.shape} do not fit a series of {len(datasets)} slices")
    if labels.size and labels.min() < 0:
        raise InputError("labels must be ≥ 0")
    values = [int(v) for v in np.unique(labels) if 0 < v != IGNORE_INDEX]
    count = max([len(classes) - 1, *values, 0])
    if count == 0:
        count = 1  # a SEG needs one segment: the first class, empty
    algorithm = None
    algorithm_type = algorithm_type.upper()
    if algorithm_type != "MANUAL":
        algorithm = hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=version or "unknown",
            parameters={"domain": domain} if domain else None,
        )
    descriptions = []
    for number in range(1, count + 1):
        name = classes[number] if number < len(classes) and classes[number] else f"label {number}"
        category, kind = anatomy_codes(name, domain)
        colour = colours[number] if colours and number < len(colours) else None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name)[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=algorithm_type,
            algorithm_identification=algorithm, display_color=_lab_colour(colour),
        ))
    source = labels if labels.dtype == np.uint8 or labels.dtype == np.uint16 else labels.astype(np.uint16)
    if IGNORE_INDEX <= count:  # 255 is a class here, not "unlabelled"
        pixels = source
    else:
        pixels = np.where(source == IGNORE_INDEX, 0, source).astype(source.dtype, copy=False)
    first = datasets[0]
    what = f"U2Net {domain}" if domain else "U2Net labels"
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=ALGORITHM_NAME,
        manufacturer_model_name=(f"{ALGORITHM_NAME} {domain}" if domain else ALGORITHM_NAME)[:64],
        software_versions=version or "unknown",
        device_serial_number="0",
        series_description=what[:64],
        content_label="U2NET",
        content_description=f"{what} ({algorithm_type.lower()})"[:64],
    )


def write_seg(
    path: str | Path,
    labels: np.ndarray,
    affine: np.ndarray,
    source: str | Path,
    classes: list[str],
    colours: list[str | None] | None = None,
    domain: str = "",
    series: str | None = None,
    algorithm_type: str = "AUTOMATIC",
    version: str = "",
    overwrite: bool = True,
) -> Path:
    """Write ``labels`` (on the grid ``affine`` of the DICOM series ``source``, as ``read_image``
    gives it) as a DICOM SEG referencing that series, atomically (``overwrite=False`` never replaces
    a file that appeared meanwhile). ``version``: the algorithm's version (e.g. ``training.__version__``)."""
    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"labels must be 3D, got shape {labels.shape}")
    datasets = source_instances(source, affine, labels.shape, series)
    seg = build_seg(labels, datasets, classes, colours, domain, algorithm_type, version)
    with atomic_output(path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    return path


# -- reading --------------------------------------------------------------------------------------
def _search_folders(seg_path: Path) -> list[Path]:
    """Where the image of a SEG may be: its folder, its sub-folders, its parent, the parent's other sub-folders."""
    here = seg_path.parent
    out = [here, *_subfolders(here)]
    if here.parent != here:
        out += [here.parent, *(d for d in _subfolders(here.parent) if d != here)]
    return out


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return []


def _has_dicom(folder: Path) -> bool:
    try:
        return any(is_dicom_file(p) for i, p in zip(range(200), folder.iterdir()))
    except OSError:
        return False


def find_series(seg_path: Path, series_uid: str, image: str | Path | None = None) -> tuple[Path, str, list[str]]:
    """(folder, GDCM's series id, files) of the image series ``series_uid`` of a SEG, looked for
    beside it (:func:`_search_folders`) or in ``image``; the error names the referenced series and
    those found."""
    folders = [Path(image)] if image is not None else [f for f in _search_folders(seg_path) if _has_dicom(f)]
    others = []
    for folder in folders:
        folder = folder if folder.is_dir() else folder.parent
        for info in list_series(folder):
            if is_seg_file(info.files[0]):
                continue
            uid = series_uid_of(info.files, info.uid)
            if uid == series_uid:
                return folder, info.uid, info.files
            others.append(f"{uid} in {folder}")
    where = str(image) if image is not None else f"{seg_path.parent}, its sub-folders, parent or sibling folders"
    found = f"; found only series {', '.join(others)}" if others else "; no image series found there"
    raise InputError(
        f"{seg_path}: this DICOM SEG refers to image series {series_uid}, which is not in {where}{found}. "
        "Put the referenced series' folder beside the SEG file (or open the SEG from that folder)"
    )


def read_seg(path: str | Path, image: str | Path | None = None) -> SegLabels:
    """Read a DICOM SEG file as labels on its referenced series' grid (see :class:`SegLabels`).

    ``image``: the folder of the referenced series; found beside the SEG when omitted. Segments
    that overlap: the higher segment number wins. A FRACTIONAL SEG is thresholded at one half.
    """
    import highdicom as hd

    path = Path(path)
    if not is_seg_file(path):
        raise InputError(f"{path}: not a DICOM Segmentation (SEG) file")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as e:  # noqa: BLE001 - highdicom/pydicom raise many types for malformed objects
        raise InputError(f"{path}: cannot read this DICOM SEG ({e})") from None
    refs = {s for _, s, _ in seg.get_source_image_uids()} or {
        str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])
    }
    if len(refs) != 1:
        raise InputError(f"{path}: this DICOM SEG references {len(refs)} image series "
                         f"({', '.join(sorted(refs)) or 'none'}); one is needed to place its labels")
    (series_uid,) = refs
    folder, gdcm_uid, files = find_series(path, series_uid, image)
    volume: Volume = read_dicom(folder, gdcm_uid)
    datasets = slice_instances(volume.affine, volume.shape, _complete_uids([_read_header(f) for f in files]))
    _check_frame_geometry(seg, datasets, path)
    labels = _seg_pixels(seg, [str(ds.SOPInstanceUID) for ds in datasets], path)
    if labels.shape != volume.shape:
        raise InputError(f"{path}: its frames are {labels.shape[1:]} pixels, the image {volume.shape[1:]}")
    numbers = [int(n) for n in seg.get_segment_numbers()]
    top = max(numbers, default=0)
    names, colours = ["background"] + [f"label {n}" for n in range(1, top + 1)], [None] * (top + 1)
    domain = ""
    for n in numbers:
        desc = seg.get_segment_description(n)
        names[n] = str(desc.segment_label)
        lab = desc.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            r, g, b = hd.color.CIELabColor.from_dicom_value(lab).to_rgb(clip=True)
            colours[n] = f"#{r:02x}{g:02x}{b:02x}"
        for alg in desc.get("SegmentationAlgorithmIdentificationSequence", []) or []:
            for p in str(alg.get("AlgorithmParameters", "")).split(","):
                key, _, value = p.partition("=")
                if key.strip() == "domain" and str(alg.get("AlgorithmName")) == ALGORITHM_NAME:
                    domain = value.strip()
    return SegLabels(labels, volume.affine, series_uid, folder, names, colours, domain, path,
                     str(seg.SeriesInstanceUID), dict(volume.meta), str(seg.get("SeriesDescription", "")))


def _check_frame_geometry(seg, datasets: list, path: Path) -> None:
    """Each frame's plane position, orientation and pixel spacing (when the SEG states them) are
    those of the source slice it references: highdicom is asked to place frames by their
    references alone (writers such as dcmqi do not state that spatial locations are preserved)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    shared = (seg.get("SharedFunctionalGroupsSequence") or [None])[0]

    def item(group, name, keyword):
        for g in (group, shared):
            seq = g.get(name) if g is not None else None
            if seq and keyword in seq[0]:
                return [float(v) for v in seq[0].get(keyword)]
        return None

    for i, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence") or []):
        try:
            ref = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        except (AttributeError, IndexError):
            continue
        ds = by_uid.get(ref)
        if ds is None:
            continue
        checks = [
            ("position", item(frame, "PlanePositionSequence", "ImagePositionPatient"), ds.ImagePositionPatient, 0.05),
            ("orientation", item(frame, "PlaneOrientationSequence", "ImageOrientationPatient"),
             ds.ImageOrientationPatient, _ORIENTATION_TOLERANCE),
            ("pixel spacing", item(frame, "PixelMeasuresSequence", "PixelSpacing"), ds.PixelSpacing, 1e-3 * float(ds.PixelSpacing[0])),
        ]
        for what, got, want, tol in checks:
            want = np.array([float(v) for v in want])
            if got is not None and not np.allclose(got, want, atol=tol):
                raise InputError(f"{path}: frame {i + 1}'s {what} {np.round(got, 3).tolist()} is not that of the image "
                                 f"slice it references ({np.round(want, 3).tolist()}); the SEG does not fit this series")


def _seg_pixels(seg, instance_uids: list[str], path: Path) -> np.ndarray:
    """(D0, D1, D2) segment numbers, slice ``z`` the frames that reference ``instance_uids[z]``."""
    kwargs = {"assert_missing_frames_are_empty": True, "ignore_spatial_locations": True}
    try:
        if str(seg.SegmentationType) == "FRACTIONAL":
            out = None
            for n in seg.get_segment_numbers():
                p = seg.get_pixels_by_source_instance(instance_uids, segment_numbers=[n], dtype=np.float32,
                                                      **kwargs)[..., 0]
                out = np.zeros(p.shape, np.uint16) if out is None else out
                out[p >= 0.5] = n
            return out
        pixels = seg.get_pixels_by_source_instance(instance_uids, combine_segments=True, skip_overlap_checks=True,
                                                   **kwargs)
    except (ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise InputError(f"{path}: its frames cannot be matched to the referenced image's slices ({e})") from None
    top = int(pixels.max()) if pixels.size else 0
    return pixels.astype(np.uint8 if top < 256 else np.uint16, copy=False)


__all__ = [
    "ANATOMY", "SegLabels", "anatomy_codes", "build_seg", "check_seg_source", "find_series",
    "is_seg_file", "read_seg", "slice_instances", "source_instances", "write_seg",
]
