"""Whole training runs: datasets → preprocessed domains → a model directory.

``domain_from_dataset`` turns an MSD dataset into a :class:`~training.train.trainer.DomainData`
(plan, cached preprocessing, train/val split, adapter metadata); ``train_model`` trains a new
U²-Net on several such domains (round-robin) and writes a model directory that ``predict``
can use, plus ``MODEL_DIR/training/{state.pt,log.csv}`` for ``--resume``.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from training.data.datasets import domain_name
from training.errors import U2NetError
from training.infer.postprocess import component_counts
from training.io.volume import IGNORE_INDEX
from training.model.modelfile import AdapterMeta, make_classes, save_model
from training.model.network import ArchConfig, DomainConfig, U2Net, pool_counts_for_patch
from training.train.distributed import DistInfo
from training.train.trainer import DomainData, TrainConfig, TrainReport, run_training

WORK_SUBDIR = "training"


def domain_from_dataset(
    root: Path,
    *,
    name: str | None = None,
    patch_size: tuple[int, int, int] | None = None,
    fold: int = 0,
    cache_dir: Path | None = None,
    max_val_cases: int | None = None,
) -> DomainData:
    """Load, plan, preprocess (cached) and split an MSD dataset."""
    from training.data.datasets import load_dataset, load_split
    from training.data.preprocess import plan_dataset, preprocess_dataset

    ds = load_dataset(Path(root))
    train_ids, val_ids = load_split(ds, fold=fold)
    plan = plan_dataset(ds)
    cases = {c.id: c for c in preprocess_dataset(ds, plan, cache_dir=cache_dir)}
    val_ids = list(val_ids)[:max_val_cases] if max_val_cases is not None else list(val_ids)
    patch = tuple(int(p) for p in (patch_size or plan.patch_size))
    class_names = list(plan.class_names or ds.class_names)
    colors = list(getattr(ds, "colors", None) or []) or None
    train_cases = [cases[i] for i in train_ids]
    meta = AdapterMeta(
        domain=domain_name(name or getattr(ds, "domain", "") or ds.name),
        modalities=list(ds.modalities),
        classes=make_classes(class_names, colors[: len(class_names)] if colors else None),
        spacing=[float(s) for s in plan.spacing],
        patch_size=list(patch),
        normalization=list(plan.normalization),
        modality=str(plan.modality),
        description=f"trained on {ds.name} ({len(train_ids)} training cases)",
        components=component_counts((c.label for c in train_cases if c.label is not None), len(class_names),
                                    IGNORE_INDEX),
        provenance={"dataset": str(Path(root).resolve())},
    )
    return DomainData(meta, train_cases, [cases[i] for i in val_ids])


def provenance(config: TrainConfig, done: int, metrics: dict, extra: dict | None = None) -> dict:
    return {
        **(extra or {}),
        "iterations": done,
        "planned_iterations": config.iterations,
        "seed": config.seed,
        "loss": config.loss,
        "metrics": metrics,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def build_net(arch: ArchConfig, domains: list[DomainData], seed: int) -> U2Net:
    torch.manual_seed(seed)  # same initial weights on every rank and in a re-run
    configs = []
    for d in domains:
        pools = pool_counts_for_patch(d.patch_size, arch.levels)
        d.meta.pool_counts = list(pools)
        configs.append(DomainConfig(d.name, d.meta.in_channels, d.meta.num_classes, pools))
    return U2Net(arch, configs)


def train_model(
    domains: list[DomainData],
    model_dir: Path,
    config: TrainConfig,
    arch: ArchConfig | None = None,
    *,
    resume: bool = False,
    dist: DistInfo | None = None,
    stop=None,
) -> Iterator[TrainReport]:
    """Train a new model on ``domains`` (round-robin) into ``model_dir``; yields reports."""
    model_dir = Path(model_dir)
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise U2NetError(f"two datasets have the same domain name ({', '.join(names)}); rename one")
    if config.patch_size is not None:
        for d in domains:
            d.meta.patch_size = list(config.patch_size)
    if not resume and model_dir.exists() and any(model_dir.iterdir()):
        raise U2NetError(f"{model_dir}: output directory exists and is not empty; "
                         "choose another -o or continue that run with --resume")
    if resume and arch is None:
        from training.model.modelfile import load_trunk

        arch = load_trunk(model_dir / "trunk.safetensors")[1].arch
    net = build_net(arch or ArchConfig(), domains, config.seed)
    metas = {d.name: d.meta for d in domains}
    base_prov = {d.name: dict(d.meta.provenance) for d in domains}

    def write_model(net: U2Net, done: int, metrics: dict) -> None:
        for d in domains:
            per = {"val_dice": (metrics.get("val_dice") or {}).get(d.name)} if metrics else {}
            d.meta.provenance = provenance(config, done, per, base_prov[d.name])
            d.meta.calibration = (metrics.get("calibration") or {}).get(d.name, d.meta.calibration)
        save_model(model_dir, net, metas, provenance=provenance(config, done, metrics, {"domains": names}))

    return run_training(
        net, domains, config,
        params=list(net.parameters()),
        prefixes=["trunk.", "adapters."],
        write_model=write_model,
        work_dir=model_dir / WORK_SUBDIR,
        dist=dist,
        resume=resume,
        stop=stop,
    )
