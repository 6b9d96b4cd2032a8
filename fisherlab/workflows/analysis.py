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

Every driver reads a checkpoint through :func:`fisherlab.planning.jacobian_from_file` (loaded, or
streamed layer by layer when ``memory=`` says the in-memory path does not fit; refused in one line
naming ``--memory`` when neither fits), shares the setup cache beside the file
(:mod:`fisherlab.cache`; ``cache=False`` turns it off, ``cache_dir=`` moves it), and rewrites its
CSV files after each checkpoint (damping), so a stopped run keeps what it finished.

Every driver takes ``scheduler=`` (``"local:4"``, ``"tcp://host:8786"`` or a
``distributed.Client``: :mod:`fisherlab.distributed`): its per-checkpoint (per-damping) work then
runs as pure tasks on Dask workers that read their own slices of the file, and the driver writes
the same CSV files and figures, in the same order, as the serial run.
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
from ..cache import SetupCache
from ..io.tables import write_csv
from ..jacobian import Jacobian
from ..metrics import ComparisonTable, compare, compare_file
from ..planning import FileJacobian, jacobian_from_file
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


def _open(path: str | Path, name: str, *, what: str, memory=None, device=None, precision: str = "float64",
          methods: Sequence[str] = (), cache: bool = False, cache_dir=None) -> tuple[FileJacobian, object]:
    """One checkpoint's Jacobian (in memory or streamed, as the budget allows) and its setup-cache
    entry (``None`` with ``cache=False``), the Jacobian seeded from it."""
    fj = jacobian_from_file(path, name, methods=methods, memory=memory, device=device, precision=precision, what=what)
    entry = SetupCache(path, cache_dir=cache_dir).entry(name, fj.fingerprint, precision) if cache else None
    if entry is not None:
        entry.seed(fj.jac)
    return fj, entry


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
    scheduler=None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
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
        scheduler: run the samples (and, with few samples, their methods) on Dask workers
            (:func:`fisherlab.compare_file`); ``retries`` may be given with it.
        cache, cache_dir: the setup cache (:mod:`fisherlab.cache`; CLI ``--no-cache``, ``--cache-dir``).
        **compare_kw: ``k``, ``m``, ``q`` (spectral, Krylov and Taylor sizes), ``device``,
            ``precision``, ``memory`` and ``stream`` for :func:`fisherlab.compare_file`.

    The CSV files are rewritten after each checkpoint: a stopped run keeps the checkpoints it
    finished.

    Returns:
        The comparison rows (with ``checkpoint``, ``step``, ``damping``); also in ``errors.csv``.
    """
    if not isinstance(damping, Damping):
        resolve_damping(damping)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in _checkpoints(path, checkpoints)]
    done: list[ComparisonTable] = []

    def write(t: ComparisonTable | None = None) -> None:
        if t is not None:
            done.append(t)
        table = ComparisonTable.concat(done)
        table.to_csv(out / "errors.csv")
        table.to_csv(out / "errors_summary.csv", summary=True)
        table.layers_to_csv(out / "errors_layers.csv")
        table.modes_to_csv(out / "errors_modes.csv")

    with warnings.catch_warnings():  # recorded in the table's notes; the CLI prints them once
        warnings.simplefilter("ignore", MeasurementWarning)
        table = compare_file(path, damping, methods, checkpoints=names, progress=progress, scheduler=scheduler,
                             cache=cache, cache_dir=cache_dir, on_checkpoint=write, **compare_kw)
    if not done:
        write()
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
    scheduler=None,
    retries: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
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
            before its setup; the layers are streamed from the file when only that fits).
        cache, cache_dir: the setup cache (:mod:`fisherlab.cache`; not used on Dask workers).
        scheduler, retries: one task per checkpoint on Dask workers (:mod:`fisherlab.distributed`).

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
    options = dict(operators=operators, coarse=coarse, method=method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed,
                   device=device, memory=memory)
    computed = _on_workers(scheduler, retries, "spectra", progress, spectra_task, [(path, i.name, damping, options) for i in infos])
    results: dict[str, dict] = {}
    summary: list[dict] = []
    bar = _bar(len(infos), "spectra", progress and computed is None)
    try:
        for j, info in enumerate(infos):
            bar.set_postfix_str(info.name)
            lam, sp = spectra_task(path, info.name, damping, {**options, "cache": cache, "cache_dir": cache_dir}) if computed is None else computed[j]
            results[info.name] = sp
            for key, s in sp.items():
                summary.append({"checkpoint": info.name, "step": info.step, **s.summary()})
                stored = s if s.values.size <= MAX_VALUES_PER_CSV else s.binned(MAX_VALUES_PER_CSV // 10)
                stored.to_csv(out / f"spectrum_{_safe(info.name)}_{_safe(key)}.csv")
            if figures:
                _close(plots.plot_spectra(sp, out / f"spectra_{_safe(info.name)}", title=f"{info.name}, λ = {lam:g}"))
            write_csv(summary, out / "spectra_summary.csv")  # after each checkpoint
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
    scheduler=None,
    retries: int | None = None,
    device: str | None = None,
    memory: int | str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, tuple]:
    """Layer interactions ρ_ij, KFAC block errors and the off-diagonal share per checkpoint.

    Args:
        path: the HDF5 capture file.
        out: output folder.
        checkpoints: checkpoint names (default: every complete one).
        progress: tqdm bar over checkpoints.
        figures: draw ``interactions_<checkpoint>.*`` and ``kfac_block_errors_<checkpoint>.*``.
        scheduler, retries: one task per checkpoint on Dask workers (:mod:`fisherlab.distributed`).
        device, memory: where the algebra runs; the memory budget (planned per checkpoint; the
            layers are streamed from the file when only that fits).
        cache, cache_dir: the setup cache (:mod:`fisherlab.cache`: the per-layer Grams; not used
            on Dask workers).

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
    options = dict(device=device, memory=memory)
    computed = _on_workers(scheduler, retries, "interactions", progress, interactions_task, [(path, i.name, options) for i in infos])
    bar = _bar(len(infos), "interactions", progress and computed is None)
    try:
        for j, info in enumerate(infos):
            bar.set_postfix_str(info.name)
            li, ke = interactions_task(path, info.name, {**options, "cache": cache, "cache_dir": cache_dir}) if computed is None else computed[j]
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
            write_csv(pair_rows, out / "interactions.csv")  # after each checkpoint
            write_csv(block_rows, out / "kfac_block_errors.csv")
            write_csv(summary, out / "structure_summary.csv")
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
    scheduler=None,
    retries: int | None = None,
    device: str | None = None,
    memory: int | str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
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
        scheduler, retries: one task per damping on Dask workers (:mod:`fisherlab.distributed`);
            they share the checkpoint's Gram K = Σ_i K_i, computed by one task per layer and
            reduced on the client (as the serial sweep shares its Jacobian).
        device, memory: where the algebra runs; the memory budget (planned once; the layers are
            streamed from the file when only that fits).
        cache, cache_dir: the setup cache (:mod:`fisherlab.cache`): Grams, eigenpairs and each
            damping's Woodbury factor (not used on Dask workers).

    Returns:
        The rows (with ``damping``, ``checkpoint``, ``step``); also in ``damping_sweep.csv``,
        rewritten after each damping.
    """
    if dampings is None:
        scale, dampings = SWEEP_DEFAULT[0].scale, SWEEP_DEFAULT[1]
    values = sorted(Damping(d, scale).value for d in dampings)
    if not values:
        raise ConfigError("damping sweep: give at least one damping")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = _checkpoints(path, [checkpoint] if checkpoint else None)[-1]
    if scheduler is not None:
        tables = _sweep_on(scheduler, retries, progress, path, info, [Damping(v, scale) for v in values], methods, device, memory)
    else:
        fj, entry = _open(path, info.name, what="damping sweep", memory=memory, device=device, methods=methods or (),
                          cache=cache, cache_dir=cache_dir)
        jac = fj.jac  # Grams shared across dampings
        tables = []
    bar = _bar(len(values), "damping sweep", progress and scheduler is None)
    try:
        for j, v in enumerate(values):
            d = Damping(v, scale)
            bar.set_postfix_str(str(d))
            if scheduler is None:
                tables.append(sweep_task(jac, d, methods, fj.grad, cache=entry, memory=memory))
            t = tables[j]
            lam = t.meta["damping"]
            rel = t.meta["damping_scales"].get("max", float("nan"))
            for r in t.rows:
                r.update(checkpoint=info.name, step=info.step, damping=lam, damping_value=v, damping_relative=rel)
            ComparisonTable.concat(tables[: j + 1]).to_csv(out / "damping_sweep.csv")  # after each damping
            bar.update(1)
    finally:
        bar.close()
        if scheduler is None:
            fj.close()
    table = ComparisonTable.concat(tables)
    table.to_csv(out / "damping_sweep.csv")
    if figures:
        _close(plots.plot_damping_sweep(table.rows, out / "damping_sweep", title=f"{info.name}: errors against the damping"))
    return table.rows


# ---- tasks: pure functions of (path, checkpoint, damping, options), run here or on Dask workers ----


def spectra_task(path: str | Path, name: str, damping: float | Damping, options: dict) -> tuple[float, dict]:
    """``(λ, {operator: Spectrum})`` of checkpoint ``name`` (read here) for :func:`run_spectra`;
    ``options`` of :func:`fisherlab.spectra.spectra`, and ``cache``/``cache_dir`` (default: off)."""
    opts = dict(options)
    cache, cache_dir = opts.pop("cache", False), opts.pop("cache_dir", None)
    device, memory = opts.pop("device", None), opts.get("memory")
    fj, entry = _open(path, name, what="spectra", memory=memory, device=device, cache=cache, cache_dir=cache_dir)
    try:
        lam = resolve_damping(damping, fj.jac)
        sp = spectra(fj.jac, lam, rhs=fj.grad, **opts)
        if entry is not None:
            entry.save(fj.jac)
    finally:
        fj.close()
    return lam, sp


def interactions_task(path: str | Path, name: str, options: dict | None = None) -> tuple:
    """``(LayerInteractions, KFACBlockErrors)`` of checkpoint ``name`` for :func:`run_interactions`;
    ``options``: ``device``, ``memory``, ``cache``, ``cache_dir`` (default: off)."""
    opts = dict(options or {})
    fj, entry = _open(path, name, what="interactions", memory=opts.get("memory"), device=opts.get("device"),
                      cache=opts.get("cache", False), cache_dir=opts.get("cache_dir"))
    try:
        out = layer_interactions(fj.jac), kfac_block_errors(fj.jac)
        if entry is not None:
            entry.save(fj.jac)
    finally:
        fj.close()
    return out


def sweep_task(source, damping: Damping, methods: Sequence[str] | None, rhs=None, gram=None, cache=None, device=None,
               memory: int | str | None = None) -> ComparisonTable:
    """:func:`fisherlab.compare` of one damping of the sweep: ``source`` a ready Jacobian (with
    ``rhs``), or on a worker ``(path, checkpoint)`` read here (onto ``device``), with ``gram`` its
    reduced K; ``memory``: the budget (it bounds the dense rows compare holds)."""
    if isinstance(source, tuple):
        cap = load(*source)
        source, rhs = Jacobian.coerce(cap, device=device), cap.grad
        if gram is not None:
            source.gram = gram.to(source.device)  # the cached property, set: computed once for the sweep
    with warnings.catch_warnings():  # in the rows' notes
        warnings.simplefilter("ignore", MeasurementWarning)
        return compare(source, damping, methods, rhs=rhs, cache=cache, memory=memory)


def _on_workers(scheduler, retries, desc: str, progress: bool, fn, args: list[tuple]) -> list | None:
    """``[fn(*a) for a in args]`` computed on Dask workers, in order; ``None`` without a scheduler."""
    if scheduler is None:
        return None
    from .. import distributed as dd

    args = [(str(Path(a[0]).resolve()), *a[1:]) for a in args]  # the workers may run elsewhere
    with dd.connect(scheduler) as client:
        return dd.run_tasks(client, [dd.Task(fn, a, label=str(a[1])) for a in args], desc=desc, progress=progress,
                            retries=dd.DEFAULT_RETRIES if retries is None else retries)


def _sweep_on(scheduler, retries, progress: bool, path: str, info, dampings: list[Damping], methods, device=None,
              memory=None) -> list[ComparisonTable]:
    """The sweep's tables on Dask workers: the Gram by layer, reduced here, then one task per damping."""
    from .. import distributed as dd
    from ..metrics import layer_gram, reduced_gram

    path = str(Path(path).resolve())
    retries = dd.DEFAULT_RETRIES if retries is None else retries
    with dd.connect(scheduler) as client:
        grams = dd.run_tasks(client, [dd.Task(layer_gram, (path, info.name, i, {"device": device}), label=f"layer {i}") for i in range(len(info.layers))],
                             desc="grams", progress=progress, retries=retries)
        gram = client.scatter(reduced_gram(grams), broadcast=True)
        return dd.run_tasks(client, [dd.Task(sweep_task, ((path, info.name), d, methods), {"gram": gram, "device": device, "memory": memory}, label=str(d)) for d in dampings],
                            desc="damping sweep", progress=progress, retries=retries)
