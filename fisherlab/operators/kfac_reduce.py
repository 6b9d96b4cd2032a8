"""KFAC-reduce (Eschenhagen et al. 2023, "Kronecker-Factored Approximate Curvature for Modern
Neural Network Architectures") for layers shared over positions (Conv2d; Linear along a sequence).

fisherlab's ``kfac`` is the **expand** variant (2.27): every position is an extra example,
``A = (1/B) Σ_{b,t} ā_{b,t}ā_{b,t}ᵀ``, ``G = (1/(B·T)) Σ_{b,k,t} g_{b,k,t}g_{b,k,t}ᵀ``. The
**reduce** variant first aggregates over positions,

    A_red = (1/B) Σ_b ā̄_b ā̄_bᵀ,  ā̄_b = (1/T) Σ_t ā_{b,t}   [d_in', d_in']
    G_red = (1/B) Σ_{b,k} ḡ_{b,k} ḡ_{b,k}ᵀ,  ḡ_{b,k} = Σ_t g_{b,k,t}   [d_out, d_out]

(:attr:`fisherlab.jacobian.LayerJacobian.reduce_factors`), then ``[F•]_ii ≈ Ã_red ⊗ G̃_red`` with
the same damping modes as KFAC (π (2.30) or exact Tikhonov). It is exact-by-construction when the
inputs do not vary over positions, and equals ``kfac`` when T = 1. Needs factored storage.
"""

from __future__ import annotations

import torch

from ..capturing.record import Capture
from ..jacobian import Jacobian
from .algebra import BlockDiagonal
from .base import check_damping
from .kfac import DampingMode, KroneckerBlock

__all__ = ["KFACReduce"]


class KFACReduce(BlockDiagonal):
    """blockdiag(Ã_red,i ⊗ G̃_red,i) (π-damped) or blockdiag(A_red ⊗ G_red + λI), ``[p, p]``.

    ``KFACReduce(blocks)`` takes ready :class:`KroneckerBlock` s; :meth:`from_capture` builds them
    from the reduce factors (needs every layer stored factored).
    """

    def __init__(self, blocks: list[KroneckerBlock]) -> None:
        super().__init__(blocks, name="kfac-reduce")
        self.damping = blocks[0].damping
        self.damping_mode = blocks[0].mode

    @classmethod
    def from_capture(
        cls, source: Capture | Jacobian, damping: float, damping_mode: str | DampingMode = "pi", *, dtype: torch.dtype = torch.float64
    ) -> "KFACReduce":
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks = []
        for lj in jac.layers:
            eigh = tuple(t.to(dtype) for t in lj.reduce_eigh)
            A, G = (t.to(dtype) for t in lj.reduce_factors)
            blocks.append(KroneckerBlock(eigh, lam, damping_mode, factors=(A, G)))  # type: ignore[arg-type]
        return cls(blocks)

    @property
    def factors(self):
        """``[(A_red,i, G_red,i)]``."""
        return [b.factors for b in self.blocks]
