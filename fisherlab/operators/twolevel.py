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
"""

from __future__ import annotations

import warnings
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..errors import FisherlabError
from ..jacobian import Jacobian
from ..layout import LayerKind
from .base import FisherOperator, check_damping
from .coarse import CoarseContext, CoarseSpace, make_coarse_space, orthonormalize
from .exact import ExactFisher, as_jacobian, spd_cholesky
from .kfac import KFAC

__all__ = ["TwoLevelKFAC", "TKO", "CoarseCorrection"]


class CoarseCorrection(FisherOperator):
    """What the two-level operators share: the one-level KFAC, the exact F•, R_0ᵀ and F_coarse.

    Args:
        source: a :class:`Capture` or :class:`Jacobian`.
        damping: λ > 0 (must match ``kfac`` and ``exact`` when those are given).
        coarse: a coarse-space name, a :class:`CoarseSpace`, or a list of blocks ``V_i [p_i, m_i]``.
        kfac: the one-level operator (default: ``KFAC(source, damping, damping_mode)``).
        exact: the exact F• (default: ``ExactFisher(source, damping)``), shared to save work.
        rhs: the right-hand side the coarse space is built for (default ``capture.grad``).
        k, m, q: sizes of the spectral, Krylov and Taylor spaces.
        coarse_dtype: dtype of the coarse solve (float64 by default).
        orth_rtol: relative tolerance under which coarse columns are dropped.

    Attributes:
        V: orthonormal blocks ``V_i [p_i, m_i]``; coarse_dims: ``[m_i]``; coarse_dim: m.
        F_coarse: R_0F•R_0ᵀ ``[m, m]`` (exact, (3.12)).
    """

    legend = "COARSE"

    def __init__(
        self,
        source: Capture | Jacobian,
        damping: float,
        coarse: str | CoarseSpace | Sequence[Tensor] = "nicolaides",
        *,
        kfac: KFAC | None = None,
        exact: ExactFisher | None = None,
        rhs: Tensor | None = None,
        damping_mode: str = "pi",
        k: int = 1,
        m: int = 2,
        q: int = 2,
        coarse_dtype: torch.dtype = torch.float64,
        orth_rtol: float = 1e-10,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.damping = check_damping(damping)
        self.jac = as_jacobian(kfac.jac if kfac is not None else source, dtype)
        super().__init__(self.jac.p, dtype)
        self.kfac = kfac if kfac is not None else KFAC(self.jac, self.damping, damping_mode, dtype=dtype)
        self.exact = exact if exact is not None else ExactFisher(self.jac, self.damping, dtype=dtype)
        for op, nm in ((self.kfac, "kfac"), (self.exact, "exact")):
            if abs(op.damping - self.damping) > 1e-15 * self.damping:
                raise ValueError(f"{nm} operator has damping {op.damping:g}, expected {self.damping:g}")
            if op.p != self.p:
                raise ValueError(f"{nm} operator has p = {op.p}, expected {self.p}")
        if rhs is None:
            if not isinstance(source, Capture):
                raise ValueError("rhs is required when the source is not a Capture")
            rhs = source.grad
        if rhs.shape != (self.p,):
            raise ValueError(f"rhs must have shape [{self.p}], got {tuple(rhs.shape)}")
        self.rhs = rhs.to(dtype)
        self.space = make_coarse_space(coarse, k=k, m=m, q=q)
        self.context = CoarseContext(self.kfac, self.exact, self.rhs)
        raw = self.space.build(self.context)
        self.V = [orthonormalize(v.to(dtype), orth_rtol) for v in raw]
        self.raw_dims = [v.shape[1] for v in raw]
        self.coarse_dims = [v.shape[1] for v in self.V]
        self.coarse_dim = sum(self.coarse_dims)
        self.coarse_dtype = coarse_dtype
        self.F_coarse = self._exact_coarse_operator()
        self._chol_exact = spd_cholesky(self.F_coarse.to(coarse_dtype), "F_coarse = R_0F•R_0ᵀ") if self.coarse_dim else None

    # ---- R_0 and R_0ᵀ ------------------------------------------------------------------
    def R0(self, X: Tensor) -> Tensor:
        """``R_0 X``: ``[p, c] -> [m, c]``."""
        parts = torch.split(X, self.kfac.sizes, dim=0)
        return torch.cat([v.T @ x for v, x in zip(self.V, parts)], dim=0)

    def R0T(self, beta: Tensor) -> Tensor:
        """``R_0ᵀ β``: ``[m, c] -> [p, c]``."""
        parts = torch.split(beta, self.coarse_dims, dim=0)
        return torch.cat([v @ b for v, b in zip(self.V, parts)], dim=0)

    def _exact_coarse_operator(self) -> Tensor:
        """F_coarse = ZᵀZ + λ blockdiag(V_iᵀV_i), Z = [U_iᵀV_i]_i ``[N, m]`` (A15)–(A19)."""
        if self.coarse_dim == 0:
            return torch.zeros(0, 0, dtype=self.dtype)
        Z = torch.cat([lj.rmatmat(v) for lj, v in zip(self.jac.layers, self.V)], dim=1)
        reg = torch.block_diag(*[v.T @ v for v in self.V])
        return Z.T @ Z + self.damping * reg

    def _coarse_solve(self, L: Tensor | None, X: Tensor) -> Tensor:
        if L is None:
            return X.new_zeros(0, X.shape[1])
        return torch.cholesky_solve(X.to(self.coarse_dtype), L).to(self.dtype)

    @property
    def coarse_kfac(self) -> Tensor:
        """R_0 F•KFAC R_0ᵀ ``[m, m]`` (block diagonal)."""
        mats = [v.T @ b.matmat(v) for v, b in zip(self.V, self.kfac.blocks)]  # type: ignore[attr-defined]
        return torch.block_diag(*mats) if mats else torch.zeros(0, 0, dtype=self.dtype)

    # ---- the right-hand side the space was built for ------------------------------------
    @property
    def zeta_kfac(self) -> Tensor:
        """ζ_KFAC = F•KFAC⁻¹∇h ``[p]`` (3.3)."""
        return self.context.zeta_kfac[:, 0]

    @property
    def residual(self) -> Tensor:
        """r = ∇h − F•ζ_KFAC ``[p]`` (3.13)."""
        return self.context.residual[:, 0]

    def beta(self, w: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gap(self, beta: Tensor | None = None) -> float:
        """𝔈(β) − 𝔈(0) = βᵀF_coarseβ − 2⟨R_0ᵀβ, r⟩ (4.6), without ζ; β defaults to this
        method's β for ∇h."""
        b = (self.beta() if beta is None else beta).reshape(-1, 1).to(self.dtype)
        if self.coarse_dim == 0:
            return 0.0
        r = self.context.residual
        return float(b.T @ self.F_coarse @ b - 2 * (self.R0(r).T @ b))

    def error_operator(self, V: Tensor) -> Tensor:
        """``(I − F•method⁻¹F•) V`` for ``V [p, c]``."""
        return V - self._solve(self.exact._matmat(V))


