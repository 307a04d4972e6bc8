"""``u2net adapt``: add a new domain to an existing model, training only its adapter."""

from __future__ import annotations

import argparse

from training.commands._trainargs import (
    add_training_arguments,
    config_from_args,
    print_rank_hash,
    summary_line,
    write_line,
)

NAME = "adapt"
HELP = "train a new domain's adapter on an MSD dataset with the shared trunk frozen"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="MSD dataset folder (with dataset.json)")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="model directory to add the domain to")
    p.add_argument("--from", dest="init_from", metavar="DOMAIN",
                   help="initialise the adapter from this domain (default: the closest by modality)")
    p.add_argument("--random-init", action="store_true", help="initialise the adapter randomly")
    p.add_argument("--name", help="name of the new domain (default: the dataset's name)")
    p.add_argument("--work-dir", help="where the resumable state and log go "
                   "(default: MODEL_DIR.adapt-NAME beside the model directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    add_training_arguments(p, iterations=None, teaching=True)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.commands._progress import track_training
    from training.train.adaptation import AUTO, adapt
    from training.train.config import TEACH_BATCH, TEACH_ITERATIONS
    from training.train.distributed import setup, teardown
    from training.train.runs import domain_from_dataset
    from training.train.trainer import consume

    model_dir = Path(args.model)
    dist = setup(args.device)
    cpu = dist.device.type == "cpu"
    kind = "cpu" if cpu else "gpu"  # the Fine-tune panel's defaults: minutes on a CPU
    args.iterations = args.iterations or TEACH_ITERATIONS[kind]
    args.batch_size = args.batch_size or TEACH_BATCH[kind]
    config = config_from_args(args)
    try:
        data = domain_from_dataset(Path(args.dataset), name=args.name, patch_size=config.patch_size,
                                   fold=args.fold, cache_dir=Path(args.cache) if args.cache else None)
        work = model_dir.parent / f"{model_dir.name}.adapt-{data.name}"
        work = Path(args.work_dir) if args.work_dir else work
        init = None if args.random_init else (args.init_from or AUTO)
        reports = adapt(model_dir, data, config, init_from=init, work_dir=work, resume=args.resume,
                        overwrite=args.overwrite, dist=dist)
        last = consume(track_training(reports, enabled=not args.quiet and dist.is_main, desc=NAME))
        if dist.is_main:
            write_line(f"adapter {data.name!r} written to {model_dir}")
        print_rank_hash(last, dist)
        summary_line(last, dist)
    finally:
        teardown(dist)
    return 0
