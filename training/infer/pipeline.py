"""Segmenting an image with a model: the whole pipeline, from any image to labels on its grid.

image (any orientation and spacing) → exact reorientation to canonical axes → resampling to the
domain's spacing (SimpleITK, linear) → normalisation from the adapter's metadata → Gaussian
sliding window (:mod:`training.infer.sliding_window`) → probabilities resampled back onto the
original grid (linear) → argmax → optional largest component per class → labels with exactly
the input's shape, on the input's grid (same affine).

Several domains share the reorientation and, when their spacings agree, the resampling.
Everything a user can get wrong is checked before any computation starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from training.data.normalization import normalize
from training.errors import CancelFlag, InputError, check_cancel
from training.infer.backends import make_runner
from training.infer.config import InferenceConfig, validate_config
from training.infer.postprocess import keep_largest_components
from training.infer.result import DomainResult, Prediction
from training.infer.sliding_window import (
    InferenceProgress,
    LabelSink,
    ProbabilitySink,
    ProgressFn,
    SlabSink,
    UncertaintySink,
    count_tiles,
    sliding_window,
    sweep_slabs,
)
from training.io.devices import default_batch_size, resolve_device
from training.io.resample import (
    Orientation,
    canonical_orientation,
    needs_resampling,
    reorient_affine,
    reorient_array,
    resample,
    resampled_grid,
    undo_reorient_array,
)
from training.io.volume import Volume, case_name, is_nifti, label_dtype, read_image, write_labels

__all__ = [
    "InferenceConfig",
    "InferenceProgress",
    "Prediction",
    "predict",
    "predict_files",
    "sliding_window",
    "validate_input",
]


FLOAT32_MAX = float(np.finfo(np.float32).max)


# -- validation ---------------------------------------------------------------------------------
def validate_input(model, volume: Volume, domains: list[str]) -> None:
    """Raise :class:`InputError` for anything that would make the result meaningless."""
    if not domains:
        raise InputError("no domain given; pick one of: " + ", ".join(model.domains))
    for d in domains:
        if d not in model.adapters:
            raise InputError(f"unknown domain {d!r}; this model has: {', '.join(model.domains) or 'none'}")
    where = f"{volume.source}: " if volume.source else ""
    if any(s < 2 for s in volume.shape):
        raise InputError(f"{where}this is a 2D image (shape {volume.shape}); the model segments 3D volumes")
    for d in domains:
        meta = model.meta(d)
        want, got = meta.in_channels, volume.channels
        if got == want:
            continue
        if want == 1:
            raise InputError(
                f"{where}the image has {got} volumes along its 4th axis (a time series or several "
                f"channels) but domain {d!r} expects one 3D volume; extract the volume to segment"
            )
        raise InputError(
            f"{where}domain {d!r} expects {want} modalities ({', '.join(meta.modalities)}) but "
            f"got {got}; give one file per modality in that order, or one 4D file"
        )
    if not np.issubdtype(volume.data.dtype, np.number) or np.issubdtype(volume.data.dtype, np.complexfloating):
        raise InputError(f"{where}unsupported voxel type {volume.data.dtype}; a real-valued image is needed")
    for c in range(volume.channels):
        which = f"volume {c + 1} of the image" if volume.channels > 1 else "the image"
        channel = volume.data[c]
        if np.issubdtype(channel.dtype, np.floating) and not np.isfinite(channel).all():
            raise InputError(f"{where}{which} has voxels that are not numbers (NaN or infinite); fix or mask them first")
        low, high = channel.min(), channel.max()
        if low == high:
            raise InputError(f"{where}{which} is blank (every voxel is {low}); there is nothing to segment")
        if max(abs(float(low)), abs(float(high))) > FLOAT32_MAX:
            raise InputError(
                f"{where}{which} has values up to {max(abs(float(low)), abs(float(high))):.3g}, beyond the 32-bit "
                "floats the network computes in (a NIfTI scl_slope like 1e38?); fix the file's scaling first"
            )
    try:
        canonical_orientation(volume.affine)
    except ValueError as e:
        raise InputError(f"{where}{e}") from None


# -- the pipeline -------------------------------------------------------------------------------
def predict(
    model,
    volume: Volume,
    domains: list[str],
    config: InferenceConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
) -> Prediction:
    """Segment ``volume`` with each domain of ``model``; a :class:`Prediction` with one
    :class:`DomainResult` per domain, in the order asked.

    Labels (and any map) have exactly ``volume.shape`` and lie on the volume's grid (write them
    with ``volume.affine``). Raises :class:`InputError` on unusable input before any work and
    :class:`~training.errors.Cancelled` (returning nothing) when ``cancel`` is set.
    """
    config = config or InferenceConfig()
    if isinstance(domains, str):
        domains = [domains]
    validate_config(config)
    validate_input(model, volume, domains)
    device = resolve_device(config.device)
    batch = config.batch_size or default_batch_size(device)

    orient = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, orient)
    data_c = reorient_array(volume.data, orient)  # a view
    shape_c = tuple(data_c.shape[1:])
    grids = _grids(model, domains, affine_c, shape_c)
    if any(spacing is not None for spacing in grids):
        _check_resamplable(volume)
    totals = {
        d: count_tiles(grid_shape, model.meta(d).patch_size, config.overlap)
        for _, grid_shape, group in grids.values()
        for d in group
    }

    def report(domain, stage, done=None):
        if progress is not None:
            total = totals[domain]
            progress(InferenceProgress(domain, total if done is None else done, total, stage))

    results: dict[str, DomainResult] = {}
    for spacing, (grid_affine, grid_shape, group) in grids.items():
        for d in group:
            report(d, "preprocess", done=0)
        check_cancel(cancel)
        if spacing is None:
            image = np.ascontiguousarray(data_c, dtype=np.float32)
        else:
            image = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
        back = _WayBack(orient, affine_c, shape_c, None if spacing is None else grid_affine)
        for d in group:
            meta = model.meta(d)
            check_cancel(cancel)
            x = torch.from_numpy(normalize(image, meta.normalization))
            runner = make_runner(
                model.net, d, config.backend, device, amp=config.amp,
                patch_size=meta.patch_size, batch_size=batch, precision=config.precision,
            )
            classes = back.label_sink(grid_shape, meta.num_classes)
            map_sinks = _map_sinks(config, meta, grid_shape)
            if "probabilities" in map_sinks and _reusable(classes):  # the labels' own float16 sink
                map_sinks["probabilities"] = classes
            sweep_slabs(
                runner, d, x, meta.patch_size, [classes, *(s for s in map_sinks.values() if s is not classes)],
                overlap=config.overlap, batch_size=batch, progress=progress, cancel=cancel,
            )
            del x
            if back.resamples:
                report(d, "resample")
            labels = back.labels(classes, cancel)
            if map_sinks.get("probabilities") is classes:  # the labels' own sink, at temperature 1
                _calibrate_in_place(classes.result(), meta.temperature)
            maps = {name: back.values(sink.result(), cancel, np.float16) for name, sink in map_sinks.items()}
            del classes, map_sinks
            if config.postprocess:
                check_cancel(cancel)
                report(d, "postprocess")
                keep_largest_components(labels, meta.kept_components)
            notes = uncertainty_notes(meta, maps, labels)
            results[d] = DomainResult(d, labels, maps, notes=notes, calibration=meta.calibration if maps else None)
            report(d, "done")
        del image
    return Prediction({d: results[d] for d in domains})


def _map_sinks(config: InferenceConfig, meta, grid_shape) -> dict[str, SlabSink]:
    """The per-voxel outputs besides the labels, by name (:attr:`DomainResult.maps`): one sink
    each on the network's grid, returning a float array (…, Z, Y, X) that goes back to the input's
    grid as the labels do (float16), at the domain's temperature. ``predict`` swaps the
    probabilities' sink for the labels' own when they keep probabilities too (:func:`_reusable`)."""
    sinks: dict[str, SlabSink] = {}
    t = meta.temperature
    if config.uncertainty:
        sinks["uncertainty"] = UncertaintySink(grid_shape, meta.num_classes, t)
    if config.probabilities:
        sinks["probabilities"] = ProbabilitySink(grid_shape, meta.num_classes, torch.float16, t)
    return sinks


def _reusable(classes: SlabSink) -> bool:
    """The labels' sink keeps float16 probabilities (a resampled domain) at temperature 1: the
    probability map uses them, calibrated in place once the labels are made, instead of a copy."""
    return (isinstance(classes, ProbabilitySink) and classes.probabilities.dtype == torch.float16
            and classes.temperature == 1.0)


def _calibrate_in_place(probabilities: torch.Tensor, temperature: float) -> None:
    """Probabilities at temperature 1 (K, Z, Y, X) → at ``temperature``, class by class:
    softmax(l / T) = p^(1/T) / Σ p^(1/T), so the logits are not needed again."""
    if temperature == 1.0:
        return
    total = torch.zeros(probabilities.shape[1:], dtype=torch.float32)
    for p in probabilities:
        total += p.float().pow_(1.0 / temperature)
    for p in probabilities:
        p.copy_(p.float().pow_(1.0 / temperature).div_(total))


# the mean uncertainty inside the predicted foreground, as a multiple of the domain's validation
# figure, above which a result is flagged (bench/bench_calibration.py measured held-out and
# wrong-domain images; docs/uncertainty.md)
UNLIKE_TRAINING_RATIO = 2.0


def uncertainty_notes(meta, maps: dict, labels: np.ndarray) -> list[str]:
    """What a user should know about the probabilities or uncertainty asked for (nothing when
    none were): the domain has no calibration, or the mean uncertainty inside the result is far
    above the domain's validation cases' (``calibration["mean_uncertainty_fg"]``)."""
    if not maps:
        return []
    cal, uncertainty = meta.calibration, maps.get("uncertainty")
    if not cal:
        note = (f"{meta.domain} has no calibration (an older model file): its probabilities and "
                "uncertainty are the network's own (temperature 1), which tend to be overconfident")
        return [note]
    reference, fg = cal.get("mean_uncertainty_fg"), labels > 0
    if uncertainty is None or not reference or not fg.any():
        return []
    mean = float(uncertainty[fg].mean(dtype=np.float64))
    if mean >= UNLIKE_TRAINING_RATIO * reference:
        note = (f"this scan looks unlike what {meta.domain} was trained on: check the result (mean "
                f"uncertainty inside it {mean:.2f}, {mean / reference:.1f}× that of its validation cases)")
        return [note]
    return []


def _grids(model, domains: list[str], affine_c, shape_c) -> dict:
    """Domains grouped by the grid the network sees, so that each distinct spacing is resampled
    once: ``{spacing or None: (affine, shape, domains)}``, None for the image's own grid (the
    domain's spacing matches the image's)."""
    grids: dict = {}
    for d in domains:
        spacing = tuple(float(s) for s in model.meta(d).spacing)
        key = spacing if needs_resampling(affine_c, spacing) else None
        if key not in grids:
            grid = (affine_c, shape_c) if key is None else resampled_grid(affine_c, shape_c, key)
            grids[key] = (*grid, [])
        grids[key][2].append(d)
    return grids


def _check_resamplable(volume: Volume) -> None:
    """Resampling needs voxel axes that are perpendicular (no shear); say so before any work."""
    m = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    if not np.allclose(m.T @ m, np.eye(3), atol=1e-4):
        where = f"{volume.source}: " if volume.source else ""
        raise InputError(
            f"{where}the image affine is sheared (its voxel axes are not perpendicular), so it "
            "cannot be resampled to the model's spacing; reslice it to a regular grid first"
        )


class _WayBack:
    """From the grid the network saw to the input's: linear resampling onto the canonical input
    grid (only when the domain's spacing differs from the image's), then the inverse
    reorientation. Labels and every map take this one road, so they lie on the input's grid alike.
    """

    def __init__(self, orient: Orientation, affine_c, shape_c, grid_affine=None):
        self.orient = orient
        self.affine_c, self.shape_c = affine_c, tuple(shape_c)
        self.grid_affine = grid_affine  # None: the network saw the canonical input grid itself

    @property
    def resamples(self) -> bool:
        return self.grid_affine is not None

    def channels(self, array: np.ndarray, cancel: CancelFlag) -> Iterator[np.ndarray]:
        """Each (Z, Y, X) channel of ``array`` (…, Z, Y, X) on the network's grid, resampled
        (float32) onto the canonical input grid, one at a time so that only one is held."""
        for channel in array.reshape(-1, *array.shape[-3:]):
            check_cancel(cancel)
            if self.resamples:
                channel = resample(channel.astype(np.float32), self.grid_affine, self.affine_c, self.shape_c)
            yield channel

    def to_input(self, array_c: np.ndarray) -> np.ndarray:
        """An array (…, Z, Y, X) on the canonical input grid → the input's own axes (contiguous)."""
        return np.ascontiguousarray(undo_reorient_array(array_c, self.orient))

    def label_sink(self, grid_shape, num_classes: int) -> SlabSink:
        """What the labels need from the sweep: on the input's grid only the argmax; through a
        resampling the probabilities (float16: half the memory, ample for an argmax)."""
        if self.resamples:
            return ProbabilitySink(grid_shape, num_classes, torch.float16)
        return LabelSink(grid_shape, num_classes)

    def labels(self, sink: SlabSink, cancel: CancelFlag) -> np.ndarray:
        """The labels on the input's grid from what :meth:`label_sink` kept: the argmax of the
        probabilities resampled class by class (one class held at a time)."""
        if not self.resamples:
            return self.to_input(sink.result())
        probs = sink.result().numpy()
        dtype = label_dtype(probs.shape[0] - 1)
        axes = _axis_map(self.grid_affine, self.affine_c)
        if axes is not None:  # the usual case: separable, a slab of the input's rows at a time
            return self.to_input(_labels_separable(probs, *axes, self.shape_c, dtype, cancel))
        return self.to_input(_argmax(self.channels(probs, cancel), self.shape_c, dtype))

    def values(self, array, cancel: CancelFlag, dtype=None) -> np.ndarray:
        """A per-voxel map (…, Z, Y, X) on the network's grid (numpy or a CPU tensor) → the
        input's grid (linear, one channel at a time); ``dtype`` of the result (None: float32 when
        resampled, else the map's own)."""
        array = np.asarray(array)
        if not self.resamples:
            return self.to_input(array if dtype is None else array.astype(dtype, copy=False))
        lead = array.shape[:-3]
        out = np.empty((int(np.prod(lead, dtype=int)), *self.shape_c), dtype=dtype or np.float32)
        axes = _axis_map(self.grid_affine, self.affine_c)
        if axes is not None:  # the usual case: the same linear interpolation, separable, in slabs
            for i, channel in enumerate(array.reshape(-1, *array.shape[-3:])):
                check_cancel(cancel)
                _resample_separable(channel, *axes, out[i])
            return self.to_input(out.reshape(*lead, *self.shape_c))
        for i, channel in enumerate(self.channels(array, cancel)):
            out[i] = channel
        return self.to_input(out.reshape(*lead, *self.shape_c))


