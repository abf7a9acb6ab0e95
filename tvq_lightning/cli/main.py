"""``tvq``: the command-line entry point.

Store commands (``quantize``, ``merge``, ``inspect``, ``export``) and the ``demo`` are argparse
sub-commands. Every :class:`~tvq_lightning.errors.TvqError` becomes one line on stderr,
``tvq: error: ...``, and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import TvqError
from . import demo, export, inspect, merge, quantize

COMMANDS = {"quantize": quantize, "merge": merge, "inspect": inspect, "export": export, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvq",
        description="Quantized task vectors (TVQ / RTVQ): store, merge, inspect and export them.",
        epilog="Run `tvq COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tvq_lightning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in COMMANDS.items():
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TvqError as e:
        print(f"tvq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvq: interrupted; no output was left half-written", file=sys.stderr)
        return 130
