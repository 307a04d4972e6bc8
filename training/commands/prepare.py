"""``u2net prepare``: build a model's fast CPU path (OpenVINO) once, so that every later run, of
the CLI or the plugin, takes it at once (:mod:`training.infer.prepare`); with ``--precision int8``
quantise it and keep INT8 where its check accepts it."""

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
    p.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32",
                   help="f32 (default); bf16 (CPUs with bf16 units; runs take it with --precision bf16); int8: "
                        "quantise (NNCF), check it on held-out cases and keep it only if it loses at most 0.005 Dice "
                        "against f32 and is faster; runs then take it by default (--precision auto)")
    p.add_argument("--calibrate", action="append", metavar="FILE",
                   help="int8: a scan of the kind the domain segments to calibrate and check on (repeat; needed "
                        "for domains without synthetic cases, e.g. abdomen-ct and your own)")
    p.add_argument("--check-labels", metavar="LABELS",
                   help="int8: labels of the last --calibrate scan, in the domain's class numbers: the check then "
                        "scores Dice against them (without, f32's labels stand in for them, which is stricter); "
                        "with several scans the last is held out from the calibration")
    p.add_argument("--low-priority", action="store_true",
                   help="run at a lower CPU priority (the plugin prepares in the background this way)")


def run(args: argparse.Namespace) -> int:
    from training.errors import InputError
    from training.infer.backends import openvino_dir
    from training.infer.prepare import has_synthetic_cases, prepare_domain
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"batch size must be ≥ 1, got {args.batch_size}")
    if args.calibrate and args.precision != "int8":
        raise InputError("--calibrate is for --precision int8 (f32 and bf16 need no calibration)")
    if args.check_labels and not args.calibrate:
        raise InputError("--check-labels labels the last --calibrate scan; give that scan too")
    if args.low_priority and hasattr(os, "nice"):
        os.nice(10)
    domains = list(dict.fromkeys(args.domain)) if args.domain else None
    calibration = _read_scans(args.calibrate) if args.calibrate else None
    truth = _read_scans([args.check_labels])[0] if args.check_labels else None
    model = load_model(resolve_model(args.model), domains=domains)
    refused = 0
    for d in domains or model.domains:
        if args.precision == "int8" and not calibration and not domains and not has_synthetic_cases(d):
            refused += 1  # all domains asked for: do the others, say what this one needs
            print(f"{d}: skipped (no synthetic cases to calibrate INT8 on: `u2net prepare --precision int8 "
                  f"--domain {d} --calibrate SCAN`)", flush=True)
            continue
        done = prepare_domain(model, d, args.batch_size, precision=args.precision, calibration=calibration, truth=truth,
                              progress=lambda stage, d=d: print(f"{d}: {stage}…", flush=True))
        state = "was ready" if done.was_ready else "ready"
        if done.verdict is None:
            print(f"{d}: {state} in {done.seconds:.1f} s" + ("" if done.precision == "f32" else f" ({done.precision})"),
                  flush=True)
        elif done.verdict["accepted"]:
            print(f"{d}: INT8 accepted ({done.verdict['why']}); {state} in {done.seconds:.1f} s", flush=True)
        else:
            refused += 1
            print(f"{d}: INT8 refused ({done.verdict['why']}); runs stay f32", flush=True)
    print(f"fast path kept in {openvino_dir()}", file=sys.stderr)
    return 1 if refused else 0


def _read_scans(paths: list[str]) -> list:
    """The calibration scans, each checked now (a bad file is one line, before any conversion)."""
    from training.io.volume import read_image

    return [read_image(p) for p in dict.fromkeys(paths)]
