"""``u2net prepare``: build a model's fast CPU path (OpenVINO) once, so that every later run, of
the CLI or the plugin, takes it at once (:mod:`training.infer.prepare`)."""

from __future__ import annotations

import argparse
import os
import sys

NAME = "prepare"
HELP = "convert a model's domains to OpenVINO once (on disk), so that later CPU runs start on the fast path"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or registry name (default: the bundled model)")
    p.add_argument("--domain", action="append", metavar="NAME", help="domain to prepare (repeat; default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch the runs will use (default: by device)")
    p.add_argument("--low-priority", action="store_true",
                   help="run at a lower CPU priority (the plugin prepares in the background this way)")


def run(args: argparse.Namespace) -> int:
    from training.errors import InputError
    from training.infer.backends import openvino_dir
    from training.infer.prepare import prepare_domain
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"batch size must be ≥ 1, got {args.batch_size}")
    if args.low_priority and hasattr(os, "nice"):
        os.nice(10)
    domains = list(dict.fromkeys(args.domain)) if args.domain else None
    model = load_model(resolve_model(args.model), domains=domains)
    for d in domains or model.domains:
        done = prepare_domain(model, d, args.batch_size, progress=lambda stage, d=d: print(f"{d}: {stage}…", flush=True))
        state = "was ready" if done.was_ready else "ready"
        print(f"{d}: {state} in {done.seconds:.1f} s", flush=True)
    print(f"fast path kept in {openvino_dir()}", file=sys.stderr)
    return 0
