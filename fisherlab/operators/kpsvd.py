"""KPSVD (Koroko et al., arXiv 2201.10285): per layer the sum of the top r Kronecker terms of the
exact block, from the Kronecker-product SVD of its rearrangement (:mod:`.kfoc`), damped exactly:

    [F•KPSVD]_ii = Σ_{k≤r} A_k ⊗ G_k + λI   [p_i, p_i],   A_k [d_in', d_in'], G_k [d_out, d_out]

(``Σ_k σ_k U_k ⊗ V_k`` truncated; with every term it is the exact block F_ii + λI). Products are
``X ↦ Σ_k G_k X A_kᵀ + λX`` on ``X = MAT(v)``. Inverses:

* r = 1: through the eigenbases of A_1 and G_1 (a :class:`~fisherlab.operators.kfac.KroneckerBlock`
  with exact Tikhonov damping) — that is KFOC with Tikhonov damping;
* r ≥ 2: preconditioned conjugate gradients per layer, preconditioned by the r = 1 block (every
  column of a block solved at once, relative residual ``cg_rtol``). CG runs in the eigenbasis of
  ``(A_1, G_1)``, ``X̂ = Q_Gᵀ X Q_A``, where the first term and λI are the diagonal
  ``D = s_G s_Aᵀ + λ`` (the preconditioner is then ``X̂ ↦ X̂ / D``) and only the terms k ≥ 2 are
  products: ``Σ_{k≥2} Ĝ_k X̂ Â_kᵀ`` with ``Ĝ_k = Q_GᵀG_kQ_G``, ``Â_k = Q_AᵀA_kQ_A`` (``"dense"``), or,
  from the ``"factors"`` Kronecker SVD (``A_k = āᵀdiag(α_k)ā``, ``G_k = gᵀdiag(β_k)g``, rank ≤ B),
  ``ĝᵀ (W ∘ (ĝ X̂ âᵀ)) â`` with ``â = ā Q_A``, ``ĝ = g Q_G``, ``W = Σ_{k≥2} β_k α_kᵀ`` ``[N, B]``
  (``"rows"``: all terms for the price of one, never d × d), whichever costs fewer flops. Two
  rotations per solve instead of four products per iteration. A truncated
  sum need not be positive definite: CG stops with a one-line error naming the layer when it meets
  non-positive curvature. (Simultaneous diagonalisation, which inverts two Kronecker terms
  exactly, does not apply with the λI term; it is not used.)

``r`` is clipped per layer to the rank the Kronecker SVD resolves (:attr:`KPSVD.ranks`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..errors import FisherlabError
from ..jacobian import Jacobian, factor_eigh
from .algebra import BlockDiagonal
from .base import FisherOperator, check_damping
from .kfac import DampingMode, KroneckerBlock
from .kfoc import KroneckerSVD, kronecker_svd, top_pair_eigh

__all__ = ["KPSVD", "KPSVDBlock"]


class KPSVDBlock(FisherOperator):
    """``Σ_k A_k ⊗ G_k + λI`` of one layer, ``[p_i, p_i]``.

    Args:
        A: ``[r, d_in', d_in']``; G: ``[r, d_out, d_out]`` (terms: both symmetric or both
            antisymmetric, so every ``A_k ⊗ G_k`` is symmetric).
        damping: λ > 0.
        cg_rtol, cg_maxiter: the CG solve for r ≥ 2.
        name: the layer, for messages.
        rows: :attr:`~fisherlab.operators.kfoc.KroneckerSVD.rows` (``"factors"`` SVD), for CG's
            ``"rows"`` products.
        first_eigh: ready eigenpairs of the symmetrised (A_1, G_1) (shared with KFOC).
        cg_path: ``"auto"`` (the cheaper), ``"rows"`` or ``"dense"``.

    Attributes:
        r; first: the r = 1 :class:`KroneckerBlock` (Tikhonov), the solve for r = 1 and CG's
        preconditioner otherwise; path: ``"eigenbasis"`` (r = 1), ``"rows"`` or ``"dense"`` (how CG
        applies the terms k ≥ 2); last_iterations: CG iterations of the last solve.
    """

    def __init__(self, A: Tensor, G: Tensor, damping: float, *, cg_rtol: float = 1e-13, cg_maxiter: int | None = None,
                 name: str = "layer", rows: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
                 first_eigh: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, cg_path: str = "auto") -> None:
        self.r, self.d_in, self.d_out = A.shape[0], A.shape[1], G.shape[1]
        super().__init__(self.d_in * self.d_out, A.dtype)
        self.A, self.G = A, G  # not symmetrised: antisymmetric pairs give symmetric A_k ⊗ G_k
        self.damping = check_damping(damping)
        A1, G1 = (A[0] + A[0].mT) / 2, (G[0] + G[0].mT) / 2  # the top pair: symmetric PSD
        eigh = first_eigh if first_eigh is not None else factor_eigh(A1, G1)
        self.first = KroneckerBlock(eigh, self.damping, DampingMode.TIKHONOV, factors=(A1, G1))
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter or max(50, 2 * self.p)
        self.last_iterations = 0
        self.name = f"kpsvd(r={self.r}) '{name}'"
        if cg_path not in ("auto", "rows", "dense"):
            raise ValueError(f"kpsvd: cg_path must be 'auto', 'rows' or 'dense', got {cg_path!r}")
        if cg_path == "rows" and rows is None:
            raise ValueError(f"{self.name}: cg_path 'rows' needs the rows of a 'factors' Kronecker SVD (a factored layer with one position)")
        auto = _cg_path(self.r, self.d_in, self.d_out, rows)
        self.path = "eigenbasis" if self.r == 1 else (auto if cg_path == "auto" else cg_path)
        if self.path == "rows":  # terms k ≥ 2 through the rotated rows
            a, alpha, g, beta = rows  # type: ignore[misc]
            self._a_hat = a @ self.first.QA  # [B, d_in']
            self._g_hat = g @ self.first.QG  # [N, d_out]
            self._W = beta[:, 1 : self.r] @ alpha[:, 1 : self.r].T  # [N, B]
        elif self.path == "dense":  # terms k ≥ 2 rotated once
            QA, QG = self.first.QA, self.first.QG
            self._A_hat = QA.T @ A[1:] @ QA  # [r-1, d_in', d_in']
            self._G_hat = QG.T @ G[1:] @ QG  # [r-1, d_out, d_out]

    def _matmat(self, V: Tensor) -> Tensor:
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # [c, d_out, d_in']
        Y = torch.einsum("krs,xsj,kij->xri", self.G, X, self.A) + self.damping * X
        return Y.mT.reshape(c, -1).T

    def _solve(self, W: Tensor) -> Tensor:
        if self.r == 1:
            return self.first.apply_inverse(W)
        return self.first.from_eigenbasis(self._pcg(self.first.to_eigenbasis(W)))

    def _rotated_product(self, X: Tensor) -> Tensor:
        """The block in the eigenbasis of (A_1, G_1): ``X̂ [c, d_out, d_in'] -> D ∘ X̂ + Σ_{k≥2} Ĝ_k X̂ Â_kᵀ``."""
        Y = self.first.eig * X
        if self.path == "rows":
            M = self._g_hat @ X @ self._a_hat.T  # [c, N, B]
            return Y + self._g_hat.T @ (M * self._W) @ self._a_hat
        return Y + torch.einsum("krs,xsj,kij->xri", self._G_hat, X, self._A_hat)

    def _pcg(self, Bh: Tensor) -> Tensor:
        """Preconditioned CG on ``X̂ [c, d_out, d_in']`` (the rotated right-hand sides), all columns
        at once (each with its own step sizes); preconditioner ``X̂ ↦ X̂ / D`` (the r = 1 block)."""
        D = self.first.eig
        X = torch.zeros_like(Bh)
        R = Bh.clone()
        Z = R / D
        P = Z.clone()
        rz = (R * Z).sum((1, 2))
        bnorm = Bh.flatten(1).norm(dim=1).clamp_min(torch.finfo(Bh.dtype).tiny)
        for it in range(1, self.cg_maxiter + 1):
            AP = self._rotated_product(P)
            pAp = (P * AP).sum((1, 2))
            active = R.flatten(1).norm(dim=1) > self.cg_rtol * bnorm
            if bool((pAp[active] <= 0).any()):
                raise FisherlabError(
                    f"{self.name}: the sum of {self.r} Kronecker terms + λI is not positive definite at "
                    f"λ = {self.damping:g} (CG met non-positive curvature); use fewer terms or a larger λ"
                )
            alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
            X += alpha[:, None, None] * P
            R -= alpha[:, None, None] * AP
            if bool((R.flatten(1).norm(dim=1) <= self.cg_rtol * bnorm).all()):
                self.last_iterations = it
                return X
            Z = R / D
            rz_new = (R * Z).sum((1, 2))
            P = Z + (rz_new / torch.where(rz == 0, torch.ones_like(rz), rz))[:, None, None] * P
            rz = rz_new
        raise FisherlabError(
            f"{self.name}: CG did not reach the relative residual {self.cg_rtol:g} in {self.cg_maxiter} iterations"
        )


def _cg_path(r: int, d_in: int, d_out: int, rows: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> str:
    """``"rows"`` or ``"dense"``: the cheaper way (flops per column) to apply the terms k ≥ 2."""
    dense = (r - 1) * d_in * d_out * (d_in + d_out)
    if rows is None:
        return "dense"
    Bn, N = rows[0].shape[0], rows[2].shape[0]
    via_rows = 2 * N * d_in * (d_out + Bn)
    return "rows" if via_rows < dense else "dense"


class KPSVD(BlockDiagonal):
    """blockdiag(Σ_{k≤r} A_{i,k} ⊗ G_{i,k} + λI), ``[p, p]``.

    ``KPSVD(blocks)`` takes ready :class:`KPSVDBlock` s; :meth:`from_capture` computes the top r
    Kronecker terms of every layer (:func:`~fisherlab.operators.kfoc.kronecker_svd`).

    Attributes:
        ranks: r per layer (after clipping); svd: the per-layer :class:`KroneckerSVD`.
    """

    def __init__(self, blocks: list[KPSVDBlock]) -> None:
        super().__init__(blocks, name="kpsvd")
        self.damping = blocks[0].damping
        self.svd: list[KroneckerSVD] = []

    @property
    def ranks(self) -> list[int]:
        return [b.r for b in self.blocks]

    @classmethod
    def from_capture(
        cls,
        source: Capture | Jacobian,
        damping: float,
        r: int = 2,
        *,
        solver: str = "auto",
        cg_rtol: float = 1e-13,
        cg_path: str = "auto",
        dtype: torch.dtype = torch.float64,
    ) -> "KPSVD":
        if int(r) != r or r < 1:
            raise ValueError(f"kpsvd: r must be a positive integer, got {r!r}")
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks, svds = [], []
        for lj in jac.layers:
            ks = kronecker_svd(lj, int(r), solver)
            blocks.append(KPSVDBlock(ks.A, ks.G, lam, cg_rtol=cg_rtol, name=lj.spec.name, rows=ks.rows,
                                     first_eigh=top_pair_eigh(lj, ks), cg_path=cg_path))
            svds.append(ks)
        op = cls(blocks)
        op.svd = svds
        return op
