"""Errors against the exact regularized natural gradient (§4.4, MATH.md §6): one table per capture.

For each method with increment ζ_m ≈ ζ = F•⁻¹∇h:

* 𝔈 = ‖ζ_m − ζ‖²_{F•} (4.1), with ‖x‖²_{F•} = ‖Uᵀx‖² + λ‖x‖²;
* 𝔈/‖ζ‖²_{F•}, where ‖ζ‖²_{F•} = ∇hᵀζ (= the error of the zero step: > 1 means worse than not
  moving at all, flagged);
* its anatomy (:mod:`fisherlab.anatomy`): 𝔈 = 𝔈_span + 𝔈_null over the span of the per-example
  Jacobian rows and its null space (where F• = λI), per layer, and along the top modes of F;
* the reduction ratio against π-damped KFAC (the reference: 𝔈_KFAC = 𝔈(0) of (4.2));
* the gap 𝔈 − 𝔈_KFAC computed **without** ζ, by the method's family (:class:`~fisherlab.methods.Family`):
  (4.6) βᵀF_coarseβ − 2⟨R_0ᵀβ, r⟩ for the coarse corrections, and for any other method, since
  F•ζ = ∇h, ``‖x − ζ‖² − ‖y − ζ‖² = xᵀF•x − yᵀF•y − 2⟨x − y, ∇h⟩`` (y = ζ_KFAC); a coarse
  correction over another base (``ekfac+residuals``) adds its base's gap to KFAC to its own (4.6),
  and the sign check applies to its own;
* the Euclidean relative error ‖ζ_m − ζ‖/‖ζ‖ and the cosine of ζ_m with ζ (the guarantee (3.19)
  holds in the F•-norm only: both are shown);
* the coarse dimension m and the wall time.

A damping is absolute or stated in the Fisher's scale (:class:`fisherlab.Damping`); the table's
meta reports the resolved λ and λ in every scale (λ/λ_max(F), λ/mean eig(F), mean-loss units),
and the relative residual of the exact solve. Several captures of one checkpoint (independent
batches, Monte-Carlo draws) give every column as a mean with a 95 % interval
(:meth:`ComparisonTable.summary`); the CSV keeps every sample.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import methods as registry
from .anatomy import SpanBasis, anatomy
from .capturing.record import Capture
from .damping import Damping, fisher_scale, resolve_damping
from .errors import FisherlabError, MeasurementWarning
from .intervals import LEVEL, mean_interval
from .io.tables import fmt, text_table, write_csv
from ._system import available_memory
from .jacobian import Jacobian
from .methods import Family, Pieces
from .operators import KFAC, CoarseCorrection, ExactFisher, FisherOperator
from .planning import plan_compare

__all__ = [
    "METHODS",
    "LEGENDS",
    "ComparisonTable",
    "compare",
    "compare_file",
    "build_method",
    "COLUMNS",
    "EXACT_RESIDUAL_TOL",
    "SUMMARY_COLUMNS",
]

METHODS = registry.METHODS
"""Every method :func:`compare` knows (the registry :data:`fisherlab.methods.METHODS`; iterating
gives the keys in table order)."""

LEGENDS = {k: m.legend for k, m in registry.METHODS.items()}
"""Method key → legend, derived from the registry (kept for callers of the first API)."""

EXACT_RESIDUAL_TOL = 1e-6
"""The exact solve's relative residual ‖F•ζ − ∇h‖/‖∇h‖ above which compare warns: every error in
the table is measured against this ζ (Woodbury in float64 reaches ~1e-12 at cond(F•) ~ 1e4)."""

COLUMNS = [
    "method",
    "legend",
    "family",
    "energy_error",
    "relative_error",
    "error_span",
    "error_null",
    "reduction_ratio",
    "gap",
    "euclidean_relative_error",
    "cosine",
    "worse_than_zero",
    "coarse_dim",
    "seconds",
    "note",
    "zeta_null_share",
    "rhs_outside_span",
]

SUMMARY_COLUMNS = [
    "energy_error",
    "relative_error",
    "error_span",
    "error_null",
    "reduction_ratio",
    "gap",
    "euclidean_relative_error",
    "cosine",
    "seconds",
    "zeta_null_share",
    "rhs_outside_span",
]
"""The numeric columns :meth:`ComparisonTable.summary` reports as mean ± half-width."""

_CONTEXT = ["checkpoint", "step", "sample", "batch", "draw", "damping"]


@dataclass
class ComparisonTable:
    """Per-method errors: one row per (sample, method), plus per-layer and per-mode rows.

    Attributes:
        rows: dicts with :data:`COLUMNS` (plus ``checkpoint``, ``step``, ``sample``, ``batch``,
            ``draw``, ``damping`` when known).
        layers: per (sample, method, layer): ``error_norm`` ‖e_i‖, ``error_fisher`` ‖e_i‖²_[F•]ii,
            ``zeta_norm`` ‖ζ_i‖ and ``zeta_fisher``.
        modes: per (sample, method, mode j ≤ 5): ``eigenvalue`` μ_j + λ of F•, ``coefficient``
            v_jᵀe, ``zeta_coefficient`` v_jᵀζ and ``relative`` |v_jᵀe|/|v_jᵀζ|.
        meta: damping (absolute) and its scales, N, p, ‖ζ‖²_F• and its span/null split, the exact
            solver's report and residual, ``notes`` (everything that was also warned), ``samples``.
    """

    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    modes: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def row(self, method: str) -> dict:
        """The (first) row of ``method``."""
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(f"no row for method '{method}' (methods: {', '.join(dict.fromkeys(r['method'] for r in self.rows))})")

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]

    @property
    def columns(self) -> list[str]:
        extra = [k for r in self.rows for k in r if k not in COLUMNS]
        return [c for c in _CONTEXT if c in extra] + COLUMNS + sorted({k for k in extra if k not in _CONTEXT})

    @property
    def n_samples(self) -> int:
        """Samples (batches × draws) per checkpoint and method (1 for a single capture)."""
        counts: dict = {}
        for r in self.rows:
            key = (r.get("checkpoint"), r["method"])
            counts[key] = counts.get(key, 0) + 1
        return max(counts.values(), default=0)

    def summary(self, level: float = LEVEL) -> list[dict]:
        """One row per (checkpoint, method): each of :data:`SUMMARY_COLUMNS` as its mean, with
        ``<column>_hw`` the half-width of its ``level`` Student-t interval over the samples (NaN
        for one sample) and ``samples`` their count; ``worse_than_zero`` when the mean relative
        error exceeds 1."""
        groups: dict = {}
        for r in self.rows:
            groups.setdefault((r.get("checkpoint"), r["method"]), []).append(r)
        out = []
        for (_, method), rs in groups.items():
            first = rs[0]
            s = {c: first[c] for c in ("checkpoint", "step", "damping") if c in first}
            s.update(method=method, legend=first["legend"], family=first["family"], samples=len(rs),
                     coarse_dim=first.get("coarse_dim"))
            for c in SUMMARY_COLUMNS:
                iv = mean_interval([r.get(c) for r in rs], level)
                s[c], s[f"{c}_hw"] = iv.mean, iv.half_width
            s["worse_than_zero"] = bool(s["relative_error"] > 1.0) if math.isfinite(s["relative_error"]) else None
            s["note"] = "; ".join(dict.fromkeys(r["note"] for r in rs if r.get("note")))
            out.append(s)
        return out

    def to_csv(self, path: str | Path, *, summary: bool = False) -> Path:
        """Write every sample row (full precision), or the :meth:`summary`, to ``path``."""
        if summary:
            rows = self.summary()
            cols = [c for c in ("checkpoint", "step", "damping") if any(c in r for r in rows)]
            cols += ["method", "legend", "family", "samples"] + [x for c in SUMMARY_COLUMNS for x in (c, f"{c}_hw")]
            return write_csv(rows, path, cols + ["worse_than_zero", "coarse_dim", "note"])
        return write_csv(self.rows, path, self.columns)

    def layers_to_csv(self, path: str | Path) -> Path:
        """The per-layer error rows."""
        return write_csv(self.layers, path)

    def modes_to_csv(self, path: str | Path) -> Path:
        """The per-mode error rows."""
        return write_csv(self.modes, path)

    @classmethod
    def concat(cls, tables: Iterable["ComparisonTable"]) -> "ComparisonTable":
        out = cls()
        for t in tables:
            out.rows.extend(t.rows)
            out.layers.extend(t.layers)
            out.modes.extend(t.modes)
            out.meta.setdefault("notes", []).extend(t.meta.get("notes", []))
        return out

    def format(self) -> str:
        """A readable fixed-width table (what ``str()`` prints): mean ± 95 % half-width over the
        samples when there are several; 𝔈_null/𝔈 is the share of the error in the null space."""
        rows = self.summary()
        several = self.n_samples > 1
        ctx = [c for c in ("checkpoint", "step") if any(c in r for r in rows)]
        head = ctx + ["method", "𝔈/‖ζ‖²", "null share", "𝔈/𝔈_KFAC", "gap (4.6)", "‖Δ‖/‖ζ‖", "cos", "m", "time s"]
        body = [head]
        for r in rows:
            def cell(col: str, spec: str) -> str:
                v, hw = r[col], r[f"{col}_hw"]
                return fmt(v, spec) if not several or not math.isfinite(hw) else f"{fmt(v, spec)} ± {fmt(hw, spec.replace('+', ''))}"

            null_share = r["error_null"] / r["energy_error"] if r["energy_error"] and math.isfinite(r["error_null"]) else math.nan
            body.append([str(r.get(c, "")) for c in ctx] + [
                r["legend"] + (" *" if r["family"] == Family.EXACT.value else ""),
                cell("relative_error", ".3e"),
                fmt(null_share, ".1%"),
                cell("reduction_ratio", ".4f"),
                cell("gap", "+.3e"),
                cell("euclidean_relative_error", ".3e"),
                cell("cosine", ".5f"),
                "" if r["coarse_dim"] is None else str(r["coarse_dim"]),
                fmt(r["seconds"], ".3f"),
            ])
        lines = []
        m = self.meta
        if "N" in m:
            scales = m.get("damping_scales", {})
            rel = "   ".join(f"λ/{k} = {v:.3g}" for k, v in (("λ_max", scales.get("max")), ("mean eig", scales.get("mean"))) if v is not None)
            lines.append(
                f"{m.get('damping_input', '')}: λ = {m['damping']:g} ({rel})   N = {m.get('N')}   p = {m.get('p', 0):,}   "
                f"‖ζ‖²_F• = {fmt(m.get('zeta_norm2'), '.3e')} ({fmt(m.get('zeta_null_share'), '.1%')} in the null space)   "
                f"exact: {m.get('solver', '')}"
            )
        if several:
            lines.append(f"mean ± {LEVEL:.0%} half-width over {self.n_samples} samples (batches × draws)")
        widths = [max(len(str(r[i])) for r in body) for i in range(len(head))]
        body.insert(1, ["-" * w for w in widths])
        lines += text_table(body, right=range(len(ctx) + 1, len(head)), indent="")
        for r in rows:
            if r.get("note"):
                lines.append(f"  {r['legend']}: {r['note']}")
        setups = {(r.get("checkpoint"), r.get("sample")): r["setup_s"] for r in self.rows if r.get("setup_s") is not None}
        if setups:
            mean = sum(setups.values()) / len(setups)
            lines.append(f"  time s: each method's own; the setup they share (Grams, K's eigenpairs, KFAC's factor eigenpairs, "
                         f"λ): {mean:.3f} s" + (f" per sample ({len(setups)})" if len(setups) > 1 else ""))
        lines.append("  (* exact reference, not a practical method; ZERO: the zero step)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        """One line (the table itself is ``str(table)`` / ``print(table)``; Jupyter shows HTML)."""
        methods = list(dict.fromkeys(r.get("method") for r in self.rows))
        lam = self.meta.get("damping")
        return (
            f"<ComparisonTable: {len(methods)} methods, {self.n_samples} sample(s), {len(self.rows)} rows"
            + (f", λ = {lam:g}" if isinstance(lam, (int, float)) else "") + "; print() it for the table>"
        )

    def to_pandas(self, *, summary: bool = False):
        """The rows as a ``pandas.DataFrame`` (``summary=True``: one row per method, mean and 95 %
        half-width columns ``*_hw`` over the samples). pandas is optional: a one-line ImportError
        says so when it is missing."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("ComparisonTable.to_pandas() needs pandas, which is not installed (pip install pandas)") from None
        return pd.DataFrame(self.summary() if summary else [dict(r) for r in self.rows])

    def _repr_html_(self) -> str:
        """The table of :meth:`format` as HTML, for Jupyter."""
        import html

        rows = self.summary()
        several = self.n_samples > 1
        ctx = [c for c in ("checkpoint", "step") if any(c in r for r in rows)]
        cols = [("relative_error", "𝔈/‖ζ‖²", ".3e"), ("reduction_ratio", "𝔈/𝔈_KFAC", ".4f"), ("gap", "gap (4.6)", "+.3e"),
                ("euclidean_relative_error", "‖Δ‖/‖ζ‖", ".3e"), ("cosine", "cos", ".5f")]

        def cell(r: dict, col: str, spec: str) -> str:
            v, hw = r.get(col), r.get(f"{col}_hw", math.nan)
            s = fmt(v, spec)
            return s if not several or hw is None or not math.isfinite(hw) else f"{s} ± {fmt(hw, spec.replace('+', ''))}"

        head = "".join(f"<th>{html.escape(h)}</th>" for h in ctx + ["method"] + [c[1] for c in cols] + ["m", "time s"])
        body = []
        for r in rows:
            exact = r.get("family") == Family.EXACT.value
            tds = [f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in ctx]
            tds.append(f"<td style='text-align:left'>{html.escape(str(r.get('legend', r.get('method'))))}{' *' if exact else ''}</td>")
            tds += [f"<td>{html.escape(cell(r, c, spec))}</td>" for c, _, spec in cols]
            tds.append(f"<td>{'' if r.get('coarse_dim') is None else r['coarse_dim']}</td><td>{fmt(r.get('seconds'), '.3f')}</td>")
            body.append("<tr>" + "".join(tds) + "</tr>")
        m = self.meta
        cap = (f"λ = {m['damping']:g}, N = {m.get('N')}, p = {m.get('p', 0):,}, ‖ζ‖²_F• = {fmt(m.get('zeta_norm2'), '.3e')}"
               if "damping" in m and "N" in m else "")
        if several:
            cap += f"; mean ± {LEVEL:.0%} half-width over {self.n_samples} samples"
        return (
            "<table style='text-align:right'>" + (f"<caption>{html.escape(cap)}</caption>" if cap else "")
            + f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            + "<p style='font-size:smaller'>* exact reference, not a practical method; ZERO: the zero step</p>"
        )


