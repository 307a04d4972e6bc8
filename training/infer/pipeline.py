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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from training.data.normalization import normalize
from training.errors import InputError
from training.infer.backends import make_runner
from training.infer.config import InferenceConfig, validate_config
from training.infer.postprocess import keep_largest_components
from training.infer.result import DomainResult, Prediction
from training.infer.sliding_window import (
    CancelFlag,
    InferenceProgress,
    check_cancel,
    count_tiles,
    iter_probability_slabs,
    sliding_window,
)
from training.io.devices import default_batch_size, resolve_device
from training.io.resample import (
    canonical_orientation,
    needs_resampling,
    reorient_affine,
    reorient_array,
    resample,
    resampled_grid,
    undo_reorient_array,
)
from training.io.volume import Volume, label_dtype

__all__ = [
    "InferenceConfig",
    "InferenceProgress",
    "Prediction",
    "predict",
    "predict_files",
    "sliding_window",
    "validate_input",
]



ProgressFn = Callable[[InferenceProgress], None]


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
    if np.issubdtype(volume.data.dtype, np.floating):
        for c in range(volume.channels):
            if not np.isfinite(volume.data[c]).all():
                raise InputError(
                    f"{where}channel {c} contains NaN or infinite voxels; fix or mask them before segmenting"
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
    :class:`DomainResult` per domain.

    Labels have exactly ``volume.shape`` and lie on the volume's grid (write them with
    ``volume.affine``). Raises :class:`InputError` on unusable input before any work and
    :class:`~training.errors.Cancelled` (returning nothing) when ``cancel`` is set.
    """
    config = config or InferenceConfig()
    if isinstance(domains, str):
        domains = [domains]
    validate_config(config)
    validate_input(model, volume, domains)
    device = resolve_device(config.device)
    batch = config.batch_size or default_batch_size(device)

    def report(domain, done, total, stage):
        if progress is not None:
            progress(InferenceProgress(domain, done, total, stage))

    orient = canonical_orientation(volume.affine)
    affine_c = reorient_affine(volume.affine, volume.shape, orient)
    data_c = reorient_array(volume.data, orient)  # a view
    shape_c = tuple(data_c.shape[1:])

    # Group domains by target grid so that each distinct spacing is resampled once.
    groups: dict[tuple, list[str]] = {}
    for d in domains:
        spacing = tuple(float(s) for s in model.meta(d).spacing)
        key = spacing if needs_resampling(affine_c, spacing) else None
        groups.setdefault(key, []).append(d)

    if any(key is not None for key in groups):
        _check_resamplable(volume)
    grids = {
        key: (affine_c, shape_c) if key is None else resampled_grid(affine_c, shape_c, key) for key in groups
    }
    totals = {
        d: count_tiles(grids[key][1], model.meta(d).patch_size, config.overlap) for key, g in groups.items() for d in g
    }

    results: dict[str, np.ndarray] = {}
    for spacing, group in groups.items():
        for d in group:
            report(d, 0, totals[d], "preprocess")
        check_cancel(cancel)
        grid_affine, grid_shape = grids[spacing]
        if spacing is None:
            image = np.ascontiguousarray(data_c, dtype=np.float32)
        else:
            image = np.stack([resample(c, affine_c, grid_affine, grid_shape) for c in data_c])
        for d in group:
            meta = model.meta(d)
            check_cancel(cancel)
            x = torch.from_numpy(normalize(image, meta.normalization))
            total = totals[d]
            runner = make_runner(
                model.net, d, config.backend, device, amp=config.amp,
                patch_size=meta.patch_size, batch_size=batch,
            )
            slabs = iter_probability_slabs(
                runner, d, x, meta.patch_size, overlap=config.overlap, batch_size=batch,
                progress=progress, cancel=cancel, labels_only=spacing is None,
            )
            dtype = label_dtype(meta.num_classes - 1)
            if spacing is None:  # on the model's grid already: only labels are ever formed
                labels_c = np.empty(grid_shape, dtype=dtype)
                for z0, z1, block in slabs:
                    labels_c[z0:z1] = block
            else:
                probs16 = np.empty((meta.num_classes, *grid_shape), dtype=np.float16)
                for z0, z1, probs in slabs:
                    probs16[:, z0:z1] = probs.numpy()
                del x
                report(d, total, total, "resample")
                labels_c = _resampled_argmax(probs16, grid_affine, affine_c, shape_c, dtype, cancel)
                del probs16
            labels = np.ascontiguousarray(undo_reorient_array(labels_c, orient))
            del labels_c
            if config.postprocess:
                check_cancel(cancel)
                report(d, total, total, "postprocess")
                keep_largest_components(labels, meta.kept_components)
            results[d] = labels
            report(d, total, total, "done")
        del image
    return Prediction({d: DomainResult(d, results[d]) for d in domains})


def _check_resamplable(volume: Volume) -> None:
    """Resampling needs voxel axes that are perpendicular (no shear); say so before any work."""
    m = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    if not np.allclose(m.T @ m, np.eye(3), atol=1e-4):
        where = f"{volume.source}: " if volume.source else ""
        raise InputError(
            f"{where}the image affine is sheared (its voxel axes are not perpendicular), so it "
            "cannot be resampled to the model's spacing; reslice it to a regular grid first"
        )


def _resampled_argmax(probs: np.ndarray, src_affine, dst_affine, dst_shape, dtype, cancel) -> np.ndarray:
    """Argmax of the class probabilities resampled onto the target grid, one class at a time."""
    best = None
    labels = np.zeros(dst_shape, dtype=dtype)
    for k in range(probs.shape[0]):
        check_cancel(cancel)
        p = resample(probs[k].astype(np.float32), src_affine, dst_affine, dst_shape)
        if best is None:
            best = p
        else:
            better = p > best
            labels[better] = k
            np.maximum(best, p, out=best)
    return labels


# -- files --------------------------------------------------------------------------------------
def case_name(path: str | Path) -> str:
    """``/data/case_001_0000.nii.gz`` → ``case_001_0000``; a DICOM folder → its name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_paths(output: str | Path, images: list, domains: list[str]) -> dict[str, Path]:
    """Where each domain's labels go: OUT itself (a .nii/.nii.gz, one domain) or OUT/<case>_<domain>.nii.gz."""
    from training.io.volume import is_nifti

    output = Path(output)
    if is_nifti(output):
        if len(domains) != 1:
            raise InputError(f"{output}: several domains need an output folder, not one file")
        return {domains[0]: output}
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder; give a folder or a .nii.gz path")
    case = case_name(images[0])
    return {d: output / f"{case}_{d}.nii.gz" for d in domains}


def predict_files(
    images: list[str | Path],
    domains: list[str],
    output: str | Path,
    model=None,
    config: InferenceConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Read one case (its modality files, a 4D file or a DICOM folder), segment it, write labels.

    ``model`` is a loaded :class:`~training.model.modelfile.Model`, a model directory, or None for the
    bundled model. Nothing is written unless every domain succeeded.
    """
    from training.io.volume import read_image, write_labels
    from training.model.modelfile import Model, load_model
    from training.model.registry import resolve_model

    if isinstance(images, (str, Path)):
        images = [images]
    images = [Path(p) for p in images]
    paths = output_paths(output, images, domains)
    resolved_inputs = {p.resolve() for p in images}
    for path in paths.values():
        if path.resolve() in resolved_inputs:
            raise InputError(f"{path}: output would overwrite an input image")
        if path.exists() and not overwrite:
            raise InputError(f"{path}: already exists; remove it or pass --overwrite")
    if not isinstance(model, Model):
        model = load_model(resolve_model(model), domains=domains)
    volume = read_image(images if len(images) > 1 else images[0])
    prediction = predict(model, volume, domains, config, progress, cancel)
    for d, path in paths.items():
        write_labels(path, prediction[d].labels, volume.affine, like=volume)
    return paths
