"""``u2net evaluate``: Dice per class of a model's domain on an MSD dataset's labelled cases.

Inference runs exactly as ``u2net predict`` does (raw image in, labels at the image's own
geometry out), and is compared with the raw label files. The last line printed is a JSON object
whose ``mean_dice`` is the mean foreground Dice over cases and classes.
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


def _inference_config(device: str):
    from ..inference import InferenceConfig

    try:
        return InferenceConfig(device=device)
    except TypeError:
        return InferenceConfig()


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ..datasets import load_dataset, load_split
    from ..errors import InputError
    from ..inference import predict
    from ..metrics import dice_per_class, mean_ignoring_nan
    from ..modelfile import load_model
    from ..registry import resolve_model
    from ..volume import read_image

    ds = load_dataset(args.dataset)
    model = load_model(resolve_model(args.model))
    if args.domain not in model.adapters:
        raise InputError(f"model has no domain {args.domain!r}; it has: {', '.join(model.adapters)}")
    meta = model.meta(args.domain)
    cases = [c for c in ds.training if c.label is not None]
    if args.val_only:
        _, val_ids = load_split(ds, fold=args.fold)
        cases = [c for c in cases if c.id in set(val_ids)]
    cases = cases[: args.limit] if args.limit else cases
    if not cases:
        raise InputError(f"{args.dataset}: no labelled case to evaluate")
    names = meta.class_names[1:]
    config = _inference_config(args.device)
    per_case = []
    for case in cases:
        volume = read_image(case.images)
        truth = np.asarray(read_image(case.label).data[0]).round().astype(np.int64)
        pred = predict(model, volume, [args.domain], config)[args.domain]
        scores = dict(zip(names, dice_per_class(pred, truth, meta.num_classes)))
        per_case.append({"case": case.id, "dice": scores, "mean": mean_ignoring_nan(scores.values())})
        if args.json:
            print(json.dumps(per_case[-1]))
        else:
            print(f"{case.id:<24} " + "  ".join(f"{n}={v:.3f}" for n, v in scores.items()))
    mean_per_class = {n: mean_ignoring_nan([c["dice"][n] for c in per_case]) for n in names}
    summary = {
        "dataset": str(args.dataset),
        "domain": args.domain,
        "cases": len(per_case),
        "mean_dice_per_class": mean_per_class,
        "mean_dice": mean_ignoring_nan(mean_per_class.values()),
    }
    if not args.json:
        print("mean " + "  ".join(f"{n}={v:.3f}" for n, v in mean_per_class.items()))
    print(json.dumps(summary))
    return 0
