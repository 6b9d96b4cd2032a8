"""The exact diagonal of F•: ``diag(F•) = (1/B) Σ_n j_n ∘ j_n + λ`` (MATH.md §2–§3).

The cheapest curvature a practitioner uses (Adam-like and diagonal-GGN preconditioners): its
error against ζ shows how much of the natural gradient survives when every parameter is treated
alone. Per layer from the factors (:meth:`fisherlab.jacobian.LayerJacobian.diagonal`: one small
GEMM for Linear layers, no dense rows), so it also serves as the one-level operator of a
coarse correction (it is block-diagonal over the layers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..damping import Damping, resolve_damping
from ..jacobian import Jacobian
from .algebra import BlockDiagonal
from .base import FisherOperator, check_damping

__all__ = ["DiagonalBlock", "DiagonalFisher"]


class DiagonalBlock(FisherOperator):
    """``diag(d_i) + λI`` of one layer, ``[p_i, p_i]``.

    Args:
        diag: the undamped diagonal ``d_i [p_i]`` (≥ 0).
        damping: λ > 0.
        name: the layer, for messages.
    """

    def __init__(self, diag: Tensor, damping: float, name: str = "layer") -> None:
        super().__init__(diag.shape[0], diag.dtype)
        self.diag = diag
        self.damping = check_damping(damping)
        self.values = (diag.clamp_min(0) + self.damping)[:, None]  # [p_i, 1]
        self.name = f"diagonal '{name}'"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.values * V

    def _solve(self, W: Tensor) -> Tensor:
        return W / self.values


class DiagonalFisher(BlockDiagonal):
    """``diag(F•) = diag(F) + λI`` ``[p, p]``, per layer.

    ``DiagonalFisher(blocks)`` takes ready :class:`DiagonalBlock` s; :meth:`from_capture` computes
    the diagonal from a capture or Jacobian.
    """

    def __init__(self, blocks: list[DiagonalBlock]) -> None:
        super().__init__(blocks, name="diagonal")
        self.damping = blocks[0].damping

    @classmethod
    def from_capture(cls, source: Capture | Jacobian, damping: float | Damping, *, dtype: torch.dtype = torch.float64) -> "DiagonalFisher":
        jac = Jacobian.coerce(source, dtype)
        lam = resolve_damping(damping, jac)
        return cls([DiagonalBlock(lj.diagonal(), lam, lj.spec.name) for lj in jac.layers])

    def diagonal(self) -> Tensor:
        """``diag(F•)`` ``[p]``."""
        return torch.cat([b.values[:, 0] for b in self.blocks])
