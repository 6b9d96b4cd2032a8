"""Spectra of F•, F•KFAC, the KFAC-preconditioned operator and the two-level error operator (MATH.md §7).

Four operators, each ``[p, p]``:

* **F• = F + λI** (2.17). ``F = UUᵀ`` and ``K = UᵀU`` (``[N, N]``) share their nonzero
  eigenvalues, so the whole spectrum is exact from the Gram: ``eig(K) + λ`` and ``p − N``
  eigenvalues equal to λ (when N < p). The eigenvector of F for ``Ku = μu`` is ``Uu/√μ``.
* **F•KFAC** = blockdiag(Ã_i ⊗ G̃_i) (2.28)–(2.30): its eigenvalues are products of the damped
  factor eigenvalues (or ``s_G s_Aᵀ + λ`` for Tikhonov damping), exact from
  :meth:`fisherlab.operators.KFAC.eigenvalues`.
* **The KFAC-preconditioned operator** ``S = F•KFAC^{-1/2} F• F•KFAC^{-1/2}`` (symmetric, with the
  eigenvalues of F•KFAC⁻¹F•): dense for tiny nets, Lanczos extremes or SLQ otherwise.
* **The two-level error operator** ``E = (I − Π)(I − F•KFAC⁻¹F•)``, ``Π = R_0ᵀF_coarse⁻¹R_0F•``
  (3.16). E is not symmetric, but its spectrum is real: ``P = I − Π`` is an F•-orthogonal
  projection and ``M = I − F•KFAC⁻¹F•`` is F•-self-adjoint, and ``eig(PM) = eig(MP) = eig(PMP)``
  (``P² = P``) with multiplicities; ``PMP`` is F•-self-adjoint, so
  ``(F•PMP) x = μ F• x`` is a symmetric-definite generalized eigenproblem (``F•PMP =
  Pᵀ(F• − F•F•KFAC⁻¹F•)P``). Dense for tiny nets (``scipy.linalg.eigh(A, F•)``), Lanczos extremes
  through ``scipy.sparse.linalg.eigsh(A, M=F•, Minv=F•⁻¹)`` otherwise. E has at least m zero
  eigenvalues (one per coarse direction); its spectral radius governs the two-level iteration.

Methods (:class:`SpectrumMethod`): ``exact`` (closed forms above), ``dense`` (``eigvalsh`` of the
dense matrix; p ≤ :data:`DENSE_P_LIMIT`), ``lanczos`` (extreme eigenvalues by ARPACK) and ``slq``
(stochastic Lanczos quadrature: a spectral density from Rademacher probes). Every result is a
:class:`Spectrum`: a discrete spectral measure ``Σ_j w_j δ(x − x_j)`` normalised by p (exact and
dense: each eigenvalue weighs 1/p; SLQ: Gauss-quadrature weights averaged over probes; Lanczos:
the few extreme Ritz values, 1/p each).

Nothing here forms a p × p matrix outside the ``dense`` method.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .capturing.record import Capture
from .errors import FisherlabError
from .jacobian import Jacobian
from .methods import legend
from .operators import (
    KFAC,
    ExactFisher,
    FisherOperator,
    TwoLevelKFAC,
    check_damping,
)

__all__ = [
    "DENSE_P_LIMIT",
    "GRAM_N_LIMIT",
    "OPERATOR_LABELS",
    "Spectrum",
    "SpectrumMethod",
    "PreconditionedFisher",
    "TwoLevelErrorOperator",
    "FisherSquareRoot",
    "condition_number",
    "fisher_spectrum",
    "fisher_eigenvectors",
    "kfac_spectrum",
    "preconditioned_spectrum",
    "error_spectrum",
    "operator_spectrum",
    "lanczos_extremes",
    "lanczos_tridiagonal",
    "rademacher_probes",
    "slq",
    "spectra",
    "write_summary_csv",
]

DENSE_P_LIMIT = 3000
"""``method="auto"`` uses dense eigenvalue routines up to this p (the error and preconditioned operators)."""

GRAM_N_LIMIT = 8192
"""``method="auto"`` takes F•'s exact spectrum from the N × N Gram up to this N, Lanczos beyond."""

SLQ_MEMORY_BYTES = 2 * 2**30
"""Memory allowed for the Lanczos bases of SLQ (``n_steps · p · probes`` float64 numbers at once)."""

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


def _method(method: str) -> str:
    """The method's value; a one-line ValueError naming the valid ones otherwise."""
    try:
        return SpectrumMethod(method).value
    except ValueError:
        raise ValueError(f"unknown spectrum method {method!r} (choose from {', '.join(m.value for m in SpectrumMethod)})") from None


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


