"""Two-level KFAC: the multiplicative coarse correction (3.9)–(3.16) and the additive TKO (4.7).

Both add ``R_0ᵀβ`` to the KFAC increment, with ``R_0ᵀ = blockdiag(V_i)`` (3.21) from a
:mod:`coarse space <fisherlab.operators.coarse>` and the coarse operator

    F_coarse = R_0 F• R_0ᵀ = ZᵀZ + λ R_0R_0ᵀ,   Z = Uᵀ R_0ᵀ ∈ R^{N×m}   (3.12), (A15)–(A19).

* :class:`TwoLevelKFAC` (the paper's, consistent): β* = F_coarse⁻¹ R_0 r with the KFAC residual
  r = w − F•F•KFAC⁻¹w (3.11), (3.13); the inverse is (3.15),
  ``F•2L⁻¹ = F•KFAC⁻¹ + R_0ᵀF_coarse⁻¹R_0(I − F•F•KFAC⁻¹)``, and its error operator factorizes,
  ``I − F•2L⁻¹F• = (I − R_0ᵀF_coarse⁻¹R_0F•)(I − F•KFAC⁻¹F•)`` (3.16). The operator itself
  (non-symmetric) is, by Woodbury on that rank-m update,
  ``F•2L = K − K R_0ᵀ (R_0 K R_0ᵀ)⁻¹ R_0 (K − F•)`` with K = F•KFAC.
* :class:`TKO` (Tselepidis–Kohler–Orvieto, additive, PREVIOUS): β = F_coarse⁻¹ R_0 w (4.7), i.e.
  ``F•TKO⁻¹ = K⁻¹ + R_0ᵀF_coarse⁻¹R_0`` (3.17), with F_coarse exact or, as published, from the
  Kronecker cross-layer blocks (3.18).

The gap (4.6), 𝔈(β) − 𝔈(0) = βᵀF_coarseβ − 2⟨R_0ᵀβ, r⟩, needs no ζ; for β* it is
−(R_0r)ᵀF_coarse⁻¹(R_0r) ≤ 0.

Every formula is an expression of :mod:`~fisherlab.operators.algebra` over the pieces
(one-level ``K``, exact ``F•``, :class:`~fisherlab.operators.coarse.CoarseBasis` ``R_0``,
the dense ``F_coarse``): with the coarse projection ``P = R_0ᵀF_coarse⁻¹R_0``,

* two-level inverse (3.15): ``(I − P F•) K⁻¹ + P`` (one K solve and one F• product per column);
* error operator (3.16): ``(I − P F•)(I − K⁻¹F•)``; projector ``Π = P F•``;
* two-level product: ``K − K R_0ᵀ(R_0KR_0ᵀ)⁻¹R_0(K − F•)``;
* TKO inverse (3.17): ``K⁻¹ + R_0ᵀF_c⁻¹R_0``; its product ``K − KR_0ᵀ(F_c + R_0KR_0ᵀ)⁻¹R_0K``.

The one-level ``K`` is any block-diagonal operator (KFAC by default).
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..damping import resolve_damping
from ..errors import FisherlabError
from ..jacobian import Jacobian
from ..layout import LayerKind
from .algebra import BlockDiagonal, Identity, Matrix
from .base import FisherOperator, check_damping
from .coarse import CoarseBasis, CoarseContext, CoarseSpace, make_coarse_space
from .exact import ExactFisher
from .kfac import KFAC

__all__ = ["TwoLevelKFAC", "TKO", "CoarseCorrection", "GAP_RTOL", "coarse_matrix"]

GAP_RTOL = 1e-10
"""Relative tolerance of the sign check of a multiplicative gap (4.6), in units of
𝔈_KFAC + ‖ζ_KFAC‖²_F• + ⟨∇h, ζ_KFAC⟩: the gap is a difference of terms of that size, computed in
float64 (~1e-16 each), so round-off stays orders of magnitude below it."""


def coarse_matrix(exact: ExactFisher, basis: CoarseBasis) -> Tensor:
    """F_coarse = R_0F•R_0ᵀ = ZᵀZ + λ R_0R_0ᵀ, Z = UᵀR_0ᵀ ``[N, m]`` (3.12), (A15)–(A19): one
    per-layer contraction per coarse column (half the work of m products with F•)."""
    if basis.m == 0:
        return torch.zeros(0, 0, dtype=exact.dtype, device=exact.jac.device)
    Z = torch.cat([lj.rmatmat(v) for lj, v in zip(exact.jac.layers, basis.V)], dim=1)
    return Z.T @ Z + exact.damping * basis.gram()


def compressed(op: FisherOperator, basis: CoarseBasis) -> Tensor:
    """``R_0 op R_0ᵀ`` ``[m, m]`` by m products with ``op``."""
    if basis.m == 0:
        return torch.zeros(0, 0, dtype=op.dtype, device=basis.V[0].device)
    return basis.apply(op.apply(basis.apply_adjoint(torch.eye(basis.m, dtype=op.dtype, device=basis.V[0].device))))


class CoarseCorrection(FisherOperator):
    """What the two-level operators share: the one-level operator, the exact F•, R_0 and F_coarse.

    Constructors take ready pieces; :meth:`from_capture` computes them (the README's call
    ``TwoLevelKFAC(capture, λ, coarse=..., kfac=..., exact=...)`` is forwarded to it).

    Args:
        base: the one-level operator ``K`` (block-diagonal over the layers: KFAC, or any other).
        exact: the exact :class:`ExactFisher` F• (same λ).
        basis: the :class:`CoarseBasis` R_0.
        rhs: the right-hand side the coarse space was built for (``[p]``; for the gap and β).
        space: the :class:`CoarseSpace` that produced the basis (for names and reports).

    Attributes:
        base (alias ``kfac``), exact, basis, space, rhs; F_coarse: R_0F•R_0ᵀ ``[m, m]``;
        coarse_dims ``[m_i]``, coarse_dim m, raw_dims; projection: ``P = R_0ᵀF_coarse⁻¹R_0`` (an operator).
    """

    def __init__(self, *args, **kw) -> None:
        if args and isinstance(args[0], (Capture, Jacobian)):  # TwoLevelKFAC(capture, λ, coarse, ...)
            self._init_pieces(**self._pieces_from_capture(*self._legacy_args(args, kw), **kw))
        else:
            self._init_pieces(*args, **kw)

    @staticmethod
    def _legacy_args(args: tuple, kw: dict) -> tuple:
        return args

    # ---- construction --------------------------------------------------------------------
    def _init_pieces(
        self,
        base: BlockDiagonal,
        exact: ExactFisher,
        basis: CoarseBasis,
        *,
        rhs: Tensor | None = None,
        space: CoarseSpace | None = None,
        **options,
    ) -> None:
        if not isinstance(exact, ExactFisher) or not isinstance(basis, CoarseBasis):
            raise TypeError(f"{type(self).__name__}(base, exact, basis): expected an ExactFisher and a CoarseBasis")
        super().__init__(exact.p, exact.dtype)
        self.device = exact.device
        self.damping = exact.damping
        lam_base = getattr(base, "damping", self.damping)
        if abs(lam_base - self.damping) > 1e-15 * self.damping:
            raise ValueError(f"the one-level operator has damping {lam_base:g}, F• has {self.damping:g}")
        for op, nm in ((base, "one-level operator"), (basis.T, "coarse basis R_0ᵀ")):
            if op.p != self.p:
                raise ValueError(f"{nm} has {op.p} rows, F• has p = {self.p}")
        self.base, self.exact, self.basis, self.space = base, exact, basis, space
        self.jac = exact.jac
        self.rhs = None if rhs is None else rhs.reshape(-1).to(self.dtype)
        self.F_coarse = coarse_matrix(exact, basis)
        self.F_coarse_op = Matrix(self.F_coarse, spd=True, what="F_coarse = R_0F•R_0ᵀ")
        if basis.m:
            self.F_coarse_op.cholesky  # noqa: B018 - fail now, with the one-line error, if not SPD
        self.projection = basis.T @ self.F_coarse_op.inverse() @ basis
        self._configure(**options)

    def _configure(self, **options) -> None:
        if options:
            raise TypeError(f"{type(self).__name__}: unexpected option(s) {', '.join(options)}")

    @classmethod
    def _pieces_from_capture(
        cls,
        source: Capture | Jacobian,
        damping: float,
        coarse: str | CoarseSpace | Sequence[Tensor] | None = None,
        *,
        kfac: BlockDiagonal | None = None,
        base: BlockDiagonal | None = None,
        exact: ExactFisher | None = None,
        rhs: Tensor | None = None,
        damping_mode: str = "pi",
        k: int = 1,
        m: int = 2,
        q: int = 2,
        orth_rtol: float = 1e-10,
        dtype: torch.dtype = torch.float64,
        **options,
    ) -> dict:
        if kfac is not None and base is not None:
            raise TypeError("give the one-level operator as base= or kfac=, not both")
        base = base if base is not None else kfac
        jac = exact.jac if exact is not None else Jacobian.coerce(source, dtype)
        lam = resolve_damping(damping, jac)
        base = base if base is not None else KFAC.from_capture(jac, lam, damping_mode, dtype=dtype)
        exact = exact if exact is not None else ExactFisher(jac, lam, dtype=dtype)
        for op, nm in ((base, "kfac"), (exact, "exact")):
            if abs(op.damping - lam) > 1e-15 * lam:
                raise ValueError(f"{nm} operator has damping {op.damping:g}, expected {lam:g}")
            if op.p != jac.p:
                raise ValueError(f"{nm} operator has p = {op.p}, expected {jac.p}")
        if rhs is None:
            if not isinstance(source, Capture):
                raise ValueError("rhs is required when the source is not a Capture")
            rhs = source.grad
        if rhs.shape != (jac.p,):
            raise ValueError(f"rhs must have shape [{jac.p}], got {tuple(rhs.shape)}")
        rhs = rhs.to(dtype)
        space = make_coarse_space(cls.default_coarse if coarse is None else coarse, k=k, m=m, q=q)
        basis = CoarseBasis.from_raw(space.build(CoarseContext(base, exact, rhs)), rtol=orth_rtol, dtype=dtype)
        return dict(base=base, exact=exact, basis=basis, rhs=rhs, space=space, **options)

    @classmethod
    def from_capture(cls, source: Capture | Jacobian, damping: float, coarse: str | CoarseSpace | Sequence[Tensor] | None = None, **kw):
        """Build the one-level operator (KFAC unless ``base``/``kfac`` is given), the exact F• (unless
        ``exact`` is given), the coarse space's basis for ``rhs`` (default ``capture.grad``), then the
        operator. ``k``, ``m``, ``q``: spectral, Krylov and Taylor sizes; ``orth_rtol``: the
        tolerance under which dependent coarse columns are dropped."""
        return cls(**cls._pieces_from_capture(source, damping, coarse, **kw))

    default_coarse = "nicolaides"

    # ---- pieces under their paper names ----------------------------------------------------
    @property
    def kfac(self) -> BlockDiagonal:
        return self.base

    @property
    def V(self) -> list[Tensor]:
        return self.basis.V

    @property
    def coarse_dims(self) -> list[int]:
        return self.basis.dims

    @property
    def coarse_dim(self) -> int:
        return self.basis.m

    @property
    def raw_dims(self) -> list[int]:
        return self.basis.raw_dims

    def R0(self, X: Tensor) -> Tensor:
        """``R_0 X``: ``[p, c] -> [m, c]``."""
        return self.basis.apply(X)

    def R0T(self, beta: Tensor) -> Tensor:
        """``R_0ᵀ β``: ``[m, c] -> [p, c]``."""
        return self.basis.apply_adjoint(beta)

    @cached_property
    def context(self) -> CoarseContext:
        if self.rhs is None:
            raise ValueError(f"{type(self).__name__}: built without a right-hand side (rhs)")
        return CoarseContext(self.base, self.exact, self.rhs)

    @property
    def zeta_kfac(self) -> Tensor:
        """ζ_KFAC = F•KFAC⁻¹∇h ``[p]`` (3.3)."""
        return self.context.zeta_kfac[:, 0]

    @property
    def residual(self) -> Tensor:
        """r = ∇h − F•ζ_KFAC ``[p]`` (3.13)."""
        return self.context.residual[:, 0]

    @cached_property
    def projector(self) -> FisherOperator:
        """Π = R_0ᵀF_coarse⁻¹R_0F• (F•-orthogonal projection on span R_0ᵀ)."""
        return self.projection @ self.exact

    @cached_property
    def coarse_kfac(self) -> Tensor:
        """R_0 K R_0ᵀ ``[m, m]`` (K the one-level operator)."""
        return compressed(self.base, self.basis)

    # ---- the correction -------------------------------------------------------------------
    def beta(self, w: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gap(self, beta: Tensor | None = None) -> float:
        """𝔈(β) − 𝔈(0) = βᵀF_coarseβ − 2⟨R_0ᵀβ, r⟩ (4.6), without ζ; β defaults to this
        method's β for ∇h."""
        if self.coarse_dim == 0:
            return 0.0
        b = (self.beta() if beta is None else beta).reshape(-1, 1).to(self.dtype)
        r = self.context.residual
        return float(b.T @ self.F_coarse @ b - 2 * (self.R0(r).T @ b))

    def error_operator(self, V: Tensor) -> Tensor:
        """``(I − F•method⁻¹F•) V`` for ``V [p, c]``."""
        return self.error.apply(V)

    @cached_property
    def error(self) -> FisherOperator:
        """The error operator ``I − F•method⁻¹F•`` (an operator)."""
        return Identity(self.p, self.dtype, self.device) - self.inverse() @ self.exact

    def _matmat(self, V: Tensor) -> Tensor:
        return self.forward.apply(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.forward.apply_adjoint(V)

    def _solve(self, W: Tensor) -> Tensor:
        return self.inverse_expression.apply(W)

    def _rsolve(self, W: Tensor) -> Tensor:
        return self.inverse_expression.apply_adjoint(W)

    def has_adjoint(self) -> bool:
        return True


class TwoLevelKFAC(CoarseCorrection):
    """The multiplicative two-level KFAC of (3.9)–(3.15), ``[p, p]``, non-symmetric.

    ``solve(w)`` = ζ_KFAC + R_0ᵀβ* with β* = F_coarse⁻¹R_0(w − F•F•KFAC⁻¹w) (3.11), i.e. the
    inverse (3.15) ``(I − P F•)K⁻¹ + P``. Built from pieces ``TwoLevelKFAC(base, exact, basis)``
    or, as in the README, ``TwoLevelKFAC(capture, λ, coarse=..., kfac=..., exact=..., rhs=...,
    k=..., m=..., q=...)`` with ``coarse`` ∈ {``"nicolaides"``, ``"spectral"``,
    ``"krylov-nicolaides"``, ``"residuals"``, ``"krylov-residuals"``, ``"taylor"``} or blocks V_i.
    """

    symmetric = False

    def _configure(self, **options) -> None:
        super()._configure(**options)
        self.name = self.space.name if self.space is not None else "two-level"

    @cached_property
    def inverse_expression(self) -> FisherOperator:
        """(3.15): ``(I − P F•) K⁻¹ + P``, P = R_0ᵀF_coarse⁻¹R_0."""
        I = Identity(self.p, self.dtype, self.device)
        return (I - self.projection @ self.exact) @ self.base.inverse() + self.projection

    @cached_property
    def forward(self) -> FisherOperator:
        """``K − K R_0ᵀ (R_0 K R_0ᵀ)⁻¹ R_0 (K − F•)`` (Woodbury on the rank-m update of (3.15))."""
        Kc = Matrix(self.coarse_kfac, spd=True, what="R_0 F•KFAC R_0ᵀ")
        K = self.base
        return K - K @ self.basis.T @ Kc.inverse() @ self.basis @ (K - self.exact)

    @cached_property
    def error(self) -> FisherOperator:
        """(3.16): ``I − F•2L⁻¹F• = (I − P F•)(I − K⁻¹F•)``."""
        I = Identity(self.p, self.dtype, self.device)
        return (I - self.projector) @ (I - self.base.inverse() @ self.exact)

    def beta(self, w: Tensor | None = None) -> Tensor:
        """β* = F_coarse⁻¹R_0 r (3.11) for ``w [p, c]`` (default ∇h, with its residual)."""
        r = self.context.residual if w is None else w - self.exact.apply(self.base.apply_inverse(w))
        return self.F_coarse_op.apply_inverse(self.R0(r))


class TKO(CoarseCorrection):
    """The additive correction of Tselepidis, Kohler and Orvieto (4.7), symmetric ``[p, p]``.

    ``solve(w)`` = K⁻¹w + R_0ᵀF_c⁻¹R_0w (3.17). From pieces: ``TKO(base, exact, basis,
    coarse_operator=...)``; as in the README: ``TKO(capture, λ, coarse_operator, coarse=..., ...)``.

    Args:
        coarse_operator: ``"exact"`` (F_c = R_0F•R_0ᵀ) or ``"kronecker"`` (F_c ≈ R_0F̄•R_0ᵀ with
            the cross-layer blocks E[ā_{i−1}ā_{j−1}ᵀ] ⊗ E[g_ig_jᵀ] of (3.18), diagonal blocks from
            the one-level KFAC; Linear layers only).
        coarse: the coarse space (default Nicolaides, as published).
    """

    symmetric = True
    default_coarse = "nicolaides"

    @staticmethod
    def _legacy_args(args: tuple, kw: dict) -> tuple:
        """TKO(capture, λ, coarse_operator, coarse): the third positional is the coarse operator."""
        if len(args) > 2:
            kw["coarse_operator"] = args[2]
        return args[:2] + args[3:4]

    def _configure(self, coarse_operator: Literal["exact", "kronecker"] = "exact") -> None:
        if coarse_operator not in ("exact", "kronecker"):
            raise ValueError(f"coarse_operator must be 'exact' or 'kronecker', got {coarse_operator!r}")
        self.coarse_operator = coarse_operator
        self.name = "tko" if coarse_operator == "exact" else "tko-kronecker"
        if coarse_operator == "exact":
            self.F_tko = self.F_coarse
            self.F_tko_op = self.F_coarse_op
        else:
            self.F_tko = self._kronecker_coarse_operator()
            self.F_tko_op = Matrix(self.F_tko, spd=True, what="the Kronecker F_coarse (3.18)")
            if self.coarse_dim:
                self.F_tko_op.cholesky  # noqa: B018 - fail now if not SPD

    @cached_property
    def inverse_expression(self) -> FisherOperator:
        """(3.17): ``K⁻¹ + R_0ᵀF_c⁻¹R_0``."""
        return self.base.inverse() + self.basis.T @ self.F_tko_op.inverse() @ self.basis

    @cached_property
    def forward(self) -> FisherOperator:
        """``(K⁻¹ + R_0ᵀF_c⁻¹R_0)⁻¹ = K − KR_0ᵀ(F_c + R_0KR_0ᵀ)⁻¹R_0K`` (Woodbury)."""
        S = Matrix(self.F_tko + self.coarse_kfac, spd=True, what="F_coarse + R_0F•KFACR_0ᵀ")
        K = self.base
        return K - K @ self.basis.T @ S.inverse() @ self.basis @ K

    def _kronecker_coarse_operator(self) -> Tensor:
        """R_0F̄•R_0ᵀ (3.18): blocks V_iᵀ(A_ij ⊗ G_ij)V_j, A_ij = (1/B)Σ_b ā_{i,b}ā_{j,b}ᵀ,
        G_ij = (1/B)Σ_{b,k} g_{i,bk}g_{j,bk}ᵀ; diagonal blocks V_iᵀ[F•KFAC]_iiV_i."""
        for lj in self.jac.layers:
            if lj.spec.kind is not LayerKind.LINEAR or lj.a is None or lj.T != 1:
                raise FisherlabError(
                    f"TKO coarse_operator='kronecker' (3.18) is defined for Linear layers stored factored "
                    f"with one position; layer '{lj.spec.name}' is {lj.spec.kind.value} "
                    f"({'dense' if lj.a is None else f'T={lj.T}'})"
                )
        L = len(self.jac.layers)
        B = self.jac.B
        a = [lj.a[:, 0] for lj in self.jac.layers]  # type: ignore[index]
        g = [lj.g[:, :, 0].reshape(-1, lj.spec.d_out) for lj in self.jac.layers]  # type: ignore[index]
        rows = []
        for i in range(L):
            row = []
            for j in range(L):
                Vi, Vj = self.V[i], self.V[j]
                if i == j:
                    row.append(Vi.T @ self.base.blocks[i].apply(Vj))
                    continue
                Aij = a[i].T @ a[j] / B
                Gij = g[i].T @ g[j] / B
                dj_in, dj_out = self.jac.layers[j].spec.d_in_bar, self.jac.layers[j].spec.d_out
                X = Vj.T.reshape(-1, dj_in, dj_out).mT  # MAT of each column: [m_j, d_out_j, d_in_j']
                Y = Gij @ X @ Aij.T  # [m_j, d_out_i, d_in_i']
                row.append(Vi.T @ Y.mT.reshape(Y.shape[0], -1).T)
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)

    def beta(self, w: Tensor | None = None) -> Tensor:
        """β_TKO = F_c⁻¹R_0w (4.7b), w defaulting to ∇h."""
        W = self.context.rhs.reshape(-1, 1) if w is None else w
        return self.F_tko_op.apply_inverse(self.R0(W))
