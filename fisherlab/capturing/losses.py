"""Losses as negative log-likelihoods (2.11): per-example value, gradient, sampling and the
loss-Hessian square root S with S Sᵀ = ∂²_z L (MATH.md §2).

All functions take network outputs ``z [B, d_y]`` (``d_y`` = number of classes for
cross-entropy) and work per example: nothing is averaged over the batch.

**Per-position cross-entropy** (sequence models, e.g. ``tiny-gpt``): targets ``[B, T]`` of class
indices with outputs ``[B, T, V]``, flattened to ``z [B, T·V]`` (position-major): the loss of an
example is the sum over its positions, ``L = Σ_t −log softmax(z_t)_{y_t}``, so its Hessian is
``blockdiag_t(diag p_t − p_t p_tᵀ)``, S is block diagonal, and an mc draw samples every position
independently (ŷ ``[K, B, T]``). The Fisher of a sequence sums over positions and outputs, and a
mean-loss damping averages the T terms (MATH.md §2). :func:`target_positions` gives T;
:func:`sample_targets` and :func:`hessian_sqrt` take it as ``positions``.

| loss            | L(y, z)                                   | S                        | sampling ŷ ~ p(y|z)   |
|-----------------|-------------------------------------------|--------------------------|------------------------|
| cross_entropy   | −log softmax(z)_y, y an integer class     | diag(√p) − p √pᵀ         | categorical(softmax z) |
| mse             | ½‖y − z‖² (2.12a)                          | I                        | N(z, I)                |
| bce_logits      | Σ_j BCE-with-logits(z_j, y_j), y ∈ [0, 1] | diag(√(σ(1−σ)))          | Bernoulli(σ(z))        |
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Loss", "normalize_targets", "per_example_loss", "output_gradient", "sample_targets", "hessian_sqrt", "check_targets", "target_positions"]


class Loss(str, Enum):
    """Supported losses (negative log-likelihoods)."""

    CROSS_ENTROPY = "cross_entropy"
    """Categorical likelihood; targets are class indices ``[B]`` (int64), or ``[B, T]`` for one
    class per position (the loss sums over positions)."""
    MSE = "mse"
    """Gaussian likelihood with unit variance, L = ½‖y − z‖²; targets ``[B, d_y]``."""
    BCE_LOGITS = "bce_logits"
    """Independent Bernoulli outputs, summed over ``d_y``; targets ``[B, d_y]`` in [0, 1]."""

    @classmethod
    def parse(cls, loss: "str | Loss") -> "Loss":
        """The loss of ``loss``; a one-line ``ValueError`` naming the choices."""
        try:
            return cls(loss)
        except ValueError:
            raise ValueError(f"unknown loss '{loss}' (choose one of {', '.join(m.value for m in cls)})") from None


_loss = Loss.parse


def target_positions(loss: str | Loss, y: Tensor) -> int:
    """T, the positions per example of ``cross_entropy`` targets ``[B, T]`` (1 for ``[B]`` and for
    the other losses)."""
    return int(y.shape[1]) if _loss(loss) is Loss.CROSS_ENTROPY and y.dim() == 2 else 1


def _per_position(z: Tensor, y: Tensor) -> tuple[Tensor, int]:
    """Outputs ``z [*S, B, T·V]`` as ``[*S, B, T, V]`` for targets ``y [*S, B, T]`` (T = 1 for
    ``[*S, B]``), and T."""
    T = int(y.shape[-1]) if y.dim() == z.dim() else 1
    return z.reshape(*z.shape[:-1], T, z.shape[-1] // T), T


def check_targets(loss: str | Loss, z: Tensor, y: Tensor) -> None:
    """Raise a one-line ``ValueError`` when targets do not fit outputs ``z [B, d_y]``."""
    loss = _loss(loss)
    B = z.shape[0]
    if loss is Loss.CROSS_ENTROPY:
        per_position = y.dim() == 2 and y.shape[0] == B and y.shape[1] >= 1 and z.shape[1] % y.shape[1] == 0
        if (y.shape != (B,) and not per_position) or y.is_floating_point():
            raise ValueError(
                f"cross_entropy targets must be class indices of shape [{B}] or [{B}, T] with T dividing the "
                f"{z.shape[1]} outputs (integer), got {tuple(y.shape)} {y.dtype}"
            )
        V = z.shape[1] // target_positions(loss, y)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
            raise ValueError(f"cross_entropy targets must lie in [0, {V}), got [{int(y.min())}, {int(y.max())}]")
    else:
        if y.shape != z.shape:
            raise ValueError(
                f"{loss.value} targets must have the output shape {tuple(z.shape)}, got {tuple(y.shape)}"
            )


def normalize_targets(loss: str | Loss, y: Tensor) -> Tensor:
    """Class labels of any integer dtype as int64; refuse boolean labels and, for ``bce_logits``,
    targets outside [0, 1] (a negative loss otherwise), with one line."""
    loss = _loss(loss)
    if y.dtype == torch.bool:
        raise ValueError(
            f"{loss.value} targets are booleans; pass class indices as integers or probabilities as floats"
        )
    if loss is Loss.CROSS_ENTROPY:
        if y.is_complex():
            raise ValueError(f"cross_entropy targets must be class indices (integer), got {y.dtype}")
        return y.long() if not y.is_floating_point() else y
    if y.is_floating_point() and loss is Loss.BCE_LOGITS and y.numel():
        lo, hi = float(y.min()), float(y.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"bce_logits targets must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    if not y.is_floating_point():
        if loss is Loss.BCE_LOGITS and y.numel() and (int(y.min()) < 0 or int(y.max()) > 1):
            raise ValueError(f"bce_logits targets must lie in [0, 1], got [{int(y.min())}, {int(y.max())}]")
        return y.to(torch.get_default_dtype())
    return y


def per_example_loss(loss: str | Loss, z: Tensor, y: Tensor) -> Tensor:
    """``L(y_b, z_b)`` for each example: ``[B]`` (per-position targets: summed over positions)."""
    loss = _loss(loss)
    if loss is Loss.CROSS_ENTROPY:
        if y.dim() == z.dim():  # [B, T] targets, z [B, T·V]
            zt, T = _per_position(z, y)
            return F.cross_entropy(zt.reshape(-1, zt.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape).sum(-1)
        return F.cross_entropy(z, y, reduction="none")
    if loss is Loss.MSE:
        return 0.5 * (z - y).pow(2).sum(-1)
    return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none").sum(-1)


def output_gradient(loss: str | Loss, z: Tensor, y: Tensor) -> Tensor:
    """``∂_z L(y_b, z_b)`` per example: ``[B, d_y]`` (analytic, no autograd).

    ``y`` may carry extra leading sample dimensions: ``y [*S, B, ...]`` gives ``[*S, B, d_y]``.
    Per-position targets ``y [*S, B, T]``: ``p_t − onehot(y_t)`` at each position, flattened.
    """
    loss = _loss(loss)
    if loss is Loss.CROSS_ENTROPY:
        zt, _ = _per_position(z, y)
        p = torch.softmax(zt, dim=-1)
        onehot = F.one_hot(y.reshape(zt.shape[:-1]), zt.shape[-1]).to(z.dtype)
        return (p - onehot).reshape(z.shape)
    if loss is Loss.MSE:
        return z - y.to(z.dtype)
    return torch.sigmoid(z) - y.to(z.dtype)


def sample_targets(loss: str | Loss, z: Tensor, n_samples: int, generator: torch.Generator | None,
                   positions: int = 1) -> Tensor:
    """``n_samples`` draws ŷ ~ p(y | z_b) per example: ``[K, B]`` or ``[K, B, d_y]``; per-position
    cross-entropy (``positions`` = T > 1): ``[K, B, T]``, each position drawn independently.

    Sampling runs on the CPU in float64 with ``generator``, so that a seed gives the same targets
    on every device.
    """
    loss = _loss(loss)
    zc = z.detach().to("cpu", torch.float64)
    K = n_samples
    if loss is Loss.CROSS_ENTROPY:
        B, T = zc.shape[0], int(positions)
        p = torch.softmax(zc.reshape(B * T, -1), dim=-1)
        ys = torch.multinomial(p, K, replacement=True, generator=generator)  # [B·T, K]
        ys = ys.T.reshape(K, B, T) if T > 1 else ys.T
        return ys.contiguous().to(z.device)
    if loss is Loss.MSE:
        eps = torch.randn((K, *zc.shape), generator=generator, dtype=torch.float64)
        return (zc + eps).to(z.device, z.dtype)
    u = torch.rand((K, *zc.shape), generator=generator, dtype=torch.float64)
    return (u < torch.sigmoid(zc)).to(z.device, z.dtype)  # Bernoulli(σ(z)); faster than torch.bernoulli


def hessian_sqrt(loss: str | Loss, z: Tensor, positions: int = 1) -> Tensor:
    """``S_b [B, d_y, d_y]`` with ``S_b S_bᵀ = ∂²_z L(y, z_b)`` (independent of y for these losses).

    Column k of ``S_b`` is the k-th backpropagated vector of the ``exact`` mode. Per-position
    cross-entropy (``positions`` = T > 1): block diagonal, one ``[V, V]`` block per position.
    """
    loss = _loss(loss)
    B, d = z.shape
    if loss is Loss.CROSS_ENTROPY:
        T = int(positions)
        p = torch.softmax(z.reshape(B, T, d // T), dim=-1)
        sp = p.sqrt()
        S = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)  # [B, T, V, V]
        if T == 1:
            return S[:, 0]
        V = d // T
        full = S.new_zeros(B, T, V, T, V)
        t = torch.arange(T, device=z.device)
        full[:, t, :, t, :] = S.transpose(0, 1)  # the diagonal blocks
        return full.reshape(B, d, d)
    if loss is Loss.MSE:
        return torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
    s = torch.sigmoid(z)
    return torch.diag_embed((s * (1 - s)).sqrt())
