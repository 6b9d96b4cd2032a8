#!/usr/bin/env python
"""Reproduction of the paper's Figs. 2, 4(a) and 5 with a markdown verdict table.

Thin script over :mod:`fisherlab.experiments.paper` (the logic, protocol and criteria live there)::

    .venv/bin/python analysis/reproduce_paper.py --out out/reproduce --threads 1          # paper settings, ≤ 30 min on 2 cores
    .venv/bin/python analysis/reproduce_paper.py --quick --out out/reproduce-quick        # ~1 min (the test suite's run)
    .venv/bin/python analysis/reproduce_paper.py --settings default --out out/reproduce   # the earlier single-seed run

``--settings paper`` (the default): the paper's units (losses averaged over outputs, the
``mean-loss`` λ), B, λ and Fisher sub-batch of the released run logs, three seeds, the paper's
equations and the released code's protocol side by side, Fig. 5 both ways (true error change vs
the logged gap). Writes into ``--out``: ``report.md`` (the verdict table), ``fig2``, ``fig4a``,
``fig5``, ``fig5_both`` (PNG+PDF), the CSVs (``claims.csv``, ``runs.csv``, ``fig5_both.csv``,
``fig5_divergence.csv``, the curves, grids and finals) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import sys

from fisherlab.experiments.paper import Criteria, default_config, paper_config, reproduce
from fisherlab.experiments.paper.config import PROTOCOLS


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run :func:`fisherlab.experiments.paper.reproduce`, print the verdicts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/reproduce", help="output folder (default: out/reproduce)")
    ap.add_argument("--settings", choices=("paper", "default"), default="paper",
                    help="'paper': the paper's settings, seeds and both protocols (default); 'default': the earlier single-seed run")
    ap.add_argument("--quick", action="store_true", help="tiny widths and steps (~1 min; the test suite's run)")
    ap.add_argument("--curves", action="store_true", help="--settings default: add curves-ae on CURVES to Fig. 2 and Fig. 5")
    ap.add_argument("--no-fig4a", action="store_true", help="skip the deep linear network (Fig. 4(a))")
    ap.add_argument("--no-cuda-convnet", action="store_true", help="--settings paper: skip cuda-convnet's Fig. 5")
    ap.add_argument("--fig4a-data", default="fashion-mnist", help="data tried first for Fig. 4(a) (falls back to random-vectors)")
    ap.add_argument("--tune", choices=("kfac", "all"),
                    help="grid-search KFAC only (two-level methods reuse its lr, λ) or every curvature method, on every problem")
    ap.add_argument("--steps", type=int, help="override the steps of every final run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data subset and (with one seed) of every run (default 0)")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds of the final runs (paper settings: 0 1 2)")
    ap.add_argument("--protocols", nargs="+", choices=PROTOCOLS, help="protocols of the final runs (paper settings: both)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for independent runs (default 1)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 is much faster on a loaded machine)")
    ap.add_argument("--overlay-rtol", type=float, default=Criteria.overlay_rtol, help="criterion (i): relative tolerance to KFAC")
    ap.add_argument("--gain-min", type=float, default=Criteria.gain_min, help="criterion (ii): least median gain")
    ap.add_argument("--gain-max", type=float, default=Criteria.gain_max, help="criterion (ii): largest 'small' median gain")
    ap.add_argument("--closeness-max", type=float, default=Criteria.closeness_max, help="criterion (iv): largest 'much closer' ratio")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    if args.settings == "paper":
        cfg = paper_config(quick=args.quick, fig4a=not args.no_fig4a, fig4a_prefer=args.fig4a_data,
                           seeds=tuple(args.seeds) if args.seeds else None, cuda_convnet=not args.no_cuda_convnet)
    else:
        cfg = default_config(quick=args.quick, curves=args.curves, fig4a=not args.no_fig4a, fig4a_prefer=args.fig4a_data)
        if args.seeds:
            cfg.seeds = tuple(args.seeds)
    cfg.seed, cfg.progress, cfg.jobs = args.seed, not args.no_progress, args.jobs
    if args.protocols:
        cfg.protocols = tuple(args.protocols)
    if args.tune is not None:
        cfg.tune = args.tune
        for p in cfg.problems:
            p.tune = args.tune
    cfg.criteria = Criteria(overlay_rtol=args.overlay_rtol, gain_min=args.gain_min, gain_max=args.gain_max,
                            closeness_max=args.closeness_max)
    if args.steps is not None:
        for p in cfg.problems:
            p.steps = args.steps
    result = reproduce(cfg, args.out, threads=args.threads)
    if result.claims and cfg.settings == "paper":
        for c in result.claims:
            print(f"({c.key}) " + " | ".join(f"{p}: {cell.label}: {cell.text}" for p, cell in c.cells.items()))
    else:
        for key, v in result.verdicts.items():
            print(f"({key}) {v.label}: {v.summary}")
    print(f"report: {args.out}/report.md  ({result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
