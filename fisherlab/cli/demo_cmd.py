"""``fisherlab demo``: the main job on the embedded MNIST digits (see :mod:`fisherlab.workflows.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._validate import damping
from ._common import FORMATTER, add_quiet_progress, progress_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train mnist-ae with KFAC, capture checkpoints, compare every method, spectra, plots, report",
        description="The main job: train → capture (HDF5) → compare with the exact natural gradient → spectra → plots → report.md.",
        formatter_class=FORMATTER,
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="report folder")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (what the tests run)")
    p.add_argument("--damping", type=float, default=None, help="λ of the analysis (default 1e-3)")
    add_quiet_progress(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..workflows.demo import DemoConfig, run_demo

    cfg = DemoConfig.tiny() if args.tiny else DemoConfig()
    if args.damping is not None:
        cfg.damping = damping(args.damping)
    run_demo(args.out, cfg, progress=progress_of(args))
    return 0
