"""Operators derived from the others: the KFAC-preconditioned F•, powers of F•, the two-level
error operator and its symmetric forms (MATH.md §7; ARCHITECTURE.md ``operators/derived.py``).

* :class:`PreconditionedFisher` ``S' = D^{-1/2}(ŨŨᵀ + λI)D^{-1/2}``, orthogonally similar to
  ``F•KFAC^{-1/2} F• F•KFAC^{-1/2}`` (eigenvalues of F•KFAC⁻¹F•) — a hand-written product (see
  its docstring for the measurement that keeps it);
* :class:`FisherSquareRoot` and :class:`FisherPower`: ``F•^s`` from the N × N Gram;
* :class:`TwoLevelErrorOperator` ``E = (I − Π)(I − F•KFAC⁻¹F•)`` (3.16) and, as algebra
  expressions over the two-level operator's pieces,

  - ``P = I − Π`` (``Identity − two_level.projector``),
  - ``M = I − K⁻¹F•`` (``Identity − base.inverse() @ exact``),
  - ``PMP`` (F•-self-adjoint, ``eig(PMP) = eig(E)``), ``F•PMP`` (symmetric),
  - ``F•^{1/2} PMP F•^{-1/2}`` (symmetric, E's spectrum; optionally deflated by
    ``I − ZZᵀ``, Z an orthonormal basis of its null space ``F•^{1/2}R_0ᵀ``);

* :class:`Symmetric`: declares an expression symmetric when theory says so and the algebra
  cannot see it (``F•PMP``, ``F•^{1/2}PMPF•^{-1/2}``), so that SLQ and ``to_scipy`` treat it so.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ..jacobian import Jacobian
from .algebra import Identity, Matrix
from .base import FisherOperator
from .exact import ExactFisher
from .kfac import KFAC
from .twolevel import TwoLevelKFAC

__all__ = [
    "FisherPower",
    "FisherSquareRoot",
    "PreconditionedFisher",
    "Symmetric",
    "TwoLevelErrorOperator",
    "rotated_jacobian",
]


class Symmetric(FisherOperator):
    """``A`` declared symmetric: products are A's, the adjoint is the product.

    For expressions that are symmetric by theory though built from non-symmetric factors
    (``F•PMP = Pᵀ(F• − F•K⁻¹F•)P``, ``F•^{1/2}PMPF•^{-1/2}``); nothing is checked.

    Args:
        op: the square operator.
        name: a name for tables and errors (default ``op.name``).
        null_basis: an orthonormal ``[p, m]`` basis of a known null space (or ``None``), for callers
            that start Krylov methods outside it.
    """

    symmetric = True

    def __init__(self, op: FisherOperator, *, name: str | None = None, null_basis: Tensor | None = None) -> None:
        if op.p != op.cols:
            raise ValueError(f"{op.name} is {op.shape}: only a square operator can be symmetric")
        super().__init__(op.p, op.dtype)
        self.op = op
        self.name = name or op.name
        self.null_basis = null_basis

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op.apply(V)


# ---- the KFAC-preconditioned F• ------------------------------------------------------------------


class PreconditionedFisher(FisherOperator):
    """The KFAC-preconditioned F• in KFAC's eigenbasis, ``[p, p]``, symmetric positive definite:

        S' = D^{-1/2} (Ũ Ũᵀ + λI) D^{-1/2} = Qᵀ (F•KFAC^{-1/2} F• F•KFAC^{-1/2}) Q,

    with ``F•KFAC = Q D Qᵀ``, ``Q = blockdiag(Q_{A,i} ⊗ Q_{G,i})`` (orthogonal) and ``Ũ = QᵀU``.
    S' and ``F•KFAC^{-1/2}F•F•KFAC^{-1/2}`` are orthogonally similar: same eigenvalues (those of
    F•KFAC⁻¹F•), eigenvectors mapped by :meth:`to_parameter_basis`. ``Ũ`` is U with rotated
    factors, ``ã = Q_Aᵀā``, ``g̃ = Q_Gᵀg`` (rows of dense layers rotated as ``Q_GᵀMAT(j)Q_A``),
    computed once (:func:`rotated_jacobian`), so a product costs one F• matvec and two diagonal
    scalings instead of one matvec plus four eigenbasis transforms
    (O(d_out²d_in' + d_out d_in'²) per column and layer).

    **A hand-written product, kept because it is measurably faster** than the algebra expression
    ``K^{-1/2} @ exact @ K^{-1/2}`` (two KFAC powers, i.e. four eigenbasis transforms, per
    product): on a 784-512-512-10 tanh MLP (p = 669,706, B = 128, mc, K = 1, N = 128), 2 threads,
    float64, median of 7, 84 ms against 545 ms for one column and 1.0 s against 8.0 s for 16
    columns (6.5–8×). Its solve is ``D^{1/2} Qᵀ F•⁻¹ Q D^{1/2}`` through public KFAC and
    ExactFisher methods.

    Args:
        kfac: the one-level :class:`KFAC` (its factor eigenbases and eigenvalues D).
        exact: the exact :class:`ExactFisher` F• (same λ and Jacobian).
        rows_free: bytes of which Ũ's factored layers seen at many positions may hold dense rows
            for the products (:meth:`fisherlab.jacobian.Jacobian.hold_rows`, a share of them;
            ``None``: none). Measured on ResNet-18 (B = 128, 2 threads): one product 0.71 → 0.44 s
            with layer3's rotated rows (2.1 GB) held. The same numbers to round-off.
    """

    name = "preconditioned"
    symmetric = True

    def __init__(self, kfac: KFAC, exact: ExactFisher, *, rows_free: int | None = None) -> None:
        if kfac.p != exact.p:
            raise ValueError(f"KFAC has p = {kfac.p}, F• has p = {exact.p}")
        super().__init__(kfac.p, kfac.dtype)
        self.kfac, self.exact = kfac, exact
        self.damping = exact.damping
        self.jac = rotated_jacobian(exact.jac, kfac)
        self.rows_held = self.jac.hold_rows(rows_free)  # released with the operator
        d = torch.cat([b.eig.mT.reshape(-1) for b in kfac.blocks])  # vec(eig): Y[r, c] ↔ index c·d_out + r
        self.d_inv_sqrt = d.to(self.dtype).rsqrt()[:, None]

    def _matmat(self, V: Tensor) -> Tensor:
        W = V * self.d_inv_sqrt
        out = self.jac.matmat(self.jac.rmatmat(W))  # (p-sized temporaries updated in place)
        return out.add_(W, alpha=self.damping).mul_(self.d_inv_sqrt)

    def _solve(self, W: Tensor) -> Tensor:
        return self.from_parameter_basis(self.exact.apply_inverse(self.to_parameter_basis(W / self.d_inv_sqrt))) / self.d_inv_sqrt

    def to_parameter_basis(self, Y: Tensor) -> Tensor:
        """``Q Y`` for ``Y [p, c]`` in KFAC-eigenbasis coordinates (e.g. eigenvectors of S')."""
        return self.kfac.from_eigenbasis(Y)

    def from_parameter_basis(self, X: Tensor) -> Tensor:
        """``Qᵀ X`` for ``X [p, c]``."""
        return self.kfac.to_eigenbasis(X)


def rotated_jacobian(jac: Jacobian, kfac: KFAC) -> Jacobian:
    """``Ũ = QᵀU`` with ``Q = blockdiag(Q_A ⊗ Q_G)``: factors ``ā Q_A``, ``g Q_G`` (row vectors), or
    dense rows ``vec(Q_Gᵀ MAT(j) Q_A)`` ``[N, p_i]``; a block whose A has an exact null space
    (``block.null``, the products KFAC itself takes through the range) leaves those columns out."""
    null = lambda b: b.null[1] if getattr(b, "null", None) and b.null[0] == "A" else 0  # noqa: E731
    layers = [lj.rotated(b.QA.to(jac.dtype), b.QG.to(jac.dtype), null(b)) for lj, b in zip(jac.layers, kfac.blocks)]
    return Jacobian(jac.layout, layers, jac.B, jac.K)


# ---- powers of F• ------------------------------------------------------------------------------------


class FisherSquareRoot:
    """``F•^{±1/2}`` (any power) from the eigendecomposition of the N × N Gram (no p × p matrix).

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

    def operator(self, s: float) -> "FisherPower":
        """``F•^s`` as an operator (it composes)."""
        return FisherPower(self, s)


class FisherPower(FisherOperator):
    """``F•^s`` ``[p, p]`` (symmetric) by :meth:`FisherSquareRoot.power`; its solve is ``F•^{-s}``."""

    symmetric = True

    def __init__(self, root: FisherSquareRoot, s: float) -> None:
        super().__init__(root.jac.p, root.jac.dtype)
        self.root, self.s = root, float(s)
        self.name = f"F•^{self.s:g}"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.root.power(V, self.s)

    def _solve(self, W: Tensor) -> Tensor:
        return self.root.power(W, -self.s)


# ---- the two-level error operator ----------------------------------------------------------------


class TwoLevelErrorOperator(FisherOperator):
    """``E = (I − Π)(I − F•KFAC⁻¹F•) = I − F•2L⁻¹F•`` (3.16) of a :class:`TwoLevelKFAC`, ``[p, p]``.

    ``@`` applies E (non-symmetric; ``two_level.error``). Its pieces are algebra expressions:
    :attr:`complement` ``P = I − Π``, :attr:`one_level_error` ``M = I − K⁻¹F•``,
    :attr:`pmp` ``PMP`` (same spectrum, F•-self-adjoint), :attr:`fpmp` ``F•PMP`` (symmetric), and
    :meth:`symmetrized` ``F•^{1/2} PMP F•^{-1/2}`` (symmetric, with E's spectrum; for Lanczos and
    SLQ). :meth:`P`, :meth:`M`, :meth:`projected` and :meth:`symmetric_form` apply them to a block.
    """

    symmetric = False

    def __init__(self, two_level: TwoLevelKFAC) -> None:
        super().__init__(two_level.p, two_level.dtype)
        self.two_level = two_level
        self.name = f"error-{two_level.name}"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.two_level.error.apply(V)

    # ---- the pieces as operators -----------------------------------------------------------
    @cached_property
    def complement(self) -> FisherOperator:
        """``P = I − Π = I − R_0ᵀF_coarse⁻¹R_0F•`` (``I`` itself when m = 0)."""
        tl = self.two_level
        I = Identity(self.p, self.dtype, self.device)
        return I if tl.coarse_dim == 0 else I - tl.projector

    @cached_property
    def one_level_error(self) -> FisherOperator:
        """``M = I − F•KFAC⁻¹F•``."""
        tl = self.two_level
        return Identity(self.p, self.dtype, self.device) - tl.base.inverse() @ tl.exact

    @cached_property
    def pmp(self) -> FisherOperator:
        """``PMP``: F•-self-adjoint, ``eig(PMP) = eig(E)`` (P² = P)."""
        P = self.complement
        return P @ self.one_level_error @ P

    @cached_property
    def fpmp(self) -> Symmetric:
        """``F•PMP = Pᵀ(F• − F•K⁻¹F•)P`` (symmetric): the left side of ``F•PMP x = μ F• x``."""
        return Symmetric(self.two_level.exact @ self.pmp, name=self.name)

    # ---- the same on blocks ------------------------------------------------------------------
    def P(self, V: Tensor) -> Tensor:
        """``(I − Π)V`` for ``V [p, c]``."""
        return self.complement.apply(V)

    def M(self, V: Tensor) -> Tensor:
        """``(I − F•KFAC⁻¹F•)V`` for ``V [p, c]``."""
        return self.one_level_error.apply(V)

    def projected(self, V: Tensor) -> Tensor:
        """``PMP V``."""
        return self.pmp.apply(V)

    def symmetric_form(self, V: Tensor) -> Tensor:
        """``F•PMP V``."""
        return self.fpmp.apply(V)

    def symmetrized(self, sqrt: FisherSquareRoot | None = None, *, deflate: bool = False) -> Symmetric:
        """``S = F•^{1/2} PMP F•^{-1/2}``: symmetric, similar to PMP, hence E's spectrum. Needs the
        N × N Gram (:class:`FisherSquareRoot`).

        With ``deflate``, S is restricted to the complement of its known null space
        ``F•^{1/2}R_0ᵀ`` (``P R_0ᵀ = 0``): ``(I − ZZᵀ) S (I − ZZᵀ)``, Z an orthonormal basis of
        that space, whose columns are in ``.null_basis``. Lanczos started in the complement then
        never meets the m-fold zero eigenvalue, a degenerate cluster ARPACK converges to slowly.
        """
        tl = self.two_level
        root = sqrt or FisherSquareRoot(tl.exact.jac, tl.damping)
        S = root.operator(0.5) @ self.pmp @ root.operator(-0.5)
        Z = None
        if deflate and tl.coarse_dim:
            R0T = tl.basis.apply_adjoint(torch.eye(tl.coarse_dim, dtype=self.dtype))
            Z = torch.linalg.qr(root.power(R0T, 0.5))[0]
            Zop = Matrix(Z, what="null basis F•^{1/2}R_0ᵀ")
            D = Identity(self.p, self.dtype, self.device) - Zop @ Zop.T
            S = D @ S @ D
        return Symmetric(S, name=self.name, null_basis=Z)