def build_method(
    method: str,
    jac: Jacobian,
    damping: float,
    *,
    rhs: Tensor,
    exact: ExactFisher,
    kfac: KFAC | None = None,
    **options,
) -> FisherOperator:
    """The operator of ``method`` sharing ``exact`` and ``kfac`` (:func:`fisherlab.methods.build`;
    options a method does not take — e.g. ``k`` for a Krylov space — are ignored here)."""
    taken = {k: v for k, v in options.items() if k in registry.get(method).options}
    return registry.build(method, jac, damping, rhs=rhs, exact=exact, kfac=kfac, **taken)


def compare(
    capture: Capture | Jacobian | Sequence[Capture],
    damping: float | Damping,
    methods: Sequence[str] | None = None,
    *,
    rhs: Tensor | None = None,
    exact: ExactFisher | None = None,
    k: int = 1,
    m: int = 2,
    q: int = 2,
    options: Mapping[str, Mapping] | None = None,
    top_modes: int = 5,
    anatomy_of_errors: bool = True,
    progress: Callable[[str], None] | None = None,
    device: torch.device | str | None = None,
    precision: str = "float64",
    memory: int | str | None = None,
    cache=None,
    sample: Mapping | None = None,
) -> ComparisonTable:
    """Each method's increment against the exact ζ = F•⁻¹∇h, in isolation (§4.4).

    Args:
        capture: a :class:`Capture` (or a ready :class:`Jacobian` with ``rhs``), or several
            captures of one checkpoint (independent batches / draws: rows per sample, and
            :meth:`ComparisonTable.summary` gives mean ± 95 % intervals).
        damping: λ > 0, or a :class:`fisherlab.Damping` in the Fisher's scale (resolved per capture).
        methods: keys of :data:`fisherlab.methods.METHODS` (default: every method marked
            ``default``, the ZERO row included; ``tko-kronecker`` is reported as n/a for
            captures with conv layers).
        rhs: the right-hand side (default ``capture.grad``).
        exact: a ready :class:`ExactFisher` to reuse (default: built with the automatic solver).
        k, m, q: spectral, Krylov and Taylor sizes (given to the methods that take them).
        options: per-method options, ``{"taylor": {"q": 3}, "residuals": {"base": "diagonal"}}``.
        top_modes: how many leading eigenvectors of F the per-mode errors cover.
        anatomy_of_errors: compute the span/null split, per-layer and per-mode errors (one
            eigendecomposition of the N × N Gram and, per method, the per-layer products Uᵀe that
            𝔈 needs anyway); ``False`` leaves those columns NaN.
        progress: called with ``"setup"`` before the shared setup, then with each method key
            before it runs.
        device: where the algebra runs (``"cuda"``, ``"cpu"``, …; default: the capture's device,
            the CPU for a loaded file); the factors are moved there once, float64.
        precision: ``"float64"`` (default) or ``"mixed"`` (float32 products and Grams, float64
            factorizations and solves: :class:`fisherlab.jacobian.MixedLayerJacobian`, its
            measured error stated there).
        memory: a budget in bytes or ``"8GiB"`` (:mod:`fisherlab.planning`): the big allocations
            are planned before anything is computed, and a plan that does not fit is refused
            with one line naming ``memory=`` (CLI ``--memory``). ``None``: no check. Factored layers
            seen at many positions (T ≥ 32·K) hold dense rows for the products within half of what
            the plan leaves free (``None``: of the memory available), named in ``meta["dense_rows"]``
            (:meth:`fisherlab.jacobian.Jacobian.hold_rows`); the numbers are the same to round-off.
        cache: a :class:`fisherlab.cache.CacheEntry` (what :func:`compare_file` passes): the
            Grams, K's eigendecomposition, the KFAC eigenpairs, the diagonal, EKFAC's moments and
            the Woodbury factor are taken from it when cached and written to it when computed here.
        sample: the sample's context for the rows (default: the capture's ``meta["sample"]``).

    The setup shared by the methods (Jacobian, Grams, the exact solve, the span basis, KFAC) is
    timed apart: ``meta["setup_s"]`` and the rows' ``setup_s``; each row's ``seconds`` is the
    method's own time (KFAC's and the exact row's include building their operator).

    The gap 𝔈 − 𝔈_KFAC is computed without ζ, by the method's family: (4.6) for coarse
    corrections, xᵀF•x − yᵀF•y − 2⟨x − y, ∇h⟩ otherwise (0 for the reference KFAC itself). The
    reduction ratio of a coarse correction is 1 + gap/𝔈_KFAC, so it is ≤ 1 exactly when its gap is
    ≤ 0; for the others it is 𝔈/𝔈_KFAC. Everything unexpected — a gap that breaks its family's
    bound, a method worse than the zero step, an inaccurate exact solve — is recorded in the row's
    ``note`` and in ``meta["notes"]``, and warned once per table.
    """
    if isinstance(capture, (list, tuple)):
        tables = []
        for i, cap in enumerate(capture):
            t = compare(cap, damping, methods, rhs=rhs, exact=exact, k=k, m=m, q=q, options=options,
                        top_modes=top_modes, anatomy_of_errors=anatomy_of_errors, progress=progress,
                        device=device, precision=precision, memory=memory, cache=cache, sample=sample)
            for rows in (t.rows, t.layers, t.modes):
                for r in rows:
                    r.setdefault("sample", i)
            tables.append(t)
        out = ComparisonTable.concat(tables)
        out.meta = {**tables[0].meta, "samples": [t.meta for t in tables], "notes": out.meta.get("notes", [])}
        return out

    names = registry.default_keys() if methods is None else list(methods)
    for name in names:
        registry.get(name)  # one-line error for an unknown key
    jac = Jacobian.coerce(capture, device=device, precision=precision)
    plan = plan_compare(jac, names, memory=memory) if memory is not None else None
    if plan is not None:
        plan.check()
    free = plan.budget - plan.peak if plan is not None else available_memory(jac.device)
    held: list[str] = []
    try:
        return _compare_checkpoint(
            jac, capture, damping, names, held=held, free=free,
            rhs=rhs, exact=exact, k=k, m=m, q=q, options=options, top_modes=top_modes,
            anatomy_of_errors=anatomy_of_errors, progress=progress, cache=cache, sample=sample)
    finally:
        jac.release_rows(held)


