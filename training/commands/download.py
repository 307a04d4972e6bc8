"""``u2net download``: fill the model cache so a computer without internet can use the models."""

from __future__ import annotations

import argparse

NAME = "download"
HELP = "download registry models into the cache for offline use"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help="registry model name(s); see `u2net info`")
    p.add_argument(
        "--force",
        action="store_true",
        help="download every file again, replacing cached copies (e.g. after a damaged-file error)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from training.commands._progress import Bars
    from training.io.folders import BUNDLED_MODEL, cache_dir
    from training.model.registry import download_model, load_registry

    registry = load_registry()
    for name in args.names:
        if name == BUNDLED_MODEL:
            print(f"{name}: the bundled model ships with the package; nothing to download")
            continue
        if not args.quiet and name in registry.entries:
            print(f"{name}: downloading (files already cached and verified are kept)" if not args.force
                  else f"{name}: downloading every file again")
        with Bars("B", enabled=not args.quiet, unit_scale=True) as bars:
            path = download_model(name, force=args.force, progress=bars.callback(name), registry=registry)
        print(f"{name}: ready in {path}")
    print(f"cache: {cache_dir()}  (set U2NET_HOME to use another folder)")
    return 0
