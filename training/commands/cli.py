"""The ``u2net`` command line: one sub-command per module in :mod:`training.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and imports its heavy dependencies inside ``run`` so that ``u2net --help`` stays fast. Errors a
user can fix (:class:`training.errors.U2NetError`) are printed as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from training.errors import U2NetError
from training.io.atomic import remove_temporaries_on_signals

COMMANDS = ["info", "predict", "prepare", "synth", "train", "adapt", "evaluate", "download", "domain"]


def _load_commands() -> list:
    return [importlib.import_module(f"training.commands.{name}") for name in COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="u2net", description="Universal 3D medical image segmentation (3D U²-Net)."
    )
    from training import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    remove_temporaries_on_signals()  # a killed run leaves no hidden half-written file behind
    try:
        return int(args._run(args) or 0)
    except U2NetError as e:
        print(f"u2net {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"u2net {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
