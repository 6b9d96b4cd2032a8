"""Figures from metric tables, spectra and structure results (no computation here).

One style (:func:`set_style`, applied inside every function through :func:`style`), one fixed
colour per method under the paper's legend names (:data:`COLORS`), and one convention: every
function returns its :class:`matplotlib.figure.Figure` and, given ``path``, also writes
``<path>.png`` and ``<path>.pdf`` (:func:`save_figure`).

Metric tables are lists of row dicts as produced by :func:`fisherlab.compare` (keys ``method``,
``legend``, ``energy_error``, ``relative_error``, ``reduction_ratio``, ``gap``,
``euclidean_relative_error``, ``cosine``, …, and over files ``checkpoint``, ``step``,
``damping``), a :class:`~fisherlab.metrics.ComparisonTable`, or the CSV it writes (numbers are
parsed back from strings). Missing values (``None``, empty, NaN: methods reported n/a) are left
out of the plots.

| function | figure |
|---|---|
| :func:`plot_error_reduction` | the paper's Fig. 5: gap 𝔈(β*) − 𝔈(0) and ratio 𝔈/𝔈_KFAC vs training step |
| :func:`plot_method_errors` | relative F•-norm and Euclidean errors per method at one checkpoint (dots ± 95 %) |
| :func:`plot_error_anatomy` | each error split into the span of U and its null space |
| :func:`plot_spectra` | overlaid densities and cumulative distributions of spectra |
| :func:`plot_interactions` | heatmap of ρ_ij |
| :func:`plot_kfac_block_errors` | bars of ‖F_ii − A⊗G‖/‖F_ii‖ per layer |
| :func:`plot_damping_sweep` | errors against λ (log-log), one line per method |
| :func:`plot_training_curves` | the paper's Figs. 2 and 4(a): training loss per optimizer |
| :func:`plot_gap_trajectories` | the paper's Fig. 5 on the KFAC trajectory and on each optimizer's own |
"""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from . import methods as registry
from .intervals import mean_interval

__all__ = [
    "COLORS",
    "METHOD_LEGENDS",
    "MARKERS",
    "set_style",
    "style",
    "color_for",
    "legend_for",
    "save_figure",
    "read_rows",
    "plot_error_reduction",
    "plot_method_errors",
    "plot_error_anatomy",
    "plot_spectra",
    "plot_interactions",
    "plot_kfac_block_errors",
    "plot_damping_sweep",
    "plot_training_curves",
    "plot_gap_trajectories",
]

_OPERATORS = {  # operators of the spectra that are not methods: key → (legend, colour, marker)
    "fisher": ("EXACT", "#000000", ""),
    "preconditioned": ("PRECONDITIONED", "#17becf", ""),  # tab20 cyan
}

METHOD_LEGENDS: dict[str, str] = {
    **{k: m.legend for k, m in registry.METHODS.items()},
    **{k: v[0] for k, v in _OPERATORS.items()},
}
"""Method (or operator) key → legend, from :mod:`fisherlab.methods`."""

COLORS: dict[str, str] = {
    **{m.legend: m.colour for m in registry.METHODS.values()},
    **{lg: c for lg, c, _ in registry.BASELINES.values()},
    **{lg: c for lg, c, _ in _OPERATORS.values()},
}
"""Legend name → colour, fixed across every figure (from :mod:`fisherlab.methods`)."""

MARKERS: dict[str, str] = {
    **{m.legend: m.marker for m in registry.METHODS.values()},
    **{lg: mk for lg, _, mk in registry.BASELINES.values()},
    **{lg: mk for lg, _, mk in _OPERATORS.values()},
}
"""Legend name → marker (from :mod:`fisherlab.methods`)."""

_RC = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "pdf.fonttype": 42,
}


def set_style() -> None:
    """Apply fisherlab's plotting style globally (seaborn ``whitegrid``/``paper`` plus a few rc)."""
    sns.set_theme(context="paper", style="whitegrid", rc=_RC)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """fisherlab's style for the figures made inside the block; the global style is restored.

    The interactive switch is *not* rolled back: resolving matplotlib's automatic backend (the
    first figure of a fresh Jupyter kernel selects the inline backend) turns interactive mode on,
    and ``rc_context`` would turn it off again on exit, so that every later figure of the kernel
    stays undisplayed. The backend is resolved before the block, and the interactive state at the
    end of the block is kept.
    """
    matplotlib.get_backend()  # resolve the auto backend (and its interactive switch) outside the block
    interactive = matplotlib.is_interactive()
    try:
        with plt.rc_context():
            set_style()
            try:
                yield
            finally:
                interactive = matplotlib.is_interactive()
    finally:
        matplotlib.interactive(interactive)