# ----------------------------------------------------------------------------------------------
# The result object
# ----------------------------------------------------------------------------------------------


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
        self.method = _method(self.method)

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["operator", "method", "damping", "p", "value", "weight"])
            for x, m in zip(self.values.tolist(), self.weights.tolist()):
                w.writerow([self.operator, self.method, repr(self.damping), self.p, repr(x), repr(m)])
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> "Spectrum":
        """Read back a file written by :meth:`to_csv` (condition number recomputed from the values)."""
        with Path(path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise FisherlabError(f"{path}: no spectrum rows")
        vals = np.array([float(r["value"]) for r in rows])
        wts = np.array([float(r["weight"]) for r in rows])
        r0 = rows[0]
        return cls(r0["operator"], r0["method"], vals, wts, float(r0["damping"]), int(r0["p"]), condition_number(vals))

    def __repr__(self) -> str:
        return (
            f"Spectrum({self.operator!r}, method={self.method!r}, p={self.p}, n={self.values.size}, "
            f"range=[{self.lambda_min:.3e}, {self.lambda_max:.3e}], cond={self.condition_number:.3e})"
        )


def write_summary_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write summary dicts (e.g. :meth:`Spectrum.summary` plus context keys) as one CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return path


# ----------------------------------------------------------------------------------------------
# Derived operators
# ----------------------------------------------------------------------------------------------


class PreconditionedFisher(FisherOperator):
    """The KFAC-preconditioned F• in KFAC's eigenbasis, ``[p, p]``, symmetric positive definite:

        S' = D^{-1/2} (Ũ Ũᵀ + λI) D^{-1/2} = Qᵀ (F•KFAC^{-1/2} F• F•KFAC^{-1/2}) Q,

    with ``F•KFAC = Q D Qᵀ``, ``Q = blockdiag(Q_{A,i} ⊗ Q_{G,i})`` (orthogonal) and ``Ũ = QᵀU``.
    S' and ``F•KFAC^{-1/2}F•F•KFAC^{-1/2}`` are orthogonally similar: same eigenvalues (those of
    F•KFAC⁻¹F•), eigenvectors mapped by :meth:`to_parameter_basis`. ``Ũ`` is U with rotated
    factors, ``ã = Q_Aᵀā``, ``g̃ = Q_Gᵀg`` (rows of dense layers rotated as ``Q_GᵀMAT(j)Q_A``),
    computed once, so a product costs one F• matvec instead of one plus four eigenbasis
    transforms (O(d_out²d_in' + d_out d_in'²) per column and layer).

    Args:
        kfac: the one-level :class:`KFAC` (its factor eigenbases and eigenvalues D).
        exact: the exact :class:`ExactFisher` F• (same λ and Jacobian).
    """

    name = "preconditioned"
    symmetric = True

    def __init__(self, kfac: KFAC, exact: ExactFisher) -> None:
        if kfac.p != exact.p:
            raise ValueError(f"KFAC has p = {kfac.p}, F• has p = {exact.p}")
        super().__init__(kfac.p, kfac.dtype)
        self.kfac, self.exact = kfac, exact
        self.damping = exact.damping
        self.jac = _rotated_jacobian(exact.jac, kfac)
        d = torch.cat([b.eig.mT.reshape(-1) for b in kfac.blocks])  # vec(eig): Y[r, c] ↔ index c·d_out + r
        self.d_inv_sqrt = d.to(self.dtype).rsqrt()[:, None]

    def _matmat(self, V: Tensor) -> Tensor:
        W = V * self.d_inv_sqrt
        return (self.jac.matmat(self.jac.rmatmat(W)) + self.damping * W) * self.d_inv_sqrt

    def _solve(self, W: Tensor) -> Tensor:
        return self.from_parameter_basis(self.exact.apply_inverse(self.to_parameter_basis(W / self.d_inv_sqrt))) / self.d_inv_sqrt

    def to_parameter_basis(self, Y: Tensor) -> Tensor:
        """``Q Y`` for ``Y [p, c]`` in KFAC-eigenbasis coordinates (e.g. eigenvectors of S')."""
        return self.kfac.from_eigenbasis(Y)

    def from_parameter_basis(self, X: Tensor) -> Tensor:
        """``Qᵀ X`` for ``X [p, c]``."""
        return self.kfac.to_eigenbasis(X)


def _rotated_jacobian(jac: Jacobian, kfac: KFAC) -> Jacobian:
    """``Ũ = QᵀU`` with ``Q = blockdiag(Q_A ⊗ Q_G)``: factors ``ā Q_A``, ``g Q_G`` (row vectors), or
    dense rows ``vec(Q_Gᵀ MAT(j) Q_A)``."""
    from .jacobian import LayerJacobian

    layers = []
    for lj, b in zip(jac.layers, kfac.blocks):
        QA, QG = b.QA.to(jac.dtype), b.QG.to(jac.dtype)
        if lj.factored:
            assert lj.a is not None and lj.g is not None
            layers.append(LayerJacobian(lj.spec, lj.B, lj.K, a=lj.a @ QA, g=lj.g @ QG))
        else:
            J = lj.dense_rows()
            Y = QG.T @ J.reshape(-1, b.d_in, b.d_out).mT @ QA  # [N, d_out, d_in']
            layers.append(LayerJacobian(lj.spec, lj.B, lj.K, dense=Y.mT.reshape(J.shape[0], -1)))
    return Jacobian(jac.layout, layers, jac.B, jac.K)


class FisherSquareRoot:
    """``F•^{±1/2}`` from the eigendecomposition of the N × N Gram (no p × p matrix).

    With ``K = UᵀU = W diag(μ) Wᵀ`` and ``Q = U W diag(μ)^{-1/2}`` (orthonormal columns, μ > 0),
    ``F• = λI + Q diag(μ) Qᵀ``, so ``F•^s = λ^s I + Q diag((μ + λ)^s − λ^s) Qᵀ`` for any s.
    Directions with ``μ ≤ rtol · μ_max`` are dropped (there ``F•^s`` differs from ``λ^s`` by
    ``O(μ)``).

    Args:
        jac: the Jacobian (its cached Gram is reused).
        damping: λ.
    """

    def __init__(self, jac: Jacobian, damping: float, rtol: float = 1e-12) -> None:
        self.jac, self.lam = jac, float(damping)
        mu, W = torch.linalg.eigh(jac.gram)
        keep = mu > rtol * max(float(mu.max()), 0.0) if mu.numel() else mu > 0
        keep &= mu > 0
        self.mu, self.W = mu[keep], W[:, keep]

    def power(self, V: Tensor, s: float) -> Tensor:
        """``F•^s V`` for ``V [p, c]``."""
        if self.mu.numel() == 0:
            return V * self.lam**s
        coef = ((self.mu + self.lam) ** s - self.lam**s) / self.mu  # Q d Qᵀ = U W diag(d/μ) Wᵀ Uᵀ
        Y = self.W.T @ self.jac.rmatmat(V)
        return self.lam**s * V + self.jac.matmat(self.W @ (coef[:, None] * Y))


class TwoLevelErrorOperator(FisherOperator):
    """``E = (I − Π)(I − F•KFAC⁻¹F•) = I − F•2L⁻¹F•`` (3.16) of a :class:`TwoLevelKFAC`, ``[p, p]``.

    ``@`` applies E (non-symmetric). :meth:`projected` applies ``PMP`` (same spectrum,
    F•-self-adjoint), :meth:`symmetric_form` applies ``F•PMP`` (symmetric), and
    :meth:`symmetrized` returns ``F•^{1/2} PMP F•^{-1/2}`` as a symmetric operator with E's
    spectrum (for Lanczos and SLQ), with ``P = I − R_0ᵀF_coarse⁻¹R_0F•`` and
    ``M = I − F•KFAC⁻¹F•``.
    """

    symmetric = False

    def __init__(self, two_level: TwoLevelKFAC) -> None:
        super().__init__(two_level.p, two_level.dtype)
        self.two_level = two_level
        self.name = f"error-{two_level.name}"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.two_level.error.apply(V)

    def P(self, V: Tensor) -> Tensor:
        """``(I − Π)V = V − R_0ᵀF_coarse⁻¹R_0F•V`` for ``V [p, c]``."""
        tl = self.two_level
        if tl.coarse_dim == 0:
            return V
        return V - tl.projector.apply(V)

    def M(self, V: Tensor) -> Tensor:
        """``(I − F•KFAC⁻¹F•)V`` for ``V [p, c]``."""
        tl = self.two_level
        return V - tl.base.apply_inverse(tl.exact.apply(V))

    def projected(self, V: Tensor) -> Tensor:
        """``PMP V``: F•-self-adjoint, ``eig(PMP) = eig(E)``."""
        return self.P(self.M(self.P(V)))

    def symmetric_form(self, V: Tensor) -> Tensor:
        """``F•PMP V`` (symmetric): the left side of ``F•PMP x = μ F• x``."""
        return self.two_level.exact.apply(self.projected(V))

    def symmetrized(self, sqrt: FisherSquareRoot | None = None, *, deflate: bool = False) -> FisherOperator:
        """``S = F•^{1/2} PMP F•^{-1/2}``: symmetric, similar to PMP, hence E's spectrum. Needs the
        N × N Gram (:class:`FisherSquareRoot`).

        With ``deflate``, S is restricted to the complement of its known null space
        ``F•^{1/2}R_0ᵀ`` (``P R_0ᵀ = 0``): ``(I − ZZᵀ) S (I − ZZᵀ)``, Z an orthonormal basis of
        that space, whose columns are in ``.null_basis``. Lanczos started in the complement then
        never meets the m-fold zero eigenvalue, a degenerate cluster ARPACK converges to slowly.
        """
        root = sqrt or FisherSquareRoot(self.two_level.exact.jac, self.two_level.damping)
        Z = None
        if deflate and self.two_level.coarse_dim:
            tl = self.two_level
            R0T = tl.R0T(torch.eye(tl.coarse_dim, dtype=self.dtype))
            Z = torch.linalg.qr(root.power(R0T, 0.5))[0]
        return _SymmetrizedError(self, root, Z)


class _SymmetrizedError(FisherOperator):
    symmetric = True

    def __init__(self, E: TwoLevelErrorOperator, root: FisherSquareRoot, null_basis: Tensor | None = None) -> None:
        super().__init__(E.p, E.dtype)
        self.E, self.root, self.null_basis = E, root, null_basis
        self.name = E.name

    def _deflate(self, V: Tensor) -> Tensor:
        Z = self.null_basis
        return V if Z is None else V - Z @ (Z.T @ V)

    def _matmat(self, V: Tensor) -> Tensor:
        V = self._deflate(V)
        return self._deflate(self.root.power(self.E.projected(self.root.power(V, -0.5)), 0.5))


# ----------------------------------------------------------------------------------------------
# Lanczos and SLQ
# ----------------------------------------------------------------------------------------------


def rademacher_probes(p: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[p, n]`` independent Rademacher (±1) vectors from a seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (p, n), generator=g).to(dtype) * 2 - 1)


