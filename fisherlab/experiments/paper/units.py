"""The paper's units: losses averaged over the d_y output terms (its code's torch mean reductions).

fisherlab's losses sum over the outputs (``bce_logits``, ``mse``); the paper's code averages
them. With L_mean = L/d_y every backpropagated output gradient is g/d_y, so the KFAC factors are
A and G/d_y², the per-example Jacobian rows and ∇h are divided by d_y and F_mean = F/d_y².
:func:`mean_loss_capture` rescales a capture accordingly, so every operator — the released
code's factor shifts √λ and λ, its λ·p_i coarse diagonal included, which do not scale with the
loss — sees the numbers the paper's code saw, with λ stated as the paper states it (absolute in
these units). Cross-entropy is one term per example: d_y = 1, nothing changes.
"""

from __future__ import annotations

from ...capturing.record import Capture

__all__ = ["mean_loss_capture"]


def mean_loss_capture(cap: Capture, d: float) -> Capture:
    """The capture of the loss averaged over ``d`` output terms, :meth:`Capture.scaled` by 1/d:
    g, dense rows and ∇h ÷ d, G ÷ d², the loss value ÷ d (ā and A unchanged). ``d = 1`` returns
    ``cap`` itself. The optimizers take the same as ``loss_scale=1/d``."""
    if not d > 0:
        raise ValueError(f"mean_loss_capture: d must be > 0, got {d}")
    return cap.scaled(1.0 / d)
