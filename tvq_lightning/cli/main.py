"""``tvq``: the command-line entry point.

``quantize``, ``merge`` and ``demo`` parse their options with jsonargparse, generated from the
dataclasses they build (:mod:`tvq_lightning.cli.options`: ``-c FILE``, ``--print_config``);
``inspect`` and ``export`` are argparse sub-commands. ``fit``, ``validate``, ``test`` and
``predict`` hand the rest of the command line to a LightningCLI (:mod:`tvq_lightning.cli.lightning`): ``tvq fit -c configs/adamerging_layer.yaml``.
Every :class:`~tvq_lightning.errors.TvqError` becomes one line on stderr,
``tvq: error: ...``, and exit status 2. Output cut short by its reader (``tvq inspect S | head -1``)
ends quietly with status 141, as a process killed by SIGPIPE.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# torch's OpenMP threads and numba's (the fused quantization kernels) both spin after a parallel
# region; on a machine with few cores they then steal each other's time slices (a tiny config
# runs 4x slower). Passive waiting avoids it; it must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .. import __version__  # noqa: E402
from ..errors import TvqError  # noqa: E402
from ..runtime import configure_allocator  # noqa: E402
from . import convert, demo, export, heads, inspect, merge, quantize, sweep  # noqa: E402

# The LightningCLI sub-commands (tvq_lightning.cli.lightning, imported only when one runs: importing
# Lightning takes seconds the store commands should not pay).
LIGHTNING_HELP: dict[str, str] = {
    "fit": "LightningCLI: train a module from a YAML config (fine-tune, AdaMerging, Tinting, Surgery)",
    "validate": "LightningCLI: run the validation loop of a configured module",
    "test": "LightningCLI: evaluate a configured module on every task's test set",
    "predict": "LightningCLI: run the predict loop of a configured module",
}
LIGHTNING_COMMANDS: tuple[str, ...] = tuple(LIGHTNING_HELP)


def run_lightning(argv: Sequence[str]) -> int:
    """``tvq fit|validate|test|predict ...`` (see :func:`tvq_lightning.cli.lightning.run_lightning`)."""
    from .lightning import run_lightning as run

    return run(argv)


COMMANDS = {"inspect": inspect, "export": export, "convert": convert}
#: jsonargparse commands: ``module.main(argv)`` parses the rest of the command line itself
CONFIG_COMMANDS = {"quantize": quantize, "merge": merge, "demo": demo, "sweep": sweep, "heads": heads}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvq",
        description="Quantized task vectors (TVQ / RTVQ): store, merge, inspect and export them.",
        epilog="Run `tvq COMMAND --help` for a command's options. fit, validate, test and predict are "
               "LightningCLI sub-commands configured by YAML (`tvq fit -c configs/finetune_tiny.yaml`; "
               "`--print_config` prints a config that re-runs as is).",
    )
    parser.add_argument("--version", action="version", version=f"tvq_lightning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in CONFIG_COMMANDS.items():  # listed for --help; main() hands them their argv first
        sub.add_parser(name, help=mod.HELP, add_help=False)
    for name, mod in COMMANDS.items():
        mod.add_parser(sub)
    for name in LIGHTNING_COMMANDS:  # listed for --help; main() hands them to LightningCLI first
        sub.add_parser(name, help=LIGHTNING_HELP[name], add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "demo":   # streaming passes return freed tensors' memory to the OS;
        configure_allocator()           # the demo's training would pay for it twice (runtime.py)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return _quiet_on_broken_pipe(run_lightning, argv)
    if argv and argv[0] in CONFIG_COMMANDS:
        command = CONFIG_COMMANDS[argv[0]].main
    else:
        args = build_parser().parse_args(argv)
        command = lambda rest: args.func(args)  # noqa: E731
    try:
        return _quiet_on_broken_pipe(command, argv[1:])
    except TvqError as e:
        print(f"tvq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tvq: interrupted; no output was left half-written", file=sys.stderr)
        return 130


def _quiet_on_broken_pipe(command, argv: list[str]) -> int:
    """Run ``command(argv)``; when stdout's reader has gone (``| head``), stop without a traceback."""
    try:
        rc = int(command(argv) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout without a file descriptor (captured in tests)
            pass
        return 141
