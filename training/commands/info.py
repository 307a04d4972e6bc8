"""``u2net info``: what a model holds (domains, classes, modalities) and parameter counts."""

from __future__ import annotations

import argparse
import json

NAME = "info"
HELP = "list the models available, show one model's domains, or count parameters"

# The paper's five training domains (MSD tasks): (name, modalities, classes incl. background).
PAPER_DOMAINS = [
    ("heart", 1, 2),
    ("liver", 1, 3),
    ("hippocampus", 1, 3),
    ("prostate", 2, 3),
    ("pancreas", 1, 3),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="model directory or registry name to describe (without it: list every model available)",
    )
    p.add_argument(
        "--params",
        action="store_true",
        help="count parameters of the paper's configuration (base 16, 6 levels, five MSD domains)",
    )
    p.add_argument("--base-channels", type=int, default=16, help="with --params (default 16)")
    p.add_argument("--levels", type=int, default=6, help="with --params (default 6)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def param_counts(base_channels: int = 16, levels: int = 6) -> dict:
    from training.model.network import ArchConfig, DomainConfig, FullConvUNet, U2Net

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

    if args.model is None:
        return list_available(args.json)

    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

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


def _provenance_line(prov: dict) -> str:
    keys = [k for k in ("command", "seed", "iterations", "data", "metrics", "made_by") if k in prov]
    keys = keys or list(prov)[:4]
    return ", ".join(f"{k}={json.dumps(prov[k]) if not isinstance(prov[k], str) else prov[k]}" for k in keys)


def list_available(as_json: bool) -> int:
    """Every model a user can pick (bundled, cached, downloadable) with domains, classes, provenance."""
    import sys

    from training.io.folders import cache_dir
    from training.model.registry import list_models, load_registry

    registry = load_registry()
    models = list_models(registry=registry)
    if as_json:
        print(json.dumps({
            "cache": str(cache_dir()),
            "models": [
                {**m.__dict__, "path": str(m.path) if m.path else None} for m in models
            ],
            "problems": registry.problems,
        }))
        return 0
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not models:
        print("no models: the bundled model is missing and no registry lists any; reinstall napari-u2net")
    for m in models:
        where = str(m.path) if m.path else f"download with `u2net download {m.name}`"
        version = f" v{m.version}" if m.version else ""
        print(f"{m.name}{version}  [{m.source}]  {where}")
        if m.description:
            print(f"    {m.description}")
        if m.provenance:
            print(f"    provenance: {_provenance_line(m.provenance)}")
        for d in m.domains:
            classes = ",".join(str(c) for c in d.get("classes", []))
            mods = ",".join(d.get("modalities", []))
            print(f"    {d.get('name', '?'):<18} {d.get('modality', ''):<3} "
                  + (f"modalities={mods} " if mods else "") + f"classes={classes}")
            if d.get("provenance"):
                print(f"        provenance: {_provenance_line(d['provenance'])}")
    print(f"cache: {cache_dir()}  (U2NET_HOME overrides; U2NET_REGISTRY adds a registry)")
    return 0
