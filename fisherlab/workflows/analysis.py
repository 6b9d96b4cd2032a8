"""Batch drivers over capture files: error reduction, spectra, layer interactions, damping sweeps.

Each driver reads an HDF5 capture file (:func:`fisherlab.load`), loops over its checkpoints (or
dampings) with a tqdm bar, writes CSV files and figures into an output folder, and returns what
it computed. The ``analysis/*.py`` scripts and the ``fisherlab analyze …`` subcommands
(:mod:`fisherlab.cli.analyze_cmd`, which owns their options) are thin wrappers over them:

| driver | script / subcommand | writes |
|---|---|---|
| :func:`run_error_reduction` | ``error_reduction.py`` / ``errors`` | ``errors.csv`` (every sample), ``errors_summary.csv`` (mean ± 95 % half-width), ``errors_layers.csv``, ``errors_modes.csv``, ``error_reduction.*``, ``method_errors_<ckpt>.*``, ``error_anatomy_<ckpt>.*`` |
| :func:`run_spectra` | ``spectra.py`` / ``spectra`` | ``spectra_summary.csv``, ``spectrum_<ckpt>_<op>.csv``, ``spectra_<ckpt>.*`` |
| :func:`run_interactions` | ``layer_interactions.py`` / ``interactions`` | ``interactions.csv``, ``kfac_block_errors.csv``, ``structure_summary.csv``, ``interactions_<ckpt>.*``, ``kfac_block_errors_<ckpt>.*`` |
| :func:`run_damping_sweep` | ``damping_sweep.py`` / ``damping-sweep`` | ``damping_sweep.csv``, ``damping_sweep.*`` |

(``.*`` = ``.png`` and ``.pdf``.)
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from ..io.progress import tqdm

from .. import plots
from .._validate import parse_enum, positive_int
from ..damping import Damping, DampingScale, resolve_damping
from ..errors import ConfigError, MeasurementWarning
from ..io.tables import write_csv
from ..jacobian import Jacobian
from ..metrics import ComparisonTable, compare, compare_file
from ..spectra import spectra
from ..store import load, select_checkpoints
from ..structure import kfac_block_errors, layer_interactions

__all__ = [
    "MAX_VALUES_PER_CSV",
    "SPECTRUM_METHODS",
    "run_error_reduction",
    "run_spectra",
    "run_interactions",
    "run_damping_sweep",
    "SWEEP_DEFAULT",
]

SWEEP_DEFAULT = Damping(1.0, "max"), [10.0**e for e in range(-8, 1)]
"""The damping sweep's default: λ/λ_max(F) from 1e-8 to 1 (every regime from "only the null space
matters" to "F• ≈ λI")."""

SPECTRUM_METHODS = ("auto", "dense", "lanczos", "slq")
"""The ``method`` values of :func:`run_spectra` (see :func:`fisherlab.spectra.spectra`)."""

MAX_VALUES_PER_CSV = 200_000
"""Spectra with more values are stored binned (:meth:`fisherlab.spectra.Spectrum.binned`)."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _checkpoints(path: str | Path, names: Sequence[str] | None) -> list:
    """The complete checkpoints of ``path`` (:func:`fisherlab.store.select_checkpoints`)."""
    return select_checkpoints(path, names)


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def _close(fig) -> None:
    plt.close(fig)


# ---- drivers ----------------------------------------------------------------------------------


def run_error_reduction(
    path: str | Path,
    damping: float | Damping,
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
        damping: λ > 0, or a :class:`fisherlab.Damping` in the Fisher's scale (resolved per checkpoint).
        out: output folder (created).
        methods: method names of :data:`fisherlab.METHODS` (default: all).
        checkpoints: checkpoint names (default: every complete one).
        progress: show a tqdm bar over checkpoints × methods.
        figures: also draw ``error_reduction.*`` and ``method_errors_<last checkpoint>.*``.
        **compare_kw: ``k``, ``m``, ``q`` (spectral, Krylov and Taylor sizes), ``device``,
            ``precision`` and ``memory`` for :func:`fisherlab.compare`.

    Returns:
        The comparison rows (with ``checkpoint``, ``step``, ``damping``); also in ``errors.csv``.
    """
    if not isinstance(damping, Damping):
        resolve_damping(damping)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in _checkpoints(path, checkpoints)]
    with warnings.catch_warnings():  # recorded in the table's notes; the CLI prints them once
        warnings.simplefilter("ignore", MeasurementWarning)
        table = compare_file(path, damping, methods, checkpoints=names, progress=progress, **compare_kw)
    table.to_csv(out / "errors.csv")
    table.to_csv(out / "errors_summary.csv", summary=True)
    table.layers_to_csv(out / "errors_layers.csv")
    table.modes_to_csv(out / "errors_modes.csv")
    rows = table.rows
    if figures:
        label = str(damping) if isinstance(damping, Damping) else f"λ = {damping:g}"
        _close(plots.plot_error_reduction(rows, out / "error_reduction", title=f"two-level errors over checkpoints, {label}"))
        last = table.rows[-1]["checkpoint"]
        last_rows = [r for r in rows if r.get("checkpoint") == last]
        _close(plots.plot_method_errors(last_rows, out / f"method_errors_{_safe(last)}", title=f"{last}, {label}"))
        _close(plots.plot_error_anatomy(last_rows, out / f"error_anatomy_{_safe(last)}", title=f"where the error lives: {last}, {label}"))
    return rows


