"""Spectra of F•, F•KFAC, the KFAC-preconditioned operator and (with --coarse) the two-level error operators.

Usage::

    python analysis/spectra.py FILE --damping 1e-3 [--operators fisher,kfac,preconditioned] [--coarse nicolaides,...] [--method auto|dense|lanczos|slq] --out DIR

A thin wrapper over :func:`fisherlab.workflows.analysis.run_spectra`
(also ``fisherlab analyze``); see :mod:`fisherlab.workflows.analysis` for the files it writes.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.cli.analyze_cmd import add_spectra_arguments, spectra_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_spectra_arguments(parser)
    return spectra_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
