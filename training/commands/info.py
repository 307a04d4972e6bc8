"""``u2net info``: what a model holds (domains, classes, modalities) and parameter counts."""

from __future__ import annotations

import argparse
import json

NAME = "info"
HELP = "show a model's domains, or parameter counts of the paper's configuration"

# The paper's five training domains (MSD tasks): (name, modalities, classes incl. background).
PAPER_DOMAINS = [
    ("heart", 1, 2),
    ("liver", 1, 3),
    ("hippocampus", 1, 3),
    ("prostate", 2, 3),
    ("pancreas", 1, 3),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or registry name (default: the bundled model)")
    p.add_argument(
        "--params",
        action="store_true",
        help="count parameters of the paper's configuration (base 16, 6 levels, five MSD domains)",
    )
    p.add_argument("--base-channels", type=int, default=16, help="with --params (default 16)")
    p.add_argument("--levels", type=int, default=6, help="with --params (default 6)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def param_counts(base_channels: int = 16, levels: int = 6) -> dict:
    from ..network import ArchConfig, DomainConfig, FullConvUNet, U2Net

    arch = ArchConfig(base_channels=base_channels, levels=levels)
    net = U2Net(arch, [DomainConfig(n, c, k) for n, c, k in PAPER_DOMAINS])
    counts = net.count_parameters()
    counts["independent"] = sum(p.numel() for p in FullConvUNet(arch).parameters())
    return counts


def model_summary(model) -> dict:
    return {
        "path": str(model.path) if model.path else None,
        "arch": model.trunk.arch.to_dict(),
        "trunk_hash": model.trunk.trunk_hash,
        "provenance": model.trunk.provenance,
        "domains": [
            {
                "name": m.domain,
                "modality": m.modality,
                "modalities": m.modalities,
                "classes": [c.name for c in m.classes],
                "colors": [c.color for c in m.classes],
                "spacing": m.spacing,
                "patch_size": m.patch_size,
                "description": m.description,
                "provenance": m.provenance,
            }
            for m in model.adapters.values()
        ],
    }


def run(args: argparse.Namespace) -> int:
    if args.params:
        counts = param_counts(args.base_channels, args.levels)
        if args.json:
            print(json.dumps(counts))
        else:
            ind = counts["independent"]
            print(f"shared (trunk):        {counts['shared']:>12,}")
            for name, n in counts["per_domain"].items():
                print(f"adapter {name:<14}{n:>12,}  ({100 * n / ind:.2f} % of an independent model)")
            print(f"independent 3D U-Net:  {ind:>12,}")
        return 0

    from ..modelfile import load_model
    from ..registry import resolve_model

    model = load_model(resolve_model(args.model))
    summary = model_summary(model)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model {summary['path']}  (trunk {summary['trunk_hash'][:12]}, arch {summary['arch']})")
    for d in summary["domains"]:
        print(f"  {d['name']:<16} {d['modality']:<3} modalities={','.join(d['modalities'])} "
              f"classes={','.join(d['classes'])}")
    return 0
