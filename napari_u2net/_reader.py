"""npe2 reader: NIfTI files, DICOM files and DICOM folders → Image layers in RAS millimetres.

The layer's ``affine`` is the volume's index → RAS mm matrix, so napari places the data exactly
where the scanner put it (oblique volumes included). Sagittal and coronal scans show with their
array axes permuted to napari's world order (S, A, R), an exact transpose (see
:mod:`._geometry`: napari cannot draw a permuted affine). A 4D (multi-modal) file opens as ONE
layer, modality first, which is what multi-modal domains take. The full geometry (displayed and
file grids, the permutation, NIfTI header, source path) is kept in ``layer.metadata["u2net"]`` for
the writer and the domain selector.
A DICOM folder holding several series opens as one layer per series, named by its description.

A DICOM Segmentation (SEG) file, or a folder holding SEG files, opens as Labels layers on the grid
of the image series each references (:func:`training.io.dicom_seg.read_seg`: found in the same,
a sub-, the parent or a sibling folder), with its segment names and colours; a folder holding
both the series and a SEG opens as both. The labels' metadata names the image folder and series,
so the layer saves back as a DICOM SEG (:mod:`._writer`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.io.dicom import is_dicom_file, list_series, read_dicom
from training.io.dicom_seg import is_seg_file, read_seg
from training.io.resample import reorient_array
from training.io.volume import Volume, case_name, is_itk_image, is_nifti, read_image

from ._geometry import META_KEY, display_grid, volume_layer_affine

# CT window presets, (width, level) in HU, as radiologists read CT; shown as contrast limits
# (level − width/2, level + width/2). A CT opens with the soft-tissue window.
CT_WINDOWS = {
    "soft tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (2000.0, 300.0),
    "brain": (80.0, 40.0),
}
DEFAULT_CT_WINDOW = "soft tissue"
WORLD_AXES = ("S", "A", "R")  # napari's world axes for our layers: superior, anterior, right (mm)


def window_limits(name: str) -> tuple[float, float]:
    """The contrast limits of a CT window preset: (level − width/2, level + width/2)."""
    width, level = CT_WINDOWS[name]
    return (level - width / 2, level + width / 2)


def volume_modality(volume: Volume) -> str | None:
    """"CT" or "MR" from the volume's DICOM Modality when it has one, else from its values
    (air in HU: CT); None when neither tells."""
    from training.model.domain_match import guess_modality

    for key in ("modality", "Modality"):
        value = str(volume.meta.get(key) or "").upper()
        if value in ("CT", "MR"):
            return value
    return guess_modality(volume.data) if volume.channels == 1 else None


def _looks_like_dicom_folder(path: Path) -> bool:
    """A folder with a DICOM file among its first files (by suffix or the ``DICM`` marker)."""
    for i, f in enumerate(path.iterdir()):
        if i > 200:
            break
        if is_dicom_file(f):
            return True
    return False


def napari_get_reader(path):
    """Return :func:`read_volume` for a .nii/.nii.gz, .nrrd or .mha/.mhd file, a DICOM file or a DICOM folder; for
    any other folder napari's own reader; else ``None``.

    Why other folders go to napari's reader: napari asks "which reader?" for every folder both
    readers accept, so the plugin is napari's preferred reader for folders
    (:data:`napari_u2net.__main__.FOLDER_PATTERN`), and a folder of images or a zarr store must
    still open as napari would open it.
    """
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        return read_volume if _looks_like_dicom_folder(p) else _napari_folder_reader(str(p))
    return read_volume if is_nifti(p) or is_itk_image(p) or is_dicom_file(p) else None


def _napari_folder_reader(path: str):
    """napari's built-in reader for a folder (None when it is not installed or declines)."""
    try:
        from napari_builtins.io import napari_get_reader as builtin_reader
    except ImportError:
        return None
    return builtin_reader(path)