def _axis_map(grid_affine, affine_c):
    """(scale, offset) with grid index = scale × input index + offset per axis, when the network's
    grid is an axis-aligned rescaling of the canonical input grid (what :func:`resampled_grid`
    makes); None otherwise."""
    m = np.linalg.inv(grid_affine) @ affine_c
    lin = m[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9 * np.abs(lin).max()):
        return None
    return np.diag(lin).copy(), m[:3, 3].copy()


def _lerp_weights(scale: float, offset: float, n_in: int, n_out: int, start: int = 0):
    """For output voxels ``start … start + n_out - 1`` along one axis: the two input voxels each
    lies between and the weight of the second (positions clamped to the input: nearest-voxel
    extrapolation, as :func:`training.io.resample.resample`)."""
    pos = np.clip((np.arange(start, start + n_out) * scale + offset), 0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy((pos - i0).astype(np.float32))


def _lerp_along(t: torch.Tensor, axis: int, n_out: int, scale, offset, start: int = 0) -> torch.Tensor:
    i0, i1, w = _lerp_weights(scale[axis], offset[axis], t.shape[axis], n_out, start)
    shape = [1, 1, 1]
    shape[axis] = -1
    return torch.lerp(t.index_select(axis, i0), t.index_select(axis, i1), w.reshape(shape))


def _resample_separable(channel, scale, offset, out: np.ndarray, rows: int = 16) -> None:
    """Trilinear interpolation of ``channel`` (the network's grid) at the input grid's voxels into
    ``out`` (any float dtype), axis by axis, positions clamped to the grid (nearest-voxel
    extrapolation): the values :func:`training.io.resample.resample` gives, at a fraction of its
    time and memory (the last axis goes out ``rows`` slices at a time)."""
    t = torch.as_tensor(np.asarray(channel)).float()
    t = _lerp_along(_lerp_along(t, 2, out.shape[2], scale, offset), 1, out.shape[1], scale, offset)
    target = torch.from_numpy(out)
    for z0 in range(0, out.shape[0], rows):
        n = min(rows, out.shape[0] - z0)
        target[z0 : z0 + n] = _lerp_along(t, 0, n, scale, offset, z0)


def _labels_separable(probs: np.ndarray, scale, offset, shape, dtype, cancel: CancelFlag,
                      rows: int = 8) -> np.ndarray:
    """The argmax of the class probabilities (K, Z, Y, X) on the network's grid, each resampled
    as :func:`_resample_separable` does, on the input grid ``shape``: ``rows`` of its slices at a
    time, so that only the few network slices they lie between are interpolated in-plane and no
    full-size probability map is ever held (the per-class SimpleITK resampling it replaces took
    3.3 of a 6.8 s CT-sized run). Ties go to the lower class, as :func:`numpy.argmax`."""
    labels = np.empty(shape, dtype=dtype)
    i0, i1, w = _lerp_weights(scale[0], offset[0], probs.shape[1], shape[0])
    for z0 in range(0, shape[0], rows):
        check_cancel(cancel)
        n = min(rows, shape[0] - z0)
        a, b, wz = i0[z0 : z0 + n], i1[z0 : z0 + n], w[z0 : z0 + n].reshape(-1, 1, 1)
        g0, g1 = int(a.min()), int(b.max())

        def class_slab(k: int, a=a, b=b, wz=wz, g0=g0, g1=g1) -> np.ndarray:
            plane = torch.from_numpy(probs[k, g0 : g1 + 1]).float()
            plane = _lerp_along(_lerp_along(plane, 2, shape[2], scale, offset), 1, shape[1], scale, offset)
            return torch.lerp(plane[a - g0], plane[b - g0], wz).numpy()

        labels[z0 : z0 + n] = _argmax(map(class_slab, range(probs.shape[0])), (n, *shape[1:]), dtype)
    return labels


def _argmax(channels: Iterable[np.ndarray], shape, dtype) -> np.ndarray:
    """Argmax over class probabilities given one class at a time (ties go to the lower class, as
    :func:`numpy.argmax`); overwrites the first channel."""
    best = None
    labels = np.zeros(shape, dtype=dtype)
    for k, p in enumerate(channels):
        if best is None:
            best = p
        else:
            better = p > best
            labels[better] = k
            np.maximum(best, p, out=best)
    return labels


# -- files --------------------------------------------------------------------------------------
OUTPUT_FORMATS = ("nifti", "dicom-seg")


def output_paths(output: str | Path, images: list, domains: list[str], fmt: str | None = None) -> dict[str, Path]:
    """Where each domain's labels go: OUT itself (a .nii/.nii.gz, or a .dcm DICOM SEG; one domain)
    or OUT/<case>_<domain>.nii.gz (.dcm with ``fmt="dicom-seg"``). ``fmt`` None: by OUT's suffix."""
    output = Path(output)
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")
    is_seg_file = output.suffix.lower() == ".dcm"
    if (fmt == "nifti" and is_seg_file) or (fmt == "dicom-seg" and is_nifti(output)):
        want = ".nii/.nii.gz" if fmt == "nifti" else ".dcm"
        raise InputError(f"{output}: --format {fmt} writes {want} files; give such a path or a folder")
    seg = fmt == "dicom-seg" or is_seg_file
    if is_nifti(output) or is_seg_file:
        if len(domains) != 1:
            raise InputError(f"{output}: several domains need an output folder, not one file")
        return {domains[0]: output}
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder; give a folder or a .nii.gz path")
    case = case_name(images[0])
    return {d: output / f"{case}_{d}{'.dcm' if seg else '.nii.gz'}" for d in domains}


def _write_seg(path: Path, model, domain: str, labels, volume: Volume, image: Path, overwrite: bool) -> Path:
    """Labels as a DICOM SEG referencing the DICOM series ``image`` they were computed on."""
    from training import __version__
    from training.io.dicom_seg import write_seg

    meta = model.meta(domain)
    series = volume.meta.get("dicom_series")
    return write_seg(path, labels, volume.affine, image, meta.class_names, [c.color for c in meta.classes],
                     domain=domain, series=series, version=__version__, overwrite=overwrite)


def predict_files(
    images: list[str | Path],
    domains: list[str],
    output: str | Path,
    model=None,
    config: InferenceConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    overwrite: bool = False,
    series: str | None = None,
    fmt: str | None = None,
) -> Prediction:
    """Read one case (its modality files, a 4D file, a DICOM file or folder), segment it, write
    labels; returns the :class:`Prediction` with each result's ``path``.

    ``model`` is a loaded :class:`~training.model.modelfile.Model`, a model directory, or None for the
    bundled model; ``series`` picks a series of a DICOM folder that holds several. Nothing is
    written unless every domain succeeded. ``fmt``: "nifti" or "dicom-seg" (a DICOM SEG referencing
    the input's series; the input must be DICOM); None: by the output's suffix (.dcm: SEG).
    """
    from training.io.atomic import check_writable
    from training.model.modelfile import Model, load_model
    from training.model.registry import resolve_model

    if isinstance(images, (str, Path)):
        images = [images]
    images = [Path(p) for p in images]
    paths = output_paths(output, images, domains, fmt)
    seg = any(p.suffix.lower() == ".dcm" for p in paths.values())
    if seg:  # a SEG of a NIfTI, a multi-frame file or UID-less files is refused before any work
        from training.io.dicom_seg import check_seg_source

        check_seg_source(images[0], series)
    resolved_inputs = {p.resolve() for p in images}
    for path in paths.values():
        if path.resolve() in resolved_inputs:
            raise InputError(f"{path}: output would overwrite an input image")
        if path.exists() and not overwrite:
            raise InputError(f"{path}: already exists; remove it or pass --overwrite")
        check_writable(path)  # a read-only, full or missing place is said now, not after the work
    if not isinstance(model, Model):
        model = load_model(resolve_model(model), domains=domains)
    volume = read_image(images if len(images) > 1 else images[0], series=series)
    prediction = predict(model, volume, domains, config, progress, cancel)
    for d, path in paths.items():  # exclusive unless overwriting: a file another run wrote meanwhile is kept
        if seg:
            prediction[d].path = _write_seg(path, model, d, prediction[d].labels, volume, images[0], overwrite)
            continue
        prediction[d].path = write_labels(path, prediction[d].labels, volume.affine, like=volume, overwrite=overwrite)
    return prediction
