"""``fisherlab analyze [errors|spectra|interactions|damping-sweep] FILE …``: offline analysis of a
capture file, one subcommand per driver of :mod:`fisherlab.analysis`.

``fisherlab analyze FILE --damping λ [--methods a,b] --out DIR`` (no target) is ``errors``: the
comparison table of §4.4 for every checkpoint, printed, written as ``errors.csv`` and plotted.
"""

from __future__ import annotations

import argparse


def _targets() -> dict:
    from ..analysis import SUBCOMMANDS

    return SUBCOMMANDS


def rewrite_argv(argv: list[str]) -> list[str]:
    """``fisherlab analyze FILE …`` means ``fisherlab analyze errors FILE …``."""
    if len(argv) >= 2 and argv[0] == "analyze" and argv[1] not in _targets() and not argv[1].startswith("-"):
        return [argv[0], "errors", *argv[1:]]
    return argv


def register(sub: argparse._SubParsersAction) -> None:
    from ..analysis import register_subcommands

    p = sub.add_parser(
        "analyze",
        help="offline analysis of a capture file: errors (default), spectra, interactions, damping-sweep",
        description="Offline analysis of an HDF5 capture file. 'fisherlab analyze FILE ...' runs the errors table.",
    )
    register_subcommands(p.add_subparsers(dest="target", required=True, metavar="TARGET"))
