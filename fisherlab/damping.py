"""Damping in the Fisher's own scale: λ given absolutely or relative to the spectrum of F.

A measurement means something only in a stated regime. The mini-batch Fisher F = UUᵀ has rank
≤ N ≪ p: every direction outside the span of the per-example Jacobian rows sees F• = λI, so at
λ ≪ λ(F) the part of ∇h outside that span, divided by λ, dominates ζ, and every practical method
looks like the zero step (MATH.md §6; issue "Errors that mean something"). A damping is therefore
stated in one of four scales (:class:`DampingScale`) and resolved to the absolute λ of
F• = F + λI for a given capture:

| scale | λ (absolute) | meaning |
|---|---|---|
| ``absolute`` | α | as before |
| ``max`` | α · λ_max(F) | relative to the largest eigenvalue (from the N × N Gram K: λ_max(F) = λ_max(K)) |
| ``mean`` | α · tr(F)/rank(F) | relative to the mean nonzero eigenvalue |
| ``mean-loss`` | α · d_y² (``mse``, ``bce_logits``), α (``cross_entropy``) | α as stated for the loss averaged over its d_y output terms (the paper's code and torch's default reductions); fisherlab sums them |

Units of ``mean-loss``: for L_mean = L/d_y, the Fisher (an outer product of loss gradients)
scales as F_mean = F/d_y² and ∇h_mean = ∇h/d_y, so ζ_mean(α) = d_y · ζ(α d_y²): every relative
error and ratio is the same in both units (tests/test_damping.py proves it on a dense tiny net).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from ._validate import DAMPING_MAX, DAMPING_MIN
from ._validate import damping as check_absolute
from .errors import DampingError

if TYPE_CHECKING:  # pragma: no cover
    from .capturing.record import Capture
    from .jacobian import Jacobian

__all__ = ["Damping", "DampingScale", "FisherScale", "fisher_scale", "resolve_damping", "RANK_RTOL", "DAMPING_MIN", "DAMPING_MAX"]

RANK_RTOL = 1e-10
"""Eigenvalues of K below ``RANK_RTOL · λ_max`` count as zero in rank(F) (float64 Gram round-off
is ~1e-16 · λ_max · N; 1e-10 leaves a wide margin while keeping genuinely small modes)."""


class DampingScale(str, Enum):
    """The scale a damping value is stated in."""

    ABSOLUTE = "absolute"
    """λ itself."""
    MAX = "max"
    """α · λ_max(F)."""
    MEAN = "mean"
    """α · tr(F)/rank(F), the mean nonzero eigenvalue."""
    MEAN_LOSS = "mean-loss"
    """α in the units of the loss averaged over its d_y output terms: λ = α·d_y² (mse, bce_logits), α (cross_entropy)."""

    @classmethod
    def parse(cls, value: "str | DampingScale") -> "DampingScale":
        try:
            return cls(value)
        except ValueError:
            raise DampingError(f"damping scale must be one of {', '.join(s.value for s in cls)}, got {value!r}") from None


@dataclass(frozen=True)
class FisherScale:
    """The scales of one capture's F: ``lambda_max``, ``mean`` (tr F / rank), ``rank``,
    ``trace``, and the loss's ``output_terms`` d_y and ``loss`` name (``None`` when unknown)."""

    lambda_max: float
    mean: float
    rank: int
    trace: float
    output_terms: int | None = None
    loss: str | None = None

    def relative(self, lam: float) -> dict[str, float]:
        """λ in every scale: ``{"max": λ/λ_max, "mean": λ/mean, "mean-loss": ...}``."""
        out = {"max": lam / self.lambda_max if self.lambda_max > 0 else math.inf,
               "mean": lam / self.mean if self.mean > 0 else math.inf}
        factor = _mean_loss_factor(self)
        if factor is not None:
            out["mean-loss"] = lam / factor
        return out


def fisher_scale(jac: "Jacobian") -> FisherScale:
    """λ_max(F), tr(F)/rank(F) and rank(F) from the N × N Gram K = UᵀU (its nonzero spectrum is
    F's); cached on the Jacobian's Gram, so the Woodbury solve reuses it."""
    K = jac.gram
    mu = jac.gram_eigh[0]
    top = float(mu[-1]) if mu.numel() else 0.0
    rank = int((mu > RANK_RTOL * top).sum()) if top > 0 else 0
    trace = float(torch.diagonal(K).sum())
    return FisherScale(top, trace / rank if rank else 0.0, rank, trace, getattr(jac, "output_terms", None), getattr(jac, "loss", None))


def _mean_loss_factor(scale: FisherScale) -> float | None:
    if scale.loss is None:
        return None
    if scale.loss == "cross_entropy":  # torch's mean reduction averages over the batch only
        return 1.0
    if scale.output_terms is None:
        return None
    return float(scale.output_terms) ** 2


@dataclass(frozen=True)
class Damping:
    """A damping value and the scale it is stated in (:class:`DampingScale`).

    ``Damping(1e-4, scale="max")`` is λ = 1e-4·λ_max(F) for whichever capture it is resolved on;
    ``Damping(61.5)`` (absolute) is λ = 61.5. Operators built with a ``Damping`` expose the
    resolved absolute λ as ``.damping``.
    """

    value: float
    scale: DampingScale | str = DampingScale.ABSOLUTE

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", DampingScale.parse(self.scale))
        try:
            v = float(self.value)
        except (TypeError, ValueError):
            raise DampingError(f"damping must be a number > 0, got {self.value!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise DampingError(f"damping must be finite and > 0, got {self.value!r} ({self.scale.value} scale)")
        object.__setattr__(self, "value", v)

    def resolve(self, source: "Capture | Jacobian") -> float:
        """The absolute λ for ``source`` (a Capture or a Jacobian)."""
        if self.scale is DampingScale.ABSOLUTE:
            return self.value
        from .jacobian import Jacobian  # jacobian.py imports nothing from here: no cycle

        scale = fisher_scale(Jacobian.coerce(source))
        if self.scale is DampingScale.MAX:
            base = scale.lambda_max
        elif self.scale is DampingScale.MEAN:
            base = scale.mean
        else:
            factor = _mean_loss_factor(scale)
            if factor is None:
                raise DampingError("damping scale 'mean-loss' needs the capture's loss and output size (give a Capture)")
            base = factor
        if not base > 0:
            raise DampingError(f"damping scale '{self.scale.value}': the Fisher of this capture is zero, so λ = α·0 is not > 0")
        return self.value * base

    def __str__(self) -> str:
        if self.scale is DampingScale.ABSOLUTE:
            return f"λ = {self.value:g}"
        unit = {"max": "λ_max(F)", "mean": "mean eig(F)", "mean-loss": "(mean-loss units)"}[self.scale.value]
        return f"λ = {self.value:g} × {unit}" if self.scale is not DampingScale.MEAN_LOSS else f"λ = {self.value:g} {unit}"


def resolve_damping(damping: "float | Damping", source: "Capture | Jacobian | None" = None) -> float:
    """The absolute λ of a number or a :class:`Damping` (resolved on ``source``)."""
    if isinstance(damping, Damping):
        if damping.scale is not DampingScale.ABSOLUTE and source is None:
            raise DampingError(f"a damping in the '{damping.scale.value}' scale needs the capture to resolve it")
        return resolve_damping(damping.resolve(source) if source is not None else damping.value)
    return check_absolute(damping)
