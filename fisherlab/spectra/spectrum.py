"""The result of every spectrum computation: :class:`Spectrum`, a discrete spectral measure
``Σ_j w_j δ(x − x_j)`` normalised by p, with its densities, moments, CSV round trip and summary row.

Also :class:`SpectrumMethod` (how a spectrum was computed), :func:`condition_number`, the display
names of the operators (:data:`OPERATOR_LABELS`, :func:`operator_label`) and
:func:`write_summary_csv`. Files are written through :mod:`fisherlab.io.tables`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from .._validate import parse_enum
from ..errors import FisherlabError
from ..io.tables import read_csv, write_csv
from ..methods import legend

__all__ = [
    "OPERATOR_LABELS",
    "Spectrum",
    "SpectrumMethod",
    "condition_number",
    "operator_label",
    "parse_method",
    "write_summary_csv",
]

OPERATOR_LABELS = {
    "fisher": "F•",
    "kfac": "F•KFAC",
    "kfac-tikhonov": "F•KFAC (Tikhonov)",
    "preconditioned": "F•KFAC^-1/2 F• F•KFAC^-1/2",
}
"""Display names of the operators (error operators: ``"error-<coarse space>"``)."""


class SpectrumMethod(str, Enum):
    """How a spectrum was computed."""

    EXACT = "exact"
    """Closed form: F• from the N × N Gram, F•KFAC from the factor eigenvalues."""
    DENSE = "dense"
    """Eigenvalues of the dense p × p matrix (tiny nets)."""
    LANCZOS = "lanczos"
    """The k largest and k smallest eigenvalues by ARPACK (``scipy.sparse.linalg.eigsh``)."""
    SLQ = "slq"
    """Stochastic Lanczos quadrature: Ritz values and Gauss weights averaged over probes."""


def parse_method(method: str | SpectrumMethod) -> str:
    """The method's value; a one-line :class:`~fisherlab.errors.ConfigError` (a ValueError) naming
    the valid ones otherwise."""
    return parse_enum(method, SpectrumMethod, "spectrum method").value


def operator_label(name: str) -> str:
    """Display name of an operator key (``"fisher"``, ``"kfac"``, ``"error-nicolaides"``, …)."""
    if name in OPERATOR_LABELS:
        return OPERATOR_LABELS[name]
    if name.startswith("error-"):
        return f"(I−Π)(I−F•KFAC⁻¹F•) {legend(name[len('error-') :])}"
    return name


def condition_number(values: np.ndarray | Sequence[float]) -> float:
    """``max(values)/min(values)`` for positive values; NaN when the smallest is ≤ 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan")
    lo, hi = float(v.min()), float(v.max())
    return hi / lo if lo > 0 else float("nan")


