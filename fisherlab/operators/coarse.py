"""Coarse spaces ``R_0ᵀ = blockdiag(V_1, …, V_ℓ)`` (3.21), one object per construction (§3.3).

A coarse space turns the one-level pieces (the KFAC blocks, the exact F• matvec, the
right-hand side and its KFAC residual) into per-layer blocks ``V_i [p_i, m_i]``.
:func:`orthonormalize` then replaces each block by an orthonormal basis of its span (thin QR
with column pivoting, columns under a relative tolerance dropped): the span — hence the
correction — is unchanged, F_coarse stays well conditioned, and the effective m is reported.

| name                 | legend      | V_i                                                                |
|----------------------|-------------|--------------------------------------------------------------------|
| ``nicolaides``       | NICO        | 1 (3.24)                                                           |
| ``spectral``         | SPECTRAL    | the k smallest Kronecker eigenvectors of [F•KFAC]_ii (3.28), k=1   |
| ``krylov-nicolaides``| KRY-NICO    | [v, B_i⁻¹v, …, B_i⁻⁽ᵐ⁻¹⁾v], v = 1 (3.29), m = 2                    |
| ``residuals``        | RESIDU      | B_i⁻¹ r[i] (3.32), r = ∇h − F•ζ_KFAC (3.13)                        |
| ``krylov-residuals`` | KRY-RESIDU  | the Krylov block (3.29) from v = B_i⁻¹ r[i], m = 2                 |
| ``taylor``           | TAYLOR      | [w_1[i], …, w_q[i]], w_1 = F•KFAC⁻¹r, w_{j+1} = F•KFAC⁻¹F•w_j (3.38) |

(B_i = [F•KFAC]_ii.) ``taylor`` with q = 1 is ``residuals``; Krylov with m = 1 is its base space.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

__all__ = [
    "CoarseContext",
    "CoarseSpace",
    "Nicolaides",
    "Spectral",
    "KrylovNicolaides",
    "Residuals",
    "KrylovResiduals",
    "Taylor",
    "UserSpace",
    "COARSE_SPACES",
    "LEGEND",
    "make_coarse_space",
    "orthonormalize",
]


@dataclass
class CoarseContext:
    """What a coarse space may use.

    Attributes:
        kfac: the one-level operator (a :class:`fisherlab.operators.KFAC`), with ``blocks``.
        fisher: the exact F• (``_matmat`` on ``[p, c]``).
        rhs: the right-hand side ∇h ``[p]``.
    """

    kfac: object
    fisher: object
    rhs: Tensor

    @cached_property
    def zeta_kfac(self) -> Tensor:
        """ζ_KFAC = F•KFAC⁻¹∇h (3.3), ``[p, 1]``."""
        return self.kfac._solve(self.rhs.reshape(-1, 1))  # type: ignore[attr-defined]

    @cached_property
    def residual(self) -> Tensor:
        """r = ∇h − F•ζ_KFAC (3.13), ``[p, 1]``."""
        return self.rhs.reshape(-1, 1) - self.fisher._matmat(self.zeta_kfac)  # type: ignore[attr-defined]

    def split(self, v: Tensor) -> list[Tensor]:
        return list(torch.split(v, self.kfac.sizes, dim=0))  # type: ignore[attr-defined]


class CoarseSpace:
    """Produces the raw blocks ``V_i [p_i, m_i]`` (before orthonormalization)."""

    name: str = "coarse"
    legend: str = "COARSE"

    def build(self, ctx: CoarseContext) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _krylov(block, v: Tensor, m: int) -> Tensor:
    """``[v, B⁻¹v, …, B⁻⁽ᵐ⁻¹⁾v]`` (3.29), each iterate normalised (the span is unchanged)."""
    cols = [v]
    for _ in range(m - 1):
        w = block.solve(cols[-1])
        n = w.norm()
        cols.append(w / n if n > 0 else w)
    return torch.cat(cols, dim=1)


class Nicolaides(CoarseSpace):
    """V_i = 1 ∈ R^{p_i} (3.24)."""

    name, legend = "nicolaides", "NICO"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [torch.ones(b.p, 1, dtype=ctx.rhs.dtype) for b in ctx.kfac.blocks]  # type: ignore[attr-defined]


@dataclass
class Spectral(CoarseSpace):
    """The k eigenvectors of the smallest eigenvalues of [F•KFAC]_ii, v_min(Ã) ⊗ v_min(G̃) for k = 1 (3.28)."""

    k: int = 1
    name = "spectral"
    legend = "SPECTRAL"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [b.smallest(self.k)[1] for b in ctx.kfac.blocks]  # type: ignore[attr-defined]


@dataclass
class KrylovNicolaides(CoarseSpace):
    """[v, B_i⁻¹v, …, B_i⁻⁽ᵐ⁻¹⁾v] with v = 1 (3.29)."""

    m: int = 2
    name = "krylov-nicolaides"
    legend = "KRY-NICO"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [_krylov(b, torch.ones(b.p, 1, dtype=ctx.rhs.dtype), self.m) for b in ctx.kfac.blocks]  # type: ignore[attr-defined]


class Residuals(CoarseSpace):
    """V_i = [F•KFAC]_ii⁻¹ r[i] (3.32): F•KFAC⁻¹r lies in the span."""

    name, legend = "residuals", "RESIDU"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [b.solve(r) for b, r in zip(ctx.kfac.blocks, ctx.split(ctx.residual))]  # type: ignore[attr-defined]


@dataclass
class KrylovResiduals(CoarseSpace):
    """The Krylov block (3.29) started from v = [F•KFAC]_ii⁻¹ r[i]."""

    m: int = 2
    name = "krylov-residuals"
    legend = "KRY-RESIDU"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [_krylov(b, b.solve(r), self.m) for b, r in zip(ctx.kfac.blocks, ctx.split(ctx.residual))]  # type: ignore[attr-defined]


@dataclass
class Taylor(CoarseSpace):
    """[w_1[i], …, w_q[i]], w_1 = F•KFAC⁻¹r, w_{j+1} = F•KFAC⁻¹F•w_j (3.37)–(3.38)."""

    q: int = 2
    name = "taylor"
    legend = "TAYLOR"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        ws = [ctx.kfac._solve(ctx.residual)]  # type: ignore[attr-defined]
        for _ in range(self.q - 1):
            w = ctx.kfac._solve(ctx.fisher._matmat(ws[-1]))  # type: ignore[attr-defined]
            n = w.norm()
            ws.append(w / n if n > 0 else w)
        W = torch.cat(ws, dim=1)
        return ctx.split(W)


class UserSpace(CoarseSpace):
    """User-supplied blocks ``V_i [p_i, m_i]`` (or ``[p_i]``)."""

    name, legend = "user", "USER"

    def __init__(self, blocks: Sequence[Tensor]) -> None:
        self.blocks = [b.reshape(b.shape[0], -1) for b in blocks]

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        sizes = ctx.kfac.sizes  # type: ignore[attr-defined]
        if len(self.blocks) != len(sizes):
            raise ValueError(f"user coarse space: expected {len(sizes)} blocks V_i (one per layer), got {len(self.blocks)}")
        for i, (b, p) in enumerate(zip(self.blocks, sizes)):
            if b.shape[0] != p:
                raise ValueError(f"user coarse space: block {i} has {b.shape[0]} rows, layer {i} has p_i = {p}")
        return [b.to(ctx.rhs.dtype) for b in self.blocks]


COARSE_SPACES: dict[str, Callable[..., CoarseSpace]] = {
    "nicolaides": lambda **kw: Nicolaides(),
    "spectral": lambda k=1, **kw: Spectral(k),
    "krylov-nicolaides": lambda m=2, **kw: KrylovNicolaides(m),
    "residuals": lambda **kw: Residuals(),
    "krylov-residuals": lambda m=2, **kw: KrylovResiduals(m),
    "taylor": lambda q=2, **kw: Taylor(q),
}

LEGEND = {
    "nicolaides": "NICO",
    "spectral": "SPECTRAL",
    "krylov-nicolaides": "KRY-NICO",
    "residuals": "RESIDU",
    "krylov-residuals": "KRY-RESIDU",
    "taylor": "TAYLOR",
}


def make_coarse_space(coarse: str | CoarseSpace | Sequence[Tensor], *, k: int = 1, m: int = 2, q: int = 2) -> CoarseSpace:
    """A :class:`CoarseSpace` from a name, an instance, or a list of user blocks ``V_i``."""
    if isinstance(coarse, CoarseSpace):
        return coarse
    if isinstance(coarse, str):
        if coarse not in COARSE_SPACES:
            raise ValueError(f"unknown coarse space '{coarse}' (choose one of {', '.join(COARSE_SPACES)} or pass blocks V_i)")
        for nm, val in (("k", k), ("m", m), ("q", q)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"coarse space parameter {nm} must be a positive integer, got {val!r}")
        return COARSE_SPACES[coarse](k=k, m=m, q=q)
    return UserSpace(list(coarse))


def orthonormalize(V: Tensor, rtol: float = 1e-10) -> Tensor:
    """Orthonormal basis ``[p_i, r]`` of span(V) by QR with column pivoting; columns whose
    pivot falls under ``rtol`` × the largest are dropped (r is the effective dimension)."""
    if V.shape[1] == 0:
        return V
    A = V.detach().double().cpu().numpy()
    if not np.isfinite(A).all():
        raise ValueError("coarse space block contains NaN/Inf")
    Q, R, _ = scipy.linalg.qr(A, mode="economic", pivoting=True)
    d = np.abs(np.diag(R))
    if d.size == 0 or d[0] == 0:
        return V.new_zeros(V.shape[0], 0)
    r = int((d > rtol * d[0]).sum())
    return torch.from_numpy(np.ascontiguousarray(Q[:, :r])).to(V.dtype)
