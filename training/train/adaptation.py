"""Adapter-only adaptation: teach an existing model a new domain without touching old ones.

The new domain's adapter is added (initialised from the closest existing domain unless told
otherwise), every other weight is frozen (``requires_grad=False``: no gradients, no optimizer
state, no weight decay), and only ``adapters/<name>.safetensors`` is written, atomically. The
trunk file and the other adapter files are never opened for writing, so every old domain's
predictions stay bit-identical.

``adapt`` takes a prepared :class:`~training.train.trainer.DomainData` (the CLI builds it from an MSD
dataset); ``adapt_domain`` is the GUI's entry point and takes in-memory images and labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from training.data.labels import check_class_names
from training.data.normalization import CT_AIR_HU, ct_spec
from training.data.preprocess import MAX_PATCH
from training.errors import InputError, U2NetError
from training.infer.postprocess import component_counts
from training.io.volume import IGNORE_INDEX, Volume
from training.model.domain_match import closest_domain_name
from training.model.modelfile import AdapterMeta, Model, adapter_path, load_model, make_classes, save_adapter
from training.model.network import pool_counts_for_patch
from training.train.distributed import DistInfo
from training.train.runs import domain_name, provenance
from training.train.sampling import ArrayCase
from training.train.trainer import DomainData, TrainConfig, TrainReport, run_training

AUTO = "auto"


def closest_domain(model: Model, meta: AdapterMeta) -> str | None:
    """The existing domain most like ``meta`` (:func:`training.model.domain_match.closest_domain_name`)."""
    candidates = ((n, m.modality, m.in_channels, m.num_classes) for n, m in model.adapters.items())
    return closest_domain_name(candidates, meta.modality, meta.in_channels, meta.num_classes)


def adapt(
    model_dir: Path,
    data: DomainData,
    config: TrainConfig,
    *,
    init_from: str | None = AUTO,
    work_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dist: DistInfo | None = None,
    stop=None,
) -> Iterator[TrainReport]:
    """Train only ``data``'s new adapter on the frozen model in ``model_dir``; yields reports.

    ``init_from``: an existing domain, ``"auto"`` (the closest one) or None (random init).
    Writes ``adapters/<name>.safetensors`` at checkpoints and at the end, nothing else in
    ``model_dir``; ``work_dir`` (optional) holds the resumable state and the CSV log.
    """
    model_dir = Path(model_dir)
    name = data.name
    model = load_model(model_dir)
    net = model.net
    if config.patch_size is not None:
        data.meta.patch_size = list(config.patch_size)
    if name in model.adapters and not resume:
        if not overwrite:
            raise U2NetError(
                f"{adapter_path(model_dir, name)}: domain {name!r} already exists in this model; "
                "choose another name, or --resume an interrupted adaptation"
            )
        net.remove_domain(name)
    if name not in net.adapters:
        source = closest_domain(model, data.meta) if init_from == AUTO else init_from
        if source is not None and source not in model.adapters:
            raise U2NetError(f"cannot initialise from {source!r}: the model has {', '.join(model.adapters)}")
        pools = pool_counts_for_patch(data.patch_size, net.arch.levels)
        torch.manual_seed(config.seed)  # the new adapter's random part: same on every rank and re-run
        net.add_domain(name, data.meta.in_channels, data.meta.num_classes, init_from=source,
                       pool_counts=pools)
        data.meta.provenance = {**data.meta.provenance, "init_from": source}
    else:
        data.meta.provenance = {**model.adapters[name].provenance, **data.meta.provenance}
    cfg = net.domain_config(name)
    data.meta.pool_counts = list(cfg.pool_counts) if cfg.pool_counts is not None else None

    # Freeze everything but the new adapter: trunk (freeze_shared) and every other adapter.
    net.freeze_shared()
    for other in net.domains:
        for p in net.adapter_parameters(other):
            p.requires_grad_(other == name)
    params = net.adapter_parameters(name)
    trunk_hash = model.trunk.trunk_hash
    base_prov = dict(data.meta.provenance)

    def write_model(net, done: int, metrics: dict) -> None:
        per = {"val_dice": (metrics.get("val_dice") or {}).get(name)} if metrics else {}
        data.meta.provenance = provenance(config, done, per, {**base_prov, "adapted": True})
        data.meta.calibration = (metrics.get("calibration") or {}).get(name, data.meta.calibration)
        save_adapter(adapter_path(model_dir, name), net, data.meta, trunk_hash)

    return run_training(
        net, [data], config,
        params=params,
        prefixes=[f"adapters.{name}."],
        write_model=write_model,
        work_dir=work_dir,
        dist=dist,
        resume=resume,
        stop=stop,
    )


# -- in-memory cases (the GUI's fine-tune panel) ------------------------------------------------
def normalization_for(images: list[np.ndarray], labels: list[np.ndarray], modality: str,
                      ignore_index: int = IGNORE_INDEX) -> list[dict]:
    """Per-channel normalisation specs: CT from labelled-foreground statistics
    (:func:`~training.data.normalization.ct_spec`), MR per-image z-score."""
    specs = []
    for c in range(images[0].shape[0]):
        if modality.upper() != "CT":
            specs.append({"scheme": "zscore", "nonzero": False})
            continue
        fg = [img[c][(lab > 0) & (lab != ignore_index)] for img, lab in zip(images, labels)]
        values = np.concatenate([v for v in fg if v.size] or [img[c].ravel() for img in images])
        hounsfield = min(float(img[c].min()) for img in images) <= CT_AIR_HU
        specs.append(ct_spec(values, len(images), hounsfield))
    return specs


def default_patch(shape, cap=MAX_PATCH) -> tuple[int, int, int]:
    """Largest patch ≤ ``cap`` (a dataset plan's largest) that fits the image, a multiple of 4 per axis (≥ 8)."""
    return tuple(max(8, min(int(s), c) // 4 * 4) for s, c in zip(shape, cap))


def _as_volume(image, spacing) -> Volume:
    if isinstance(image, Volume):
        return image
    data = np.asarray(image, dtype=np.float32)
    data = data[None] if data.ndim == 3 else data
    affine = np.diag([*(float(s) for s in (spacing or (1.0, 1.0, 1.0))), 1.0])
    return Volume(data, affine)


def cases_from_arrays(
    cases: list,
    modality: str,
    spacing=None,
    ignore_index: int = IGNORE_INDEX,
    patch_size=None,
    class_names: list[str] | None = None,
    normalization: list[dict] | None = None,
) -> tuple[list[ArrayCase], list[float], list[dict]]:
    """(Volume or raw (C, Z, Y, X) array, labels (Z, Y, X)) pairs → preprocessed cases.

    Cases go through :func:`training.data.preprocess.preprocess_case` exactly as dataset cases do
    (canonical axes, the cases' median spacing, normalisation, crop), so inference later sees new
    images the same way. A bare array gets the voxel size ``spacing`` (default 1 mm). Labels:
    0 background, 1..K classes, ``ignore_index`` unlabelled. Returns the cases, the spacing
    (canonical z, y, x) and the normalisation specs: ``normalization`` when given (cases that are
    augmented copies of fewer scans would otherwise count as more scans), else derived from the cases.
    """
    from training.data.preprocess import PreprocessPlan, preprocess_case
    from training.io.resample import canonical_orientation, reorient_affine
    from training.io.volume import spacing_of

    volumes, labels = [], []
    for i, (image, label) in enumerate(cases):
        vol = _as_volume(image, spacing)
        label = np.asarray(label)
        if vol.data.ndim != 4 or tuple(vol.shape) != label.shape:
            raise InputError(f"case {i}: image {tuple(vol.data.shape)} and labels {label.shape} do not "
                             "match (expected image (C, Z, Y, X) and labels (Z, Y, X))")
        if not ((label > 0) & (label != ignore_index)).any():
            raise InputError(f"case {i}: no foreground voxel is labelled; paint at least one structure")
        if volumes and vol.channels != volumes[0].channels:
            raise InputError(f"case {i}: {vol.channels} channel(s), the first case has {volumes[0].channels}")
        volumes.append(vol)
        labels.append(label.astype(np.uint8))
    # the median spacing on canonical axes, as a dataset's plan takes it (one odd image does not
    # set the grid for all the others)
    spacings = [spacing_of(reorient_affine(v.affine, v.shape, canonical_orientation(v.affine))) for v in volumes]
    target = [float(s) for s in np.median(spacings, axis=0)]
    specs = normalization or normalization_for([np.asarray(v.data, np.float32) for v in volumes], labels, modality,
                                               ignore_index)
    plan = PreprocessPlan(spacing=target, normalization=specs, modality=modality,
                          patch_size=list(patch_size or [64, 64, 64]),
                          class_names=list(class_names or []))
    out = []
    for i, (vol, lab) in enumerate(zip(volumes, labels)):
        pc = preprocess_case(vol, lab, plan, f"case{i}")
        out.append(ArrayCase(pc.id, pc.image, pc.label))
    return out, target, specs


def adapt_domain(
    model_dir: Path,
    name: str,
    cases: list,
    class_names: list[str],
    modality: str = "CT",
    init_from: str | None = AUTO,
    config: TrainConfig | None = None,
    stop=None,
    *,
    colors: list[str] | None = None,
    modalities: list[str] | None = None,
    spacing=None,
    val_cases: list | None = None,
    work_dir: Path | None = None,
    overwrite: bool = False,
    normalization: list[dict] | None = None,
) -> Iterator[TrainReport]:
    """Fine-tune a new domain from in-memory images (the GUI's entry point).

    ``cases``: [(Volume or raw image (C, Z, Y, X), labels (Z, Y, X) with 255 = unlabelled)];
    ``class_names`` include the background first. Yields a :class:`TrainReport` per iteration;
    set ``stop`` (Event or callable) to end early; the adapter file is written at the end (and
    when stopped) into ``model_dir/adapters/<name>.safetensors``. ``normalization``: see
    :func:`cases_from_arrays`.
    """
    config = config or TrainConfig(iterations=200, batch_size=2, checkpoint_every=0)
    arrays, spacing, specs = cases_from_arrays(cases, modality, spacing, config.ignore_index,
                                               config.patch_size, class_names, normalization)
    check_class_names(list(class_names), [c.label for c in arrays], config.ignore_index)
    patch = config.patch_size or default_patch(arrays[0].label.shape)
    channels = arrays[0].image.shape[0]
    meta = AdapterMeta(
        domain=domain_name(name),
        modalities=list(modalities or [f"{modality}{i}" if channels > 1 else modality for i in range(channels)]),
        classes=make_classes(list(class_names), colors),
        spacing=spacing,
        patch_size=list(patch),
        normalization=specs,
        modality=modality,
        description=f"fine-tuned from {len(arrays)} annotated image(s)",
        components=component_counts((c.label for c in arrays), len(class_names), config.ignore_index),
        provenance={"source": "in-memory annotations", "cases": len(arrays)},
    )
    val = []
    if val_cases:
        from training.data.preprocess import PreprocessPlan, preprocess_case

        plan = PreprocessPlan(spacing=spacing, normalization=specs, modality=modality,
                              patch_size=list(patch), class_names=list(class_names))
        for i, (im, lab) in enumerate(val_cases):
            pc = preprocess_case(_as_volume(im, spacing), np.asarray(lab, np.uint8), plan, f"val{i}")
            val.append(ArrayCase(pc.id, pc.image, pc.label))
    data = DomainData(meta, arrays, val)
    return adapt(model_dir, data, config, init_from=init_from, work_dir=work_dir,
                 overwrite=overwrite, stop=stop)
