"""``fisherlab analyze [errors|spectra|interactions|damping-sweep] FILE …``: offline analysis of a
capture file, one subcommand per driver of :mod:`fisherlab.workflows.analysis`.

``fisherlab analyze FILE [--damping λ] [--methods a,b] [--out DIR]`` (no target) is ``errors``: the
comparison table of §4.4 for every checkpoint, printed, written as ``errors.csv`` and plotted.

Every subcommand takes the same common options: ``--out`` (default: a folder named after the
file, ``runs/ae.h5`` → ``runs/ae.analysis/``), ``--quiet`` (no progress bar and no tables),
``--progress/--no-progress`` (default: a bar only when stderr is a terminal), ``--no-figures``;
``--scheduler local:4`` / ``--scheduler tcp://host:8786`` (with ``--retries``) runs the work as
tasks on Dask workers (:mod:`fisherlab.distributed`; ``pip install "fisherlab[distributed]"``);
``errors`` and ``spectra`` share ``--damping 1e-3 --damping-scale max``.

The options of each driver (``add_*_arguments``) and its command (``*_main``) are here; the
``analysis/*.py`` scripts build their parsers from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._validate import parse_enum, positive_int
from ..errors import ConfigError
from ..io.tables import fmt
from ._common import FORMATTER, check_device, check_out_folder, progress_of

__all__ = [
    "SUBCOMMANDS",
    "add_error_reduction_arguments",
    "add_spectra_arguments",
    "add_interactions_arguments",
    "add_damping_sweep_arguments",
    "error_reduction_main",
    "spectra_main",
    "interactions_main",
    "damping_sweep_main",
    "register_subcommands",
    "register",
    "rewrite_argv",
]

SPECTRUM_METHODS = ("auto", "dense", "lanczos", "slq")  # = fisherlab.workflows.analysis.SPECTRUM_METHODS
SPECTRUM_OPERATORS = ("fisher", "kfac", "kfac-tikhonov", "preconditioned")


# ---- argument types (argparse turns a ValueError/ArgumentTypeError into its usage error) --------


def _csv_list(s: str) -> list[str]:
    return [x for x in (t.strip() for t in s.split(",")) if x]


def _dampings(s: str) -> list[float]:
    try:
        return [float(x) for x in _csv_list(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


COARSE_SIZE_MAX = 64
"""Bound of --spectral-k, --krylov-m, --taylor-q: each adds one p_i-vector per layer to R_0 (at
p_i ≈ 3e6 that is 24 MB a column; an unbounded value once asked for 49 GB)."""


def _count(what: str, max_: int | None = None):
    def parse(s: str) -> int:
        try:
            return positive_int(int(s), what, max=max_)
        except ValueError as err:  # int() or ConfigError
            raise argparse.ArgumentTypeError(str(err) if isinstance(err, ConfigError) else f"{what} must be a positive integer, got {s!r}") from None

    parse.__name__ = what
    return parse


def _damping_of(args: argparse.Namespace):
    """``--damping`` in ``--damping-scale`` as a :class:`fisherlab.Damping` (one-line error if bad)."""
    from ..damping import Damping

    return Damping(args.damping, args.damping_scale)


def _add_damping(parser: argparse.ArgumentParser, default: float | None) -> None:
    from ..damping import DampingScale

    parser.add_argument("--damping", type=float, default=default, required=default is None,
                        help="the damping value, in --damping-scale")
    parser.add_argument("--damping-scale", default="max", choices=[s.value for s in DampingScale],
                        help="max: λ = value·λ_max(F); mean: value·tr F/rank F; mean-loss: value for the loss averaged "
                             "over its outputs (the paper's units); absolute: λ = value")


def default_out(file: Path) -> Path:
    """``--out`` when not given: a folder named after the capture file (``runs/ae.h5`` → ``runs/ae.analysis/``)."""
    return Path(file).with_suffix(".analysis")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="HDF5 capture file")
    parser.add_argument("--out", "-o", type=Path, default=None,
                        help="output folder for CSV files and figures (default: FILE without its suffix + .analysis, "
                        "e.g. runs/ae.h5 → runs/ae.analysis/)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no tables")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="force the progress bar on or off (default: on when stderr is a terminal, unless --quiet)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="write CSV files only")
    parser.add_argument("--scheduler", default=None,
                        help="run the tasks on Dask: local:N (a local cluster of N worker processes) or the address of a running "
                             "scheduler, tcp://host:8786, whose workers see FILE at the same path (needs fisherlab[distributed])")
    parser.add_argument("--retries", type=_nonnegative, default=None,
                        help="with --scheduler: retries of a task that raised (default: 2; a task whose worker died is rescheduled anyway)")


def _nonnegative(s: str) -> int:
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"--retries must be an integer ≥ 0, got {s!r}")
    return int(s)


def _resolve(args: argparse.Namespace) -> tuple[Path, bool]:
    """``(out, progress)`` of the common options."""
    out = args.out if args.out is not None else default_out(args.file)
    args.out = out = check_out_folder(out)
    check_device(getattr(args, "device", None))
    if getattr(args, "scheduler", None) is not None:  # a bad value, or no dask, fails before any work
        from ..distributed import check

        check(args.scheduler)
    return out, progress_of(args)


# ---- options -------------------------------------------------------------------------------


def _add_resources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="torch device of the offline algebra, e.g. cuda or cpu (default: cpu; float64)")
    parser.add_argument("--memory", default=None, metavar="SIZE",
                        help="memory budget, e.g. 8GiB: the analysis is planned first; the layers are streamed from FILE one at a "
                             "time when only that fits, and it is refused in one line when neither fits (default: no budget, no plan)")
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="neither read nor write the setup cache (Grams, eigendecompositions) beside FILE")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the setup cache under this folder instead of beside FILE (FILE.cache/)")


def _resources(args: argparse.Namespace) -> dict:
    """``device``, ``memory``, ``cache``, ``cache_dir`` of :func:`_add_resources` for the drivers."""
    return dict(device=args.device, memory=args.memory, cache=args.cache, cache_dir=args.cache_dir)


def add_error_reduction_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``errors``: FILE --damping λ [--methods a,b] [--checkpoints c1,c2] --out DIR."""
    _add_common(parser)
    _add_damping(parser, 1e-3)
    _add_resources(parser)
    parser.add_argument("--methods", type=_csv_list, default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    parser.add_argument("--spectral-k", type=_count("--spectral-k", COARSE_SIZE_MAX), default=1, help="eigenvectors per layer of the spectral coarse space")
    parser.add_argument("--krylov-m", type=_count("--krylov-m", COARSE_SIZE_MAX), default=2, help="Krylov block size m")
    parser.add_argument("--taylor-q", type=_count("--taylor-q", COARSE_SIZE_MAX), default=2, help="Taylor order q")
    return parser


def add_spectra_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``spectra``: FILE --damping λ [--operators …] [--coarse …] [--method …] --out DIR."""
    _add_common(parser)
    _add_damping(parser, 1e-3)
    _add_resources(parser)
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    parser.add_argument("--operators", type=_csv_list, default=["fisher", "kfac", "preconditioned"], help=f"comma-separated: {', '.join(SPECTRUM_OPERATORS)}")
    parser.add_argument("--coarse", type=_csv_list, default=[], help="coarse spaces whose two-level error operators to add")
    parser.add_argument("--method", default="auto", choices=list(SPECTRUM_METHODS), help="for the preconditioned/error operators")
    parser.add_argument("--k", type=_count("--k"), default=6, help="Lanczos: eigenvalues per end")
    parser.add_argument("--probes", dest="n_probes", type=_count("--probes"), default=16, help="SLQ probes")
    parser.add_argument("--steps", dest="n_steps", type=_count("--steps"), default=64, help="SLQ Lanczos steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Lanczos/SLQ probes")
    return parser


def add_interactions_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``interactions``: FILE [--checkpoints c1,c2] --out DIR."""
    _add_common(parser)
    _add_resources(parser)
    parser.add_argument("--checkpoints", type=_csv_list, default=None, help="comma-separated checkpoint names (default: all)")
    return parser


def add_damping_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``damping-sweep``: FILE --dampings 1e-4,1e-3,… [--checkpoint c] [--methods …] --out DIR."""
    _add_common(parser)
    _add_resources(parser)
    parser.add_argument("--dampings", type=_dampings, default=None,
                        help="comma-separated damping values in --damping-scale (default: λ/λ_max = 1e-8, 1e-7, …, 1)")
    parser.add_argument("--damping-scale", default="max", choices=["absolute", "max", "mean", "mean-loss"],
                        help="the scale of --dampings")
    parser.add_argument("--checkpoint", default=None, help="checkpoint name (default: the last one)")
    parser.add_argument("--methods", type=_csv_list, default=None, help="comma-separated methods (default: all)")
    return parser


# ---- commands ------------------------------------------------------------------------------


def error_reduction_main(args: argparse.Namespace) -> int:
    from ..metrics import ComparisonTable
    from ..workflows.analysis import run_error_reduction

    out, progress = _resolve(args)
    damping = _damping_of(args)
    rows = run_error_reduction(
        args.file, damping, out, methods=args.methods, checkpoints=args.checkpoints,
        progress=progress, figures=args.figures, k=args.spectral_k, m=args.krylov_m, q=args.taylor_q,
        scheduler=args.scheduler, retries=args.retries, **_resources(args),
    )
    if not args.quiet:
        for ckpt in dict.fromkeys(r["checkpoint"] for r in rows):
            sub = [r for r in rows if r["checkpoint"] == ckpt]
            print(f"\n== checkpoint {ckpt} (step {sub[0]['step']}), {damping}: λ = {sub[0]['damping']:g} ==")
            print(ComparisonTable(sub).format())
    print(f"{len(rows)} rows → {args.out / 'errors.csv'}")
    return 0


def spectra_main(args: argparse.Namespace) -> int:
    from ..operators import COARSE_SPACES
    from ..workflows.analysis import run_spectra

    operators = [parse_enum(o, SPECTRUM_OPERATORS, "--operators") for o in args.operators]
    coarse = [parse_enum(c, COARSE_SPACES, "--coarse") for c in args.coarse]
    out, progress = _resolve(args)
    res = run_spectra(
        args.file, _damping_of(args), out, checkpoints=args.checkpoints, operators=operators, coarse=coarse,
        method=parse_enum(args.method, SPECTRUM_METHODS, "--method"), k=args.k, n_probes=args.n_probes,
        n_steps=args.n_steps, seed=args.seed, progress=progress, figures=args.figures,
        scheduler=args.scheduler, retries=args.retries, **_resources(args),
    )
    if not args.quiet:
        for ck, sp in res.items():
            for s in sp.values():
                print(f"{ck}: {s}")
    print(f"{sum(map(len, res.values()))} spectra → {out}")
    return 0


def interactions_main(args: argparse.Namespace) -> int:
    from ..workflows.analysis import run_interactions

    out, progress = _resolve(args)
    res = run_interactions(args.file, out, checkpoints=args.checkpoints, progress=progress, figures=args.figures,
                           scheduler=args.scheduler, retries=args.retries, **_resources(args))
    for ck, (li, ke) in res.items():
        if args.quiet:
            continue
        print(f"{ck}: off-diagonal share of ‖F‖²_F {fmt(li.off_diagonal_share, '.3f')}; KFAC block errors "
              + ", ".join(fmt(e, ".3f") for e in ke.relative_error))
    print(f"{len(res)} checkpoint(s) → {out}")
    return 0


def damping_sweep_main(args: argparse.Namespace) -> int:
    from ..workflows.analysis import run_damping_sweep

    out, progress = _resolve(args)
    rows = run_damping_sweep(args.file, args.dampings, out, scale=args.damping_scale, checkpoint=args.checkpoint, methods=args.methods,
                             progress=progress, figures=args.figures, scheduler=args.scheduler, retries=args.retries,
                             **_resources(args))
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
        p = subparsers.add_parser(name, help=help_, description=help_, formatter_class=FORMATTER)
        add(p)
        p.set_defaults(func=_reporting_skipped(main))


def _reporting_skipped(main):
    """Run ``main``; then, when the file holds checkpoints that are not complete (a stopped writer)
    or damaged, say which on stderr and exit 1: the results cover only the complete ones."""

    def run(args: argparse.Namespace) -> int:
        import sys

        from ..store import list_checkpoints

        rc = main(args)
        skipped = [c for c in list_checkpoints(args.file) if not c.complete]
        if skipped and rc == 0:
            what = ", ".join(f"'{c.name}' ({c.status})" for c in skipped)
            print(f"fisherlab analyze: {args.file}: skipped {len(skipped)} checkpoint(s) that are not complete: {what}",
                  file=sys.stderr)
            return 1
        return rc

    run.__name__ = main.__name__
    run.__doc__ = main.__doc__
    return run


def rewrite_argv(argv: list[str]) -> list[str]:
    """``fisherlab analyze FILE …`` means ``fisherlab analyze errors FILE …``."""
    if len(argv) >= 2 and argv[0] == "analyze" and argv[1] not in SUBCOMMANDS and not argv[1].startswith("-"):
        return [argv[0], "errors", *argv[1:]]
    return argv


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="offline analysis of a capture file: errors (default), spectra, interactions, damping-sweep",
        description="Offline analysis of an HDF5 capture file. 'fisherlab analyze FILE ...' runs the errors table.",
        formatter_class=FORMATTER,
    )
    register_subcommands(p.add_subparsers(dest="target", required=True, metavar="TARGET"))
