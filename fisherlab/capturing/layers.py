"""Per-layer views of forward inputs and backward output-gradients, normalised to
``[batch, positions, features]`` (Linear: positions = flattened extra dims, 1 for ``[B, d]``).

After these two functions Linear and Conv2d are the same to every other part of fisherlab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import LayerKind, LayerSpec

__all__ = ["layer_inputs", "layer_output_grads", "dense_from_factors"]


def layer_inputs(spec: LayerSpec, x: Tensor) -> Tensor:
    """ā: the layer input with the bias column appended, ``[B, T, d_in']``.

    Linear: ``x [B, *, d_in]`` → ``[B, T = prod(*), d_in']``.
    Conv2d: ``x [B, c_in, H, W]`` → ``F.unfold`` → ``[B, T = H_out·W_out, c_in·kh·kw (+1)]``.
    """
    B = x.shape[0]
    if spec.kind is LayerKind.LINEAR:
        a = x.reshape(B, -1, spec.d_in)
    else:
        c = spec.conv
        a = F.unfold(x, c["kernel_size"], dilation=c["dilation"], padding=c["padding"], stride=c["stride"])
        a = a.transpose(1, 2)  # [B, T, d_in]
    if spec.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def layer_output_grads(spec: LayerSpec, g: Tensor, lead: int = 1) -> Tensor:
    """g: derivative w.r.t. the layer output, ``[*L, ...] -> [*L, T, d_out]``.

    Linear outputs are ``[*L, *, d_out]``; Conv2d outputs ``[*L, d_out, H_out, W_out]``. ``L`` are
    the ``lead`` leading dimensions (the batch, and the samples of a batched backward pass).
    """
    if spec.kind is LayerKind.LINEAR:
        return g.reshape(*g.shape[:lead], -1, spec.d_out)
    return g.flatten(-2).transpose(-1, -2)


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
