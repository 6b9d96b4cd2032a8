"""Every method's errors against the exact natural gradient over the checkpoints of a capture file (the paper's Fig. 5).

Usage::

    python analysis/error_reduction.py FILE --damping 1e-3 [--methods kfac,nicolaides,...] [--checkpoints c1,c2] --out DIR

A thin wrapper over :func:`fisherlab.workflows.analysis.run_error_reduction`
(also ``fisherlab analyze``); see :mod:`fisherlab.workflows.analysis` for the files it writes.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.cli.analyze_cmd import add_error_reduction_arguments, error_reduction_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_error_reduction_arguments(parser)
    return error_reduction_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
