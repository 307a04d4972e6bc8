"""``u2net train``: train a new universal model on one or more MSD datasets (round-robin)."""

from __future__ import annotations

import argparse

from training.commands._trainargs import (
    add_training_arguments,
    config_from_args,
    print_rank_hash,
    summary_line,
    write_line,
)
from training.train.config import TrainConfig

NAME = "train"
HELP = "train a new model on MSD-layout datasets (one domain per dataset); torchrun-ready"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET", help="MSD dataset folders (with dataset.json)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory to write")
    add_training_arguments(p, iterations=TrainConfig.iterations)
    p.add_argument("--base-channels", type=int, default=16, help="channels of the first level (default 16)")
    p.add_argument("--levels", type=int, default=6, help="resolution levels (default 6)")
    p.add_argument("--domain-weight", action="append", default=[], metavar="DOMAIN=N",
                   help="train DOMAIN N times per round-robin cycle instead of once (repeatable), "
                        "e.g. for a domain that lags behind the others")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.commands._progress import track_training
    from training.errors import InputError, U2NetError
    from training.io.atomic import check_writable
    from training.model.layout import TRUNK_FILE
    from training.model.network import ArchConfig
    from training.train.distributed import setup, teardown
    from training.train.runs import domain_from_dataset, train_model
    from training.train.trainer import consume, domain_cycle, parse_domain_weights

    config = config_from_args(args)
    config.domain_weights = parse_domain_weights(args.domain_weight)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder; -o names the model folder to write")
    check_writable(output / TRUNK_FILE)  # a read-only or full place is said now, not after training
    try:
        arch = ArchConfig(base_channels=args.base_channels, levels=args.levels)
    except ValueError as e:
        raise U2NetError(str(e)) from None
    dist = setup(args.device)
    try:
        domains = [
            domain_from_dataset(Path(d), patch_size=config.patch_size, fold=args.fold,
                                cache_dir=Path(args.cache) if args.cache else None)
            for d in args.datasets
        ]
        domain_cycle([d.name for d in domains], config.domain_weights)  # names checked before any training
        reports = train_model(domains, Path(args.output), config, None if args.resume else arch,
                              resume=args.resume, dist=dist)
        last = consume(track_training(reports, enabled=not args.quiet and dist.is_main, desc=NAME))
        if dist.is_main:
            write_line(f"model written to {args.output}")
        print_rank_hash(last, dist)
        summary_line(last, dist)
    finally:
        teardown(dist)
    return 0