def legend_for(key: str) -> str:
    """Legend name of a method/operator/optimizer key (``"nicolaides"`` → ``"NICO"``); legends map to themselves."""
    if key in COLORS:
        return key
    if key in _OPERATORS:
        return _OPERATORS[key][0]
    return registry.legend(key)


def color_for(key: str) -> str:
    """The fixed colour of a method, operator or legend name (dark grey for unknown keys)."""
    return COLORS.get(legend_for(key), "#444444")


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``fig`` as PNG and PDF next to each other (``path`` with or without a suffix)."""
    p = Path(path)
    if p.suffix.lower() in (".png", ".pdf"):
        p = p.with_suffix("")
    p.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        q = p.with_name(p.name + "." + ext)
        fig.savefig(q)
        out.append(q)
    return out


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


# ---- rows -------------------------------------------------------------------------------------


def _num(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        if s == "" or s.lower() in ("none", "nan", "n/a"):
            return None
        try:
            f = float(s)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in s and "e" not in s.lower() else f
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def read_rows(source: Any) -> list[dict]:
    """Row dicts from a list of dicts, an object with ``.rows`` (``ComparisonTable``) or a CSV
    path; numeric strings become numbers, empty/NaN become ``None``."""
    if isinstance(source, (str, Path)):
        with Path(source).open(newline="") as f:
            rows: Iterable[Mapping] = list(csv.DictReader(f))
    elif hasattr(source, "rows"):
        rows = source.rows
    else:
        rows = source
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


def _methods(rows: Sequence[dict], methods: Sequence[str] | None, exclude: Sequence[str] = ()) -> list[str]:
    seen: list[str] = []
    for r in rows:
        m = r.get("method")
        if m is not None and m not in seen and m not in exclude:
            seen.append(m)
    if methods is not None:
        return [m for m in methods if m in seen]
    return seen


def _label(rows: Sequence[dict], method: str) -> str:
    for r in rows:
        if r.get("method") == method and r.get("legend"):
            return str(r["legend"])
    return legend_for(method)


def _series(rows: Sequence[dict], method: str, x: str, y: str) -> tuple[list, list]:
    """The mean of ``y`` at each ``x`` over the samples (batches, draws) of ``method``."""
    xs, mean, _ = _series_ci(rows, method, x, y)
    return xs, mean


def _series_ci(rows: Sequence[dict], method: str, x: str, y: str) -> tuple[list, list, list]:
    """``(x, mean, half-width)`` of ``y`` per ``x`` over the samples of ``method`` (95 % Student-t
    half-widths; NaN where one sample)."""
    groups: dict[Any, list[float]] = {}
    for r in rows:
        if r.get("method") == method and _ok(r.get(x)) and _ok(r.get(y)):
            groups.setdefault(r[x], []).append(float(r[y]))
    xs = sorted(groups)
    ivs = [mean_interval(groups[v]) for v in xs]
    return xs, [iv.mean for iv in ivs], [iv.half_width for iv in ivs]


MAX_RANKED = 500
"""At most this many of the largest eigenvalues in the rank panel of :func:`plot_spectra`."""


def _line_ci(ax, xs, mean, hw, **kw) -> None:
    """A line with its 95 % band (where there are several samples); nothing (and no legend entry)
    for a method without data."""
    if not xs:
        return
    (line,) = ax.plot(xs, mean, **kw)
    lo = [m - h if math.isfinite(h) else m for m, h in zip(mean, hw)]
    hi = [m + h if math.isfinite(h) else m for m, h in zip(mean, hw)]
    if any(math.isfinite(h) and h > 0 for h in hw):
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18, lw=0)


def _practical(ms: Sequence[str]) -> list[str]:
    return [m for m in ms if m in registry.METHODS and registry.practical(m)]


def _x_key(rows: Sequence[dict]) -> tuple[str, str]:
    """``step`` when every row has one, else the checkpoint order."""
    if rows and all(_ok(r.get("step")) for r in rows):
        return "step", "training step"
    order: dict[Any, int] = {}
    for r in rows:
        order.setdefault(r.get("checkpoint"), len(order))
    for r in rows:
        r["_index"] = order[r.get("checkpoint")]
    return "_index", "checkpoint"


# ---- figures ----------------------------------------------------------------------------------

def plot_error_reduction(
    rows: Any,
    path: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """The paper's Fig. 5 over checkpoints: (a) the gap 𝔈 − 𝔈_KFAC (4.6) per method against the
    training step (0 dashed: below it a method improves on KFAC), (b) the reduction ratio
    𝔈/𝔈_KFAC (1 dashed; a log axis when the ratios span more than a factor 20); the legend
    sits outside the axes.

    Args:
        rows: comparison rows over checkpoints (``method``, ``gap``, ``reduction_ratio`` and
            ``step`` or ``checkpoint``).
        path: write ``<path>.png`` and ``<path>.pdf``.
        methods: method keys to show, in order (default: the coarse corrections, as in the
            paper's Fig. 5; one-level methods, exact references and the zero step are kept out so
            they do not set the scale).
        title: figure title.

    With several samples per checkpoint (batches, draws) each line is the mean with its 95 % band.

    Returns:
        The figure: two axes, one line per method on each plus the dashed reference.
    """
    rows = read_rows(rows)
    ms = _methods(rows, methods) if methods is not None else [
        m for m in _methods(rows, None) if registry.get(m).family.coarse  # the paper's Fig. 5: coarse corrections
    ] if all(m in registry.METHODS or "+" in m for m in _methods(rows, None)) else _methods(rows, None)
    xk, xlabel = _x_key(rows)
    with style():
        fig, (ax_gap, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.8))
        for m in ms:
            lab, c, mk = _label(rows, m), color_for(m), MARKERS.get(legend_for(m), "o")
            _line_ci(ax_gap, *_series_ci(rows, m, xk, "gap"), color=c, marker=mk, label=lab)
            _line_ci(ax_ratio, *_series_ci(rows, m, xk, "reduction_ratio"), color=c, marker=mk, label=lab)
        ax_gap.axhline(0.0, color="k", ls="--", lw=0.8)
        ax_ratio.axhline(1.0, color="k", ls="--", lw=0.8)
        ax_gap.set_xlabel(xlabel)
        ax_gap.set_ylabel(r"$\mathfrak{E}(\beta) - \mathfrak{E}(0)$  (gap to KFAC)")
        ax_gap.set_title("(a) error gap to KFAC")
        ax_ratio.set_xlabel(xlabel)
        ax_ratio.set_ylabel(r"$\mathfrak{E} / \mathfrak{E}_{\mathrm{KFAC}}$")
        ratios = [v for m in ms for v in _series(rows, m, xk, "reduction_ratio")[1] if v > 0]
        if ratios and max(ratios) / min(ratios) > 20:  # a log axis only when the ratios span decades
            ax_ratio.set_yscale("log")
        ax_ratio.set_title("(b) error reduction ratio")
        if ms:
            fig.legend(*ax_ratio.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5))
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


def _dots(ax, rows: Sequence[dict], ms: Sequence[str], key: str) -> list[str]:
    """Mean ± 95 % interval per method as a dot with whiskers on a horizontal log axis, exact
    references (and the zero step) below a separating line, in grey type."""
    practical = _practical(ms)
    refs = [m for m in ms if m not in practical]
    order = practical + refs
    shown = []
    for m in order:
        vals = [float(r[key]) for r in rows if r.get("method") == m and _ok(r.get(key)) and float(r[key]) > 0]
        if vals:
            shown.append((m, mean_interval(vals)))
    for i, (m, iv) in enumerate(shown):
        y = len(shown) - 1 - i
        err = None if not math.isfinite(iv.half_width) else [[min(iv.half_width, iv.mean * 0.999)], [iv.half_width]]
        ax.errorbar([iv.mean], [y], xerr=err, fmt=MARKERS.get(legend_for(m), "o") or "o", color=color_for(m), ms=6, capsize=3)
    ax.set_yticks(range(len(shown)), [_label(rows, m) for m, _ in reversed(shown)])
    for t, (m, _) in zip(ax.get_yticklabels(), list(reversed(shown))):
        if m in refs:
            t.set_color("#777777")
            t.set_fontstyle("italic")
    n_ref = sum(1 for m, _ in shown if m in refs)
    if n_ref and n_ref < len(shown):
        ax.axhline(n_ref - 0.5, color="#999999", lw=0.6)
    ax.set_xscale("log")
    ax.set_ylim(-0.7, len(shown) - 0.3)
    return [m for m, _ in shown]


def plot_method_errors(
    rows: Any,
    path: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Per-method errors at one checkpoint: (a) relative F•-norm error 𝔈/‖ζ‖²_F• with the zero
    step at 1 (right of it a method is worse than not moving), (b) Euclidean relative error
    ‖ζ_m − ζ‖/‖ζ‖. One dot per method (mean ± 95 % interval over samples) on a log axis; exact
    references (grey, italic) below the line, apart from the practical methods.

    Args:
        rows: the comparison rows of one checkpoint (``method``, ``relative_error``,
            ``euclidean_relative_error``; several samples per method give intervals).
        path, methods, title: as in :func:`plot_error_reduction` (default: every method).

    Returns:
        The figure: two axes with one dot per method each.
    """
    rows = read_rows(rows)
    ms = _methods(rows, methods)
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.9 + 0.3 * max(len(ms), 4)), sharey=True)
        for ax, key, xlabel, t in (
            (axes[0], "relative_error", r"$\mathfrak{E} / \|\zeta\|^2_{F_\bullet}$", r"(a) relative $F_\bullet$-norm error"),
            (axes[1], "euclidean_relative_error", r"$\|\zeta_m - \zeta\| / \|\zeta\|$", "(b) Euclidean relative error"),
        ):
            _dots(ax, rows, ms, key)  # the same methods in both panels: they share the y axis
            ax.axvline(1.0, color="k", ls="--", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_title(t)
        axes[0].text(1.0, 1.0, " zero step", transform=axes[0].get_xaxis_transform(), va="bottom", ha="left", fontsize=7)
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


def plot_error_anatomy(
    rows: Any,
    path: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Where each method's error lives (:mod:`fisherlab.anatomy`): (a) 𝔈/‖ζ‖²_F• split into the
    span of the per-example Jacobian rows and its null space (where F• = λI), stacked, linear
    axis, the zero step at 1; (b) the null-space share 𝔈_null/𝔈 on [0, 1].

    Args:
        rows: the comparison rows of one checkpoint (``error_span``, ``error_null``,
            ``energy_error``, ``relative_error``; samples are averaged).
        path, methods, title: as in :func:`plot_error_reduction` (default: every method but ZERO).

    Returns:
        The figure: two axes with one bar per method each.
    """
    rows = read_rows(rows)
    ms = [m for m in _methods(rows, methods) if m != "zero"]
    stats = []
    for m in _practical(ms) + [m for m in ms if m not in _practical(ms)]:
        rs = [r for r in rows if r.get("method") == m and _ok(r.get("error_span")) and _ok(r.get("energy_error"))]
        if not rs:
            continue
        scale = [float(r["energy_error"]) / float(r["relative_error"]) for r in rs if _ok(r.get("relative_error")) and r["relative_error"]]
        z2 = sum(scale) / len(scale) if scale else 1.0
        span = sum(float(r["error_span"]) for r in rs) / len(rs) / z2
        null = sum(float(r["error_null"]) for r in rs) / len(rs) / z2
        stats.append((m, span, null))
    with style():
        fig, (ax, ax_share) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.3 * max(len(stats), 4)), sharey=True,
                                           gridspec_kw={"width_ratios": [2, 1]})
        ys = list(range(len(stats)))[::-1]
        totals = sorted(span + null for _, span, null in stats)
        # a method far worse than the zero step must not squeeze the rest: the axis ends at
        # max(1.5, the second-largest total · 1.1) and longer bars are cut and labelled
        xmax = max(1.5, 1.1 * (totals[-2] if len(totals) > 1 else totals[-1]))
        for y, (m, span, null) in zip(ys, stats):
            ax.barh(y, span, color=color_for(m), edgecolor="none")
            ax.barh(y, null, left=span, color=color_for(m), alpha=0.35, hatch="///", edgecolor="#555555", lw=0)
            total = span + null
            if total > xmax:
                ax.text(xmax * 0.99, y, f"{total:.3g} →", va="center", ha="right", fontsize=7, color="#222222")
            ax_share.barh(y, null / total if total > 0 else 0.0, color=color_for(m), alpha=0.6)
        ax.set_xlim(0, xmax)
        ax.set_yticks(range(len(stats)), [_label(rows, m) for m, *_ in reversed(stats)])
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel(r"$\mathfrak{E} / \|\zeta\|^2_{F_\bullet}$: solid = span of $U$, hatched = null space")
        ax.set_title("(a) the error, split")
        ax_share.set_xlim(0, 1)
        ax_share.set_xlabel(r"$\mathfrak{E}_{\mathrm{null}} / \mathfrak{E}$")
        ax_share.set_title("(b) null-space share")
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


def plot_spectra(
    spectra: Any,
    path: str | Path | None = None,
    *,
    log: bool | None = None,
    n_grid: int = 400,
    sigma: float | None = None,
    title: str | None = None,
) -> Figure:
    """Overlaid spectra: (a) Gaussian-broadened densities, (b) cumulative distributions, (c) the
    eigenvalues above the damping by rank (log scale) for the spectra known eigenvalue by eigenvalue
    (``exact``, ``dense``, ``lanczos``): F• has p − N eigenvalues equal to λ, which fill (a) and (b)
    and hide the N informative ones; (c) shows those.

    Args:
        spectra: :class:`fisherlab.spectra.Spectrum` objects (a list or a ``{key: Spectrum}``).
        path: write ``<path>.png`` and ``<path>.pdf``.
        log: eigenvalue axis in ``log10`` (default: when every spectrum is positive).
        n_grid: grid points of the densities.
        sigma: broadening in axis units (default: 1/100 of the common range).
        title: figure title.

    Returns:
        The figure: three axes, one line per spectrum on (a) and (b), one per discrete spectrum
        with eigenvalues above λ on (c).
    """
    specs = list(spectra.values()) if isinstance(spectra, Mapping) else list(spectra)
    if log is None:
        log = all(s.values.size and s.values[0] > 0 for s in specs)
    lo = min((float(s.grid(2, log=log)[0]) for s in specs), default=0.0)
    hi = max((float(s.grid(2, log=log)[-1]) for s in specs), default=1.0)
    grid = np.linspace(lo, hi, n_grid)
    sig = sigma if sigma is not None else (hi - lo) / 100
    xlabel = "log10 eigenvalue" if log else "eigenvalue"
    with style():
        fig, (ax_d, ax_c, ax_r) = plt.subplots(1, 3, figsize=(14, 3.8))
        for s in specs:
            lab = f"{s.label} ({s.method})"
            c = color_for(s.operator)
            ax_d.plot(grid, s.density(grid, sig, log=log), color=c, label=lab)
            ax_c.plot(grid, s.cdf(grid, log=log), color=c, label=lab)
            if s.method in ("exact", "dense", "lanczos") and s.values.size:
                lam = s.damping if math.isfinite(s.damping) else 0.0
                top = np.sort(s.values[s.values > lam * (1 + 1e-9)])[::-1][:MAX_RANKED]
                if top.size:
                    ax_r.plot(np.arange(1, top.size + 1), top, color=c, label=lab)
        if ax_r.lines:
            ax_r.set_xscale("log")
            ax_r.set_yscale("log")
            lam = next((s.damping for s in specs if math.isfinite(s.damping)), None)
            if lam is not None:
                ax_r.axhline(lam, color="k", ls="--", lw=0.8)
                ax_r.text(1, lam, " λ", va="bottom", fontsize=7)
        else:
            ax_r.text(0.5, 0.5, "no discrete spectrum above λ", ha="center", va="center", transform=ax_r.transAxes)
        ax_r.set_xlabel("rank")
        ax_r.set_ylabel("eigenvalue")
        ax_r.set_title(f"(c) the eigenvalues above λ (top {MAX_RANKED})")
        ax_d.set_xlabel(xlabel)
        ax_d.set_ylabel("spectral density")
        ax_d.set_yscale("symlog", linthresh=1e-3)
        ax_d.set_title("(a) density")
        ax_c.set_xlabel(xlabel)
        ax_c.set_ylabel("fraction of eigenvalues ≤ x")
        ax_c.set_title("(b) cumulative distribution")
        fig.legend(*ax_d.get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, -0.08), ncol=len(specs))
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


def plot_interactions(
    interactions: Any,
    path: str | Path | None = None,
    *,
    annotate: bool | None = None,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmap of the layer-interaction matrix ρ_ij = ‖F_ij‖_F/√(‖F_ii‖_F‖F_jj‖_F).

    Args:
        interactions: a :class:`fisherlab.structure.LayerInteractions` or a ρ matrix ``[ℓ, ℓ]``.
        path: write ``<path>.png`` and ``<path>.pdf``.
        annotate: write the values in the cells (default: ℓ ≤ 12).
        names: layer names (default: from ``interactions``, else indices).
        title: axes title (default mentions the off-diagonal share when known).

    Returns:
        The figure: the heatmap axes and its colour bar.
    """
    if hasattr(interactions, "rho"):
        rho = np.asarray(interactions.rho)
        names = list(names or interactions.names)
        share = getattr(interactions, "off_diagonal_share", None)
    else:
        rho = np.asarray(interactions, dtype=float)
        names = list(names or range(rho.shape[0]))
        share = None
    ell = rho.shape[0]
    annotate = ell <= 12 if annotate is None else annotate
    with style():
        size = min(2.0 + 0.55 * ell, 12.0)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        sns.heatmap(
            rho, ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", square=True, annot=annotate, fmt=".2f",
            xticklabels=names, yticklabels=names, cbar_kws={"label": r"$\rho_{ij}$"}, annot_kws={"fontsize": 7},
        )
        ax.set_xlabel("layer j")
        ax.set_ylabel("layer i")
        t = title or r"layer interactions $\rho_{ij}$"
        if share is not None and title is None:
            t += rf"  (off-diagonal share of $\|F\|_F^2$: {share:.2f})"
        ax.set_title(t)
        return _finish(fig, path)


def plot_kfac_block_errors(errors: Any, path: str | Path | None = None, *, title: str | None = None) -> Figure:
    """Bars of the KFAC block errors ‖F_ii − A_i⊗G_i‖_F/‖F_ii‖_F, one per layer.

    Args:
        errors: a :class:`fisherlab.structure.KFACBlockErrors` or rows with ``name`` and
            ``relative_error`` (e.g. its CSV).
        path, title: as elsewhere.

    Returns:
        The figure: one axes, one bar per layer.
    """
    if hasattr(errors, "relative_error"):
        names, vals = list(errors.names), [float(v) for v in errors.relative_error]
    else:
        rows = read_rows(errors)
        names, vals = [str(r["name"]) for r in rows], [float(r["relative_error"]) for r in rows]
    with style():
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), 3.5))
        ax.bar(range(len(vals)), vals, color=color_for("kfac"))
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right")
        ax.set_ylabel(r"$\|F_{ii} - A_i \otimes G_i\|_F / \|F_{ii}\|_F$")
        ax.set_xlabel("layer")
        ax.set_title(title or "KFAC error of the diagonal blocks")
        return _finish(fig, path)