def lanczos_tridiagonal(
    matmat: Callable[[Tensor], Tensor], Z: Tensor, n_steps: int, *, breakdown_rtol: float = 1e-12
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lanczos with full reorthogonalization, run on the columns of ``Z`` at once.

    For each column z: ``q_1 = z/‖z‖``, ``A Q_j = Q_j T_j + β_j q_{j+1} e_jᵀ``: the three-term
    recurrence, then every new vector orthogonalized against all previous ones (classical
    Gram–Schmidt, repeated when it removed more than 30 % of the norm: DGKS). A column
    stops early when its Krylov space is exhausted (``β_j ≤ breakdown_rtol · ‖T_j‖``).

    Args:
        matmat: ``A V`` for ``V [p, c]`` (A symmetric).
        Z: starting vectors ``[p, c]``.
        n_steps: m, the largest tridiagonal size (capped at p).

    Returns:
        Per column ``(α [L], β [L − 1])``, the diagonal and off-diagonal of ``T_L``, L ≤ m.
    """
    p, c = Z.shape
    m = max(1, min(int(n_steps), p))
    Q = Z.new_zeros(c, m, p)  # the bases, one [m, p] block per column (contiguous rows for bmm)
    q = Z / Z.norm(dim=0, keepdim=True)
    alpha = Z.new_zeros(m, c)
    beta = Z.new_zeros(m, c)
    length = [m] * c
    active = torch.ones(c, dtype=torch.bool)
    scale = Z.new_zeros(c)
    q_prev = torch.zeros_like(Z)
    for j in range(m):
        Q[:, j, :] = q.T
        w = matmat(q)
        alpha[j] = (q * w).sum(0)
        w = w - alpha[j] * q - (beta[j - 1] * q_prev if j > 0 else 0.0)  # the three-term recurrence
        Qj = Q[:, : j + 1, :]  # [c, j+1, p]
        for _ in range(2):  # full reorthogonalization; a second pass only when the first removed a lot (DGKS)
            before = w.norm(dim=0)
            w = w - torch.bmm(Qj.mT, torch.bmm(Qj, w.T.unsqueeze(2))).squeeze(2).T
            if not bool((w.norm(dim=0) < 0.7 * before).any()):
                break
        b = w.norm(dim=0)
        scale = torch.maximum(scale, alpha[j].abs() + b)
        if j == m - 1:
            break
        done = active & (b <= breakdown_rtol * scale.clamp_min(torch.finfo(Z.dtype).tiny))
        for col in torch.nonzero(done).flatten().tolist():
            length[col] = j + 1
        active &= ~done
        if not bool(active.any()):
            break
        beta[j] = torch.where(active, b, torch.zeros_like(b))
        q_prev = q
        q = torch.where(active, w / b.clamp_min(torch.finfo(Z.dtype).tiny), torch.zeros_like(w))
    out = []
    for col in range(c):
        L = length[col]
        out.append((alpha[:L, col].double().numpy().copy(), beta[: L - 1, col].double().numpy().copy()))
    return out


def _gauss_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (eigenvalues of T) and weights (squared first components of its eigenvectors)."""
    if alpha.size == 1:
        return alpha.copy(), np.ones(1)
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
    return theta, S[0] ** 2


def slq(
    op: FisherOperator,
    *,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    operator: str | None = None,
    damping: float = float("nan"),
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> Spectrum:
    """Stochastic Lanczos quadrature density of a symmetric operator.

    For each Rademacher probe z (``[p]``, seeded) and ``q = z/√p``, m Lanczos steps with full
    reorthogonalization give ``T_m = S diag(θ) Sᵀ``; the Gauss rule ``Σ_j S_{0j}² f(θ_j)``
    approximates ``qᵀf(A)q`` (exactly for polynomials of degree ≤ 2m − 1), whose expectation
    is ``tr f(A)/p``. The measure averages these rules over the probes (weights sum to 1).

    Args:
        op: a symmetric :class:`FisherOperator` (``apply`` on ``[p, c]``).
        n_probes: number of probes.
        n_steps: m, Lanczos steps per probe (capped at p).
        seed: seeds the probes (:func:`rademacher_probes`).
        operator, damping: recorded in the result (default ``op.name``).
        memory_bytes: the Lanczos bases ``[c, m, p]`` of c probes run together stay under this.

    Returns:
        A :class:`Spectrum` with method ``"slq"``; ``condition_number`` from the extreme Ritz values.
    """
    if not op.symmetric:
        raise ValueError(f"slq needs a symmetric operator; '{op.name}' is not (use the dense or lanczos method)")
    if n_probes < 1 or n_steps < 1:
        raise ValueError(f"slq: n_probes and n_steps must be ≥ 1, got {n_probes}, {n_steps}")
    p = op.p
    m = min(n_steps, p)
    per_probe = m * p * 8
    if per_probe > memory_bytes:
        raise FisherlabError(
            f"slq: one Lanczos basis needs {per_probe / 2**30:.2f} GiB ({m} steps × p = {p:,}); "
            f"reduce n_steps or raise memory_bytes ({memory_bytes / 2**30:.2f} GiB)"
        )
    chunk = max(1, min(n_probes, memory_bytes // per_probe))
    Z = rademacher_probes(p, n_probes, seed, op.dtype)
    nodes, weights = [], []
    for s in range(0, n_probes, chunk):
        for a, b in lanczos_tridiagonal(op.apply, Z[:, s : s + chunk], m):
            th, tau = _gauss_quadrature(a, b)
            nodes.append(th)
            weights.append(tau / n_probes)
    values, w = np.concatenate(nodes), np.concatenate(weights)
    info = {"n_probes": n_probes, "n_steps": m, "seed": seed}
    return Spectrum(operator or op.name, "slq", values, w, damping, p, condition_number(values), info=info)


def _v0(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


def lanczos_extremes(
    A,
    k: int = 6,
    *,
    which: str = "both",
    M=None,
    Minv=None,
    tol: float = 1e-10,
    maxiter: int | None = 500,
    seed: int = 0,
    v0: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """The k largest and/or k smallest eigenvalues of a symmetric operator by ARPACK.

    Args:
        A: a :class:`scipy.sparse.linalg.LinearOperator` (or matrix), symmetric, ``[p, p]``.
        k: eigenvalues per end (capped at p − 1; small operators fall back to dense).
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        M, Minv: for the generalized problem ``A x = μ M x`` (M SPD) and its inverse.
        tol, maxiter: ARPACK's relative accuracy and restart cap (default 500 restarts, about
            500·(2k+1) products, instead of ARPACK's 10·p; what converged is returned with a warning).
        seed: seeds the starting vector (results are reproducible).
        v0: the starting vector ``[p]`` (default: seeded Gaussian).

    Degenerate extreme eigenvalues (a cluster of equal values at an end) converge slowly:
    deflate them first where they are known (F•'s λ, the error operator's zeros).

    Returns:
        ``(values ascending, info)`` with ``info["converged"]`` False when ARPACK stopped early
        (the converged values are returned, with a warning).
    """
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = A.shape[0]
    ends = {"both": ("LA", "SA"), "largest": ("LA",), "smallest": ("SA",)}
    if which not in ends:
        raise ValueError(f"which must be 'both', 'largest' or 'smallest', got {which!r}")
    if n <= 2 * k + 2:  # ARPACK needs k < n; a handful of matvecs gives the dense matrix
        I = np.eye(n)
        D = np.column_stack([A @ I[:, j] for j in range(n)])
        if M is None:
            vals = scipy.linalg.eigvalsh((D + D.T) / 2)
        else:
            Md = np.column_stack([M @ I[:, j] for j in range(n)])
            vals = scipy.linalg.eigh((D + D.T) / 2, (Md + Md.T) / 2, eigvals_only=True)
        sel = {"both": np.r_[vals[:k], vals[-k:]], "largest": vals[-k:], "smallest": vals[:k]}[which]
        return np.unique(sel), {"converged": True, "dense_fallback": True}
    kk = min(k, n - 1)
    vals, converged = [], True
    for w in ends[which]:
        try:
            v = eigsh(A, k=kk, M=M, Minv=Minv, which=w, tol=tol, maxiter=maxiter, v0=_v0(n, seed) if v0 is None else v0, return_eigenvectors=False)
        except ArpackNoConvergence as err:
            v = err.eigenvalues
            converged = False
            warnings.warn(
                f"lanczos_extremes: ARPACK converged on {len(v)} of {kk} eigenvalues ({w}); returning those",
                RuntimeWarning,
                stacklevel=2,
            )
        vals.append(np.asarray(v, dtype=np.float64))
    return np.unique(np.concatenate(vals)), {"converged": converged, "dense_fallback": False}


# ----------------------------------------------------------------------------------------------
# The four operators
# ----------------------------------------------------------------------------------------------


def _exact_operator(source: Capture | Jacobian | ExactFisher, damping: float | None) -> ExactFisher:
    if isinstance(source, ExactFisher):
        if damping is not None and abs(check_damping(damping) - source.damping) > 1e-15 * source.damping:
            raise ValueError(f"damping {damping:g} differs from the operator's λ = {source.damping:g}")
        return source
    if damping is None:
        raise ValueError("damping is required unless an operator is given")
    return ExactFisher(Jacobian.coerce(source), damping)


def _kfac_operator(source: Capture | Jacobian | KFAC, damping: float | None, damping_mode: str) -> KFAC:
    if isinstance(source, KFAC):
        if damping is not None and abs(check_damping(damping) - source.damping) > 1e-15 * source.damping:
            raise ValueError(f"damping {damping:g} differs from the operator's λ = {source.damping:g}")
        return source
    if damping is None:
        raise ValueError("damping is required unless an operator is given")
    return KFAC.from_capture(source, damping, damping_mode)


def _uniform(values: np.ndarray, p: int) -> np.ndarray:
    return np.full(values.shape, 1.0 / p)


def operator_spectrum(
    op: FisherOperator,
    method: str = "dense",
    *,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    operator: str | None = None,
    damping: float = float("nan"),
) -> Spectrum:
    """Spectrum of a symmetric :class:`FisherOperator` by ``"dense"``, ``"lanczos"`` or ``"slq"``.

    Args:
        op: the operator ``[p, p]`` (``to_dense`` for dense, ``to_scipy`` for Lanczos).
        method: ``"dense"`` (all p eigenvalues; p ≤ a few thousand), ``"lanczos"`` (k per end),
            ``"slq"`` (density).
        k: eigenvalues per end for Lanczos.
        n_probes, n_steps, seed: SLQ parameters (see :func:`slq`).
        operator, damping: recorded in the result.
    """
    name = operator or op.name
    method = _method(method)
    if method == "dense":
        D = op.to_dense().double()
        vals = torch.linalg.eigvalsh((D + D.T) / 2).numpy()
        return Spectrum(name, "dense", vals, _uniform(vals, op.p), damping, op.p, condition_number(vals))
    if method == "lanczos":
        vals, info = lanczos_extremes(op.to_scipy(), k, seed=seed)
        return Spectrum(name, "lanczos", vals, _uniform(vals, op.p), damping, op.p, condition_number(vals), info=dict(info, k=k))
    if method == "slq":
        return slq(op, n_probes=n_probes, n_steps=n_steps, seed=seed, operator=name, damping=damping)
    raise ValueError(f"operator_spectrum: method must be 'dense', 'lanczos' or 'slq', got {method!r}")


def fisher_eigenvectors(jac: Jacobian, k: int, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The k largest eigenpairs of F = UUᵀ from the Gram: ``Ku = μu`` ⇒ ``F(Uu/√μ) = μ(Uu/√μ)``.

    Returns:
        ``(μ [k] descending, vectors [p, k])`` with unit-norm columns (eigenvalues of F, no λ).
    """
    mu, W = torch.linalg.eigh(jac.gram.to(dtype))
    k = min(k, int((mu > 0).sum()))
    mu, W = mu.flip(0)[:k], W.flip(1)[:, :k]
    return mu, jac.matmat(W) / mu.sqrt()


def fisher_spectrum(
    source: Capture | Jacobian | ExactFisher,
    damping: float | None = None,
    *,
    method: str = "auto",
    n_vectors: int = 0,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
) -> Spectrum:
    """Spectrum of F• = F + λI (2.17).

    ``exact`` (the default up to N = :data:`GRAM_N_LIMIT`): ``eig(UᵀU) + λ`` from the
    N × N Gram and ``p − N`` eigenvalues λ (stored once, weight ``(p − N)/p``); the N × N
    eigendecomposition is the only cubic step. ``dense``/``lanczos``/``slq`` through the
    operator (:func:`operator_spectrum`).

    Args:
        source: a :class:`Capture`, :class:`Jacobian` (its cached Grams are reused) or
            :class:`ExactFisher`.
        damping: λ > 0 (taken from the operator when one is given).
        method: ``"auto"``, ``"exact"``, ``"dense"``, ``"lanczos"`` or ``"slq"``.
        n_vectors: with ``exact``, also return the top eigenvectors ``Uu/√μ`` ``[p, n_vectors]``.
        k, n_probes, n_steps, seed: Lanczos and SLQ parameters.

    Returns:
        A :class:`Spectrum` with operator ``"fisher"``; ``condition_number = (μ_max + λ)/(μ_min + λ)``.
    """
    F = _exact_operator(source, damping)
    lam, jac = F.damping, F.jac
    if method == "auto":
        method = "exact" if jac.N <= GRAM_N_LIMIT else "lanczos"
    p, N = jac.p, jac.N
    if method == "lanczos" and N < p:
        # the smallest eigenvalue is λ, (p − N)-fold: a degenerate end that ARPACK resolves
        # slowly, known exactly; Lanczos runs for the largest end only
        vals, linfo = lanczos_extremes(F.to_scipy(), k, which="largest", seed=seed)
        values = np.concatenate([[lam], vals])
        weights = np.concatenate([[(p - N) / p], np.full(vals.shape, 1.0 / p)])
        return Spectrum("fisher", "lanczos", values, weights, lam, p, condition_number(values), info=dict(linfo, k=k, N=N))
    if method != "exact":
        return operator_spectrum(F, method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed, operator="fisher", damping=lam)
    mu = torch.linalg.eigvalsh(jac.gram).clamp_min(0).numpy()
    r = min(N, p)
    top = mu[N - r :] + lam
    if p > r:
        values = np.concatenate([[lam], top])
        weights = np.concatenate([[(p - r) / p], np.full(r, 1.0 / p)])
    else:
        values, weights = top, np.full(r, 1.0 / p)
    vecs = fisher_eigenvectors(jac, n_vectors)[1] if n_vectors > 0 else None
    info = {"N": N, "rank_bound": r}
    return Spectrum("fisher", "exact", values, weights, lam, p, condition_number(values), vecs, info)


def kfac_spectrum(
    source: Capture | Jacobian | KFAC,
    damping: float | None = None,
    damping_mode: str = "pi",
    *,
    method: str = "exact",
    **kw,
) -> Spectrum:
    """Spectrum of F•KFAC (2.28)–(2.30): per layer, the products ``(s_G + √λ/π)(s_A + π√λ)``
    of the damped factor eigenvalues (``s_G s_A + λ`` with Tikhonov damping), exact.

    Args:
        source: a :class:`Capture`, :class:`Jacobian` or ready :class:`KFAC`.
        damping: λ > 0 (taken from the operator when one is given).
        damping_mode: ``"pi"`` or ``"tikhonov"`` (ignored for a ready operator).
        method: ``"exact"`` (default) or ``"dense"``/``"lanczos"``/``"slq"`` through the operator.
        **kw: Lanczos/SLQ parameters of :func:`operator_spectrum`.

    Returns:
        A :class:`Spectrum` with operator ``"kfac"`` or ``"kfac-tikhonov"`` (p values, 1/p each).
    """
    K = _kfac_operator(source, damping, damping_mode)
    if method != "exact":
        return operator_spectrum(K, method, operator=K.name, damping=K.damping, **kw)
    vals = K.eigenvalues().double().numpy()
    return Spectrum(K.name, "exact", vals, _uniform(vals, K.p), K.damping, K.p, condition_number(vals), info={"pi_mean": float(np.mean(K.pi))})


def preconditioned_spectrum(
    source: Capture | Jacobian | None = None,
    damping: float | None = None,
    *,
    kfac: KFAC | None = None,
    exact: ExactFisher | None = None,
    damping_mode: str = "pi",
    method: str = "auto",
    **kw,
) -> Spectrum:
    """Spectrum of ``F•KFAC^{-1/2} F• F•KFAC^{-1/2}`` (= eig(F•KFAC⁻¹F•)), the KFAC-preconditioned F•.

    Args:
        source, damping: the capture (or Jacobian) and λ, unless ``kfac`` and ``exact`` are given.
        kfac, exact: ready operators to reuse (they must share λ).
        damping_mode: KFAC damping when ``kfac`` is built here.
        method: ``"auto"`` (dense for p ≤ :data:`DENSE_P_LIMIT`, else SLQ: ARPACK on the small
            end of this wide spectrum converges only after minutes),
            ``"dense"``, ``"lanczos"`` or ``"slq"``.
        **kw: ``k``, ``n_probes``, ``n_steps``, ``seed``.
    """
    if kfac is None:
        if source is None:
            raise ValueError("preconditioned_spectrum: give a source or a KFAC operator")
        kfac = _kfac_operator(Jacobian.coerce(source) if exact is None else exact.jac, damping, damping_mode)
    if exact is None:  # a KFAC operator is independent of any Jacobian: F• comes from the source
        if source is None:
            raise ValueError("preconditioned_spectrum: give a source, or the exact operator with the KFAC operator")
        exact = ExactFisher(Jacobian.coerce(source), kfac.damping)
    if abs(exact.damping - kfac.damping) > 1e-15 * kfac.damping:
        raise ValueError(f"KFAC has λ = {kfac.damping:g}, F• has λ = {exact.damping:g}")
    S = PreconditionedFisher(kfac, exact)
    if method == "auto":  # ARPACK on the small end of this wide, dense spectrum takes minutes: SLQ
        method = "dense" if S.p <= DENSE_P_LIMIT else "slq"
    out = operator_spectrum(S, method, operator="preconditioned", damping=kfac.damping, **kw)
    out.info["kfac"] = kfac.name
    return out


def error_spectrum(
    two_level: TwoLevelKFAC,
    *,
    method: str = "auto",
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    tol: float = 1e-10,
) -> Spectrum:
    """Spectrum of the two-level error operator ``E = (I − Π)(I − F•KFAC⁻¹F•)`` (3.16).

    Real: E has the spectrum of ``PMP``, which is F•-self-adjoint (see the module notes).

    Args:
        two_level: a :class:`TwoLevelKFAC` (its coarse space, KFAC and F•).
        method: ``"auto"`` (dense for p ≤ :data:`DENSE_P_LIMIT`, else SLQ when the Gram fits,
            else Lanczos), ``"dense"`` (all
            p eigenvalues of the symmetric-definite pencil, ``scipy.linalg.eigh(F•PMP, F•)``),
            ``"lanczos"`` (k per end) or ``"slq"``. Lanczos and SLQ run on the symmetric
            ``F•^{1/2}PMPF•^{-1/2}`` (:class:`FisherSquareRoot`, N ≤ :data:`GRAM_N_LIMIT`);
            beyond that Lanczos solves ``eigsh(F•PMP, M=F•, Minv=F•⁻¹)`` (slower).
        k, n_probes, n_steps, seed, tol: Lanczos and SLQ parameters.

    Returns:
        A :class:`Spectrum` with operator ``"error-<space>"``; ``condition_number`` is NaN (E is
        singular: at least m zero eigenvalues), see ``spectral_radius``.
    """
    E = TwoLevelErrorOperator(two_level)
    F = two_level.exact
    if method == "auto":
        method = "dense" if E.p <= DENSE_P_LIMIT else ("slq" if F.jac.N <= GRAM_N_LIMIT else "lanczos")
    method = _method(method)
    info: dict = {"coarse_dim": two_level.coarse_dim, "coarse": two_level.name}
    gram_ok = F.jac.N <= GRAM_N_LIMIT
    if method == "dense":
        if E.p > 4 * DENSE_P_LIMIT:
            raise FisherlabError(f"error_spectrum: p = {E.p:,} is too large for the dense method; use 'lanczos'")
        I = torch.eye(E.p, dtype=E.dtype)
        A = E.symmetric_form(I).double().numpy()
        Fd = F.apply(I).double().numpy()
        vals = scipy.linalg.eigh((A + A.T) / 2, (Fd + Fd.T) / 2, eigvals_only=True)
    elif method == "slq" and gram_ok:
        out = slq(E.symmetrized(), n_probes=n_probes, n_steps=n_steps, seed=seed, operator=E.name, damping=two_level.damping)
        out.condition_number = float("nan")
        out.info.update(info)
        return out
    elif method == "lanczos" and gram_ok:
        S = E.symmetrized(deflate=True)
        Z = S.null_basis  # type: ignore[attr-defined]
        v0 = torch.as_tensor(_v0(E.p, seed))[:, None].to(E.dtype)
        v0 = (v0 if Z is None else v0 - Z @ (Z.T @ v0))[:, 0].double().numpy()
        vals, linfo = lanczos_extremes(S.to_scipy(), k, tol=tol, v0=v0)
        m = two_level.coarse_dim
        # the m zero eigenvalues of the null space F•^{1/2}R_0ᵀ, removed from the Lanczos run
        weights = np.concatenate([np.full(vals.shape, 1.0 / E.p), [m / E.p] if m else []])
        vals = np.concatenate([vals, [0.0] if m else []])
        info.update(linfo, k=k, deflated=m)
        return Spectrum(E.name, method, vals, weights, two_level.damping, E.p, float("nan"), info=info)
    elif method == "lanczos":
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(E.p, -1).to(E.dtype)
            return E.symmetric_form(X).double().numpy().reshape(x.shape)

        A = LinearOperator(E.shape, matvec=mv, rmatvec=mv, dtype=np.float64)
        vals, linfo = lanczos_extremes(A, k, M=F.to_scipy(), Minv=F.inverse().to_scipy(), tol=tol, seed=seed)
        info.update(linfo, k=k, generalized=True)
    else:
        raise ValueError(
            f"error_spectrum: method {method!r} needs the symmetrized operator, i.e. the N × N Gram "
            f"(N = {F.jac.N:,} > {GRAM_N_LIMIT:,}); use 'lanczos'"
        )
    return Spectrum(E.name, method, vals, _uniform(vals, E.p), two_level.damping, E.p, float("nan"), info=info)


def spectra(
    source: Capture | Jacobian,
    damping: float,
    *,
    operators: Sequence[str] = ("fisher", "kfac", "preconditioned"),
    coarse: Sequence[str] = (),
    damping_mode: str = "pi",
    method: str = "auto",
    rhs: Tensor | None = None,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
) -> dict[str, Spectrum]:
    """Spectra of several operators of one capture, sharing the Jacobian, F• and KFAC.

    Args:
        source: a :class:`Capture` (or a :class:`Jacobian` with ``rhs`` when ``coarse`` is set).
        damping: λ > 0.
        operators: any of ``"fisher"``, ``"kfac"``, ``"kfac-tikhonov"``, ``"preconditioned"``.
        coarse: coarse spaces whose two-level error operators to add (``"error-<space>"``).
        damping_mode: KFAC damping of the preconditioned and error operators.
        method: ``"auto"`` or one method (``"dense"``, ``"lanczos"``, ``"slq"``) for the
            preconditioned and error operators (``"slq"`` gives densities). F•KFAC is always
            exact; F• is exact whenever N ≤ :data:`GRAM_N_LIMIT`, else Lanczos (or SLQ when
            ``method="slq"``).
        rhs: right-hand side for the residual-based coarse spaces (default ``capture.grad``).
        k, n_probes, n_steps, seed: Lanczos and SLQ parameters.

    Returns:
        ``{operator key: Spectrum}`` in the order requested.
    """
    lam = check_damping(damping)
    known = {"fisher", "kfac", "kfac-tikhonov", "preconditioned"}
    bad = [o for o in operators if o not in known]
    if bad:
        raise ValueError(f"unknown operator(s) {', '.join(bad)} (choose from {', '.join(sorted(known))})")
    jac = Jacobian.coerce(source)
    exact = ExactFisher(jac, lam)
    kfacs: dict[str, KFAC] = {}

    def kf(mode: str) -> KFAC:
        if mode not in kfacs:
            kfacs[mode] = KFAC.from_capture(jac, lam, mode)
        return kfacs[mode]

    lk = dict(k=k, n_probes=n_probes, n_steps=n_steps, seed=seed)
    out: dict[str, Spectrum] = {}
    for o in operators:
        if o == "fisher":
            fm = "exact" if jac.N <= GRAM_N_LIMIT else ("lanczos" if method in ("auto", "dense") else method)
            out[o] = fisher_spectrum(exact, method=fm, **lk)
        elif o in ("kfac", "kfac-tikhonov"):
            out[o] = kfac_spectrum(kf("pi" if o == "kfac" else "tikhonov"))
        else:
            out[o] = preconditioned_spectrum(kfac=kf(damping_mode), exact=exact, method=method, **lk)
    if coarse:
        if rhs is None and not isinstance(source, Capture):
            raise ValueError("spectra: rhs is required for coarse spaces when the source is a Jacobian")
        for space in coarse:
            tl = TwoLevelKFAC(source if isinstance(source, Capture) else jac, lam, space, kfac=kf(damping_mode), exact=exact, rhs=rhs)
            s = error_spectrum(tl, method=method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed)
            out[s.operator] = s
    return out
