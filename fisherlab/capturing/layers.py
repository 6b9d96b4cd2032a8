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


# ---- dense Conv2d layers: their stored pieces straight from x and the output gradients -----------
# A layer stored dense (``J_i [N, p_i]`` and its KFAC factors, :mod:`fisherlab.capturing.record`)
# never needs ā itself, whose unfold is k_h·k_w times its input; these three build what is stored
# from the input x and the output gradients, in the layout the unfolded ā would give.


_CHUNK_NUMBERS = 1 << 24
"""At most this many numbers (64 MiB in float32) in one batch of pixel products of
:func:`conv_input_moment`: large images go through in bands of rows."""


_TWO_STEP_TRANSPOSE = 1 << 22
"""From this many numbers of padded input up, :func:`conv_input_moment` moves the batch axis
last by a 2-D transpose and a copy of whole rows rather than one strided gather (ResNet-18's
layer1 input, B = 128: 89.9 → 34.3 ms; 64 × 58 × 58: 199.5 → 97.1 ms; below, the gather is as
fast or faster)."""


def _geometry(spec: LayerSpec) -> tuple[tuple[int, int], ...]:
    c = spec.conv
    return tuple(tuple(c[k]) for k in ("kernel_size", "stride", "padding", "dilation"))  # type: ignore[return-value]


def conv_input_moment(spec: LayerSpec, x: Tensor) -> Tensor:
    """``Σ_{b,t} ā_{b,t} ā_{b,t}ᵀ [d_in', d_in']`` of a Conv2d layer from its input ``x [B, c_in, H, W]``
    (B times the KFAC factor A (2.27)), in the dtype of ``x``; equals ``āᵀā`` of the unfolded ā.

    With stride 1 the entry of channels (c, c′) at kernel offsets (i, j), (i′, j′) is a sum, over
    the window of output positions shifted by (i·d_h, j·d_w), of the products
    Q_δ[u, v] = Σ_b x̃[b, c, u, v] x̃[b, c′, u + δ_h, v + δ_w] of the padded input x̃, at the pixel
    offset δ = ((i′ − i)·d_h, (j′ − j)·d_w). Half of the (2k_h − 1)(2k_w − 1) offsets are needed
    (the others are transposes); one batched product per kernel-row offset covers all its column
    offsets when d_w = 1 (their partner pixels are consecutive), and two small products with
    window indicators sum the windows: c_in²·B·H̃·W̃ multiply-adds per offset against
    c_in²·k_h²·k_w²·B·T for āᵀā (about 7× fewer for a 5 × 5 kernel, 2.5× for 3 × 3; measured 4.3×
    faster on the small CNN's second conv, 1.8× over ResNet-18's layers 1–2), and no k_h·k_w-fold copy
    of the input. Sums are direct (no prefix differences), accumulated in the dtype of ``x`` as
    āᵀā is.
    Other strides, and a single input channel (its ā has only k_h·k_w + 1 columns, and the
    (2k_h − 1)·k_w offsets' products of single numbers cost more than the unfold): āᵀā of the
    unfolded ā.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _geometry(spec)
    if (sh, sw) != (1, 1) or x.shape[1] == 1:
        a = layer_inputs(spec, x).flatten(0, 1)
        return a.T @ a
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    B, C, Hp, Wp = xp.shape
    Ho, Wo = Hp - dh * (kh - 1), Wp - dw * (kw - 1)
    P = Hp * Wp
    # x̃ at the flat pixel index u·W̃ + v, with zero pixels past the end so that every partner
    # index p + shift exists (the products there are zero, and no window reads them)
    flat = x.new_empty(P + (kh - 1) * dh * Wp + (kw - 1) * dw, C, B)
    flat[P:].zero_()
    if xp.numel() >= _TWO_STEP_TRANSPOSE:  # [B, C·P] → [C·P, B] → [P, C, B]: rows of B numbers
        flat[:P].copy_(xp.reshape(B, C * P).T.contiguous().view(C, P, B).transpose(0, 1))
    else:
        flat[:P].copy_(xp.reshape(B, C, P).permute(2, 1, 0))
    dev = x.device
    # window indicators: row u is in the window of kernel row i when i·d_h ≤ u < i·d_h + H_o
    in_row = ((torch.arange(Hp, device=dev) >= (torch.arange(kh, device=dev) * dh)[:, None])
              & (torch.arange(Hp, device=dev) < (torch.arange(kh, device=dev) * dh + Ho)[:, None])).to(x.dtype)
    in_col = ((torch.arange(Wp, device=dev) >= (torch.arange(kw, device=dev) * dw)[:, None])
              & (torch.arange(Wp, device=dev) < (torch.arange(kw, device=dev) * dw + Wo)[:, None])).to(x.dtype)
    M = x.new_zeros(C, kh, kw, C, kh, kw)
    # one buffer for every batch of pixel products (a fresh one per product costs its page faults)
    Qbuf = x.new_empty(min(Hp * Wp * C * (2 * kw - 1) * C, max(_CHUNK_NUMBERS, Wp * C * (2 * kw - 1) * C)))
    for di in range(kh):  # δ = (di, dj) ≥ (0, 0) in lexicographic order; the rest by symmetry
        offsets = list(range(0 if di == 0 else -(kw - 1), kw))
        # with d_w = 1 the partners of consecutive dj are consecutive pixels: one product [C, n·C]
        # per pixel covers the whole block of offsets; otherwise one offset at a time
        for block in ([offsets] if dw == 1 else [[dj] for dj in offsets]):
            n, base = len(block), di * dh * Wp + block[0] * dw  # base ≥ 0: lexicographic order
            partners = flat.as_strided((P, n * C, B), (C * B, B, 1), base * C * B)  # [P, n·C, B]
            ni = kh - di
            by_row = None  # [ni, Wp, C·n·C]: Σ over the rows u of each window, per column v
            rows_per = max(1, _CHUNK_NUMBERS // (Wp * C * n * C))
            for u0 in range(0, Hp, rows_per):
                u1 = min(Hp, u0 + rows_per)
                Q = torch.bmm(flat[u0 * Wp : u1 * Wp], partners[u0 * Wp : u1 * Wp].transpose(1, 2),
                              out=Qbuf[: (u1 - u0) * Wp * C * n * C].view((u1 - u0) * Wp, C, n * C))  # [·, C, n·C]
                part = (in_row[:ni, u0:u1] @ Q.view(u1 - u0, Wp * C * n * C)).view(ni, Wp, C * n * C)
                by_row = part if by_row is None else by_row.add_(part)
            win = torch.matmul(in_col, by_row).view(ni, kw, C, n, C)  # Σ over the columns of each window
            for q, dj in enumerate(block):
                j0, j1 = max(0, -dj), kw - max(0, dj)
                w = win[:, j0:j1, :, q]  # [ni, nj, C, C]
                ii = torch.arange(ni, device=dev)[:, None]  # i, with i′ = i + di
                jv = torch.arange(j0, j1, device=dev)[None, :]  # j, with j′ = j + dj
                M[:, ii, jv, :, ii + di, jv + dj] = w
                M[:, ii + di, jv + dj, :, ii, jv] = w.transpose(-1, -2)
    d = spec.d_in
    out = x.new_empty(spec.d_in_bar, spec.d_in_bar)
    out[:d, :d] = M.view(d, d)
    if spec.bias:  # Σ ā over the positions: the window sums of Σ_b x̃
        col = torch.einsum("iu,uvc,jv->cij", in_row, flat[:P].sum(-1).view(Hp, Wp, C), in_col).reshape(d)
        out[:d, d] = col
        out[d, :d] = col
        out[d, d] = B * Ho * Wo
    return out


def _weight_gradient(spec: LayerSpec, x: Tensor, go: Tensor) -> Tensor:
    """``∂/∂weight`` of ⟨go, conv(x)⟩: ``[d_out, c_in, k_h, k_w]`` (a convolution's weight backward)."""
    (kh, kw), stride, padding, dilation = _geometry(spec)
    shape = (spec.d_out, x.shape[-3], kh, kw)
    weight = go.new_empty(1).expand(shape)
    return torch.ops.aten.convolution_backward(
        go, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], 1, (False, True, False)
    )[1]


