"""EKFAC (George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis"): KFAC's eigenbasis with the diagonal re-fitted to the per-example Jacobian rows.

Per layer, with the KFAC (expand) factors' eigenbases ``A_i = Q_A diag(s_A) Q_Aᵀ``,
``G_i = Q_G diag(s_G) Q_Gᵀ`` (2.25)–(2.27) and ``Q = Q_A ⊗ Q_G``:

    [F•EKFAC]_ii = Q (diag(s) + λI) Qᵀ,   s[(c, r)] = (1/B) Σ_n ((Q_Gᵀ MAT(j_n) Q_A)[r, c])²
                                                  = diag(Qᵀ F_ii Q),

the Frobenius-optimal diagonal in the KFAC eigenbasis (``‖F_ii − Q D Qᵀ‖_F`` is minimal at
D = diag(QᵀF_iiQ)). ``MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ`` ``[d_out, d_in']``: the rotation is
applied to the factors (:meth:`fisherlab.jacobian.LayerJacobian.eigenbasis_second_moments`), never
to a p_i × p_i matrix. **Damping: exact Tikhonov on the re-fitted diagonal**, s + λ (the π split
of (2.30) has no meaning without Kronecker factors). For a Linear layer with one example and K = 1
EKFAC is the exact block.

The blocks are :class:`~fisherlab.operators.kfac.KroneckerBlock` s whose eigenvalues are replaced
(``eig[r, c] = s[r, c] + λ``), so products, solves, powers, the spectral coarse space and spectra
work unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..jacobian import Jacobian, range_second_moments
from .algebra import BlockDiagonal
from .base import check_damping
from .kfac import DampingMode, KroneckerBlock

__all__ = ["EKFAC", "EKFACBlock", "range_second_moments"]


class EKFACBlock(KroneckerBlock):
    """``Q (diag(s) + λI) Qᵀ`` of one layer, ``[p_i, p_i]``, Q = Q_A ⊗ Q_G.

    Args:
        eigh: the KFAC factors' eigenpairs ``(s_A, Q_A, s_G, Q_G)`` (only the bases are used for
            the operator; the eigenvalues stay available for comparison).
        second_moments: ``s [d_out, d_in']`` (``s[r, c]`` belongs to ``QA[:, c] ⊗ QG[:, r]``).
        damping: λ > 0.
    """

    def __init__(self, eigh: tuple[Tensor, Tensor, Tensor, Tensor], second_moments: Tensor, damping: float) -> None:
        super().__init__(eigh, damping, DampingMode.TIKHONOV)
        if second_moments.shape != (self.d_out, self.d_in):
            raise ValueError(f"EKFAC: second moments must be [{self.d_out}, {self.d_in}], got {tuple(second_moments.shape)}")
        self.second_moments = second_moments.clamp_min(0)
        self.eig = self.second_moments + self.damping
        self.name = "ekfac-block"


class EKFAC(BlockDiagonal):
    """F•EKFAC = blockdiag(Q_i (diag(s_i) + λI) Q_iᵀ), ``[p, p]``.

    ``EKFAC(blocks)`` takes ready :class:`EKFACBlock` s; :meth:`from_capture` computes the re-fitted
    diagonals in the Jacobian's (shared) KFAC eigenbases.
    """

    def __init__(self, blocks: list[EKFACBlock]) -> None:
        super().__init__(blocks, name="ekfac")
        self.damping = blocks[0].damping

    @classmethod
    def from_capture(cls, source: Capture | Jacobian, damping: float, *, dtype: torch.dtype = torch.float64) -> "EKFAC":
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks = []
        for lj in jac.layers:
            eigh = tuple(t.to(dtype) for t in lj.kfac_eigh)
            blocks.append(EKFACBlock(eigh, lj.ekfac_second_moments().to(dtype), lam))  # type: ignore[arg-type]
        return cls(blocks)

    def second_moments(self) -> list[Tensor]:
        """The re-fitted (undamped) eigenvalues ``s_i [d_out, d_in']`` per layer."""
        return [b.second_moments for b in self.blocks]
