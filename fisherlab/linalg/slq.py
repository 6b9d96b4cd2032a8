"""Stochastic Lanczos quadrature (SLQ): a spectral measure of a symmetric operator from probes.

For each Rademacher probe z (``[p]``, seeded) and ``q = z/√p``, m Lanczos steps with full
reorthogonalization give ``T_m = S diag(θ) Sᵀ``; the Gauss rule ``Σ_j S_{0j}² f(θ_j)``
approximates ``qᵀf(A)q`` (exactly for polynomials of degree ≤ 2m − 1), whose expectation is
``tr f(A)/p``. :func:`slq_quadrature` averages these rules over the probes (weights sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import warnings

import numpy as np
import torch
from torch import Tensor

from ..errors import FisherlabError
from .lanczos import gauss_quadrature, lanczos_tridiagonal

__all__ = ["SLQ_MEMORY_BYTES", "QuadratureRule", "rademacher_probes", "slq_quadrature"]

SLQ_MEMORY_BYTES = 2 * 2**30
MIN_STEPS = 8
"""Fewest Lanczos steps per probe SLQ runs when the budget shrinks its bases (fewer: refused)."""
"""Memory allowed for the Lanczos bases of SLQ (``n_steps · p · probes`` float64 numbers at once)."""


def rademacher_probes(p: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[p, n]`` independent Rademacher (±1) vectors from a seeded generator."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (p, n), generator=g).to(dtype) * 2 - 1)


@dataclass
class QuadratureRule:
    """A discrete measure ``Σ_j w_j δ(x − θ_j)``: ``nodes [n]``, ``weights [n]`` (summing to 1 for
    SLQ), and the parameters that produced it (``info``: n_probes, n_steps, seed)."""

    nodes: np.ndarray
    weights: np.ndarray
    info: dict = field(default_factory=dict)


def slq_quadrature(
    matmat: Callable[[Tensor], Tensor],
    p: int,
    *,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> QuadratureRule:
    """The SLQ rule of a symmetric ``A [p, p]`` given by its block product (see the module notes).

    Args:
        matmat: ``A V`` for ``V [p, c]`` in ``dtype`` (A symmetric).
        p: the dimension.
        n_probes: number of probes.
        n_steps: m, Lanczos steps per probe (capped at p).
        seed: seeds the probes (:func:`rademacher_probes`).
        dtype: the probes' dtype (the operator's).
        memory_bytes: the Lanczos bases ``[c, m, p]`` of c probes run together stay under this.

    Returns:
        A :class:`QuadratureRule`: Ritz values and Gauss weights / n_probes, probe after probe.
    """
    if n_probes < 1 or n_steps < 1:
        raise ValueError(f"slq: n_probes and n_steps must be ≥ 1, got {n_probes}, {n_steps}")
    m = min(n_steps, p)
    per_probe = m * p * 8
    if per_probe > memory_bytes:  # sized to the budget: fewer steps, before any work
        fit = int(memory_bytes // (p * 8))
        if fit < min(MIN_STEPS, m):
            raise FisherlabError(
                f"slq: one Lanczos basis needs {per_probe / 2**30:.2f} GiB ({m} steps × p = {p:,}) and "
                f"{min(MIN_STEPS, m)} steps need {min(MIN_STEPS, m) * p * 8 / 2**30:.2f} GiB; raise the memory budget "
                f"(memory_bytes / --memory, now {memory_bytes / 2**30:.2f} GiB)"
            )
        warnings.warn(f"slq: {m} Lanczos steps × p = {p:,} exceed the memory budget "
                      f"({memory_bytes / 2**30:.2f} GiB): running {fit} steps per probe", RuntimeWarning, stacklevel=2)
        m, per_probe = fit, fit * p * 8
    chunk = max(1, min(n_probes, memory_bytes // per_probe))
    Z = rademacher_probes(p, n_probes, seed, dtype)
    nodes, weights = [], []
    for s in range(0, n_probes, chunk):
        for a, b in lanczos_tridiagonal(matmat, Z[:, s : s + chunk], m):
            th, tau = gauss_quadrature(a, b)
            nodes.append(th)
            weights.append(tau / n_probes)
    return QuadratureRule(np.concatenate(nodes), np.concatenate(weights), {"n_probes": n_probes, "n_steps": m, "seed": seed})