def volume_layer_data(volume: Volume, name: str, **kwargs) -> tuple:
    """A napari LayerData tuple for a volume: 3D layer, or 4D modality-first layer, its spatial
    axes in napari's world order (S, A, R) (a transpose for sagittal/coronal scans)."""
    orientation, affine, shape = display_grid(volume.affine, volume.shape)
    data = volume.data
    if not orientation.is_identity:  # one contiguous copy: napari slices and uploads it fast
        data = np.ascontiguousarray(reorient_array(data, orientation))
    data = data[0] if volume.channels == 1 else data
    meta = {
        "affine": affine,  # the displayed grid (the layer's data)
        "header": volume.header,
        "source": volume.source,
        "shape": shape,
        "source_affine": volume.affine.copy(),  # the file's grid, for the writer
        "source_shape": tuple(int(s) for s in volume.shape),
        "orientation": tuple(orientation.perm),  # displayed axis i = file axis orientation[i]
        "channels": int(volume.channels),
        "spacing": [float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "info": dict(volume.meta),
    }
    modality = volume_modality(volume)
    if modality is not None:
        meta["modality"] = modality
    if modality == "CT" and volume.channels == 1 and "contrast_limits" not in kwargs:
        kwargs["contrast_limits"] = window_limits(DEFAULT_CT_WINDOW)  # not the full −1024…3000 range
        meta["window"] = DEFAULT_CT_WINDOW
    attrs = {
        "name": name,
        "affine": volume_layer_affine(affine, volume.channels),
        "metadata": {META_KEY: meta},
        "units": "mm",
        **kwargs,
    }
    # the world axes are anatomical (napari has no orientation markers: the axis names, shown on
    # the slider and by the axes overlay, are the cheap, always-right hint)
    attrs["axis_labels"] = WORLD_AXES if volume.channels == 1 else ("modality", *WORLD_AXES)
    return (data, attrs, "image")


def seg_layer_data(path) -> tuple:
    """A napari LayerData tuple for a DICOM SEG file: a Labels layer on the referenced image's
    displayed grid (the one :func:`volume_layer_data` gives that image), one value per segment."""
    import pandas as pd

    seg = read_seg(path)
    orientation, affine, shape = display_grid(seg.affine, seg.labels.shape)
    data = seg.labels
    if not orientation.is_identity:
        data = np.ascontiguousarray(reorient_array(data[None], orientation)[0])
    meta = {
        "affine": affine,
        "shape": shape,
        "source": str(seg.image),  # the image series' folder: the writer saves a SEG referencing it
        "source_affine": np.asarray(seg.affine).copy(),
        "source_shape": tuple(int(s) for s in seg.labels.shape),
        "orientation": tuple(orientation.perm),
        "info": dict(seg.image_meta),  # dicom_series, as the image layer's
        "classes": list(seg.names),
        "domain": seg.domain,
        "dicom_seg": str(path),
    }
    attrs = {
        "name": f"{seg.image.name} {seg.description or Path(path).stem}",
        "affine": volume_layer_affine(affine, 1),
        "metadata": {META_KEY: meta},
        "units": "mm",
        "axis_labels": WORLD_AXES,
        "opacity": 0.5,
        "features": pd.DataFrame({"index": np.arange(len(seg.names)), "class": seg.names}),
    }
    if seg.colours[1:] and all(seg.colours[1:]):  # else napari's own label colours
        attrs["colormap"] = {None: "transparent", 0: "transparent",
                             **{v: c for v, c in enumerate(seg.colours) if v}}
    return (data, attrs, "labels")


def read_volume(path) -> list[tuple]:
    """Read one NIfTI file, DICOM file or DICOM folder (errors are U2NetError with a reason); DICOM
    SEG files (alone or in the folder) become Labels layers."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    if path.is_file() and is_seg_file(path):
        return [seg_layer_data(path)]
    if path.is_dir():
        series = list_series(path)
        segs = [s for s in series if is_seg_file(s.files[0])]
        images = [s for s in series if s not in segs]
        if len(images) > 1 or segs:
            layers = [
                volume_layer_data(read_dicom(path, s.uid), f"{path.name} {s.description or s.uid}"
                                  if len(images) > 1 else case_name(path))
                for s in images
            ]
            return layers + [seg_layer_data(f) for s in segs for f in sorted(s.files)]
    return [volume_layer_data(read_image(path), case_name(path))]
