"""KFAC (2.25)–(2.31): ``[F•KFAC]_ii = Ã_i ⊗ G̃_i`` through the factor eigenbases.

Per layer, the factors ``A_i [d_in', d_in']`` and ``G_i [d_out, d_out]`` (2.25)/(2.27) are
eigendecomposed once, ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ``; products,
inverses, spectra and the spectral coarse space all reuse them. With ``X = MAT(v)``
``[d_out, d_in']`` and ``X̂ = Q_Gᵀ X Q_A``:

* ``"pi"`` (2.30): π_i = √[(tr A/dim A)/(tr G/dim G)], Ã = A + π√λ I, G̃ = G + (√λ/π) I,
  eigenvalues ``(s_G + √λ/π)(s_A + π√λ)ᵀ``;
* ``"tikhonov"``: ``A ⊗ G + λI``, eigenvalues ``s_G s_Aᵀ + λ`` — the exact damping, which
  isolates the Kronecker error from the damping heuristic.

``(A ⊗ G) vec(X) = vec(G X Aᵀ)``, so every block product is ``Q_G (D ∘ X̂) Q_Aᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..jacobian import Jacobian, factor_eigh
from .base import BlockDiagonalOperator, BlockOperator, check_damping
from .exact import as_jacobian

__all__ = ["KFAC", "DampingMode", "KroneckerBlock", "factor_eigh", "pi_damping"]


class DampingMode(str, Enum):
    """How λ enters KFAC."""

    PI = "pi"
    """Factored Tikhonov with π-correction (2.30): (A + π√λ I) ⊗ (G + √λ/π I)."""
    TIKHONOV = "tikhonov"
    """Exact Tikhonov: A ⊗ G + λI."""


def pi_damping(A: Tensor, G: Tensor) -> float:
    """π = √[(tr A / dim A) / (tr G / dim G)] (2.30); 1 when either trace vanishes."""
    ta = float(torch.trace(A)) / A.shape[0]
    tg = float(torch.trace(G)) / G.shape[0]
    if ta <= 0 or tg <= 0 or not math.isfinite(ta / tg):
        return 1.0
    return math.sqrt(ta / tg)


@dataclass
class KroneckerBlock(BlockOperator):
    """One layer's ``Ã ⊗ G̃`` (or ``A ⊗ G + λI``) in its eigenbasis.

    Attributes:
        A, G: undamped factors ``[d_in', d_in']``, ``[d_out, d_out]``.
        sA, QA, sG, QG: eigenpairs of the undamped factors (ascending).
        damping: λ; mode: :class:`DampingMode`; pi: π_i (1 for Tikhonov).
        eig: eigenvalues of the damped block as ``[d_out, d_in']`` (``eig[r, c]`` belongs to the
            eigenvector ``vec(QG[:, r] QA[:, c]ᵀ) = QA[:, c] ⊗ QG[:, r]``).
    """

    A: Tensor
    G: Tensor
    damping: float
    mode: DampingMode
    eigh: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    """Precomputed ``(s_A, Q_A, s_G, Q_G)`` of the undamped factors (shared between modes)."""

    def __post_init__(self) -> None:
        self.d_in, self.d_out = self.A.shape[0], self.G.shape[0]
        self.p = self.d_in * self.d_out
        if self.eigh is None:
            self.eigh = factor_eigh(self.A, self.G)
        self.sA, self.QA, self.sG, self.QG = self.eigh
        # PSD in theory: clip round-off negatives.
        self.sA = self.sA.clamp_min(0)
        self.sG = self.sG.clamp_min(0)
        sq = math.sqrt(self.damping)
        if self.mode is DampingMode.PI:
            self.pi = pi_damping(self.A, self.G)
            self.sA_damped = self.sA + self.pi * sq
            self.sG_damped = self.sG + sq / self.pi
            self.eig = torch.outer(self.sG_damped, self.sA_damped)
        else:
            self.pi = 1.0
            self.sA_damped, self.sG_damped = self.sA, self.sG
            self.eig = torch.outer(self.sG, self.sA) + self.damping

    @property
    def A_damped(self) -> Tensor:
        """Ã = A + π√λ I (``pi``); A itself for ``tikhonov``."""
        return self.A + (self.pi * math.sqrt(self.damping) if self.mode is DampingMode.PI else 0.0) * torch.eye(
            self.d_in, dtype=self.A.dtype
        )

    @property
    def G_damped(self) -> Tensor:
        """G̃ = G + (√λ/π) I (``pi``); G itself for ``tikhonov``."""
        return self.G + (math.sqrt(self.damping) / self.pi if self.mode is DampingMode.PI else 0.0) * torch.eye(
            self.d_out, dtype=self.G.dtype
        )

    # ---- eigenbasis transforms of [p_i, c] blocks -----------------------------------------
    def _to_eigen(self, V: Tensor) -> Tensor:
        """``V [p_i, c] -> X̂ [c, d_out, d_in']`` with ``X̂ = Q_Gᵀ MAT(v) Q_A``."""
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # MAT per column: [c, d_out, d_in']
        return self.QG.T @ X @ self.QA

    def _from_eigen(self, Xh: Tensor) -> Tensor:
        X = self.QG @ Xh @ self.QA.T  # [c, d_out, d_in']
        return X.mT.reshape(X.shape[0], -1).T

    def matmat(self, V: Tensor) -> Tensor:
        return self._from_eigen(self._to_eigen(V) * self.eig)

    def solve(self, W: Tensor) -> Tensor:
        return self._from_eigen(self._to_eigen(W) / self.eig)

    def power(self, V: Tensor, k: float) -> Tensor:
        """``[F•KFAC]_ii^k V`` (k may be negative or fractional)."""
        return self._from_eigen(self._to_eigen(V) * self.eig.pow(k))

    def eigenvectors(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Kronecker eigenvectors ``QA[:, c] ⊗ QG[:, r]`` as ``[p_i, len(rows)]``."""
        return (self.QA[:, cols].T[:, :, None] * self.QG[:, rows].T[:, None, :]).reshape(len(rows), -1).T

    def smallest(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` smallest eigenpairs of the damped block: values ``[k]``, vectors ``[p_i, k]``."""
        k = min(k, self.p)
        vals, flat = torch.topk(self.eig.reshape(-1), k, largest=False)
        rows, cols = flat // self.d_in, flat % self.d_in
        return vals, self.eigenvectors(rows, cols)


class KFAC(BlockDiagonalOperator):
    """F•KFAC = blockdiag(Ã_i ⊗ G̃_i) (2.28)–(2.31), or blockdiag(A_i ⊗ G_i + λI).

    Args:
        source: a :class:`Capture` or :class:`Jacobian` (the factors come from ā and g, or the
            stored ``A_i``/``G_i`` of dense-stored layers).
        damping: λ > 0.
        damping_mode: ``"pi"`` (2.30) or ``"tikhonov"``.
        factors: optional ``[(A_i, G_i)]`` to use instead of the capture's (e.g. running averages
            kept by an optimizer); shapes must match the layers.

    Attributes:
        factors: ``[(A_i, G_i)]``; pi: ``[π_i]``; blocks: the :class:`KroneckerBlock` per layer,
        with their eigendecompositions.
    """

    def __init__(
        self,
        source: Capture | Jacobian,
        damping: float,
        damping_mode: str | DampingMode = "pi",
        *,
        factors: list[tuple[Tensor, Tensor]] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.damping = check_damping(damping)
        try:
            self.damping_mode = DampingMode(damping_mode)
        except ValueError:
            raise ValueError(f"damping_mode must be 'pi' or 'tikhonov', got {damping_mode!r}") from None
        self.jac: Jacobian = as_jacobian(source, dtype)
        shared = factors is None
        if factors is None:
            factors = [lj.kfac_factors for lj in self.jac.layers]
        elif len(factors) != len(self.jac.layers):
            raise ValueError(f"KFAC: {len(factors)} factor pairs given for {len(self.jac.layers)} layers")
        for (A, G), lj in zip(factors, self.jac.layers):
            if A.shape != (lj.spec.d_in_bar,) * 2 or G.shape != (lj.spec.d_out,) * 2:
                raise ValueError(
                    f"KFAC: layer '{lj.spec.name}' needs A [{lj.spec.d_in_bar}, {lj.spec.d_in_bar}] and "
                    f"G [{lj.spec.d_out}, {lj.spec.d_out}], got {tuple(A.shape)} and {tuple(G.shape)}"
                )
        # the capture's factors are decomposed once per Jacobian and shared by both damping modes
        blocks = [
            KroneckerBlock(
                A.to(dtype), G.to(dtype), self.damping, self.damping_mode,
                eigh=lj.kfac_eigh if shared and A.dtype == dtype else None,
            )
            for (A, G), lj in zip(factors, self.jac.layers)
        ]
        super().__init__(blocks, self.jac.layout.sizes, dtype)
        self.name = "kfac" if self.damping_mode is DampingMode.PI else "kfac-tikhonov"

    @property
    def factors(self) -> list[tuple[Tensor, Tensor]]:
        return [(b.A, b.G) for b in self.blocks]  # type: ignore[attr-defined]

    @property
    def pi(self) -> list[float]:
        return [b.pi for b in self.blocks]  # type: ignore[attr-defined]

    def eigenvalues(self) -> Tensor:
        """All p eigenvalues of F•KFAC (products of the damped factor eigenvalues), unsorted."""
        return torch.cat([b.eig.reshape(-1) for b in self.blocks])  # type: ignore[attr-defined]

    def power(self, V: Tensor, k: float) -> Tensor:
        """``F•KFAC^k V`` for ``V [p, c]`` (e.g. k = −½ for the preconditioned operator)."""
        return torch.cat([b.power(v, k) for b, v in zip(self.blocks, self._split(V))], dim=0)  # type: ignore[attr-defined]