def plot_damping_sweep(
    rows: Any,
    path: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    metrics: Sequence[str] = ("relative_error", "euclidean_relative_error"),
    title: str | None = None,
) -> Figure:
    """Errors against the damping λ, log-log, one line per method and one axes per metric.

    Args:
        rows: comparison rows with ``damping`` (e.g. from :func:`fisherlab.analysis.run_damping_sweep`).
        path: write ``<path>.png`` and ``<path>.pdf``.
        methods: method keys (default: all present).
        metrics: row keys to plot (default: relative F•-norm and Euclidean errors).
        title: figure title.

    Returns:
        The figure: ``len(metrics)`` axes, one line per method each.
    """
    rows = read_rows(rows)
    ms = _methods(rows, methods)
    labels = {
        "relative_error": r"$\mathfrak{E} / \|\zeta\|^2_{F_\bullet}$",
        "euclidean_relative_error": r"$\|\zeta_m - \zeta\| / \|\zeta\|$",
        "reduction_ratio": r"$\mathfrak{E} / \mathfrak{E}_{\mathrm{KFAC}}$",
        "energy_error": r"$\mathfrak{E}$",
    }
    _TITLES = {"relative_error": r"relative $F_\bullet$-norm error", "euclidean_relative_error": "Euclidean relative error",
               "reduction_ratio": "error relative to KFAC", "energy_error": r"$F_\bullet$-norm error"}
    relative = all(_ok(r.get("damping_relative")) for r in rows)
    xkey = "damping_relative" if relative else "damping"
    with style():
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
        for ax, key in zip(axes[0], metrics):
            for m in ms:
                xs, mean, hw = _series_ci(rows, m, xkey, key)
                _line_ci(ax, xs, mean, hw, color=color_for(m), marker=MARKERS.get(legend_for(m), "o"), label=_label(rows, m))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(r"$\lambda / \lambda_{\max}(F)$" if relative else r"damping $\lambda$")
            ax.set_ylabel(labels.get(key, key))
            ax.set_title(f"({'abcdefgh'[list(metrics).index(key)]}) " + _TITLES.get(key, key))
            if relative:  # the absolute λ on a second axis: λ = (λ/λ_max)·λ_max
                lmax = [r["damping"] / r["damping_relative"] for r in rows if r["damping_relative"]]
                if lmax:
                    f = sum(lmax) / len(lmax)
                    sec = ax.secondary_xaxis("top", functions=(lambda x, f=f: x * f, lambda x, f=f: x / f))
                    sec.set_xlabel(r"absolute $\lambda$", fontsize=8)
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1)
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


