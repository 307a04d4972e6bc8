"""``u2net synth``: write a synthetic MSD-layout dataset (or list the synthetic domains)."""

from __future__ import annotations

import argparse
import sys

NAME = "synth"
HELP = "write a synthetic CT/MR dataset with ground truth in the MSD layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", nargs="?", help="output folder (new or empty)")
    p.add_argument("--list", action="store_true", help="print the synthetic domain names, one per line")
    p.add_argument("--domain", help="synthetic domain (see --list)")
    p.add_argument("--cases", type=int, default=10, help="training cases with labels (default 10)")
    p.add_argument("--test-cases", type=int, default=0, help="extra unlabelled cases in imagesTs (default 0)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)"
    )
    p.add_argument(
        "--size-scale",
        type=float,
        default=1.0,
        help="multiply voxel counts (and divide the spacing) by this; 0.5 = 8x fewer voxels (default 1)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace a synthetic dataset previously written to OUT"
    )


def run(args: argparse.Namespace) -> int:
    from training.commands._progress import Bars
    from training.data.synth import SYNTH_DOMAINS, domain_info, write_dataset
    from training.errors import InputError

    if args.list:
        for name in SYNTH_DOMAINS:
            print(name)
        return 0
    if not args.out or not args.domain:
        raise InputError("give an output folder and --domain NAME (u2net synth --list shows the names)")
    domain_info(args.domain)
    total = args.cases + max(args.test_cases, 0)
    with Bars("case", enabled=total >= 2) as bars:  # a bar appears with the first case written
        out = write_dataset(args.out, args.domain, args.cases, args.seed, args.test_cases, args.size_scale,
                            bars.callback(f"synth {args.domain}"), args.force)
    print(out / "dataset.json", file=sys.stderr)
    return 0
