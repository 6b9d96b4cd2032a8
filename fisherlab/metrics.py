"""Errors against the exact regularized natural gradient (§4.4, MATH.md §6): one table per capture.

For each method with increment ζ_m ≈ ζ = F•⁻¹∇h:

* 𝔈 = ‖ζ_m − ζ‖²_{F•} (4.1), with ‖x‖²_{F•} = ‖Uᵀx‖² + λ‖x‖²;
* 𝔈/‖ζ‖²_{F•}, where ‖ζ‖²_{F•} = ∇hᵀζ;
* the reduction ratio 𝔈/𝔈_KFAC (π-damped KFAC is the reference: 𝔈_KFAC = 𝔈(0) of (4.2));
* the gap 𝔈 − 𝔈_KFAC computed **without** ζ: (4.6) βᵀF_coarseβ − 2⟨R_0ᵀβ, r⟩ for the coarse
  corrections, and for any other method, since F•ζ = ∇h,
  ``‖x − ζ‖² − ‖y − ζ‖² = xᵀF•x − yᵀF•y − 2⟨x − y, ∇h⟩`` (y = ζ_KFAC);
* the Euclidean relative error ‖ζ_m − ζ‖/‖ζ‖ and the cosine of ζ_m with ζ (the guarantee (3.19)
  holds in the F•-norm only: both are shown);
* the coarse dimension m and the wall time.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import methods as registry
from .capturing.record import Capture
from .errors import FisherlabError
from .jacobian import Jacobian
from .methods import Family, Pieces
from .operators import KFAC, CoarseCorrection, ExactFisher, FisherOperator, check_damping

__all__ = ["METHODS", "LEGENDS", "ComparisonTable", "compare", "compare_file", "build_method", "COLUMNS"]

METHODS = registry.METHODS
"""Every method :func:`compare` knows (the registry :data:`fisherlab.methods.METHODS`; iterating
gives the keys in table order)."""

LEGENDS = {k: m.legend for k, m in registry.METHODS.items()}
"""Method key → legend, derived from the registry (kept for callers of the first API)."""

COLUMNS = [
    "method",
    "legend",
    "family",
    "energy_error",
    "relative_error",
    "reduction_ratio",
    "gap",
    "euclidean_relative_error",
    "cosine",
    "coarse_dim",
    "seconds",
    "note",
]


@dataclass
class ComparisonTable:
    """Rows of per-method errors (dicts with :data:`COLUMNS` plus context keys) and metadata.

    Attributes:
        rows: one dict per method (and per checkpoint when tables are concatenated).
        meta: damping, N, p, the exact solver's report, ‖ζ‖²_{F•}, …
    """

    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def row(self, method: str) -> dict:
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(f"no row for method '{method}' (methods: {', '.join(r['method'] for r in self.rows)})")

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]

    @property
    def columns(self) -> list[str]:
        extra = [k for r in self.rows for k in r if k not in COLUMNS]
        return [c for c in ["checkpoint", "step", "damping"] if c in extra] + COLUMNS + sorted(
            {k for k in extra if k not in ("checkpoint", "step", "damping")}
        )

    def to_csv(self, path: str | Path) -> Path:
        """Write all rows (full precision) to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = self.columns
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        return path

    @classmethod
    def concat(cls, tables: Iterable["ComparisonTable"]) -> "ComparisonTable":
        out = cls()
        for t in tables:
            out.rows.extend(t.rows)
        return out

    def format(self) -> str:
        """A readable fixed-width table (what ``str()`` prints)."""
        head = ["method", "𝔈", "𝔈/‖ζ‖²", "𝔈/𝔈_KFAC", "gap (4.6)", "‖Δ‖/‖ζ‖", "cos", "m", "time s"]
        ctx = [c for c in ("checkpoint", "step") if any(c in r for r in self.rows)]
        head = ctx + head
        body = []
        for r in self.rows:
            cells = [str(r.get(c, "")) for c in ctx] + [
                r["legend"],
                _fmt(r["energy_error"]),
                _fmt(r["relative_error"]),
                _fmt(r["reduction_ratio"], "{:.4f}"),
                _fmt(r["gap"], "{:+.3e}"),
                _fmt(r["euclidean_relative_error"]),
                _fmt(r["cosine"], "{:.5f}"),
                "" if r["coarse_dim"] is None else str(r["coarse_dim"]),
                _fmt(r["seconds"], "{:.3f}"),
            ]
            body.append(cells)
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) if i >= len(ctx) + 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = []
        if self.meta:
            m = self.meta
            out.append(
                f"λ = {m.get('damping', float('nan')):g}   N = {m.get('N')}   p = {m.get('p', 0):,}   "
                f"‖ζ‖²_F• = {_fmt(m.get('zeta_norm2'))}   exact: {m.get('solver', '')}"
            )
        out.append(line(head))
        out.append("  ".join("-" * w for w in widths))
        for r, b in zip(self.rows, body):
            out.append(line(b) + (f"  ({r['note']})" if r.get("note") else ""))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def _fmt(x, spec: str = "{:.3e}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return spec.format(x)


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
    capture: Capture | Jacobian,
    damping: float,
    methods: Sequence[str] | None = None,
    *,
    rhs: Tensor | None = None,
    exact: ExactFisher | None = None,
    k: int = 1,
    m: int = 2,
    q: int = 2,
    options: Mapping[str, Mapping] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ComparisonTable:
    """Each method's increment against the exact ζ = F•⁻¹∇h, in isolation (§4.4).

    Args:
        capture: a :class:`Capture` (or a ready :class:`Jacobian` with ``rhs``).
        damping: λ > 0.
        methods: keys of :data:`fisherlab.methods.METHODS` (default: every method marked
            ``default``; ``tko-kronecker`` is reported as n/a for captures with conv layers).
        rhs: the right-hand side (default ``capture.grad``).
        exact: a ready :class:`ExactFisher` to reuse (default: built with the automatic solver).
        k, m, q: spectral, Krylov and Taylor sizes (given to the methods that take them).
        options: per-method options, ``{"taylor": {"q": 3}, "residuals": {"base": "diagonal"}}``.
        progress: called with each method key before it runs.

    The gap 𝔈 − 𝔈_KFAC is computed without ζ, by the method's family (:class:`Family`): (4.6) for
    coarse corrections, xᵀF•x − yᵀF•y − 2⟨x − y, ∇h⟩ otherwise (0 for the reference KFAC itself).
    The reduction ratio of a coarse correction is 1 + gap/𝔈_KFAC, so it is ≤ 1 exactly when its
    gap is ≤ 0; for the others it is 𝔈/𝔈_KFAC. A gap that breaks its family's bound is recorded
    in the row's ``note`` and in ``meta["notes"]``, and warned once.

    Returns:
        A :class:`ComparisonTable`; ``meta`` holds λ, N, p, ‖ζ‖²_{F•}, 𝔈_KFAC, the solver report
        and ``notes``.
    """
    lam = check_damping(damping)
    names = registry.default_keys() if methods is None else list(methods)
    for name in names:
        registry.get(name)  # one-line error for an unknown key
    jac = Jacobian.coerce(capture)
    if rhs is None:
        if not isinstance(capture, Capture):
            raise ValueError("compare: rhs is required when given a Jacobian")
        rhs = capture.grad
    w = rhs.to(torch.float64).reshape(-1, 1)
    if not bool(torch.isfinite(w).all()):
        raise FisherlabError("compare: the gradient ∇h contains NaN/Inf")
    if float(w.norm()) == 0.0:
        raise FisherlabError("compare: the gradient ∇h is zero; every increment is zero")

    exact = exact if exact is not None else ExactFisher(jac, lam)
    t0 = time.perf_counter()
    zeta = exact.apply_inverse(w)
    t_exact = time.perf_counter() - t0
    zeta_norm2 = float((w * zeta).sum())
    zeta_norm = float(zeta.norm())

    def fnorm2(x: Tensor) -> float:
        return float(exact.fisher_norm2(x)[0])

    t0 = time.perf_counter()
    kfac = KFAC.from_capture(jac, lam, "pi")
    zK = kfac.apply_inverse(w)
    t_kfac = time.perf_counter() - t0
    E_kfac = fnorm2(zK - zeta)
    zKFzK = float((zK * exact.apply(zK)).sum())
    pieces = Pieces(jac, lam, w[:, 0], exact=exact, kfac=kfac)
    sizes = {"k": k, "m": m, "q": q}
    per_method = dict(options or {})

    rows: list[dict] = []
    notes: list[str] = []
    for name in names:
        if progress is not None:
            progress(name)
        method = registry.get(name)
        opts = {key: val for key, val in sizes.items() if key in method.options}
        opts.update(per_method.get(name, {}))
        note = ""
        t0 = time.perf_counter()
        try:
            op = registry.build(name, pieces, **opts)
        except FisherlabError as err:
            if method.family.coarse and "defined for Linear layers" in str(err):
                rows.append(_na_row(name, str(err).split(";")[0]))
                continue
            raise
        x = op.apply_inverse(w)
        seconds = time.perf_counter() - t0 + (t_kfac if op is kfac else 0.0) + (t_exact if op is exact else 0.0)
        E = fnorm2(x - zeta)
        coarse_dim = None
        if method.family.coarse and isinstance(op, CoarseCorrection):
            gap = op.gap()
            coarse_dim = op.coarse_dim
            if coarse_dim < sum(op.raw_dims):
                note = f"{sum(op.raw_dims) - coarse_dim} dependent coarse column(s) dropped"
            ratio = 1.0 + gap / E_kfac if E_kfac > 0 else float("nan")
        else:
            gap = 0.0 if op is kfac else float((x * exact.apply(x)).sum()) - zKFzK - 2 * float(((x - zK) * w).sum())
            ratio = E / E_kfac if E_kfac > 0 else float("nan")
        if method.family.gap_violation(gap, E_kfac + zeta_norm2):
            msg = f"gap (4.6) of '{name}' is {gap:.3e} > 0; theory says ≤ 0 (𝔈_KFAC = {E_kfac:.3e})"
            note = "; ".join(filter(None, [note, msg]))
            notes.append(msg)
        xn = float(x.norm())
        rows.append(
            {
                "method": name,
                "legend": method.legend,
                "family": method.family.value,
                "energy_error": E,
                "relative_error": E / zeta_norm2 if zeta_norm2 > 0 else float("nan"),
                "reduction_ratio": ratio,
                "gap": gap,
                "euclidean_relative_error": float((x - zeta).norm()) / zeta_norm if zeta_norm > 0 else float("nan"),
                "cosine": float((x * zeta).sum()) / (xn * zeta_norm) if xn > 0 and zeta_norm > 0 else float("nan"),
                "coarse_dim": coarse_dim,
                "seconds": seconds,
                "note": note,
            }
        )
    if notes:
        warnings.warn("compare: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
    meta = {
        "damping": lam,
        "N": jac.N,
        "p": jac.p,
        "B": jac.B,
        "K": jac.K,
        "zeta_norm2": zeta_norm2,
        "energy_error_kfac": E_kfac,
        "solver": exact.report(),
        "exact_seconds": t_exact,
        "notes": notes,
    }
    return ComparisonTable(rows, meta)


def _na_row(name: str, note: str) -> dict:
    nan = float("nan")
    return {
        "method": name, "legend": registry.legend(name), "family": registry.get(name).family.value, "energy_error": nan, "relative_error": nan,
        "reduction_ratio": nan, "gap": nan, "euclidean_relative_error": nan, "cosine": nan,
        "coarse_dim": None, "seconds": nan, "note": note,
    }


def compare_file(
    path: str | Path,
    damping: float,
    methods: Sequence[str] | None = None,
    *,
    checkpoints: Sequence[str] | None = None,
    progress: bool = True,
    **kw,
) -> ComparisonTable:
    """:func:`compare` for every complete checkpoint of a capture file (or those named).

    Rows gain ``checkpoint``, ``step`` and ``damping``; a tqdm bar runs over checkpoints × methods.
    """
    from tqdm.auto import tqdm

    from .store import load, select_checkpoints

    lam = check_damping(damping)
    infos = select_checkpoints(path, checkpoints)
    names = list(methods) if methods is not None else registry.default_keys()
    bar = tqdm(total=len(infos) * len(names), desc="compare", unit="method", disable=not progress, leave=False)
    tables = []
    try:
        for info in infos:
            cap = load(path, info.name)
            table = compare(cap, lam, names, progress=lambda m, c=info.name: (bar.set_postfix_str(f"{c}: {m}"), bar.update(1)), **kw)
            for r in table.rows:
                r.update(checkpoint=info.name, step=info.step, damping=lam)
            table.meta.update(checkpoint=info.name, step=info.step)
            tables.append(table)
    finally:
        bar.close()
    out = ComparisonTable.concat(tables)
    out.meta = {"damping": lam, "checkpoints": [t.meta for t in tables]}
    return out