# ---- the paper reproduction's figures (fisherlab.experiments.paper) ----------------------------
# Plain functions of the rows the reproduction writes (fig2_curves.csv, fig5_gap.csv), so each
# figure can be redrawn from its CSV.

def _run_marker(key: str) -> str:
    return MARKERS.get(legend_for(key), "") or ""


def _running_mean(values: Sequence[float], k: int) -> list[float]:
    """The mean of the last ``min(i + 1, k)`` values at each i."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _groups(rows: Sequence[dict], key: str) -> dict[Any, list[dict]]:
    """Rows grouped by ``r[key]``, groups in order of first appearance."""
    out: dict[Any, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get(key), []).append(r)
    return out


def plot_training_curves(
    rows: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    panel_titles: Mapping[str, str] | None = None,
    smooth: Mapping[str, int] | None = None,
    diverged: Iterable[tuple[str, str]] = (),
    reference: str = "kfac",
    dashed: Sequence[str] = ("sgd", "adam"),
) -> Figure:
    """The paper's Figs. 2 and 4(a): training loss against step and against wall time, one row
    of two axes per problem, one line per optimizer (log scale; a diverged run ends early).

    Args:
        rows: per-step rows (``problem``, ``optimizer``, ``legend``, ``step``, ``loss``,
            ``wall_time``), e.g. the reproduction's ``fig2_curves.csv``; problems and optimizers
            are drawn in order of first appearance.
        path: write ``<path>.png`` and ``<path>.pdf``.
        title: figure title.
        panel_titles: problem → axes title (default: the problem key).
        smooth: problem → running-mean window in mini-batches (default: max(1, last step // 30)).
        diverged: ``(problem, optimizer)`` pairs labelled "(diverged)".
        reference: the optimizer drawn thick on top (KFAC).
        dashed: the optimizers drawn dashed (the first-order baselines).

    Returns:
        The figure: ``len(problems) × 2`` axes.
    """
    rows = read_rows(rows)
    panels = _groups(rows, "problem")
    gone = set(diverged)
    with style():
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.9 * len(panels)), squeeze=False)
        for row, (problem, prows) in zip(axes, panels.items()):
            last = max((int(r["step"]) for r in prows if _ok(r.get("step"))), default=1)
            k = (smooth or {}).get(problem, max(1, last // 30))
            for o, orows in _groups(prows, "optimizer").items():
                name = str(orows[0].get("legend") or legend_for(o))
                y = _running_mean([_nan(r["loss"]) for r in orows], k)
                style_kw: dict[str, Any] = {"lw": 2.4, "zorder": 3} if o == reference else {"lw": 1.4, "ls": "--"} if o in dashed else {"lw": 1.2}
                kw = dict(color=color_for(name), label=name + (" (diverged)" if (problem, o) in gone else ""), **style_kw)
                row[0].plot([r["step"] for r in orows], y, **kw)
                row[1].plot([_nan(r["wall_time"]) for r in orows], y, **kw)
            for ax, xl in zip(row, ("step", "training time (s)")):
                ax.set_yscale("log")
                ax.set_xlabel(xl)
                ax.set_ylabel(f"training loss (mean of {k} batches)" if k > 1 else "training loss")
                ax.set_title((panel_titles or {}).get(problem, str(problem)), fontsize=9)
            row[1].legend(loc="upper right", ncol=2, fontsize=7)
        if title:
            fig.suptitle(title)
        return _finish(fig, path)


def plot_gap_trajectories(
    rows: Any,
    own: Any = (),
    path: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    additive: Sequence[str] = ("tko",),
    title: str | None = "Fig. 5 (small scale): error gap of the two-level corrections to KFAC (< 0: closer to ζ)",
) -> Figure:
    """The paper's Fig. 5 along training, one row of three axes per problem: (a) the gap
    𝔈(β*) − 𝔈(0) (4.6) against the step on the KFAC trajectory (symlog), (b) the reduction ratio
    𝔈(β*)/𝔈(0) on it (log), (c) each two-level optimizer's gap on its own trajectory (symlog).

    Args:
        rows: the KFAC-trajectory rows (``problem``, ``step``, ``method``, ``legend``, ``gap``,
            ``reduction_ratio``), e.g. the reproduction's ``fig5_gap.csv``; one row of axes per
            problem in them.
        own: the own-trajectory rows (``problem``, ``method``, ``legend``, ``step``, ``gap``).
        path: write ``<path>.png`` and ``<path>.pdf``.
        methods: method keys to draw, in order (default: every method of ``rows``).
        additive: methods drawn dashed (the additive corrections, whose gap may be positive).
        title: figure title.

    Returns:
        The figure: ``max(1, len(problems)) × 3`` axes.
    """
    rows = read_rows(rows)
    own_by = _groups(read_rows(own), "problem")
    panels = _groups(rows, "problem")
    with style():
        fig, axes = plt.subplots(max(1, len(panels)), 3, figsize=(15, 3.9 * max(1, len(panels))), squeeze=False)
        for row, (problem, prows) in zip(axes, panels.items()):
            for m in _methods(prows, methods):
                pts = [r for r in prows if r.get("method") == m]
                kw: dict[str, Any] = dict(color=color_for(m), marker=_run_marker(m), ms=3, label=_label(prows, m), lw=1.2)
                if m in additive:
                    kw["ls"] = "--"
                row[0].plot([r["step"] for r in pts], [_nan(r["gap"]) for r in pts], **kw)
                row[1].plot([r["step"] for r in pts], [_nan(r["reduction_ratio"]) for r in pts], **kw)
            orows = own_by.get(problem, [])
            for m in _methods(orows, methods):
                pts = [r for r in orows if r.get("method") == m]
                kw = dict(color=color_for(m), label=_label(orows, m), lw=1.0)
                if m in additive:
                    kw["ls"] = "--"
                row[2].plot([r["step"] for r in pts], [_nan(r["gap"]) for r in pts], **kw)
            gaps = [_nan(r["gap"]) for r in prows]
            scale = max((abs(g) for g in gaps if math.isfinite(g) and g != 0), default=1.0)
            for ax in (row[0], row[2]):
                ax.set_yscale("symlog", linthresh=max(scale * 1e-6, 1e-12))
                ax.axhline(0.0, color="k", ls=":", lw=0.8)
                ax.set_xlabel("step")
                ax.set_ylabel(r"$\mathfrak{E}(\beta^*) - \mathfrak{E}(0)$")
            row[1].set_yscale("log")
            row[1].axhline(1.0, color="k", ls=":", lw=0.8)
            row[1].set_xlabel("step")
            row[1].set_ylabel(r"$\mathfrak{E}(\beta^*) / \mathfrak{E}(0)$")
            row[0].set_title(f"(a) gap on the KFAC trajectory — {problem}", fontsize=9)
            row[1].set_title("(b) reduction ratio on the KFAC trajectory", fontsize=9)
            row[2].set_title("(c) gap on each optimizer's own trajectory", fontsize=9)
            row[1].legend(loc="best", ncol=2, fontsize=7)
        if title:
            fig.suptitle(title)
        return _finish(fig, path)
