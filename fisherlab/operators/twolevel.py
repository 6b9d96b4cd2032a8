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

**Protocol options** (:mod:`~fisherlab.operators.protocol`, docs/PROTOCOL.md): the released code
departs from these equations; each departure is a keyword of both operators, and
``protocol="released-code"`` sets them all. With F̂ the coarse matrix β is solved with
(``coarse_matrix``, default R_0F•R_0ᵀ with the chosen ``coarse_diagonal``), c the
``coefficient`` and P̂ = R_0ᵀF̂⁻¹R_0, the step ``solve(w)`` is

* ``coarse_rhs="residual"`` (3.11): ``K⁻¹w + c R_0ᵀF̂⁻¹R_0(w − F•K⁻¹w)`` = ``[(I − cP̂F•)K⁻¹ + cP̂] w``;
* ``coarse_rhs="gradient"`` (the released code): ``K⁻¹w + c R_0ᵀF̂⁻¹R_0w`` = ``[K⁻¹ + cP̂] w``
  (TKO's form, with F̂ in place of F_c);

both linear in w; the product (``apply``/``to_dense``) is its exact inverse by Woodbury,
``K − K R_0ᵀ c S⁻¹ R_0 (K − δF•)`` with ``S = F̂ + c(R_0KR_0ᵀ − δF_coarse)``, δ = 1 for the
residual, 0 for the gradient (a one-line error when S is singular). :meth:`~CoarseCorrection.gap`
is always the TRUE error change against F• and ζ of the batch;
:meth:`~CoarseCorrection.logged_gap` the one the released code prints, with F̂.
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
from .protocol import (
    Protocol,
    check_coarse_diagonal,
    check_coarse_normalization,
    check_coarse_rhs,
    check_coefficient,
)

__all__ = [
    "TwoLevelKFAC",
    "TKO",
    "CoarseCorrection",
    "GAP_RTOL",
    "coarse_matrix",
    "coarse_diagonal_term",
    "max_abs_basis",
]

GAP_RTOL = 1e-10
"""Relative tolerance of the sign check of a multiplicative gap (4.6), in units of
𝔈_KFAC + ‖ζ_KFAC‖²_F• + ⟨∇h, ζ_KFAC⟩: the gap is a difference of terms of that size, computed in
float64 (~1e-16 each), so round-off stays orders of magnitude below it."""


def coarse_matrix(
    exact: ExactFisher | Jacobian, basis: CoarseBasis, *, damping: float | None = None, diagonal: str = "exact"
) -> Tensor:
    """F_coarse = R_0F•R_0ᵀ = ZᵀZ + λ R_0R_0ᵀ, Z = UᵀR_0ᵀ ``[N, m]`` (3.12), (A15)–(A19): one
    per-layer contraction per coarse column (half the work of m products with F•).

    Args:
        exact: the :class:`ExactFisher` F•, or a :class:`Jacobian` (then ``damping`` is required),
            e.g. of a Fisher sub-batch.
        basis: R_0 (any full-rank blocks; orthonormal or not).
        damping: λ (default: the ExactFisher's).
        diagonal: the λ-term, ``"exact"`` (λR_0R_0ᵀ) or ``"layer-size"`` (λ·p_i on the diagonal
            entry of each coarse column of layer i — :func:`coarse_diagonal_term`).
    """
    return coarse_matrix_and_products(exact, basis, damping=damping, diagonal=diagonal)[0]


def coarse_matrix_and_products(
    exact: ExactFisher | Jacobian, basis: CoarseBasis, *, damping: float | None = None, diagonal: str = "exact"
) -> tuple[Tensor, Tensor]:
    """``(F_coarse, Z)``: :func:`coarse_matrix` and the Z = UᵀR_0ᵀ ``[N, m]`` it is built from
    (column block i = U_iᵀV_i), which :meth:`CoarseCorrection.layer_products` reuses."""
    jac = exact if isinstance(exact, Jacobian) else exact.jac
    if damping is None:
        if isinstance(exact, Jacobian):
            raise ValueError("coarse_matrix(jacobian, basis): give damping=λ")
        damping = exact.damping
    lam = check_damping(damping)
    dtype = basis.dtype
    if basis.m == 0:
        return torch.zeros(0, 0, dtype=dtype, device=jac.device), torch.zeros(jac.N, 0, dtype=dtype, device=jac.device)
    if len(jac.layers) != len(basis.V):
        raise ValueError(f"coarse_matrix: the basis has {len(basis.V)} blocks, the Jacobian {len(jac.layers)} layers")
    Z = torch.cat([lj.rmatmat(v) for lj, v in zip(jac.layers, basis.V)], dim=1)
    return Z.T @ Z + lam * coarse_diagonal_term(basis, diagonal), Z


def _checked_context(context: CoarseContext, base: BlockDiagonal, exact: ExactFisher, rhs: Tensor) -> CoarseContext:
    """``context`` when it belongs to this one-level operator, F• and right-hand side (else a one-line error)."""
    if context.base is not base or context.fisher is not exact:
        raise ValueError("the given coarse context belongs to another one-level operator or F•")
    if rhs is None or not torch.equal(context.rhs.reshape(-1).to(rhs.dtype), rhs.reshape(-1)):
        raise ValueError("the given coarse context was built for another right-hand side")
    return context


def coarse_diagonal_term(basis: CoarseBasis, diagonal: str = "exact") -> Tensor:
    """The matrix that λ multiplies in the coarse matrix ``[m, m]``: R_0R_0ᵀ = blockdiag(V_iᵀV_i)
    (``"exact"``), or ``diag(p_i, …)`` with p_i repeated for each of the m_i columns of layer i
    (``"layer-size"``: what the released code adds; equal to V_iᵀV_i only for an all-ones column)."""
    if check_coarse_diagonal(diagonal) == "exact":
        return basis.gram()
    sizes = [float(p) for p, m in zip(basis.sizes, basis.dims) for _ in range(m)]
    return torch.diag(torch.tensor(sizes, dtype=basis.dtype, device=basis.device))


MAX_ABS_RTOL = 1e-10
"""Pivot tolerance (relative to the largest) under which a raw column is dependent on the others
and dropped by :func:`max_abs_basis` (the same rule as :func:`~fisherlab.operators.coarse.orthonormalize`)."""


def max_abs_basis(raw: Sequence[Tensor], *, rtol: float = MAX_ABS_RTOL, dtype: torch.dtype = torch.float64) -> CoarseBasis:
    """R_0 as the released code scales it: each raw column ``v`` of ``V_i [p_i, r_i]`` divided by
    ``max|v|`` (the code's ``r0/‖r0‖_∞``, without its +1e-8), not orthogonalised. A column that QR
    with pivoting finds dependent on the others (pivot under ``rtol``) or zero is dropped, so
    the span — and the exact-F_coarse correction — is that of :meth:`CoarseBasis.from_raw`."""
    import numpy as np
    import scipy.linalg

    blocks = []
    for V in raw:
        V = V.to(dtype)
        if V.shape[1] == 0:
            blocks.append(V)
            continue
        A = V.detach().double().cpu().numpy()
        if not np.isfinite(A).all():
            raise ValueError("coarse space block contains NaN/Inf")
        _, R, piv = scipy.linalg.qr(A, mode="economic", pivoting=True)
        d = np.abs(np.diag(R))
        r = 0 if d.size == 0 or d[0] == 0 else int((d > rtol * d[0]).sum())
        keep = torch.as_tensor(np.sort(piv[:r]), dtype=torch.long, device=V.device)
        cols = V[:, keep]
        blocks.append(cols / cols.abs().amax(dim=0, keepdim=True))
    return CoarseBasis(blocks, [v.shape[1] for v in raw])


def compressed(op: FisherOperator, basis: CoarseBasis) -> Tensor:
    """``R_0 op R_0ᵀ`` ``[m, m]`` by m products with ``op``."""
    if basis.m == 0:
        return torch.zeros(0, 0, dtype=op.dtype, device=basis.V[0].device)
    return basis.apply(op.apply(basis.apply_adjoint(torch.eye(basis.m, dtype=op.dtype, device=basis.V[0].device))))


def _coarse_matrix(exact: ExactFisher, basis: CoarseBasis) -> tuple[Tensor, Tensor]:
    """:func:`coarse_matrix_and_products` under another name (the constructors' ``coarse_matrix`` keyword shadows it)."""
    return coarse_matrix_and_products(exact, basis)


def _check_coarse_matrix(M: Tensor, m: int, dtype: torch.dtype, device) -> Tensor:
    """A given approximate coarse matrix: ``[m, m]``, finite, symmetric (symmetrised)."""
    if not isinstance(M, Tensor) or M.shape != (m, m):
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"coarse_matrix must be a [{m}, {m}] tensor (the coarse dimension), got {shape}")
    M = M.to(dtype=dtype, device=device)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("coarse_matrix contains NaN/Inf")
    return (M + M.T) / 2



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
        coarse_diagonal: ``"exact"`` (λR_0R_0ᵀ, default) or ``"layer-size"`` (λ·p_i per coarse
            column of layer i, the released code's) in the coarse matrix β is solved with.
        coarse_matrix: a ready approximate F̂ ``[m, m]`` (symmetric positive definite, in the
            coordinates of ``basis``: a running average, a sub-batch's) to solve β with; default
            the method's own (R_0F•R_0ᵀ with ``coarse_diagonal``).
        coefficient: c in ζ = ζ_KFAC + c·R_0ᵀβ (default 1; the released code's ``two_level_coeff``).
        protocol: ``"paper"`` (default) or ``"released-code"`` (or a :class:`Protocol`): the
            defaults of the options above; an option given explicitly overrides it.

    Attributes:
        base (alias ``kfac``), exact, basis, space, rhs; F_coarse: the EXACT R_0F•R_0ᵀ ``[m, m]``
        (always, whatever the options); F_hat: the coarse matrix β is solved with; coefficient;
        coarse_diagonal; protocol; coarse_dims ``[m_i]``, coarse_dim m, raw_dims;
        projection: ``P = R_0ᵀF_coarse⁻¹R_0`` (exact); coarse_projection: ``P̂ = R_0ᵀF̂⁻¹R_0``.
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
        coarse_diagonal: str | None = None,
        coarse_matrix: Tensor | None = None,
        coefficient: float | None = None,
        protocol: str | Protocol | None = None,
        context: CoarseContext | None = None,
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
        if context is not None:  # ζ_KFAC and r shared with other corrections of the same (K, F•, ∇h)
            self.__dict__["context"] = _checked_context(context, base, exact, self.rhs)
        self.F_coarse, self.Z = _coarse_matrix(exact, basis)
        self.F_coarse_op = Matrix(self.F_coarse, spd=True, what="F_coarse = R_0F•R_0ᵀ")
        if basis.m:
            self.F_coarse_op.cholesky  # noqa: B018 - fail now, with the one-line error, if not SPD
        self.projection = basis.T @ self.F_coarse_op.inverse() @ basis
        rhs_option = {"coarse_rhs": options.pop("coarse_rhs")} if "coarse_rhs" in options else {}
        self.protocol = Protocol.parse(protocol).with_options(
            coarse_diagonal=coarse_diagonal, coefficient=coefficient, **rhs_option
        )
        self.coarse_diagonal = check_coarse_diagonal(self.protocol.coarse_diagonal)
        self.coefficient = check_coefficient(self.protocol.coefficient)
        self._configure(**rhs_option, **options)
        if coarse_matrix is not None:
            self.F_hat = _check_coarse_matrix(coarse_matrix, basis.m, self.dtype, self.device)
            self.coarse_matrix_given = True
        else:
            self.F_hat = self._default_coarse_matrix()
            self.coarse_matrix_given = False
        if self.F_hat is self.F_coarse:
            self.F_hat_op = self.F_coarse_op
        else:
            self.F_hat_op = Matrix(self.F_hat, spd=True, what=self._F_hat_what())
            if basis.m:
                self.F_hat_op.cholesky  # noqa: B018 - fail now if not SPD
        self.coarse_projection = basis.T @ self.F_hat_op.inverse() @ basis if self.F_hat_op is not self.F_coarse_op else self.projection

    def _default_coarse_matrix(self) -> Tensor:
        """The coarse matrix β is solved with when none is given: R_0F•R_0ᵀ with the chosen diagonal."""
        if self.coarse_diagonal == "exact":
            return self.F_coarse
        return self.F_coarse - self.damping * self.basis.gram() + self.damping * coarse_diagonal_term(self.basis, "layer-size")

    def _F_hat_what(self) -> str:
        if self.coarse_matrix_given:
            return "the given coarse_matrix"
        return "F_coarse with the layer-size diagonal (ZᵀZ + λ·diag(p_i))"

    @property
    def options_default(self) -> bool:
        """Whether every protocol option is the paper's (β from the exact F_coarse, c = 1, the rhs of the method)."""
        return self.F_hat_op is self.F_coarse_op and self.coefficient == 1.0

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
        damping_mode: str | None = None,
        k: int = 1,
        m: int = 2,
        q: int = 2,
        orth_rtol: float = 1e-10,
        dtype: torch.dtype = torch.float64,
        protocol: str | Protocol | None = None,
        coarse_normalization: str | None = None,
        conv_damping: str | None = None,
        context: CoarseContext | None = None,
        **options,
    ) -> dict:
        if kfac is not None and base is not None:
            raise TypeError("give the one-level operator as base= or kfac=, not both")
        proto = Protocol.parse(protocol).with_options(coarse_normalization=coarse_normalization, conv_damping=conv_damping)
        if damping_mode is None:
            damping_mode = proto.fine_damping_mode
        normalization = check_coarse_normalization(proto.coarse_normalization)
        base = base if base is not None else kfac
        jac = exact.jac if exact is not None else Jacobian.coerce(source, dtype)
        lam = resolve_damping(damping, jac)
        if base is None:
            base = KFAC.from_capture(jac, lam, damping_mode, dtype=dtype, conv_damping=proto.conv_damping)
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
        context = CoarseContext(base, exact, rhs) if context is None else _checked_context(context, base, exact, rhs)
        raw = space.build(context)
        if normalization == "orthonormal":
            basis = CoarseBasis.from_raw(raw, rtol=orth_rtol, dtype=dtype)
        else:
            basis = max_abs_basis(raw, rtol=orth_rtol, dtype=dtype)
        return dict(base=base, exact=exact, basis=basis, rhs=rhs, space=space, protocol=proto, context=context, **options)

    @classmethod
    def from_capture(cls, source: Capture | Jacobian, damping: float, coarse: str | CoarseSpace | Sequence[Tensor] | None = None, **kw):
        """Build the one-level operator (KFAC unless ``base``/``kfac`` is given), the exact F• (unless
        ``exact`` is given), the coarse space's basis for ``rhs`` (default ``capture.grad``), then the
        operator. ``k``, ``m``, ``q``: spectral, Krylov and Taylor sizes; ``orth_rtol``: the
        tolerance under which dependent coarse columns are dropped; ``context``: a ready
        :class:`~fisherlab.operators.coarse.CoarseContext` of the same base, F• and rhs, whose
        ζ_KFAC and residual r (each one K⁻¹ and one F• product) several corrections then share.

        Protocol keywords (module docstring, docs/PROTOCOL.md): ``protocol`` (``"paper"`` default,
        ``"released-code"``) sets the defaults of ``damping_mode`` (the fine level's, when KFAC is
        built here: the preset's ``fine_damping_mode``) and ``conv_damping`` (how it meets conv
        layers, :mod:`~fisherlab.operators.kfac`), ``coarse_normalization``
        (``"orthonormal"`` | ``"max-abs"``: how the raw coarse columns become R_0),
        ``coarse_diagonal``, ``coefficient`` and (TwoLevelKFAC) ``coarse_rhs``; ``coarse_matrix``
        gives a ready F̂. An explicit keyword overrides the preset."""
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

    def layer_products(self, products: Sequence[Tensor]) -> list[Tensor]:
        """``U_iᵀ(x − y)_i`` per layer ``[N, 1]`` for x = :meth:`increment` and any y, given
        ``products`` = ``U_iᵀ(ζ_KFAC − y)_i``: adds c·Z_iβ_i (Z = UᵀR_0ᵀ, kept from F_coarse), so
        compare's anatomy of a correction costs no product with U."""
        if self.coarse_dim == 0 or self.coefficient == 0.0:
            return list(products)
        beta = self.coefficient * self.beta()
        Zs = torch.split(self.Z, self.basis.dims, dim=1)
        bs = torch.split(beta, self.basis.dims, dim=0)
        return [y.reshape(-1, 1) + Z @ b for y, Z, b in zip(products, Zs, bs)]

    def increment(self) -> Tensor:
        """The method's increment for its own right-hand side ∇h, ``[p, 1]``: ζ_KFAC + c·R_0ᵀβ
        ((3.14) multiplicative, (3.17) additive; β of :meth:`beta`). Equal to ``solve(∇h)``, but
        from the context's ζ_KFAC and r, so it costs no K⁻¹ or F• product of its own."""
        zk = self.context.zeta_kfac
        if self.coarse_dim == 0 or self.coefficient == 0.0:
            return zk.clone()
        return zk + self.coefficient * self.R0T(self.beta())

    def gap(self, beta: Tensor | None = None) -> float:
        """The TRUE error change 𝔈(ζ_KFAC + cR_0ᵀβ) − 𝔈(ζ_KFAC) = c²βᵀF_coarseβ − 2c⟨R_0ᵀβ, r⟩
        (4.6), with the EXACT F_coarse = R_0F•R_0ᵀ and r = ∇h − F•ζ_KFAC of this batch (no ζ
        needed: 𝔈(ζ) = ‖ζ − F•⁻¹∇h‖²_F•); c the ``coefficient``; β defaults to this method's β
        for ∇h (whatever F̂ and right-hand side produced it)."""
        return self._gap(self.F_coarse, beta)

    def logged_gap(self, beta: Tensor | None = None) -> float:
        """The gap as the released code logs it (its ``check_error``): the same expression with
        the coarse matrix F̂ that produced β in place of the exact F_coarse,
        c²βᵀF̂β − 2c⟨R_0ᵀβ, r⟩ (c = 1 in the released code). For the multiplicative β = F̂⁻¹R_0r
        and c = 1 it is −(R_0r)ᵀF̂⁻¹(R_0r) ≤ 0 by construction, whatever the true error does;
        with ``coarse_rhs="gradient"`` it has no sign. Equal to :meth:`gap` when F̂ = F_coarse."""
        return self._gap(self.F_hat, beta)

    def _gap(self, M: Tensor, beta: Tensor | None) -> float:
        if self.coarse_dim == 0:
            return 0.0
        b = (self.beta() if beta is None else beta).reshape(-1, 1).to(self.dtype)
        r = self.context.residual
        c = self.coefficient
        return float(c * c * (b.T @ M @ b) - 2 * c * (self.R0(r).T @ b))

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

    def _configure(self, coarse_rhs: str | None = None, **options) -> None:
        super()._configure(**options)
        if coarse_rhs is not None:
            self.protocol = self.protocol.with_options(coarse_rhs=coarse_rhs)
        self.coarse_rhs = check_coarse_rhs(self.protocol.coarse_rhs)
        self.name = self.space.name if self.space is not None else "two-level"

    @property
    def options_default(self) -> bool:
        return super().options_default and self.coarse_rhs == "residual"

    @cached_property
    def inverse_expression(self) -> FisherOperator:
        """(3.15): ``(I − P F•) K⁻¹ + P``, P = R_0ᵀF_coarse⁻¹R_0; with the options
        ``(I − cP̂F•)K⁻¹ + cP̂`` (residual) or ``K⁻¹ + cP̂`` (gradient), P̂ = R_0ᵀF̂⁻¹R_0."""
        I = Identity(self.p, self.dtype, self.device)
        c = self.coefficient
        P = self.coarse_projection if c == 1.0 else c * self.coarse_projection
        if self.coarse_rhs == "gradient":
            return self.base.inverse() + P
        return (I - P @ self.exact) @ self.base.inverse() + P

    @cached_property
    def forward(self) -> FisherOperator:
        """``K − K R_0ᵀ (R_0 K R_0ᵀ)⁻¹ R_0 (K − F•)`` (Woodbury on the rank-m update of (3.15));
        with the options ``K − K R_0ᵀ c S⁻¹ R_0 (K − δF•)``, S = F̂ + c(R_0KR_0ᵀ − δF_coarse)
        (module docstring)."""
        K = self.base
        if self.options_default:
            Kc = Matrix(self.coarse_kfac, spd=True, what="R_0 F•KFAC R_0ᵀ")
            return K - K @ self.basis.T @ Kc.inverse() @ self.basis @ (K - self.exact)
        c = self.coefficient
        if c == 0.0:
            return K
        if self.coarse_rhs == "gradient":
            S = Matrix(self.F_hat + c * self.coarse_kfac, what="F̂ + c·R_0F•KFACR_0ᵀ")
            right = K
        else:
            S = Matrix(self.F_hat + c * (self.coarse_kfac - self.F_coarse), what="F̂ + c(R_0F•KFACR_0ᵀ − F_coarse)")
            right = K - self.exact
        return K - K @ self.basis.T @ (c * S.inverse()) @ self.basis @ right

    @cached_property
    def error(self) -> FisherOperator:
        """(3.16): ``I − F•2L⁻¹F• = (I − P F•)(I − K⁻¹F•)`` (``(I − cP̂F•)(I − K⁻¹F•)`` with the
        residual options; ``I − (K⁻¹ + cP̂)F•`` with the gradient)."""
        I = Identity(self.p, self.dtype, self.device)
        if self.options_default:
            return (I - self.projector) @ (I - self.base.inverse() @ self.exact)
        if self.coarse_rhs == "gradient":
            return I - self.inverse_expression @ self.exact
        c = self.coefficient
        P = self.coarse_projection if c == 1.0 else c * self.coarse_projection
        return (I - P @ self.exact) @ (I - self.base.inverse() @ self.exact)

    def coarse_rhs_of(self, w: Tensor | None = None) -> Tensor:
        """The coarse right-hand side ``[m, c]``: R_0 r (``coarse_rhs="residual"``, r = w − F•K⁻¹w,
        (3.11)) or R_0 w (``"gradient"``); w defaults to ∇h."""
        if self.coarse_rhs == "gradient":
            W = self.context.rhs.reshape(-1, 1) if w is None else w
            return self.R0(W)
        r = self.context.residual if w is None else w - self.exact.apply(self.base.apply_inverse(w))
        return self.R0(r)

    def beta(self, w: Tensor | None = None) -> Tensor:
        """β* = F_coarse⁻¹R_0 r (3.11) for ``w [p, c]`` (default ∇h, with its residual); with the
        options β = F̂⁻¹ × (R_0r or R_0w) (the coefficient is applied in the step, not here)."""
        return self.F_hat_op.apply_inverse(self.coarse_rhs_of(w))


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

    def _configure(self, coarse_operator: Literal["exact", "kronecker"] = "exact", coarse_rhs: str | None = None) -> None:
        if coarse_operator not in ("exact", "kronecker"):
            raise ValueError(f"coarse_operator must be 'exact' or 'kronecker', got {coarse_operator!r}")
        if coarse_rhs not in (None, "gradient"):
            raise ValueError(f"TKO's coarse right-hand side is R_0w by definition (4.7b); coarse_rhs={coarse_rhs!r} is not an option")
        self.coarse_rhs = "gradient"
        self.coarse_operator = coarse_operator
        self.name = "tko" if coarse_operator == "exact" else "tko-kronecker"
        if coarse_operator == "exact":
            self.F_tko = self._default_exact_coarse()
        else:
            self.F_tko = self._kronecker_coarse_operator()
        self.F_tko_op = self.F_coarse_op if self.F_tko is self.F_coarse else None  # set with F̂ below

    def _default_exact_coarse(self) -> Tensor:
        return super()._default_coarse_matrix()

    def _default_coarse_matrix(self) -> Tensor:
        return self.F_tko

    def _F_hat_what(self) -> str:
        if self.coarse_matrix_given:
            return "the given coarse_matrix"
        if self.coarse_operator == "kronecker":
            return "the Kronecker F_coarse (3.18)"
        return "F_coarse with the layer-size diagonal (ZᵀZ + λ·diag(p_i))"

    def _init_pieces(self, *args, **kw) -> None:
        super()._init_pieces(*args, **kw)
        if self.F_tko_op is None:
            self.F_tko_op = self.F_hat_op if self.F_hat is self.F_tko else Matrix(self.F_tko, spd=True, what="the TKO coarse matrix")

    @cached_property
    def inverse_expression(self) -> FisherOperator:
        """(3.17): ``K⁻¹ + R_0ᵀF_c⁻¹R_0`` (``K⁻¹ + cR_0ᵀF̂⁻¹R_0`` with the options)."""
        c = self.coefficient
        P = self.coarse_projection if c == 1.0 else c * self.coarse_projection
        return self.base.inverse() + P

    @cached_property
    def forward(self) -> FisherOperator:
        """``(K⁻¹ + R_0ᵀF_c⁻¹R_0)⁻¹ = K − KR_0ᵀ(F_c + R_0KR_0ᵀ)⁻¹R_0K`` (Woodbury); with the
        options ``K − KR_0ᵀ c(F̂ + cR_0KR_0ᵀ)⁻¹R_0K``."""
        K = self.base
        c = self.coefficient
        if c == 0.0:
            return K
        if c == 1.0:
            S = Matrix(self.F_hat + self.coarse_kfac, spd=True, what="F_coarse + R_0F•KFACR_0ᵀ")
            return K - K @ self.basis.T @ S.inverse() @ self.basis @ K
        S = Matrix(self.F_hat + c * self.coarse_kfac, what="F̂ + c·R_0F•KFACR_0ᵀ")
        return K - K @ self.basis.T @ (c * S.inverse()) @ self.basis @ K

    def _kronecker_coarse_operator(self) -> Tensor:
        """R_0F̄•R_0ᵀ (3.18): blocks V_iᵀ(A_ij ⊗ G_ij)V_j, A_ij = (1/B)Σ_b ā_{i,b}ā_{j,b}ᵀ,
        G_ij = (1/B)Σ_{b,k} g_{i,bk}g_{j,bk}ᵀ; diagonal blocks V_iᵀ[F•KFAC]_iiV_i — or, with
        ``coarse_diagonal="layer-size"`` (the released code's ``tpselepedis`` matrix), the
        undamped V_iᵀ(A_ii ⊗ G_ii)V_i plus λ·p_i on the diagonal."""
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
                if i == j and self.coarse_diagonal == "exact":
                    row.append(Vi.T @ self.base.blocks[i].apply(Vj))
                    continue
                Aij = a[i].T @ a[j] / B
                Gij = g[i].T @ g[j] / B
                dj_in, dj_out = self.jac.layers[j].spec.d_in_bar, self.jac.layers[j].spec.d_out
                X = Vj.T.reshape(-1, dj_in, dj_out).mT  # MAT of each column: [m_j, d_out_j, d_in_j']
                Y = Gij @ X @ Aij.T  # [m_j, d_out_i, d_in_i']
                row.append(Vi.T @ Y.mT.reshape(Y.shape[0], -1).T)
            rows.append(torch.cat(row, dim=1))
        M = torch.cat(rows, dim=0)
        if self.coarse_diagonal == "layer-size":
            M = M + self.damping * coarse_diagonal_term(self.basis, "layer-size")
        return M

    def beta(self, w: Tensor | None = None) -> Tensor:
        """β_TKO = F_c⁻¹R_0w (4.7b), w defaulting to ∇h (F̂⁻¹R_0w with the options)."""
        W = self.context.rhs.reshape(-1, 1) if w is None else w
        return self.F_hat_op.apply_inverse(self.R0(W))
