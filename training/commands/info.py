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
    p.add_argument("--domain", metavar="D",
                   help="print domain D's model card (from --model, else the first local model that has D)")
    p.add_argument("--base-channels", type=int, default=16, help="with --params (default 16)")
    p.add_argument("--levels", type=int, default=6, help="with --params (default 6)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="full listing: descriptions and every domain's training provenance")
    p.add_argument("--json", action="store_true", help="print JSON instead of text (everything, cards included)")


def param_counts(base_channels: int = 16, levels: int = 6) -> dict:
    from training.model.network import ArchConfig, DomainConfig, FullConvUNet, U2Net

    arch = ArchConfig(base_channels=base_channels, levels=levels)
    net = U2Net(arch, [DomainConfig(n, c, k) for n, c, k in PAPER_DOMAINS])
    counts = net.count_parameters()
    counts["independent"] = sum(p.numel() for p in FullConvUNet(arch).parameters())
    return counts


def model_summary(model) -> dict:
    from training.model.card import card_from_meta

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
                "card": card_from_meta(m).to_dict(),
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
    if args.domain is not None:
        return show_card(args.domain, args.model, args.json)
    if args.model is None:
        return list_available(args.json, args.verbose)

    from training.model.modelfile import load_model
    from training.model.registry import resolve_model

    model = load_model(resolve_model(args.model))
    summary = model_summary(model)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"model {summary['path']}  (trunk {summary['trunk_hash'][:12]}, arch {summary['arch']})")
    _print_domains(summary["domains"], args.verbose)
    return 0


# -- text output ---------------------------------------------------------------------------------
def heldout_dice(domain: dict) -> float | None:
    """Mean foreground Dice on held-out cases, from a domain's provenance (None: not measured)."""
    prov = domain.get("provenance") if isinstance(domain.get("provenance"), dict) else {}
    heldout = prov.get("heldout_evaluation")
    dice = heldout.get("mean_dice") if isinstance(heldout, dict) else None
    return float(dice) if isinstance(dice, (int, float)) and not isinstance(dice, bool) else None


def _print_domains(domains: list[dict], verbose: bool, indent: str = "  ") -> None:
    """The compact table: domain, modality (inputs), classes, held-out Dice; ``verbose`` adds each
    domain's description and provenance below its row."""
    rows = []
    for d in domains:
        classes = [str(c) for c in d.get("classes", [])][1:]
        mods = ",".join(d.get("modalities", []))
        modality = d.get("modality", "") + (f" ({mods})" if mods else "")
        dice = heldout_dice(d)
        rows.append((str(d.get("name", "?")), modality, ", ".join(classes) or "—",
                     f"{dice:.3f}" if dice is not None else ("unreadable" if d.get("error") else "—"), d))
    if not rows:
        print(f"{indent}(no domains)")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("domain", "modality", "classes"))]
    head = ("domain", "modality", "classes")
    print(indent + "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  held-out Dice")
    for *cells, dice, d in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths)) + f"  {dice}")
        if verbose:
            if d.get("description"):
                print(f"{indent}    {d['description']}")
            if d.get("provenance"):
                print(f"{indent}    provenance: {_provenance_line(d['provenance'])}")


def _provenance_line(prov: dict) -> str:
    keys = [k for k in ("command", "seed", "iterations", "data", "metrics", "made_by") if k in prov]
    keys = keys or list(prov)[:4]
    return ", ".join(f"{k}={json.dumps(prov[k]) if not isinstance(prov[k], str) else prov[k]}" for k in keys)


def list_available(as_json: bool, verbose: bool = False) -> int:
    """Every model a user can pick (bundled, cached, downloadable, the user's own): one header line
    each (name, source, where) and a compact table of its domains; ``verbose`` adds descriptions and
    provenance, ``as_json`` everything."""
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
        if verbose and m.description:
            print(f"    {m.description}")
        if verbose and m.provenance:
            print(f"    provenance: {_provenance_line(m.provenance)}")
        _print_domains(m.domains, verbose)
    print(f"cache: {cache_dir()}  (U2NET_HOME overrides; U2NET_REGISTRY adds a registry)")
    if not verbose:
        print("more: --verbose (provenance), --json, --domain D (a domain's model card)")
    return 0


# -- model cards ---------------------------------------------------------------------------------
def _find_domain(domain: str, model: str | None):
    """(model directory, adapter file) of ``domain``: in ``model``, else in the first local model
    (bundled, cached, the user's) that has it."""
    from training.errors import InputError
    from training.model.layout import adapter_path
    from training.model.registry import list_models, resolve_model

    if model is not None:
        model_dir = resolve_model(model)
        path = adapter_path(model_dir, domain)
        if path.is_file():
            return model_dir, path
        have = sorted(p.stem for p in path.parent.glob("*.safetensors"))
        raise InputError(f"model {model!r} has no domain {domain!r}; it has: {', '.join(have) or 'none'}")
    local = [m for m in list_models() if m.path is not None]
    for m in local:
        path = adapter_path(m.path, domain)
        if path.is_file():
            return m.path, path
    known = sorted({str(d.get("name")) for m in local for d in m.domains})
    raise InputError(f"no local model has a domain {domain!r} (known: {', '.join(known) or 'none'}); "
                     "name its model with --model")


def show_card(domain: str, model: str | None, as_json: bool) -> int:
    """Print one domain's model card, read from its verified adapter file."""
    from training.model.card import card_from_meta
    from training.model.modelfile import read_weights

    model_dir, path = _find_domain(domain, model)
    _state, meta = read_weights(path, "adapter")  # a damaged or edited file is refused, not shown
    card = card_from_meta(meta)
    if as_json:
        print(json.dumps({"model": str(model_dir), **card.to_dict()}))
    else:
        print(f"Model: {model_dir}")
        print(card.text())
    return 0
