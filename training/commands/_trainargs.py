"""Options shared by ``u2net train`` and ``u2net adapt``."""

from __future__ import annotations

import argparse
import sys

from training.train.config import CLI_LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig


def add_training_arguments(p: argparse.ArgumentParser, iterations: int | None, lr: float = TrainConfig.lr,
                           teaching: bool = False) -> None:
    """``teaching``: iterations and batch size default to the Fine-tune panel's
    (:func:`training.train.config.teaching_config`; the command resolves them for its device)."""
    from training.train.config import TEACH_BATCH, TEACH_ITERATIONS

    d = TrainConfig
    default = (f"{TEACH_ITERATIONS['cpu']} on a CPU, {TEACH_ITERATIONS['gpu']} on a GPU" if teaching
               else f"{iterations}")
    p.add_argument("--iterations", type=int, default=None if teaching else iterations,
                   help=f"training iterations (default {default})")
    p.add_argument("--patch-size", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="patch size in voxels (default: from the dataset's plan)")
    batch = f"{TEACH_BATCH['cpu']} on a CPU, {TEACH_BATCH['gpu']} on a GPU" if teaching else f"{d.batch_size}"
    p.add_argument("--batch-size", type=int, default=None if teaching else d.batch_size,
                   help=f"patches per iteration (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"initial learning rate (default {lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"weight decay (default {d.weight_decay:g})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help=f"default {d.optimizer}")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"default {d.schedule}")
    p.add_argument("--loss", choices=CLI_LOSSES, default=d.loss,
                   help="dice_ce (default) or lovasz_focal (the paper's)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--device", default=d.device,
                   help="auto, cpu, cuda, cuda:N, mps (torchrun: one GPU per process)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run exactly")
    p.add_argument("--val-every", type=int, default=0, help="validate every N iterations (default: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a checkpoint every N iterations")
    p.add_argument("--fold", type=int, default=0, help="cross-validation fold for the train/val split (default 0)")
    p.add_argument("--cache", help="preprocessing cache directory (default: DATASET/.u2net_cache)")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--no-augment", action="store_true", help="disable data augmentation")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    from training.train.augment import AugmentConfig

    return TrainConfig(
        iterations=args.iterations,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        schedule=args.schedule,
        loss=args.loss,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        deterministic=args.deterministic,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        augment=AugmentConfig.none() if args.no_augment else AugmentConfig(),
    )


def summary_line(report, dist) -> None:
    """The last line of train/adapt: a JSON object (rank 0 only)."""
    import json

    if not dist.is_main or report is None:
        return
    write_line(json.dumps({"iterations": report.iteration, "loss": report.loss,
                            "val_dice": report.val_dice, "val_mean": report.val_mean}))


def print_rank_hash(report, dist) -> None:
    """Under torchrun every rank prints a hash of its final weights (they must all agree)."""
    if dist.enabled and report is not None and report.weights_hash:
        write_line(f"rank {dist.rank} weights {report.weights_hash}")


def write_line(text: str) -> None:
    """One line in one write, flushed: under torchrun every rank shares the same stdout pipe, and
    `print` writes the text and its newline separately when Python runs unbuffered (as CI runs
    it), so another rank's line could land in between and break the JSON summary line."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