def run_spectra(
    path: str | Path,
    damping: float | Damping,
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
    device: str | None = None,
    memory: int | str | None = None,
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
        device, memory: see :func:`fisherlab.spectra.spectra` (the plan is checked per checkpoint,
            before its setup).

    Returns:
        ``{checkpoint: {operator: Spectrum}}``; ``spectra_summary.csv`` holds one row per
        checkpoint and operator, ``spectrum_<checkpoint>_<operator>.csv`` the values (binned
        beyond :data:`MAX_VALUES_PER_CSV`).
    """
    if not isinstance(damping, Damping):
        resolve_damping(damping)
    method = parse_enum(method, SPECTRUM_METHODS, "spectrum method")
    k, n_probes, n_steps = (positive_int(v, w) for v, w in ((k, "k"), (n_probes, "n_probes"), (n_steps, "n_steps")))
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
            lam = resolve_damping(damping, cap)
            sp = spectra(cap, lam, operators=operators, coarse=coarse, method=method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed,
                         device=device, memory=memory)
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
    write_csv(summary, out / "spectra_summary.csv")
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
    write_csv(pair_rows, out / "interactions.csv")
    write_csv(block_rows, out / "kfac_block_errors.csv")
    write_csv(summary, out / "structure_summary.csv")
    return results


def run_damping_sweep(
    path: str | Path,
    dampings: Sequence[float] | None,
    out: str | Path,
    *,
    scale: str | DampingScale = "absolute",
    checkpoint: str | None = None,
    methods: Sequence[str] | None = None,
    progress: bool = True,
    figures: bool = True,
) -> list[dict]:
    """:func:`fisherlab.compare` at several dampings for one checkpoint.

    Args:
        path: the HDF5 capture file.
        dampings: the damping values (each > 0), in ``scale``; ``None``: :data:`SWEEP_DEFAULT`
            (λ/λ_max from 1e-8 to 1).
        out: output folder.
        scale: the :class:`fisherlab.DampingScale` of ``dampings``; every row records the
            absolute λ (``damping``), the value as given (``damping_value``) and λ/λ_max(F)
            (``damping_relative``).
        checkpoint: the checkpoint (default: the last complete one).
        methods: method names (default: all).
        progress: tqdm bar over dampings.
        figures: draw ``damping_sweep.*``.

    Returns:
        The rows (with ``damping``, ``checkpoint``, ``step``); also in ``damping_sweep.csv``.
    """
    if dampings is None:
        scale, dampings = SWEEP_DEFAULT[0].scale, SWEEP_DEFAULT[1]
    values = sorted(Damping(d, scale).value for d in dampings)
    if not values:
        raise ConfigError("damping sweep: give at least one damping")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = _checkpoints(path, [checkpoint] if checkpoint else None)[-1]
    cap = load(path, info.name)
    jac = Jacobian.from_capture(cap)  # Grams shared across dampings
    tables = []
    bar = _bar(len(values), "damping sweep", progress)
    try:
        for v in values:
            d = Damping(v, scale)
            bar.set_postfix_str(str(d))
            with warnings.catch_warnings():  # in the rows' notes
                warnings.simplefilter("ignore", MeasurementWarning)
                t = compare(jac, d, methods, rhs=cap.grad)
            lam = t.meta["damping"]
            rel = t.meta["damping_scales"].get("max", float("nan"))
            for r in t.rows:
                r.update(checkpoint=info.name, step=info.step, damping=lam, damping_value=v, damping_relative=rel)
            tables.append(t)
            bar.update(1)
    finally:
        bar.close()
    table = ComparisonTable.concat(tables)
    table.to_csv(out / "damping_sweep.csv")
    if figures:
        _close(plots.plot_damping_sweep(table.rows, out / "damping_sweep", title=f"{info.name}: errors against the damping"))
    return table.rows