@dataclass
class Spectrum:
    """A discrete spectral measure ``μ = Σ_j w_j δ(x − x_j)`` of a p × p operator.

    For ``exact`` and ``dense`` spectra ``μ`` is the eigenvalue distribution (each eigenvalue
    weighs 1/p; F• stores its λ-cluster once, with weight ``(p − N)/p``), so
    ``moment(k) = tr(A^k)/p``. For ``slq`` the Ritz values and Gauss weights averaged over
    probes (weights sum to 1; ``moment(k)`` is an unbiased estimate of ``tr(A^k)/p`` for
    ``k ≤ 2·n_steps − 1``). For ``lanczos`` the extreme Ritz values only (1/p each).

    Attributes:
        operator: the operator's key (``"fisher"``, ``"kfac"``, ``"kfac-tikhonov"``,
            ``"preconditioned"``, ``"error-<coarse space>"``).
        method: a :class:`SpectrumMethod` value.
        values: ``[n]`` eigenvalues, Ritz values or quadrature nodes, ascending.
        weights: ``[n]`` their masses (see above).
        damping: λ.
        p: the operator's dimension.
        condition_number: ``λ_max/λ_min`` (an estimate from Ritz values for ``lanczos``/``slq``;
            NaN when the spectrum is not positive).
        vectors: optional eigenvectors ``[p, k]`` of the k largest eigenvalues (F• only).
        info: method parameters (probes, steps, seed, coarse dimension, convergence …).
    """

    operator: str
    method: str
    values: np.ndarray
    weights: np.ndarray
    damping: float
    p: int
    condition_number: float = float("nan")
    vectors: Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64).reshape(-1)
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if v.shape != w.shape:
            raise ValueError(f"Spectrum: {v.size} values but {w.size} weights")
        order = np.argsort(v, kind="stable")
        self.values, self.weights = v[order], w[order]
        self.method = parse_method(self.method)

    # ---- simple statistics -------------------------------------------------------------
    @property
    def label(self) -> str:
        """Display name of the operator."""
        return operator_label(self.operator)

    @property
    def complete(self) -> bool:
        """Whether the weights describe the whole spectrum (sum to 1)."""
        return bool(abs(self.weights.sum() - 1.0) < 1e-8)

    @property
    def lambda_min(self) -> float:
        return float(self.values[0]) if self.values.size else float("nan")

    @property
    def lambda_max(self) -> float:
        return float(self.values[-1]) if self.values.size else float("nan")

    @property
    def spectral_radius(self) -> float:
        """``max_j |x_j|``."""
        return float(np.abs(self.values).max()) if self.values.size else float("nan")

    def moment(self, k: int) -> float:
        """``Σ_j w_j x_j^k`` (= ``tr(A^k)/p`` for a complete exact spectrum)."""
        return float(np.sum(self.weights * self.values**k))

    def counts(self) -> np.ndarray:
        """``[n]`` multiplicities ``p · w_j`` (integers for exact spectra)."""
        return self.weights * self.p

    # ---- densities ---------------------------------------------------------------------
    def _log_ok(self, log: bool | None) -> bool:
        return bool(self.values.size and self.values[0] > 0) if log is None else bool(log)

    def grid(self, n: int = 400, *, log: bool | None = None, pad: float = 0.05) -> np.ndarray:
        """A grid ``[n]`` over the spectrum (in ``log10`` units when ``log``; default: log when all
        values are positive), padded by ``pad`` times its span on each side."""
        log = self._log_ok(log)
        x = self._coords(log)[0]
        if x.size == 0:
            return np.linspace(0.0, 1.0, n)
        lo, hi = float(x.min()), float(x.max())
        span = hi - lo if hi > lo else max(abs(hi), 1.0)
        return np.linspace(lo - pad * span - 3 * self._default_sigma(x, span), hi + pad * span + 3 * self._default_sigma(x, span), n)

    @staticmethod
    def _default_sigma(x: np.ndarray, span: float) -> float:
        return span / 100 if span > 0 else 1e-3

    def _coords(self, log: bool) -> tuple[np.ndarray, np.ndarray]:
        if not log:
            return self.values, self.weights
        keep = self.values > 0
        return np.log10(self.values[keep]), self.weights[keep]

    def density(self, grid: np.ndarray, sigma: float | None = None, *, log: bool | None = None) -> np.ndarray:
        """Gaussian-broadened density ``Σ_j w_j N(grid; x_j, σ²)`` ``[len(grid)]``.

        Args:
            grid: evaluation points (``log10`` eigenvalues when ``log``).
            sigma: broadening (default: 1 % of the spectrum's span in the chosen units).
            log: density of ``log10 x`` (only positive values count); default: log when all
                values are positive.

        Returns:
            The density; it integrates to ``Σ w_j`` (1 for a complete spectrum) over a grid that
            covers the spectrum by a few σ.
        """
        log = self._log_ok(log)
        x, w = self._coords(log)
        g = np.asarray(grid, dtype=np.float64)
        if sigma is None:
            span = float(x.max() - x.min()) if x.size else 1.0
            sigma = self._default_sigma(x, span)
        out = np.zeros_like(g)
        norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
        step = max(1, 2**22 // max(g.size, 1))
        for s in range(0, x.size, step):  # bounded [chunk, grid] temporaries
            d = (g[None, :] - x[s : s + step, None]) / sigma
            out += (w[s : s + step, None] * np.exp(-0.5 * d * d)).sum(0)
        return out * norm

    def cdf(self, grid: np.ndarray, *, log: bool | None = None) -> np.ndarray:
        """``μ(x ≤ grid)`` ``[len(grid)]`` (the fraction of eigenvalues below each point)."""
        log = self._log_ok(log)
        x, w = self._coords(log)
        c = np.concatenate([[0.0], np.cumsum(w)])
        return c[np.searchsorted(x, np.asarray(grid, dtype=np.float64), side="right")]

    def binned(self, bins: int = 2000) -> "Spectrum":
        """The measure with its values merged into ``bins`` bins (log-spaced when positive):
        each bin keeps its total weight at its weighted mean, so ``moment(1)`` is unchanged.
        For storing spectra of millions of eigenvalues compactly."""
        if self.values.size <= bins:
            return self
        log = self._log_ok(None)
        x = np.log10(self.values) if log else self.values
        edges = np.linspace(x[0], x[-1], bins + 1)
        idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
        w = np.bincount(idx, weights=self.weights, minlength=bins)
        s = np.bincount(idx, weights=self.weights * self.values, minlength=bins)
        keep = w > 0
        info = dict(self.info, binned=bins)
        return Spectrum(self.operator, self.method, s[keep] / w[keep], w[keep], self.damping, self.p, self.condition_number, None, info)

    # ---- export ------------------------------------------------------------------------
    def summary(self) -> dict:
        """One row: operator, method, λ, p, extremes, condition number, spectral radius, tr/p."""
        return {
            "operator": self.operator,
            "label": self.label,
            "method": self.method,
            "damping": self.damping,
            "p": self.p,
            "n_values": int(self.values.size),
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "condition_number": self.condition_number,
            "spectral_radius": self.spectral_radius,
            "mean": self.moment(1) if self.complete else float("nan"),
            "second_moment": self.moment(2) if self.complete else float("nan"),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }

    def to_csv(self, path: str | Path) -> Path:
        """Write ``operator, method, damping, p, value, weight`` per value (full precision)."""
        rows = ((self.operator, self.method, float(self.damping), self.p, x, m) for x, m in zip(self.values.tolist(), self.weights.tolist()))
        return write_csv(rows, path, columns=["operator", "method", "damping", "p", "value", "weight"])

    @classmethod
    def read_csv(cls, path: str | Path) -> "Spectrum":
        """Read back a file written by :meth:`to_csv` (condition number recomputed from the values)."""
        rows = read_csv(path)
        if not rows:
            raise FisherlabError(f"{path}: no spectrum rows")
        vals = np.array([float(r["value"]) for r in rows])
        wts = np.array([float(r["weight"]) for r in rows])
        r0 = rows[0]
        return cls(r0["operator"], r0["method"], vals, wts, float(r0["damping"]), int(r0["p"]), condition_number(vals))

    def _repr_html_(self) -> str:
        """Jupyter: a one-row table (operator, method, damping, p, eigenvalues kept, range, condition number)."""
        from html import escape

        cells = {"operator": self.operator, "method": self.method, "λ (damping)": f"{self.damping:.3g}",
                 "p": f"{self.p:,}", "eigenvalues": self.values.size, "λ_min": f"{self.lambda_min:.3e}",
                 "λ_max": f"{self.lambda_max:.3e}", "condition number": f"{self.condition_number:.3e}"}
        head = "".join(f"<th>{escape(k)}</th>" for k in cells)
        row = "".join(f"<td>{escape(str(v))}</td>" for v in cells.values())
        return f"<table><tr>{head}</tr><tr>{row}</tr></table>"

    def __repr__(self) -> str:
        return (
            f"Spectrum({self.operator!r}, method={self.method!r}, p={self.p}, n={self.values.size}, "
            f"range=[{self.lambda_min:.3e}, {self.lambda_max:.3e}], cond={self.condition_number:.3e})"
        )


def write_summary_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write summary dicts (e.g. :meth:`Spectrum.summary` plus context keys) as one CSV (columns in
    first-seen order, empty cells for missing keys, floats in full precision)."""
    return write_csv(rows, path)
