#!/usr/bin/env python
"""Small-scale reproduction of the paper's Figs. 2, 4(a) and 5 with a markdown verdict.

Thin script over :mod:`fisherlab.experiments.paper` (the logic, protocol and criteria live there)::

    .venv/bin/python analysis/reproduce_paper.py --out out/reproduce --threads 1   # ~10 min on 2 cores
    .venv/bin/python analysis/reproduce_paper.py --quick --out out/reproduce-quick  # ~30 s

Writes into ``--out``: ``fig2.png/.pdf``, ``fig4a.png/.pdf``, ``fig5.png/.pdf``, the CSVs of every
curve, grid and final loss, ``fig5_gap.csv``, ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.experiments.paper import Criteria, default_config, reproduce


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run :func:`fisherlab.experiments.paper.reproduce`, print the verdicts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/reproduce", help="output folder (default: out/reproduce)")
    ap.add_argument("--quick", action="store_true", help="tiny widths and steps (~30 s; the test suite's run)")
    ap.add_argument("--curves", action="store_true", help="add curves-ae on CURVES to Fig. 2 and Fig. 5")
    ap.add_argument("--no-fig4a", action="store_true", help="skip the deep linear network (Fig. 4(a))")
    ap.add_argument("--fig4a-data", default="fashion-mnist", help="data tried first for Fig. 4(a) (falls back to random-vectors)")
    ap.add_argument("--tune", choices=("kfac", "all"),
                    help="grid-search KFAC only (two-level methods reuse its lr, λ) or every curvature method, "
                    "on every problem (default: 'kfac' on the autoencoders, 'all' on the deep linear network)")
    ap.add_argument("--steps", type=int, help="override the steps of every final run")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 is much faster on a loaded machine)")
    ap.add_argument("--overlay-rtol", type=float, default=Criteria.overlay_rtol, help="criterion (i): relative tolerance to KFAC")
    ap.add_argument("--gain-min", type=float, default=Criteria.gain_min, help="criterion (ii): least median gain")
    ap.add_argument("--gain-max", type=float, default=Criteria.gain_max, help="criterion (ii): largest 'small' median gain")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    cfg = default_config(quick=args.quick, curves=args.curves, fig4a=not args.no_fig4a, fig4a_prefer=args.fig4a_data)
    cfg.seed, cfg.progress = args.seed, not args.no_progress
    problems = cfg.fig2 + ([cfg.fig4a] if cfg.fig4a else [])
    if args.tune is not None:
        cfg.tune = args.tune
        for p in problems:
            p.tune = args.tune
    cfg.criteria = Criteria(overlay_rtol=args.overlay_rtol, gain_min=args.gain_min, gain_max=args.gain_max)
    if args.steps is not None:
        for p in problems:
            p.steps = args.steps
    result = reproduce(cfg, args.out, threads=args.threads)
    for key, v in result.verdicts.items():
        print(f"({key}) {v.label}: {v.summary}")
    print(f"report: {args.out}/report.md  ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
