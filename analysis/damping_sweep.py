"""Every method's errors against the damping for one checkpoint.

Usage::

    python analysis/damping_sweep.py FILE [--dampings 1e-4,1e-3,1e-2] [--checkpoint c] [--methods ...] --out DIR

A thin wrapper over :func:`fisherlab.workflows.analysis.run_damping_sweep`
(also ``fisherlab analyze``); see :mod:`fisherlab.workflows.analysis` for the files it writes.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.cli.analyze_cmd import add_damping_sweep_arguments, damping_sweep_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_damping_sweep_arguments(parser)
    return damping_sweep_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
