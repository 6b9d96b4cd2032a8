"""Per-layer views of forward inputs and backward output-gradients, normalised to
``[batch, positions, features]`` (Linear: positions = flattened extra dims, 1 for ``[B, d]``).

After these two functions Linear and Conv2d are the same to every other part of fisherlab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import dense_from_factors
from ..layout import LayerKind, LayerSpec

__all__ = ["layer_inputs", "layer_output_grads", "dense_from_factors"]


def layer_inputs(spec: LayerSpec, x: Tensor) -> Tensor:
    """ā: the layer input with the bias column appended, ``[B, T, d_in']``.

    Linear: ``x [B, *, d_in]`` → ``[B, T = prod(*), d_in']``.
    Conv2d: ``x [B, c_in, H, W]`` → ``F.unfold`` → ``[B, T = H_out·W_out, c_in·kh·kw (+1)]``.
    """
    B = x.shape[0]
    if spec.kind is LayerKind.CONV2D:
        return _conv_patches(spec, x)
    a = x.reshape(B, -1, spec.d_in)
    if spec.bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def _conv_patches(spec: LayerSpec, x: Tensor) -> Tensor:
    """``F.unfold(x).transpose(1, 2)`` (+ the bias column), contiguous ``[B, T, d_in']``, by one
    strided copy from the padded input: ā[b, (ho, wo), (c, i, j)] = x̃[b, c, ho·s + i·d, wo·s + j·d].

    Equivalent to unfold + transpose + cat, which on the CPU costs several times a convolution.
    """
    c = spec.conv
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["kernel_size"], c["stride"], c["padding"], c["dilation"]
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    x = x.contiguous()
    B, C, Hp, Wp = x.shape
    Ho, Wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    sB, sC, sH, sW = x.stride()
    patches = x.as_strided((B, Ho, Wo, C, kh, kw), (sB, sh * sH, sw * sW, sC, dh * sH, dw * sW))
    a = x.new_empty(B, Ho * Wo, spec.d_in_bar)
    a[..., : spec.d_in].view(B, Ho, Wo, C, kh, kw).copy_(patches)
    if spec.bias:
        a[..., spec.d_in] = 1
    return a


def layer_output_grads(spec: LayerSpec, g: Tensor, lead: int = 1) -> Tensor:
    """g: derivative w.r.t. the layer output, ``[*L, ...] -> [*L, T, d_out]``.

    Linear outputs are ``[*L, *, d_out]``; Conv2d outputs ``[*L, d_out, H_out, W_out]``. ``L`` are
    the ``lead`` leading dimensions (the batch, and the samples of a batched backward pass).
    """
    if spec.kind is LayerKind.LINEAR:
        return g.reshape(*g.shape[:lead], -1, spec.d_out)
    return g.flatten(-2).transpose(-1, -2)