def _compare_checkpoint(jac: Jacobian, capture, damping, names: list[str], *, held: list[str], free: int | None,
                        rhs, exact, k, m, q, options, top_modes, anatomy_of_errors, progress, cache, sample) -> "ComparisonTable":
    """:func:`compare` of one checkpoint's Jacobian (the names checked, the plan fitted): the layers
    with many positions hold dense rows for its products (:meth:`Jacobian.hold_rows`, within a
    share of the ``free`` bytes; their names are appended to ``held``, which the caller releases)."""
    if progress is not None:
        progress("setup")
    t_setup = time.perf_counter()
    held += jac.hold_rows(free)
    if cache is not None:
        cache.seed(jac)
    lam = resolve_damping(damping, jac)
    if rhs is None:
        if not isinstance(capture, Capture):
            raise ValueError("compare: rhs is required when given a Jacobian")
        rhs = capture.grad
    w = rhs.to(device=jac.device, dtype=torch.float64).reshape(-1, 1)
    if not bool(torch.isfinite(w).all()):
        raise FisherlabError("compare: the gradient ∇h contains NaN/Inf")
    if float(w.norm()) == 0.0:
        raise FisherlabError("compare: the gradient ∇h is zero; every increment is zero")
    if sample is None:
        sample = capture.meta.get("sample", {}) if isinstance(capture, Capture) else {}
    sample = dict(sample)

    exact = exact if exact is not None else ExactFisher(jac, lam)
    if cache is not None and exact.solver == "woodbury" and exact._chol is None:
        exact._chol = cache.woodbury(lam, jac.N)  # the Cholesky factor of λI + K, when cached
    t0 = time.perf_counter()
    zeta = exact.apply_inverse(w)
    t_exact = time.perf_counter() - t0
    zeta_norm2 = _dot(w, zeta)
    zeta_norm = float(zeta.norm())

    # the span of U and the anatomy of ζ (needs the N × N Gram: not on the CG path)
    basis = SpanBasis.from_jacobian(jac, lam) if exact.solver == "woodbury" and anatomy_of_errors else None
    scale = fisher_scale(jac) if exact.solver == "woodbury" and (basis is not None or isinstance(damping, Damping)) else None
    za = anatomy(jac, basis, zeta, top=top_modes) if basis is not None else None

    def fisher_times(x: Tensor, ux: Tensor | None) -> Tensor:
        """F•x = U(Uᵀx) + λx, with Uᵀx ``[N]`` when known (one product with U instead of two)."""
        return exact.apply(x) if ux is None else jac.matmat(ux.reshape(-1, 1)) + lam * x

    residual = float((fisher_times(zeta, za.product if za is not None else None) - w).norm()) / float(w.norm())
    notes: list[str] = []
    if residual > EXACT_RESIDUAL_TOL:
        notes.append(f"the exact solve's relative residual ‖F•ζ − ∇h‖/‖∇h‖ is {residual:.2e} (> {EXACT_RESIDUAL_TOL:g})")
    # how much of ∇h (true labels) lies outside the span of the Jacobian rows (e.g. mc-sampled ones);
    # Uᵀ∇h = (K + λI)Uᵀζ for the Woodbury ζ (to its residual)
    rhs_outside = None
    if basis is not None:
        c = basis.W.T @ (jac.gram @ za.product + lam * za.product)
        rhs_outside = max(0.0, 1.0 - float((c.pow(2) / basis.mu).sum()) / float(w.pow(2).sum()))

    t0 = time.perf_counter()
    kfac = KFAC.from_capture(jac, lam, "pi")
    zK = kfac.apply_inverse(w)
    t_kfac = time.perf_counter() - t0
    aK = anatomy(jac, basis, zK - zeta, top=top_modes) if basis is not None else None  # U_iᵀ(ζ_KFAC − ζ)_i: the corrections' anatomies
    E_kfac = aK.total if aK is not None else float(exact.fisher_norm2(zK - zeta)[0])
    FzK = fisher_times(zK, aK.product + za.product if aK is not None else None)
    zKFzK = _dot(zK, FzK)
    pieces = Pieces(jac, lam, w[:, 0], exact=exact, kfac=kfac)
    ctx = pieces.coarse_context(kfac)  # ζ_KFAC and r = ∇h − F•ζ_KFAC (3.13), shared by every coarse correction
    ctx.__dict__.update(zeta_kfac=zK, residual=w - FzK)
    Uzeta = za.product if za is not None else None  # Uᵀζ: each method's xᵀF•x then comes from its anatomy's Uᵀe
    if cache is not None:
        cache.save(jac, woodbury=(lam, exact._chol) if exact._chol is not None else None)
    setup_s = time.perf_counter() - t_setup - t_kfac - t_exact  # KFAC's and ζ's own time go to their rows
    sizes = {"k": k, "m": m, "q": q}
    per_method = dict(options or {})

    table = ComparisonTable()
    worse: list[str] = []
    for name in names:
        if progress is not None:
            progress(name)
        method = registry.get(name)
        note = ""
        t0 = time.perf_counter()
        coarse_dim = None
        op = None
        if method.builder is None:  # the zero step
            x = torch.zeros_like(w)
        elif name == "kfac" and not per_method.get(name):
            op, x = kfac, zK  # the reference itself, solved in the setup
        else:
            opts = {key: val for key, val in sizes.items() if key in method.options}
            opts.update(per_method.get(name, {}))
            try:
                op = registry.build(name, pieces, **opts)
            except FisherlabError as err:
                if method.family.coarse and "defined for Linear layers" in str(err):
                    table.rows.append({**sample, **_na_row(name, str(err).split(";")[0])})
                    continue
                raise
            # a coarse correction's increment from the shared ζ_KFAC and r (= op.apply_inverse(w))
            x = op.increment() if isinstance(op, CoarseCorrection) and op.rhs is not None else op.apply_inverse(w)
        seconds = time.perf_counter() - t0 + (t_kfac if op is kfac else 0.0) + (t_exact if op is exact else 0.0)
        e = x - zeta
        if basis is not None:
            if op is None:  # the zero step: e = −ζ
                known = [-y for y in za.layer_products]
            elif op is kfac:
                known = aK.layer_products
            elif isinstance(op, CoarseCorrection) and op.base is kfac and op.rhs is not None:
                known = op.layer_products(aK.layer_products)
            else:
                known = None
            an = anatomy(jac, basis, e, top=top_modes, layer_products=known)
            E, span, null = an.total, an.span, an.null
        else:
            an, E, span, null = None, float(exact.fisher_norm2(e)[0]), math.nan, math.nan
        own_gap = None  # a coarse correction's gap (4.6) to its own one-level base: what theory bounds
        if method.family.coarse and isinstance(op, CoarseCorrection):
            own_gap = gap = op.gap()
            if op.base is not kfac:  # over another base: the gap to KFAC adds the base's own gap to KFAC
                xb = op.base.apply_inverse(w)
                gap = own_gap + float((xb * exact.apply(xb)).sum()) - zKFzK - 2 * float(((xb - zK) * w).sum())
                note = f"over {getattr(op.base, 'name', 'another base')}"
            coarse_dim = op.coarse_dim
            if coarse_dim < sum(op.raw_dims):
                note = "; ".join(filter(None, [note, f"{sum(op.raw_dims) - coarse_dim} dependent coarse column(s) dropped"]))
            space_note = getattr(op.space, "note", "")
            if space_note:
                note = "; ".join(filter(None, [note, space_note]))
            ratio = 1.0 + gap / E_kfac if E_kfac > 0 else float("nan")
        else:
            if op is kfac:
                gap = 0.0
            else:  # xᵀF•x = ‖Uᵀx‖² + λ‖x‖², with Uᵀx = Uᵀζ + Uᵀe from the anatomy (no further product)
                xFx = (float((Uzeta + an.product).pow(2).sum()) + lam * _dot(x, x) if an is not None
                       else _dot(x, exact.apply(x)))
                gap = xFx - zKFzK - 2 * _dot(x - zK, w)
            ratio = E / E_kfac if E_kfac > 0 else float("nan")
        checked = gap if own_gap is None else own_gap
        if method.family.gap_violation(checked, E_kfac + zeta_norm2 + abs(gap - checked)):
            msg = f"gap (4.6) of '{name}' is {checked:.3e} > 0; theory says ≤ 0 (𝔈_KFAC = {E_kfac:.3e})"
            note = "; ".join(filter(None, [note, msg]))
            notes.append(msg)
        rel = E / zeta_norm2 if zeta_norm2 > 0 else float("nan")
        is_worse = method.family is not Family.BASELINE and rel > 1.0
        if is_worse:
            note = "; ".join(filter(None, [note, "worse than the zero step (𝔈 > ‖ζ‖²_F•)"]))
            worse.append(f"{method.legend} ({rel:.3g})")
        xn = float(x.norm())
        table.rows.append({
            **sample,
            "method": name,
            "legend": method.legend,
            "family": method.family.value,
            "energy_error": E,
            "relative_error": rel,
            "error_span": span,
            "error_null": null,
            "reduction_ratio": ratio,
            "gap": gap,
            "euclidean_relative_error": float(e.norm()) / zeta_norm if zeta_norm > 0 else float("nan"),
            "cosine": _dot(x, zeta) / (xn * zeta_norm) if xn > 0 and zeta_norm > 0 else float("nan"),
            "worse_than_zero": is_worse,
            "coarse_dim": coarse_dim,
            "seconds": seconds,
            "note": note,
            "zeta_null_share": za.null / zeta_norm2 if za is not None and zeta_norm2 > 0 else None,
            "rhs_outside_span": rhs_outside,
            "setup_s": setup_s,
        })
        if an is not None and za is not None:
            for i, (spec, (en, ef), (zn, zf)) in enumerate(zip(jac.layout.layers, an.layers, za.layers)):
                table.layers.append({**sample, "method": name, "layer": i, "name": spec.name, "error_norm": en,
                                     "error_fisher": ef, "zeta_norm": zn, "zeta_fisher": zf})
            for j, (c, cz) in enumerate(zip(an.modes.tolist(), za.modes.tolist())):
                table.modes.append({**sample, "method": name, "mode": j, "eigenvalue": float(basis.mu[j]) + lam,
                                    "coefficient": c, "zeta_coefficient": cz,
                                    "relative": abs(c) / abs(cz) if cz != 0 else float("nan")})
    if cache is not None:  # what the methods computed beyond the setup (e.g. KFAC eigenpairs)
        cache.save(jac)
    if worse:
        notes.append("worse than the zero step: " + ", ".join(worse))
    if notes:
        warnings.warn("compare: " + "; ".join(notes), MeasurementWarning, stacklevel=2)
    table.meta = {
        "damping": lam,
        "damping_input": str(damping) if isinstance(damping, Damping) else f"λ = {lam:g}",
        "damping_scales": scale.relative(lam) if scale is not None else {},
        "lambda_max": scale.lambda_max if scale is not None else None,
        "fisher_mean_eig": scale.mean if scale is not None else None,
        "fisher_rank": scale.rank if scale is not None else None,
        "N": jac.N,
        "p": jac.p,
        "B": jac.B,
        "K": jac.K,
        "zeta_norm2": zeta_norm2,
        "zeta_span": za.span if za is not None else None,
        "zeta_null": za.null if za is not None else None,
        "zeta_null_share": za.null / zeta_norm2 if za is not None and zeta_norm2 > 0 else None,
        "rhs_outside_span": rhs_outside,
        "energy_error_kfac": E_kfac,
        "solver": exact.report(),
        "exact_seconds": t_exact,
        "setup_s": setup_s,
        **({"cache": cache.summary()} if cache is not None else {}),
        "exact_residual": residual,
        "dense_rows": list(held),
        "notes": notes,
        **({"sample": sample} if sample else {}),
    }
    return table


