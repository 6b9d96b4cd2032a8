"""The ``fisherlab`` command line: one module per subcommand, each with ``register(subparsers)``.

Errors that fisherlab raises on purpose (:class:`fisherlab.errors.FisherlabError`: bad
arguments, missing files, unusable captures) print as one line, ``fisherlab: error: …``, exit
status 2, no traceback; argparse's own usage errors exit 2 too. Any other exception is a bug and
shows its traceback. ``--traceback`` shows it for FisherlabErrors as well.

The subcommands import the library inside their handlers, so that building the parser stays
cheap; the import-order test (tests/test_imports.py) checks those imports like any other.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .._version import __version__
from ..errors import FisherlabError

__all__ = ["COMMANDS", "build_parser", "main"]

# subcommand modules, in the order `fisherlab --help` lists them
COMMANDS = [
    "capture_cmd",
    "inspect_cmd",
    "analyze_cmd",
    "demo_cmd",
    "train_cmd",
]


def _command(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherlab", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Capture per-example Jacobians to HDF5 and compare curvature approximations offline.",
    )
    parser.add_argument("--version", action="version", version=f"fisherlab {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the traceback of every error (by default fisherlab's own errors print one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _command(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fisherlab ARGV``; returns the exit status (0; 2 for an error; 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    lead = [a for a in argv[:1] if a == "--traceback"]  # `fisherlab --traceback analyze FILE …`
    rest = argv[len(lead):]
    for name in COMMANDS:
        rewrite = getattr(_command(name), "rewrite_argv", None)
        if rewrite is not None:
            rest = rewrite(rest)
    args = parser.parse_args(lead + rest)
    try:
        return int(args.func(args) or 0)
    except FisherlabError as err:
        if args.traceback:
            raise
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fisherlab: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fisherlab inspect f.h5 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fisherlab: interrupted", file=sys.stderr)
        return 130
