"""``u2net evaluate``: Dice per class of a model's domain on an MSD dataset's labelled cases.

Inference runs exactly as ``u2net predict`` does (raw image in, labels at the image's own
geometry out), and is compared with the raw label files. It also scores the calibrated
probabilities (docs/uncertainty.md): the top-label ECE before and after the domain's temperature,
and the expected volume per class against the reference (error, coverage of its 90 % interval,
CRPS). The last line printed is a JSON object whose ``mean_dice`` is the mean foreground Dice over
cases and classes, with ``ece_before``, ``ece_after`` and ``volume``.
"""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = "Dice per class of a model's domain on an MSD dataset (per case and mean)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="MSD dataset folder (with dataset.json)")
    p.add_argument("--model", metavar="MODEL_DIR", help="model directory or registry name (default: bundled)")
    p.add_argument("--domain", required=True, help="the model's domain to evaluate")
    p.add_argument("--val-only", action="store_true", help="only the validation cases of --fold")
    p.add_argument("--fold", type=int, default=0, help="fold for --val-only (default 0)")
    p.add_argument("--limit", type=int, help="evaluate at most N cases")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--json", action="store_true", help="print one JSON object per case, then the summary")
    p.add_argument("--no-calibration", action="store_true",
                   help="Dice only: skip the probabilities (ECE, expected volumes), which cost time and memory")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import warnings

    from training.data.datasets import load_dataset, load_split
    from training.model.modelfile import load_model
    from training.model.registry import resolve_model
    from training.train.evaluation import class_mismatch, evaluate_dataset

    model = load_model(resolve_model(args.model))
    case_ids = None
    if args.val_only:
        _, case_ids = load_split(load_dataset(args.dataset), fold=args.fold)

    def show(case: dict) -> None:
        if args.json:
            print(json.dumps(case), flush=True)
        else:
            print(f"{case['case']:<24} " + "  ".join(f"{n}={v:.3f}" for n, v in case["dice"].items()), flush=True)

    dataset = load_dataset(args.dataset)
    if args.domain in model.adapters:  # said before the work, as one line (not as a Python warning)
        mismatch = class_mismatch(model.meta(args.domain).class_names, dataset.class_names)
        if mismatch:
            print(f"u2net evaluate: warning: {args.dataset}: {mismatch}", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*differ from the dataset's")
        summary = evaluate_dataset(model, args.dataset, args.domain, device=args.device, case_ids=case_ids,
                                   limit=args.limit, on_case=show, calibration=not args.no_calibration)
    summary.pop("per_case")
    if not args.json:
        print("mean " + "  ".join(f"{n}={v:.3f}" for n, v in summary["mean_dice_per_class"].items()))
        if "ece_before" in summary:
            _print_calibration(summary)
    print(json.dumps(summary))
    return 0


def _print_calibration(summary: dict) -> None:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    t = f"temperature {summary['temperature']:.3f}" if summary["calibrated"] else "no calibration: temperature 1"
    print(f"calibration: ECE {num(summary['ece_before'], '.4f')} before, {num(summary['ece_after'], '.4f')} "
          f"after ({t})")
    v = summary["volume"]
    print(f"volume: mean |error| {num(v['mean_abs_volume_error_pct'], '.1f')} %, {v['nominal']:.0%} interval "
          f"covers {num(v['coverage'], '.0%')} of {v['cases']}, CRPS {num(v['crps_ml'], '.2f')} mL")