def conv_rows(spec: LayerSpec, x: Tensor, go: Tensor) -> Tensor:
    """Dense rows ``J_i [B·K, p_i]`` of a Conv2d layer (:func:`fisherlab.kernels.dense_from_factors`
    of its ā and g, row ``b·K + k``) from its input ``x [B, c_in, H, W]`` and output gradients
    ``go [B, K, d_out, H_o, W_o]``: one per-example weight backward each (``torch.func.vmap`` over
    the batch of the convolution's own backward, once per vector k), without the unfolded ā.

    One vmap per k, not a vmap nested over K: the nested one's batching rule (an unbatched x
    against K batched gradients inside the vmap over B) costs 2.3× as much on the small CNN's
    second conv even at K = 1 (141 against 61 ms, B = 128, 2 threads)."""
    from torch.func import vmap

    B, K = go.shape[:2]
    per_example = vmap(lambda xb, gb: _weight_gradient(spec, xb[None], gb[None]))
    out = x.new_empty(B, K, spec.d_in_bar, spec.d_out)  # vec of [d_out, d_in'] stacks its columns
    for k in range(K):
        out[:, k, : spec.d_in] = per_example(x, go[:, k]).view(B, spec.d_out, spec.d_in).transpose(-1, -2)
    if spec.bias:
        out[:, :, spec.d_in] = go.sum((-2, -1))
    return out.view(B * K, spec.numel)


def conv_gradient_block(spec: LayerSpec, x: Tensor, go: Tensor) -> Tensor:
    """``Σ_{b,t} ā_{b,t} g_{b,t}ᵀ [d_in', d_out]`` of a Conv2d layer from ``x [B, c_in, H, W]`` and
    ``go [B, d_out, H_o, W_o]``: B times its block of ∇h (2.10) as the row-major matrix the capture
    writes, by the convolution's weight backward (no unfolded ā)."""
    out = x.new_empty(spec.d_in_bar, spec.d_out)
    out[: spec.d_in] = _weight_gradient(spec, x, go).view(spec.d_out, spec.d_in).T
    if spec.bias:
        out[spec.d_in] = go.sum((0, 2, 3))
    return out
