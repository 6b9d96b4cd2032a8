"""The anatomy of an error: where ‖ζ_m − ζ‖²_F• lives (span of the Jacobian vs its null space,
layers, the leading modes of F), exact and at Woodbury cost.

F = UUᵀ has rank r ≤ N. With ``K = UᵀU = W diag(μ) Wᵀ`` (μ > 0 kept, :data:`RANK_RTOL`), the
orthogonal projector on span(U) is ``P = U K⁺ Uᵀ`` and F• = λI on its complement. For any
e ∈ Rᵖ, with y = Uᵀe [N]:

    ‖e‖²_F• = ‖y‖² + λ‖e‖² = 𝔈_span + 𝔈_null,
    𝔈_span = ‖y‖² + λ‖Pe‖²,   ‖Pe‖² = yᵀK⁺y = Σ_j (w_jᵀy)²/μ_j,
    𝔈_null = λ‖(I − P)e‖² = λ(‖e‖² − ‖Pe‖²).

The same split of ‖ζ‖²_F• says how much of the exact step lives in the null space, where only
λI models F•: a method that does not treat that space as exactly λI (π-damped KFAC, a coarse
space of a few dimensions) cannot get that share right.

Per layer, ‖e_i‖ and ‖e_i‖²_[F•]ii = ‖U_iᵀe_i‖² + λ‖e_i‖². Along the top eigenvectors
v_j = U w_j/√μ_j of F, the coefficient v_jᵀe = w_jᵀy/√μ_j: which modes a method gets right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .damping import RANK_RTOL
from .jacobian import Jacobian

__all__ = ["SpanBasis", "Anatomy", "anatomy"]


@dataclass
class SpanBasis:
    """The eigenpairs of K with μ > RANK_RTOL·μ_max: ``mu [r]`` (descending), ``W [N, r]``."""

    mu: Tensor
    W: Tensor
    damping: float

    @classmethod
    def from_jacobian(cls, jac: Jacobian, damping: float) -> "SpanBasis":
        mu, W = jac.gram_eigh
        top = float(mu[-1]) if mu.numel() else 0.0
        keep = mu > RANK_RTOL * top if top > 0 else mu > 0
        mu, W = mu[keep].flip(0), W[:, keep].flip(1)
        return cls(mu, W, float(damping))

    @property
    def rank(self) -> int:
        return int(self.mu.numel())


@dataclass
class Anatomy:
    """The split of ``‖e‖²_F•`` for one vector e.

    Attributes:
        total: ‖e‖²_F•; span, null: 𝔈_span, 𝔈_null (total = span + null).
        layers: per layer ``(‖e_i‖, ‖e_i‖²_[F•]ii)``.
        modes: the coefficients ``v_jᵀe`` along the top eigenvectors of F ``[k]``.
        product: ``Uᵀe`` ``[N]`` (what the split is computed from; :func:`fisherlab.compare`
            reuses it for the method's ``xᵀF•x`` = ‖Uᵀζ + Uᵀe‖² + λ‖x‖²).
        layer_products: the per-layer ``U_iᵀe_i`` ``[N, 1]`` (their sum is ``product``).
    """

    total: float
    span: float
    null: float
    layers: list[tuple[float, float]]
    modes: Tensor
    product: Tensor | None = None
    layer_products: list[Tensor] | None = None


def anatomy(jac: Jacobian, basis: SpanBasis, e: Tensor, *, top: int = 5, layer_products: list[Tensor] | None = None) -> Anatomy:
    """The :class:`Anatomy` of ``e [p]`` or ``[p, 1]`` (one Uᵀ product per layer, no p × p);
    ``layer_products``: the ``U_iᵀe_i [N, 1]`` when already known (then no product is computed)."""
    e = e.reshape(-1, 1).to(torch.float64)
    lam = basis.damping
    ys, layers = [], []
    for i, (lj, ei) in enumerate(zip(jac.layers, jac.layout.split(e))):
        yi = lj.rmatmat(ei) if layer_products is None else layer_products[i].reshape(-1, 1)
        ni2 = float(torch.dot(ei.reshape(-1), ei.reshape(-1)))  # no p_i-sized temporary
        layers.append((ni2**0.5, float(yi.pow(2).sum()) + lam * ni2))
        ys.append(yi)
    y = torch.stack(ys).sum(0)[:, 0]
    e2 = float(torch.dot(e.reshape(-1), e.reshape(-1)))
    c = basis.W.T @ y  # [r]
    pe2 = min(float((c.pow(2) / basis.mu).sum()), e2)  # ‖Pe‖² ≤ ‖e‖² (round-off)
    y2 = float(y.pow(2).sum())
    span, null = y2 + lam * pe2, lam * (e2 - pe2)
    k = min(top, basis.rank)
    modes = c[:k] / basis.mu[:k].sqrt()
    return Anatomy(y2 + lam * e2, span, null, layers, modes, y, ys)
