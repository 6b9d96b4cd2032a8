"""Layer-interaction map rho_ij, KFAC block errors and the off-diagonal share of the Fisher.

Usage::

    python analysis/layer_interactions.py FILE [--checkpoints c1,c2] --out DIR

A thin wrapper over :func:`fisherlab.workflows.analysis.run_interactions`
(also ``fisherlab analyze``); see :mod:`fisherlab.workflows.analysis` for the files it writes.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.cli.analyze_cmd import add_interactions_arguments, interactions_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_interactions_arguments(parser)
    return interactions_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
