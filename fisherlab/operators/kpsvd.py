"""KPSVD (Koroko et al., arXiv 2201.10285): per layer the sum of the top r Kronecker terms of the
exact block, from the Kronecker-product SVD of its rearrangement (:mod:`.kfoc`), damped exactly:

    [F•KPSVD]_ii = Σ_{k≤r} A_k ⊗ G_k + λI   [p_i, p_i],   A_k [d_in', d_in'], G_k [d_out, d_out]

(``Σ_k σ_k U_k ⊗ V_k`` truncated; with every term it is the exact block F_ii + λI). Products are
``X ↦ Σ_k G_k X A_kᵀ + λX`` on ``X = MAT(v)``. Inverses:

* r = 1: through the eigenbases of A_1 and G_1 (a :class:`~fisherlab.operators.kfac.KroneckerBlock`
  with exact Tikhonov damping) — that is KFOC with Tikhonov damping;
* r ≥ 2: preconditioned conjugate gradients per layer on the product, preconditioned by the
  r = 1 block (every column of a block solved at once, relative residual ``cg_rtol``). A truncated
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
from .kfoc import KroneckerSVD, kronecker_svd

__all__ = ["KPSVD", "KPSVDBlock"]


class KPSVDBlock(FisherOperator):
    """``Σ_k A_k ⊗ G_k + λI`` of one layer, ``[p_i, p_i]``.

    Args:
        A: ``[r, d_in', d_in']``; G: ``[r, d_out, d_out]`` (terms: both symmetric or both
            antisymmetric, so every ``A_k ⊗ G_k`` is symmetric).
        damping: λ > 0.
        cg_rtol, cg_maxiter: the CG solve for r ≥ 2.
        name: the layer, for messages.

    Attributes:
        r; first: the r = 1 :class:`KroneckerBlock` (Tikhonov), the solve for r = 1 and CG's
        preconditioner otherwise; last_iterations: CG iterations of the last solve.
    """

    def __init__(self, A: Tensor, G: Tensor, damping: float, *, cg_rtol: float = 1e-13, cg_maxiter: int | None = None, name: str = "layer") -> None:
        self.r, self.d_in, self.d_out = A.shape[0], A.shape[1], G.shape[1]
        super().__init__(self.d_in * self.d_out, A.dtype)
        self.A, self.G = A, G  # not symmetrised: antisymmetric pairs give symmetric A_k ⊗ G_k
        self.damping = check_damping(damping)
        A1, G1 = (A[0] + A[0].mT) / 2, (G[0] + G[0].mT) / 2  # the top pair: symmetric PSD
        self.first = KroneckerBlock(factor_eigh(A1, G1), self.damping, DampingMode.TIKHONOV, factors=(A1, G1))
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter or max(50, 2 * self.p)
        self.last_iterations = 0
        self.name = f"kpsvd(r={self.r}) '{name}'"

    def _matmat(self, V: Tensor) -> Tensor:
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # [c, d_out, d_in']
        Y = torch.einsum("krs,xsj,kij->xri", self.G, X, self.A) + self.damping * X
        return Y.mT.reshape(c, -1).T

    def _solve(self, W: Tensor) -> Tensor:
        if self.r == 1:
            return self.first.apply_inverse(W)
        return self._pcg(W)

    def _pcg(self, W: Tensor) -> Tensor:
        """Preconditioned CG, all columns at once (each with its own step sizes)."""
        X = torch.zeros_like(W)
        R = W.clone()
        Z = self.first.apply_inverse(R)
        P = Z.clone()
        rz = (R * Z).sum(0)
        bnorm = W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
        for it in range(1, self.cg_maxiter + 1):
            AP = self._matmat(P)
            pAp = (P * AP).sum(0)
            active = R.norm(dim=0) > self.cg_rtol * bnorm
            if bool((pAp[active] <= 0).any()):
                raise FisherlabError(
                    f"{self.name}: the sum of {self.r} Kronecker terms + λI is not positive definite at "
                    f"λ = {self.damping:g} (CG met non-positive curvature); use fewer terms or a larger λ"
                )
            alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
            X += alpha * P
            R -= alpha * AP
            if bool((R.norm(dim=0) <= self.cg_rtol * bnorm).all()):
                self.last_iterations = it
                return X
            Z = self.first.apply_inverse(R)
            rz_new = (R * Z).sum(0)
            P = Z + (rz_new / torch.where(rz == 0, torch.ones_like(rz), rz)) * P
            rz = rz_new
        raise FisherlabError(
            f"{self.name}: CG did not reach the relative residual {self.cg_rtol:g} in {self.cg_maxiter} iterations"
        )


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
        dtype: torch.dtype = torch.float64,
    ) -> "KPSVD":
        if int(r) != r or r < 1:
            raise ValueError(f"kpsvd: r must be a positive integer, got {r!r}")
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks, svds = [], []
        for lj in jac.layers:
            ks = kronecker_svd(lj, int(r), solver)
            blocks.append(KPSVDBlock(ks.A, ks.G, lam, cg_rtol=cg_rtol, name=lj.spec.name))
            svds.append(ks)
        op = cls(blocks)
        op.svd = svds
        return op
