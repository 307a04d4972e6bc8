"""``u2net domain``: share one domain as one ``.u2d`` file (export, import, show its card).

The file format and every check are in :mod:`training.model.domain_file`; this is the command line.
"""

from __future__ import annotations

import argparse
import json

NAME = "domain"
HELP = "share a domain as one .u2d file: export it from a model, import it into another, show its card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    e = sub.add_parser("export", help="write one domain of MODEL as a .u2d file (adapter, metadata, trunk hash, card)")
    e.add_argument("model", metavar="MODEL", help="model directory, registry name, or default (the bundled model)")
    e.add_argument("domain", metavar="DOMAIN")
    e.add_argument("-o", "--output", required=True, metavar="FILE.u2d")
    e.add_argument("--overwrite", action="store_true", help="replace FILE.u2d if it exists")
    i = sub.add_parser("import", help="verify a .u2d file and add its domain to a model with the same trunk")
    i.add_argument("file", metavar="FILE.u2d")
    i.add_argument("--model", default=None,
                   help="model directory or name (default: the bundled model, which is read-only: the domain "
                        "then goes into your own model 'user', made from it)")
    i.add_argument("--as", dest="as_name", metavar="NEWNAME", help="import under another domain name")
    i.add_argument("--overwrite", action="store_true", help="replace a domain of the same name")
    s = sub.add_parser("show", help="verify a .u2d file and print what it holds and its model card")
    s.add_argument("file", metavar="FILE.u2d")
    s.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.model.domain_file import export_domain, import_domain, read_domain_file
    from training.model.registry import resolve_model

    if args.action == "export":
        shared = export_domain(resolve_model(args.model), args.domain, Path(args.output), overwrite=args.overwrite)
        size = shared.path.stat().st_size
        print(f"wrote {shared.path} ({size / 1024:.0f} KB): domain {shared.domain!r}, trunk {shared.trunk_hash[:12]}")
        return 0
    if args.action == "import":
        done = import_domain(Path(args.file), resolve_model(args.model), overwrite=args.overwrite,
                             new_name=args.as_name)
        verb = "replaced" if done.replaced else "added"
        print(f"{verb} domain {done.domain!r} in {done.model_dir}")
        if done.note:
            print(f"note: {done.note}; use it with --model {done.model_dir.name}")
        return 0
    shared, _state = read_domain_file(Path(args.file))
    if args.json:
        print(json.dumps({"domain": shared.domain, "trunk_hash": shared.trunk_hash, "arch": shared.arch,
                          "exported_from": shared.exported_from, "exported_at": shared.exported_at,
                          "tool": shared.tool, "card": shared.card.to_dict()}))
        return 0
    print(f"{shared.path}: domain {shared.domain!r}, exported from model {shared.exported_from!r} on "
          f"{shared.exported_at} ({shared.tool}); trunk {shared.trunk_hash}")
    print(shared.card.text())
    return 0
