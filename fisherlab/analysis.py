"""Batch drivers over capture files: error reduction, spectra, layer interactions, damping sweeps.

Each driver reads an HDF5 capture file (:func:`fisherlab.load`), loops over its checkpoints (or
dampings) with a tqdm bar, writes CSV files and figures into an output folder, and returns what
it computed. The ``analysis/*.py`` scripts and the ``fisherlab analyze …`` subcommands are thin
wrappers over the ``*_main(args)`` functions here, whose options come from the ``add_*_arguments``
functions:

| driver | script / subcommand | writes |
|---|---|---|
| :func:`run_error_reduction` | ``error_reduction.py`` / ``errors`` | ``errors.csv``, ``error_reduction.*``, ``method_errors_<ckpt>.*`` |
| :func:`run_spectra` | ``spectra.py`` / ``spectra`` | ``spectra_summary.csv``, ``spectrum_<ckpt>_<op>.csv``, ``spectra_<ckpt>.*`` |
| :func:`run_interactions` | ``layer_interactions.py`` / ``interactions`` | ``interactions.csv``, ``kfac_block_errors.csv``, ``structure_summary.csv``, ``interactions_<ckpt>.*``, ``kfac_block_errors_<ckpt>.*`` |
| :func:`run_damping_sweep` | ``damping_sweep.py`` / ``damping-sweep`` | ``damping_sweep.csv``, ``damping_sweep.*`` |

(``.*`` = ``.png`` and ``.pdf``.)
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .operators import check_damping

__all__ = [
    "run_error_reduction",
    "run_spectra",
    "run_interactions",
    "run_damping_sweep",
    "add_error_reduction_arguments",
    "add_spectra_arguments",
    "add_interactions_arguments",
    "add_damping_sweep_arguments",
    "error_reduction_main",
    "spectra_main",
    "interactions_main",
    "damping_sweep_main",
    "register_subcommands",
]

MAX_VALUES_PER_CSV = 200_000
"""Spectra with more values are stored binned (:meth:`fisherlab.spectra.Spectrum.binned`)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _checkpoints(path: str | Path, names: Sequence[str] | None) -> list:
    """The complete checkpoints of ``path`` (:func:`fisherlab.store.select_checkpoints`)."""
    from .store import select_checkpoints

    return select_checkpoints(path, names)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---- drivers ----------------------------------------------------------------------------------


def run_error_reduction(
    path: str | Path,
    damping: float,
    out: str | Path,
    *,
    methods: Sequence[str] | None = None,
    checkpoints: Sequence[str] | None = None,
    progress: bool = True,
    figures: bool = True,
    **compare_kw,
) -> list[dict]:
    """:func:`fisherlab.compare` for every checkpoint of a file: the paper's Fig. 5 data.

    Args:
        path: the HDF5 capture file.
        damping: λ > 0.
        out: output folder (created).
        methods: method names of :data:`fisherlab.METHODS` (default: all).
        checkpoints: checkpoint names (default: every complete one).
        progress: show a tqdm bar over checkpoints × methods.
        figures: also draw ``error_reduction.*`` and ``method_errors_<last checkpoint>.*``.
        **compare_kw: ``k``, ``m``, ``q`` (spectral, Krylov and Taylor sizes) for :func:`fisherlab.compare`.

    Returns:
        The comparison rows (with ``checkpoint``, ``step``, ``damping``); also in ``errors.csv``.
    """
    from . import plots
    from .metrics import compare_file

    lam = check_damping(damping)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in _checkpoints(path, checkpoints)]
    table = compare_file(path, lam, methods, checkpoints=names, progress=progress, **compare_kw)
    table.to_csv(out / "errors.csv")
    rows = table.rows
    if figures:
        _close(plots.plot_error_reduction(rows, out / "error_reduction", title=f"two-level errors over checkpoints, λ = {lam:g}"))
        last = names[-1]
        _close(plots.plot_method_errors([r for r in rows if r.get("checkpoint") == last], out / f"method_errors_{_safe(last)}", title=f"{last}, λ = {lam:g}"))
    return rows