class TwoLevelKFAC(CoarseCorrection):
    """The multiplicative two-level KFAC of (3.9)–(3.15), ``[p, p]``, non-symmetric.

    ``solve(w)`` = ζ_KFAC + R_0ᵀβ* with β* = F_coarse⁻¹R_0(w − F•F•KFAC⁻¹w) (3.11). See
    :class:`CoarseCorrection` for the arguments (``coarse`` ∈ {``"nicolaides"``, ``"spectral"``,
    ``"krylov-nicolaides"``, ``"residuals"``, ``"krylov-residuals"``, ``"taylor"``} or blocks).
    """

    symmetric = False

    def __init__(self, source: Capture | Jacobian, damping: float, coarse: str | CoarseSpace | Sequence[Tensor] = "nicolaides", **kw) -> None:
        super().__init__(source, damping, coarse, **kw)
        self.name = self.space.name
        self.legend = self.space.legend
        self._chol_kfac: Tensor | None = None

    def beta(self, w: Tensor | None = None) -> Tensor:
        """β* = F_coarse⁻¹R_0 r (3.11) for ``w [p, c]`` (default ∇h, with its residual)."""
        r = self.context.residual if w is None else w - self.exact._matmat(self.kfac._solve(w))
        return self._coarse_solve(self._chol_exact, self.R0(r))

    def _solve(self, W: Tensor) -> Tensor:
        zK = self.kfac._solve(W)
        r = W - self.exact._matmat(zK)
        return zK + self.R0T(self._coarse_solve(self._chol_exact, self.R0(r)))

    def _matmat(self, V: Tensor) -> Tensor:
        """F•2L V = KV − KR_0ᵀ(R_0KR_0ᵀ)⁻¹R_0(KV − F•V), K = F•KFAC."""
        KV = self.kfac._matmat(V)
        if self.coarse_dim == 0:
            return KV
        if self._chol_kfac is None:
            self._chol_kfac = spd_cholesky(self.coarse_kfac, "R_0 F•KFAC R_0ᵀ")
        y = torch.cholesky_solve(self.R0(KV - self.exact._matmat(V)), self._chol_kfac)
        return KV - self.kfac._matmat(self.R0T(y))

    def gap(self, beta: Tensor | None = None) -> float:
        g = super().gap(beta)
        if beta is None:
            scale = float(self.exact.fisher_norm2(self.zeta_kfac)) + float(self.rhs @ self.zeta_kfac)
            if g > 1e-10 * max(scale, 1e-300):
                warnings.warn(
                    f"two-level gap (4.6) is {g:.3e} > 0 for coarse space '{self.name}': theory says ≤ 0 "
                    "(ill-conditioned F_coarse or loss of precision)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return g


class TKO(CoarseCorrection):
    """The additive correction of Tselepidis, Kohler and Orvieto (4.7), symmetric ``[p, p]``.

    ``solve(w)`` = F•KFAC⁻¹w + R_0ᵀF_coarse⁻¹R_0w.

    Args:
        coarse_operator: ``"exact"`` (F_coarse = R_0F•R_0ᵀ) or ``"kronecker"`` (F_coarse ≈
            R_0F̄•R_0ᵀ with the cross-layer blocks E[ā_{i−1}ā_{j−1}ᵀ] ⊗ E[g_ig_jᵀ] of (3.18),
            diagonal blocks from the one-level KFAC; Linear layers only).
        coarse: the coarse space (default Nicolaides, as published). Other arguments as in
            :class:`CoarseCorrection`.
    """

    symmetric = True
    legend = "PREVIOUS"

    def __init__(
        self,
        source: Capture | Jacobian,
        damping: float,
        coarse_operator: Literal["exact", "kronecker"] = "exact",
        coarse: str | CoarseSpace | Sequence[Tensor] = "nicolaides",
        **kw,
    ) -> None:
        if coarse_operator not in ("exact", "kronecker"):
            raise ValueError(f"coarse_operator must be 'exact' or 'kronecker', got {coarse_operator!r}")
        super().__init__(source, damping, coarse, **kw)
        self.coarse_operator = coarse_operator
        self.name = "tko" if coarse_operator == "exact" else "tko-kronecker"
        if coarse_operator == "exact":
            self.F_tko = self.F_coarse
            self._chol_tko = self._chol_exact
        else:
            self.F_tko = self._kronecker_coarse_operator()
            self._chol_tko = spd_cholesky(self.F_tko.to(self.coarse_dtype), "the Kronecker F_coarse (3.18)") if self.coarse_dim else None
        self._chol_sum: Tensor | None = None

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
                    row.append(Vi.T @ self.kfac.blocks[i].matmat(Vj))  # type: ignore[attr-defined]
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
        """β_TKO = F_coarse⁻¹R_0w (4.7b), w defaulting to ∇h."""
        W = self.rhs.reshape(-1, 1) if w is None else w
        return self._coarse_solve(self._chol_tko, self.R0(W))

    def _solve(self, W: Tensor) -> Tensor:
        return self.kfac._solve(W) + self.R0T(self._coarse_solve(self._chol_tko, self.R0(W)))

    def _matmat(self, V: Tensor) -> Tensor:
        """(K⁻¹ + R_0ᵀF_c⁻¹R_0)⁻¹V = KV − KR_0ᵀ(F_c + R_0KR_0ᵀ)⁻¹R_0KV (Woodbury)."""
        KV = self.kfac._matmat(V)
        if self.coarse_dim == 0:
            return KV
        if self._chol_sum is None:
            self._chol_sum = spd_cholesky(self.F_tko + self.coarse_kfac, "F_coarse + R_0F•KFACR_0ᵀ")
        y = torch.cholesky_solve(self.R0(KV), self._chol_sum)
        return KV - self.kfac._matmat(self.R0T(y))