def _dot(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ of two ``[p]`` or ``[p, 1]`` vectors without a p-sized temporary (at p ~ 1e7 each
    temporary costs its page faults, ~40 ms)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _na_row(name: str, note: str) -> dict:
    nan = float("nan")
    return {
        "method": name, "legend": registry.legend(name), "family": registry.get(name).family.value, "energy_error": nan,
        "relative_error": nan, "error_span": nan, "error_null": nan, "reduction_ratio": nan, "gap": nan,
        "euclidean_relative_error": nan, "cosine": nan, "worse_than_zero": None, "coarse_dim": None,
        "seconds": nan, "note": note, "zeta_null_share": None, "rhs_outside_span": None,
    }


def compare_file(
    path: str | Path,
    damping: float | Damping,
    methods: Sequence[str] | None = None,
    *,
    checkpoints: Sequence[str] | None = None,
    progress: bool = True,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    stream: bool | None = None,
    on_checkpoint: Callable[[ComparisonTable], None] | None = None,
    scheduler=None,
    retries: int | None = None,
    **kw,
) -> ComparisonTable:
    """:func:`compare` for every complete checkpoint of a capture file (or those named).

    A checkpoint captured with several batches / draws (``fisherlab capture --batches B --draws D``)
    is compared over all its samples. Rows gain ``checkpoint``, ``step`` and ``damping`` (the
    resolved λ of each sample); a tqdm bar runs over samples × (setup + methods).

    Args:
        cache: use the setup cache beside the file (:mod:`fisherlab.cache`; ``False``: neither
            read nor written, CLI ``--no-cache``); ``cache_dir``: where it lives (``--cache-dir``).
        stream: ``None`` (default): the layers are streamed from the file, one at a time, when the
            in-memory plan does not fit ``memory=`` (:func:`fisherlab.planning.jacobian_from_file`);
            ``True``/``False`` forces it.
        on_checkpoint: called with each checkpoint's table as soon as it is complete (the drivers
            write their CSV files there, so a stopped run keeps what it finished).
        scheduler: ``"local:4"``, ``"tcp://host:8786"`` or a ``distributed.Client``
            (:mod:`fisherlab.distributed`): the samples run as tasks on Dask workers that read
            them from ``path`` (at the same path on every worker); with fewer samples than workers
            each sample's methods are split over several tasks sharing one Gram K = Σ_i K_i,
            computed by one task per layer and reduced on the client. Same rows in the same order
            as the serial run (``seconds`` and ``setup_s`` aside); each task is the serial run's
            step (:func:`sample_table`: layers streamed under ``memory=``, the setup cache read
            and filled, so the cache folder must be shared too). ``retries``: of a task that raised.
        **kw: the options of :func:`compare` (``memory``, ``device``, ``precision``, sizes, …).
    """
    from .io.progress import tqdm
    from .store import select_checkpoints

    if not isinstance(damping, Damping):
        resolve_damping(damping)  # a bad number fails before any file is read
    infos = select_checkpoints(path, checkpoints)
    names = list(methods) if methods is not None else registry.default_keys()
    if scheduler is not None:  # the same tables, computed on Dask workers
        return _compare_file_on(scheduler, path, infos, damping, names, progress=progress, retries=retries,
                                on_checkpoint=on_checkpoint, options=kw, cache=cache, cache_dir=cache_dir, stream=stream)
    bar = tqdm(total=len(infos) * (len(names) + 1), desc="compare", unit="step", disable=not progress, leave=False)
    tables = []
    try:
        for info in infos:
            table = sample_table(path, info.name, info.step, damping, names, kw, cache=cache, cache_dir=cache_dir, stream=stream,
                                 progress=lambda m, c=info.name: (bar.set_postfix_str(f"{c}: {m}"), bar.update(1)))
            tables.append(table)
            if on_checkpoint is not None:
                on_checkpoint(table)
    finally:
        bar.close()
    out = ComparisonTable.concat(tables)
    out.meta = {"damping": tables[0].meta["damping"] if tables else None,
                "damping_input": tables[0].meta["damping_input"] if tables else str(damping),
                "checkpoints": [t.meta for t in tables], "notes": out.meta.get("notes", [])}
    return out


# ---- compare_file on a Dask cluster: pure tasks of (path, sample, damping, methods, options) ---


def sample_table(path: str, name: str, step: int | None, damping: float | Damping, methods: Sequence[str],
                 options: Mapping, gram: Tensor | None = None, *, cache: bool = True, cache_dir: str | Path | None = None,
                 stream: bool | None = None, progress: Callable[[str], None] | None = None) -> ComparisonTable:
    """:func:`compare` of the sample ``name`` of the file ``path`` (read here, read-only), rows gaining
    ``checkpoint`` (the sample's group), ``step`` and ``damping``: one step of :func:`compare_file`,
    serial or as a Dask task (``scheduler=``), the same in both.

    The layers are held as ``options["memory"]`` allows (in memory, or streamed from the file:
    :func:`fisherlab.planning.jacobian_from_file`); the setup comes from, and goes to, the cache
    beside the file (``cache``, ``cache_dir``; :mod:`fisherlab.cache`: entries are published
    atomically, so workers sharing it are safe). ``gram``: its K = UᵀU ``[N, N]`` when already
    reduced (:func:`reduced_gram`). ``options``: those of :func:`compare`.
    """
    from .cache import SetupCache
    from .planning import jacobian_from_file

    precision = options.get("precision", "float64")
    fj = jacobian_from_file(path, name, methods=methods, memory=options.get("memory"), device=options.get("device"),
                            precision=precision, stream=stream)
    try:
        entry = SetupCache(path, cache_dir=cache_dir).entry(name, fj.fingerprint, precision) if cache else None
        if gram is not None:
            fj.jac.gram = gram.to(device=fj.jac.device, dtype=fj.jac.dtype)  # the cached property, given
        # compare plans again, for the path chosen: the budget bounds the dense rows it holds too
        table = compare(fj.jac, damping, methods, rhs=fj.grad, sample=fj.sample, cache=entry, progress=progress, **options)
    finally:
        fj.close()
    group = fj.sample.get("of", name)
    for rows in (table.rows, table.layers, table.modes):
        for r in rows:
            r.update(checkpoint=group, step=step, damping=table.meta["damping"])
    table.meta.update(checkpoint=group, step=step, streamed=fj.streamed)
    return table


def _sample_task(*args, **kw) -> ComparisonTable:
    """:func:`sample_table` on a Dask worker: its MeasurementWarnings stay in the table's notes
    (the client warns them once, as the serial run does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        return sample_table(*args, **kw)


def layer_gram(path: str, name: str, layer: int, options: Mapping) -> Tensor:
    """A task: the Gram K_i ``[N, N]`` of one layer of checkpoint ``name`` (only that layer read),
    on the CPU, as :attr:`Jacobian.grams` computes it (``device``, ``precision`` of ``options``)."""
    from .store import load

    jac = Jacobian.coerce(load(path, name, layers=[layer]), device=options.get("device"), precision=options.get("precision", "float64"))
    return jac.grams[0].cpu()


def reduced_gram(grams: Sequence[Tensor]) -> Tensor:
    """K = Σ_i K_i of per-layer Grams, in layer order and summed as :attr:`Jacobian.gram` sums them."""
    return torch.stack(list(grams)).sum(0) if len(grams) > 1 else grams[0]


def _compare_file_on(scheduler, path, infos, damping, names, *, progress, retries, on_checkpoint, options,
                     cache=True, cache_dir=None, stream=None) -> ComparisonTable:
    """:func:`compare_file`'s table computed on a Dask cluster (:mod:`fisherlab.distributed`)."""
    from . import distributed as dd

    path = str(Path(path).resolve())  # the workers may run elsewhere
    retries = dd.DEFAULT_RETRIES if retries is None else retries
    with dd.connect(scheduler) as client:
        parts = dd.chunks(names, max(1, dd.n_workers(client) // len(infos)))
        grams: list = [None] * len(infos)
        if len(parts) > 1:  # several tasks per sample share its Gram, split by layer
            counts = [len(info.layers) for info in infos]
            tasks = [dd.Task(layer_gram, (path, info.name, i, options), label=f"{info.name}: layer {i}") for info, n in zip(infos, counts) for i in range(n)]
            per_layer = dd.run_tasks(client, tasks, desc="grams", progress=progress, retries=retries)
            starts = [sum(counts[:j]) for j in range(len(infos))]
            grams = [client.scatter(reduced_gram(per_layer[s:s + n]), broadcast=True) for s, n in zip(starts, counts)]
        where = {"cache": cache, "cache_dir": None if cache_dir is None else str(Path(cache_dir).resolve()), "stream": stream}
        tasks = [dd.Task(_sample_task, (path, info.name, info.step, damping, part, options), {"gram": g, **where}, label=f"{info.name}: {part[0]}")
                 for info, g in zip(infos, grams) for part in parts]
        tables: list[ComparisonTable] = []
        pending: list[ComparisonTable] = []

        def part_done(_: int, part: ComparisonTable) -> None:  # in task order: a sample is done with its last part
            pending.append(part)
            if len(pending) == len(parts):
                tables.append(_merge_parts(pending[:]))
                pending.clear()
                if tables[-1].meta.get("notes"):
                    warnings.warn("compare: " + "; ".join(tables[-1].meta["notes"]), MeasurementWarning, stacklevel=1)
                if on_checkpoint is not None:
                    on_checkpoint(tables[-1])

        dd.run_tasks(client, tasks, desc="compare", progress=progress, retries=retries, in_order=part_done)
    out = ComparisonTable.concat(tables)
    out.meta = {"damping": tables[0].meta["damping"], "damping_input": tables[0].meta["damping_input"],
                "checkpoints": [t.meta for t in tables], "notes": out.meta.get("notes", [])}
    return out


def _merge_parts(parts: list[ComparisonTable]) -> ComparisonTable:
    """One sample's table from its method parts, in method order: rows, layers and modes joined;
    the first part's meta with every part's notes."""
    if len(parts) == 1:
        return parts[0]
    out = ComparisonTable.concat(parts)
    out.meta = {**parts[0].meta, "notes": list(dict.fromkeys(out.meta.get("notes", [])))}
    return out