def run_spectra(
    path: str | Path,
    damping: float,
    out: str | Path,
    *,
    checkpoints: Sequence[str] | None = None,
    operators: Sequence[str] = ("fisher", "kfac", "preconditioned"),
    coarse: Sequence[str] = (),
    method: str = "auto",
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, dict]:
    """Spectra of F•, F•KFAC, the preconditioned and (optionally) the two-level error operators.

    Args:
        path: the HDF5 capture file.
        damping: λ > 0.
        out: output folder.
        checkpoints: checkpoint names (default: every complete one).
        operators: see :func:`fisherlab.spectra.spectra`.
        coarse: coarse spaces whose error operators to add.
        method: ``"auto"``, ``"dense"``, ``"lanczos"`` or ``"slq"`` (see :func:`fisherlab.spectra.spectra`).
        k, n_probes, n_steps, seed: Lanczos and SLQ parameters.
        progress: tqdm bar over checkpoints.
        figures: draw ``spectra_<checkpoint>.*``.

    Returns:
        ``{checkpoint: {operator: Spectrum}}``; ``spectra_summary.csv`` holds one row per
        checkpoint and operator, ``spectrum_<checkpoint>_<operator>.csv`` the values (binned
        beyond :data:`MAX_VALUES_PER_CSV`).
    """
    from . import plots
    from .spectra import spectra, write_summary_csv
    from .store import load

    lam = check_damping(damping)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = _checkpoints(path, checkpoints)
    results: dict[str, dict] = {}
    summary: list[dict] = []
    bar = _bar(len(infos), "spectra", progress)
    try:
        for info in infos:
            bar.set_postfix_str(info.name)
            cap = load(path, info.name)
            sp = spectra(cap, lam, operators=operators, coarse=coarse, method=method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed)
            results[info.name] = sp
            for key, s in sp.items():
                summary.append({"checkpoint": info.name, "step": info.step, **s.summary()})
                stored = s if s.values.size <= MAX_VALUES_PER_CSV else s.binned(MAX_VALUES_PER_CSV // 10)
                stored.to_csv(out / f"spectrum_{_safe(info.name)}_{_safe(key)}.csv")
            if figures:
                _close(plots.plot_spectra(sp, out / f"spectra_{_safe(info.name)}", title=f"{info.name}, λ = {lam:g}"))
            bar.update(1)
    finally:
        bar.close()
    write_summary_csv(summary, out / "spectra_summary.csv")
    return results


def run_interactions(
    path: str | Path,
    out: str | Path,
    *,
    checkpoints: Sequence[str] | None = None,
    progress: bool = True,
    figures: bool = True,
) -> dict[str, tuple]:
    """Layer interactions ρ_ij, KFAC block errors and the off-diagonal share per checkpoint.

    Args:
        path: the HDF5 capture file.
        out: output folder.
        checkpoints: checkpoint names (default: every complete one).
        progress: tqdm bar over checkpoints.
        figures: draw ``interactions_<checkpoint>.*`` and ``kfac_block_errors_<checkpoint>.*``.

    Returns:
        ``{checkpoint: (LayerInteractions, KFACBlockErrors)}``; CSV: ``interactions.csv`` (one
        row per checkpoint and layer pair), ``kfac_block_errors.csv``, ``structure_summary.csv``.
    """
    import csv

    from . import plots
    from .jacobian import Jacobian
    from .spectra import write_summary_csv
    from .store import load
    from .structure import kfac_block_errors, layer_interactions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    infos = _checkpoints(path, checkpoints)
    results: dict[str, tuple] = {}
    pair_rows: list[dict] = []
    block_rows: list[dict] = []
    summary: list[dict] = []
    bar = _bar(len(infos), "interactions", progress)
    try:
        for info in infos:
            bar.set_postfix_str(info.name)
            cap = load(path, info.name)
            jac = Jacobian.from_capture(cap)
            li, ke = layer_interactions(jac), kfac_block_errors(jac)
            ctx = {"checkpoint": info.name, "step": info.step}
            li.meta.update(ctx)
            ke.meta.update(ctx)
            results[info.name] = (li, ke)
            rho = li.rho
            for i in range(len(li.names)):
                for j in range(len(li.names)):
                    pair_rows.append({**ctx, "i": i, "j": j, "layer_i": li.names[i], "layer_j": li.names[j], "norm2": float(li.norms2[i, j]), "rho": float(rho[i, j])})
            block_rows += ke.rows()
            summary.append({**li.summary(), "mean_kfac_block_error": float(np.nanmean(ke.relative_error))})
            if figures:
                _close(plots.plot_interactions(li, out / f"interactions_{_safe(info.name)}"))
                _close(plots.plot_kfac_block_errors(ke, out / f"kfac_block_errors_{_safe(info.name)}", title=f"KFAC block errors, {info.name}"))
            bar.update(1)
    finally:
        bar.close()
    for name, rows in (("interactions.csv", pair_rows), ("kfac_block_errors.csv", block_rows)):
        with (out / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    write_summary_csv(summary, out / "structure_summary.csv")
    return results


def run_damping_sweep(
    path: str | Path,
    dampings: Sequence[float],
    out: str | Path,
    *,
    checkpoint: str | None = None,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    figures: bool = True,
) -> list[dict]:
    """:func:`fisherlab.compare` at several dampings for one checkpoint.

    Args:
        path: the HDF5 capture file.
        dampings: the λ values (each > 0).
        out: output folder.
        checkpoint: the checkpoint (default: the last complete one).
        methods: method names (default: all).
        progress: tqdm bar over dampings.
        figures: draw ``damping_sweep.*``.

    Returns:
        The rows (with ``damping``, ``checkpoint``, ``step``); also in ``damping_sweep.csv``.
    """
    from . import plots
    from .jacobian import Jacobian
    from .metrics import ComparisonTable, compare
    from .store import load

    lams = sorted(check_damping(d) for d in dampings)
    if not lams:
        raise ValueError("damping sweep: give at least one damping")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = _checkpoints(path, [checkpoint] if checkpoint else None)[-1]
    cap = load(path, info.name)
    jac = Jacobian.from_capture(cap)  # Grams shared across dampings
    tables = []
    bar = _bar(len(lams), "damping sweep", progress)
    try:
        for lam in lams:
            bar.set_postfix_str(f"λ = {lam:g}")
            t = compare(jac, lam, methods, rhs=cap.grad)
            for r in t.rows:
                r.update(checkpoint=info.name, step=info.step, damping=lam)
            tables.append(t)
            bar.update(1)
    finally:
        bar.close()
    table = ComparisonTable.concat(tables)
    table.to_csv(out / "damping_sweep.csv")
    if figures:
        _close(plots.plot_damping_sweep(table.rows, out / "damping_sweep", title=f"{info.name}: errors against the damping"))
    return table.rows


# ---- command-line glue ------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, *, file: bool = True) -> None:
    if file:
        parser.add_argument("file", type=Path, help="HDF5 capture file")
    parser.add_argument("--out", type=Path, required=True, help="output folder for CSV files and figures")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="write CSV files only")


def _csv_list(s: str) -> list[str]:
    return [x for x in (t.strip() for t in s.split(",")) if x]


def add_error_reduction_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``error_reduction``: FILE --damping λ [--methods a,b] [--checkpoints c1,c2] --out DIR."""
    _add_common(parser)
    parser.add_argument("--damping", type=float, default=1e-3, help="λ > 0 (default 1e-3)")
    parser.add_argument("--methods", type=_csv_list, default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    parser.add_argument("--spectral-k", type=int, default=1, help="eigenvectors per layer of the spectral coarse space (default 1)")
    parser.add_argument("--krylov-m", type=int, default=2, help="Krylov block size m (default 2)")
    parser.add_argument("--taylor-q", type=int, default=2, help="Taylor order q (default 2)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    return parser


def add_spectra_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``spectra``: FILE --damping λ [--operators …] [--coarse …] [--method …] --out DIR."""
    _add_common(parser)
    parser.add_argument("--damping", type=float, required=True, help="λ > 0")
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    parser.add_argument("--operators", type=_csv_list, default=["fisher", "kfac", "preconditioned"], help="comma-separated: fisher, kfac, kfac-tikhonov, preconditioned")
    parser.add_argument("--coarse", type=_csv_list, default=[], help="coarse spaces whose two-level error operators to add")
    parser.add_argument("--method", default="auto", choices=["auto", "dense", "lanczos", "slq"], help="for the preconditioned/error operators")
    parser.add_argument("--k", type=int, default=6, help="Lanczos: eigenvalues per end")
    parser.add_argument("--probes", dest="n_probes", type=int, default=16, help="SLQ probes")
    parser.add_argument("--steps", dest="n_steps", type=int, default=64, help="SLQ Lanczos steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def add_interactions_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``interactions``: FILE [--checkpoints c1,c2] --out DIR."""
    _add_common(parser)
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    return parser


def _dampings(s: str) -> list[float]:
    return [float(x) for x in _csv_list(s)]


def add_damping_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``damping-sweep``: FILE --dampings 1e-4,1e-3,… [--checkpoint c] [--methods …] --out DIR."""
    _add_common(parser)
    parser.add_argument("--dampings", type=_dampings, default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], help="comma-separated λ values")
    parser.add_argument("--checkpoint", default=None, help="checkpoint name (default: the last one)")
    parser.add_argument("--methods", type=_csv_list, default=None, help="comma-separated methods (default: all)")
    return parser


def error_reduction_main(args: argparse.Namespace) -> int:
    from .metrics import ComparisonTable

    rows = run_error_reduction(
        args.file, args.damping, args.out, methods=args.methods, checkpoints=args.checkpoints,
        progress=args.progress, figures=args.figures, k=args.spectral_k, m=args.krylov_m, q=args.taylor_q,
    )
    if not args.quiet:
        for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
            sub = [r for r in rows if r["checkpoint"] == ckpt]
            print(f"\n== checkpoint {ckpt} (step {sub[0]['step']}), λ = {args.damping:g} ==")
            print(ComparisonTable(sub).format())
    print(f"{len(rows)} rows → {args.out / 'errors.csv'}")
    return 0


def spectra_main(args: argparse.Namespace) -> int:
    res = run_spectra(
        args.file, args.damping, args.out, checkpoints=args.checkpoints, operators=args.operators, coarse=args.coarse,
        method=args.method, k=args.k, n_probes=args.n_probes, n_steps=args.n_steps, seed=args.seed,
        progress=args.progress, figures=args.figures,
    )
    for ck, sp in res.items():
        for s in sp.values():
            print(f"{ck}: {s}")
    return 0


def interactions_main(args: argparse.Namespace) -> int:
    res = run_interactions(args.file, args.out, checkpoints=args.checkpoints, progress=args.progress, figures=args.figures)
    for ck, (li, ke) in res.items():
        print(f"{ck}: off-diagonal share of ‖F‖²_F {li.off_diagonal_share:.3f}; KFAC block errors "
              + ", ".join(f"{e:.3f}" for e in ke.relative_error))
    return 0


def damping_sweep_main(args: argparse.Namespace) -> int:
    rows = run_damping_sweep(args.file, args.dampings, args.out, checkpoint=args.checkpoint, methods=args.methods, progress=args.progress, figures=args.figures)
    print(f"{len(rows)} rows → {args.out / 'damping_sweep.csv'}")
    return 0


SUBCOMMANDS = {
    "errors": (add_error_reduction_arguments, error_reduction_main, "every method's errors over the checkpoints (Fig. 5)"),
    "spectra": (add_spectra_arguments, spectra_main, "spectra of F•, KFAC, the preconditioned and error operators"),
    "interactions": (add_interactions_arguments, interactions_main, "layer-interaction map and KFAC block errors"),
    "damping-sweep": (add_damping_sweep_arguments, damping_sweep_main, "errors against the damping"),
}
"""``name → (add_arguments, main, help)`` for ``fisherlab analyze <name>``."""


def register_subcommands(subparsers) -> None:
    """Add ``errors``, ``spectra``, ``interactions`` and ``damping-sweep`` to an argparse
    subparsers object; each sets ``func`` to its ``*_main``."""
    for name, (add, main, help_) in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=main)
