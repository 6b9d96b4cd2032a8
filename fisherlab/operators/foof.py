"""FOOF (Benzing 2022, "Gradient descent on neurons and its link to approximate second-order
optimization"): KFAC with the gradient factor replaced by the identity, ``[F•FOOF]_ii = A_i ⊗ I``.

Per layer, with ``A_i [d_in', d_in']`` the KFAC input factor (2.25)/(2.27) and ``X = MAT(v)``
``[d_out, d_in']``:

* ``"tikhonov"`` (default): ``A_i ⊗ I + λI = (A_i + λI) ⊗ I``, so ``solve`` is
  ``X ↦ X (A_i + λI)⁻¹`` — exactly Benzing's damped update, and the Tikhonov damping of KFAC
  with G = I;
* ``"pi"``: the π-damping of (2.30) applied to the pair ``(A_i, I)``:
  ``(A_i + π√λ I) ⊗ (1 + √λ/π) I`` with π = √(tr A_i / d_in').

A_i is KFAC's input factor (2.27): for a layer with T positions a *sum* over positions (KFAC's
split puts the 1/T in G), so on such layers this FOOF is T times curvlinops' forward-only KFAC,
whose A is the mean over positions (tests/test_curvlinops.py converts); on Linear layers (T = 1)
they coincide. FOOF is *not* scale-matched to F (``G = I`` instead of the gradients' second moment): its increment
is a forward-only preconditioned gradient, and its error against ζ measures that too. The blocks are
:class:`~fisherlab.operators.kfac.KroneckerBlock` s with ``G = I`` (eigenbasis ``Q_G = I``), so the
spectral coarse space and every KFAC tool apply unchanged.
"""

from __future__ import annotations

import torch

from ..capturing.record import Capture
from ..jacobian import Jacobian
from .algebra import BlockDiagonal
from .base import check_damping
from .kfac import DampingMode, KroneckerBlock

__all__ = ["FOOF"]


class FOOF(BlockDiagonal):
    """F•FOOF = blockdiag(A_i ⊗ I + λI) (or π-damped), ``[p, p]``.

    ``FOOF(blocks)`` takes ready :class:`KroneckerBlock` s (with ``G = I``); :meth:`from_capture`
    builds them from a capture's input factors, reusing the Jacobian's eigendecomposition of A_i.

    Attributes:
        blocks, damping, damping_mode.
    """

    def __init__(self, blocks: list[KroneckerBlock]) -> None:
        super().__init__(blocks, name="foof")
        self.damping = blocks[0].damping
        self.damping_mode = blocks[0].mode

    @classmethod
    def from_capture(
        cls,
        source: Capture | Jacobian,
        damping: float,
        damping_mode: str | DampingMode = "tikhonov",
        *,
        dtype: torch.dtype = torch.float64,
    ) -> "FOOF":
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks = []
        for lj in jac.layers:
            sA, QA, _, _ = lj.kfac_eigh  # shared with KFAC
            sA, QA = sA.to(dtype), QA.to(dtype)
            d_out = lj.spec.d_out
            eye = torch.eye(d_out, dtype=dtype)
            known = lj.__dict__.get("kfac_factors")  # A itself only when at hand (a seeded eigh needs none)
            factors = None if known is None else (known[0].to(dtype), eye)
            blocks.append(KroneckerBlock((sA, QA, torch.ones(d_out, dtype=dtype), eye), lam, damping_mode, factors=factors))
        return cls(blocks)
