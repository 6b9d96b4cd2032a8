"""Pure tensor maths shared by the capture and the Jacobian core (ARCHITECTURE.md ``kernels.py``):
functions of the per-layer factors ā ``[B, T, d_in']`` and g ``[B, K, T, d_out]`` (MATH.md §2–§4).

Below both :mod:`fisherlab.capturing` and :mod:`fisherlab.jacobian`, so neither reaches into the
other for them; nothing here knows a layer, a capture or a file.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_from_factors", "kfac_factors_from"]


def dense_from_factors(a: Tensor, g: Tensor) -> Tensor:
    """Per-example gradient rows ``j_{b,k} = vec(Σ_t g_{b,k,t} ā_{b,t}ᵀ)``: ``[B·K, d_in'·d_out]``.

    Args:
        a: ``[B, T, d_in']``.
        g: ``[B, K, T, d_out]``.
    """
    B, K, T, d_out = g.shape
    # vec stacks columns of the d_out × d_in' matrix: index = col·d_out + row.
    Mt = torch.einsum("bte,bktd->bked", a, g)  # [B, K, d_in', d_out] = (G_bkᵀ Ā_b)ᵀ
    return Mt.reshape(B * K, -1)


def kfac_factors_from(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """KFAC factors (2.25)–(2.27) from ā ``[B, T, d_in']`` and g ``[B, K, T, d_out]``.

    ``A = (1/B) Σ_{b,t} ā_{b,t} ā_{b,t}ᵀ``, ``G = (1/(B·T)) Σ_{b,k,t} g_{b,k,t} g_{b,k,t}ᵀ``
    (T = 1 for Linear: the usual (2.25)). Accumulated in the dtype of the inputs.
    """
    B, K, T, d_out = g.shape
    af = a.reshape(-1, a.shape[-1])
    gf = g.reshape(-1, d_out)
    return af.T @ af / B, gf.T @ gf / (B * T)
