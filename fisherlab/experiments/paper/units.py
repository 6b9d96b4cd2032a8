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

import dataclasses
from typing import Any

from ...capturing.record import Capture

__all__ = ["mean_loss_capture", "scale_capture_of"]


def mean_loss_capture(cap: Capture, d: float) -> Capture:
    """The capture of the loss averaged over ``d`` output terms: g, dense rows and ∇h ÷ d, G ÷ d²,
    the loss value ÷ d (ā and A unchanged). ``d = 1`` returns ``cap`` itself."""
    if d == 1:
        return cap
    if not d > 0:
        raise ValueError(f"mean_loss_capture: d must be > 0, got {d}")
    layers = [
        dataclasses.replace(
            lc,
            g=None if lc.g is None else lc.g / d,
            dense=None if lc.dense is None else lc.dense / d,
            G=None if lc.G is None else lc.G / d**2,
        )
        for lc in cap.layers
    ]
    return dataclasses.replace(cap, layers=layers, grad=cap.grad / d, loss_value=cap.loss_value / d)


def scale_capture_of(optimizer: Any, d: float) -> Any:
    """Make a fisherlab optimizer step in the paper's units: each of its captures passes through
    :func:`mean_loss_capture` (λ, lr and ω then mean what the paper's code means by them). The
    parameters outside the Fisher (BatchNorm) keep fisherlab's loss; the paper's settings
    have none where d ≠ 1. Returns ``optimizer``."""
    if d == 1:
        return optimizer
    inner = optimizer._capture

    def _capture(x, y):  # the optimizers' one capture hook (fisherlab.optim.FisherOptimizer._capture)
        return mean_loss_capture(inner(x, y), d)

    optimizer._capture = _capture
    return optimizer
