"""The ``fisherlab`` command line: one module per subcommand, each with ``register(subparsers)``.

Errors that fisherlab raises on purpose (:class:`fisherlab.errors.FisherlabError`, bad
arguments) print as one line, ``fisherlab: error: …``, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import FisherlabError

# subcommand modules, in the order `fisherlab --help` lists them
COMMANDS = [
    "capture_cmd",
    "inspect_cmd",
    "analyze_cmd",
    "demo_cmd",
    "train_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fisherlab",
        description="Capture per-example Jacobians to HDF5 and compare curvature approximations offline.",
    )
    parser.add_argument("--version", action="version", version=f"fisherlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in COMMANDS:
        mod = importlib.import_module(f"{__name__}.{name}")
        if hasattr(mod, "rewrite_argv"):
            argv = mod.rewrite_argv(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FisherlabError, FileNotFoundError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fisherlab: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fisherlab inspect f.h5 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fisherlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
