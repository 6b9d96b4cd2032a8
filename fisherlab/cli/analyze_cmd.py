"""``fisherlab analyze [errors] FILE --damping λ [--methods …] --out DIR``: the comparison table
(§4.4) for every checkpoint of a capture file, printed and written as CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

TARGETS = ["errors"]
"""``fisherlab analyze`` sub-targets; ``errors`` is the default when FILE comes first."""


def rewrite_argv(argv: list[str]) -> list[str]:
    """``fisherlab analyze FILE …`` means ``fisherlab analyze errors FILE …``."""
    if len(argv) >= 2 and argv[0] == "analyze" and argv[1] not in TARGETS and not argv[1].startswith("-"):
        return [argv[0], "errors", *argv[1:]]
    return argv


def add_errors_arguments(p: argparse.ArgumentParser) -> None:
    from ..metrics import METHODS

    p.add_argument("file", type=Path, help="HDF5 capture file")
    p.add_argument("--damping", "-l", type=float, default=1e-3, help="λ > 0 (default 1e-3)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", choices=METHODS, help=f"subset of: {' '.join(METHODS)} (default: all)")
    p.add_argument("--checkpoints", nargs="+", metavar="NAME", help="checkpoints to analyse (default: every complete one)")
    p.add_argument("--out", type=Path, default=None, help="folder for errors.csv (default: print only)")
    p.add_argument("--spectral-k", type=int, default=1, help="eigenvectors per layer of the spectral coarse space")
    p.add_argument("--krylov-m", type=int, default=2, help="Krylov block size m")
    p.add_argument("--taylor-q", type=int, default=2, help="Taylor order q")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def errors_main(args: argparse.Namespace) -> int:
    from ..metrics import compare_file

    table = compare_file(
        args.file, args.damping, args.methods, checkpoints=args.checkpoints, progress=not args.quiet,
        k=args.spectral_k, m=args.krylov_m, q=args.taylor_q,
    )
    for meta in table.meta["checkpoints"]:
        rows = [r for r in table.rows if r["checkpoint"] == meta["checkpoint"]]
        from ..metrics import ComparisonTable

        print(f"\n== checkpoint {meta['checkpoint']} (step {meta['step']}) ==")
        print(ComparisonTable(rows, meta).format())
    if args.out is not None:
        path = table.to_csv(Path(args.out) / "errors.csv")
        print(f"\nwrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="offline analysis of a capture file (errors table by default)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    e = targets.add_parser("errors", help="each method's error against the exact natural gradient, per checkpoint")
    add_errors_arguments(e)
    e.set_defaults(func=errors_main)
