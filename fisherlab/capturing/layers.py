"""Per-layer views of forward inputs and backward output-gradients, normalised to
``[batch, positions, features]`` (Linear: positions = flattened extra dims, 1 for ``[B, d]``).

After these two functions Linear, Conv2d and BatchNorm are the same to every other part of
fisherlab. A BatchNorm layer in the Fisher (kind ``batchnorm``, :mod:`fisherlab.layout`) has
ā = [1] and, as its g, the per-example gradient row w.r.t. ``[γ; β]``, built from the gradient
w.r.t. its output and its normalised input x̂ (:func:`batchnorm_normalized`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import dense_from_factors
from ..layout import LayerKind, LayerSpec

__all__ = ["layer_inputs", "layer_output_grads", "batchnorm_normalized", "uses_batch_statistics", "dense_from_factors"]


def layer_inputs(spec: LayerSpec, x: Tensor) -> Tensor:
    """ā: the layer input with the bias column appended, ``[B, T, d_in']``.

    Linear: ``x [B, *, d_in]`` → ``[B, T = prod(*), d_in']``.
    Conv2d: ``x [B, c_in, H, W]`` → ``F.unfold`` → ``[B, T = H_out·W_out, c_in·kh·kw (+1)]``.
    BatchNorm: the constant ā = [1], ``[B, 1, 1]`` (``x`` only gives B and the dtype).
    """
    B = x.shape[0]
    if spec.kind is LayerKind.CONV2D:
        return _conv_patches(spec, x)
    if spec.kind is LayerKind.BATCHNORM:
        return x.new_ones(B, 1, 1)
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


def layer_output_grads(spec: LayerSpec, g: Tensor, lead: int = 1, xhat: Tensor | None = None) -> Tensor:
    """g: derivative w.r.t. the layer output, ``[*L, ...] -> [*L, T, d_out]``.

    Linear outputs are ``[*L, *, d_out]``; Conv2d outputs ``[*L, d_out, H_out, W_out]``. ``L`` are
    the ``lead`` leading dimensions (the batch, and the samples of a batched backward pass).

    BatchNorm (``xhat``: its normalised input ``[B, C, *S]``, :func:`batchnorm_normalized`): the
    output gradient ``g [*L, C, *S]`` (the batch axis last of ``L``) becomes the per-example
    gradient row w.r.t. ``[γ; β]``, ``[*L, 1, 2C] = [Σ_s g_{c,s} x̂_{c,s} (c = 1…C), Σ_s g_{c,s}]``
    (y = γ x̂ + β per channel, so this is exact whichever statistics x̂ used).
    """
    if spec.kind is LayerKind.LINEAR:
        return g.reshape(*g.shape[:lead], -1, spec.d_out)
    if spec.kind is LayerKind.BATCHNORM:
        if xhat is None:
            raise ValueError(f"layer '{spec.name}' (batchnorm): its normalised input x̂ is needed")
        C = spec.d_out // 2
        gf = g.reshape(*g.shape[:lead], C, -1)  # [*L, C, S]
        xf = xhat.reshape(xhat.shape[0], C, -1)  # [B, C, S], broadcast over the leading sample axes
        return torch.cat([(gf * xf).sum(-1), gf.sum(-1)], dim=-1).unsqueeze(-2)
    return g.flatten(-2).transpose(-1, -2)


def uses_batch_statistics(m: torch.nn.Module) -> bool:
    """Whether a BatchNorm module's forward normalises by the batch's statistics: in train mode,
    or without running statistics (``F.batch_norm``'s rule, ``track_running_stats=False``)."""
    return bool(m.training) or (getattr(m, "running_mean", None) is None and getattr(m, "running_var", None) is None)


def batchnorm_normalized(m: torch.nn.Module, x: Tensor) -> Tensor:
    """x̂ of a BatchNorm forward on ``x [B, C, *S]``, with the statistics that forward uses
    (:func:`uses_batch_statistics`): the batch's (mean and biased variance over the batch and
    positions, per channel) or the running ones; ``(x − μ)/√(σ² + ε)``, no graph."""
    with torch.no_grad():
        C = x.shape[1]
        shape = (1, C) + (1,) * (x.dim() - 2)
        if uses_batch_statistics(m):
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
        else:
            mean = m.running_mean.to(x.dtype).reshape(shape)
            var = m.running_var.to(x.dtype).reshape(shape)
        return (x - mean) / torch.sqrt(var + m.eps)
