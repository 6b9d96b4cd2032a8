"""``fisherlab demo``: the main job on the embedded MNIST digits (see :mod:`fisherlab.workflows.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._validate import damping
from ._common import FORMATTER, add_quiet_progress, check_out_folder, progress_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train mnist-ae with KFAC, capture checkpoints, compare every method, spectra, plots, report",
        description="The main job: train → capture (HDF5) → compare with the exact natural gradient → spectra → plots → report.md.",
        formatter_class=FORMATTER,
    )
    p.add_argument("--out", "-o", type=Path, default=Path("out/demo"), metavar="DIR", help="report folder")
    p.add_argument("--tiny", action="store_true", help="a seconds-long run (what the tests run)")
    p.add_argument("--damping", type=float, default=1e-3, help="the analysis damping, in --damping-scale")
    p.add_argument("--damping-scale", default="max", choices=["absolute", "max", "mean", "mean-loss"],
                   help="max: λ = value·λ_max(F) (as in fisherlab analyze)")
    add_quiet_progress(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..workflows.demo import DemoConfig, run_demo

    cfg = DemoConfig.tiny() if args.tiny else DemoConfig()
    cfg.damping = damping(args.damping)
    cfg.damping_scale = args.damping_scale
    run_demo(check_out_folder(args.out), cfg, progress=progress_of(args))
    return 0
