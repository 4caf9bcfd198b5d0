"""The ``skyproto`` console tool (also ``python -m skyproto``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skyproto", description="Inspect a skyproto cluster."
    )
    parser.add_argument("--version", action="version", version=f"skyproto {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("status", help="list live harbors and global names (with issue 4)")
    commands.add_parser("names", help="list a mapper's registrations (with issue 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes are one line on stderr and exit status 1 or 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    print(f"skyproto: error: '{args.command}' is not available yet", file=sys.stderr)
    return 1
