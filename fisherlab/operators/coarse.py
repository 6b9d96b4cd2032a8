"""Coarse spaces ``R_0ᵀ = blockdiag(V_1, …, V_ℓ)`` (3.21), one object per construction (§3.3).

A coarse space turns the one-level pieces (the KFAC blocks, the exact F• matvec, the
right-hand side and its KFAC residual) into per-layer blocks ``V_i [p_i, m_i]``.
:func:`orthonormalize` then replaces each block by an orthonormal basis of its span (thin QR
with column pivoting, columns under a relative tolerance dropped): the span — hence the
correction — is unchanged, F_coarse stays well conditioned, and the effective m is reported.

| name                 | V_i                                                                |
|----------------------|--------------------------------------------------------------------|
| ``nicolaides``       | 1 (3.24)                                                           |
| ``spectral``         | the k smallest Kronecker eigenvectors of [F•KFAC]_ii (3.28), k=1   |
| ``krylov-nicolaides``| [v, B_i⁻¹v, …, B_i⁻⁽ᵐ⁻¹⁾v], v = 1 (3.29), m = 2                    |
| ``residuals``        | B_i⁻¹ r[i] (3.32), r = ∇h − F•ζ_KFAC (3.13)                        |
| ``krylov-residuals`` | the Krylov block (3.29) from v = B_i⁻¹ r[i], m = 2                 |
| ``taylor``           | [w_1[i], …, w_q[i]], w_1 = F•KFAC⁻¹r, w_{j+1} = F•KFAC⁻¹F•w_j (3.38) |

(B_i = [F•KFAC]_ii, the diagonal blocks of the one-level operator — any block-diagonal operator.)
``taylor`` with q = 1 is ``residuals``; Krylov with m = 1 is its base space. Legends, colours
and markers belong to the method registry (:mod:`fisherlab.methods`); a subclass with a
``name`` is found by :func:`make_coarse_space` (:data:`COARSE_SPACES` is derived from the classes).

:class:`CoarseBasis` is R_0 itself, an ``m × p`` operator (``.T`` is R_0ᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .algebra import BlockDiagonal
from .base import FisherOperator

__all__ = [
    "CoarseBasis",
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
    "make_coarse_space",
    "orthonormalize",
]


@dataclass
class CoarseContext:
    """What a coarse space may use.

    Attributes:
        base: the one-level operator, block-diagonal over the layers (``blocks``, ``split``).
        fisher: the exact F•.
        rhs: the right-hand side ∇h ``[p]``.
    """

    base: BlockDiagonal
    fisher: FisherOperator
    rhs: Tensor

    @property
    def kfac(self) -> BlockDiagonal:
        """The one-level operator (the name the paper's spaces are written with)."""
        return self.base

    @cached_property
    def zeta_kfac(self) -> Tensor:
        """ζ_KFAC = F•KFAC⁻¹∇h (3.3), ``[p, 1]``."""
        return self.base.apply_inverse(self.rhs.reshape(-1, 1))

    @cached_property
    def residual(self) -> Tensor:
        """r = ∇h − F•ζ_KFAC (3.13), ``[p, 1]``."""
        return self.rhs.reshape(-1, 1) - self.fisher.apply(self.zeta_kfac)

    @cached_property
    def preconditioned_residual(self) -> Tensor:
        """F•KFAC⁻¹r ``[p, 1]``: the start of the residual spaces (3.32) and of Taylor's (3.38)
        (the base is block-diagonal, so its blocks are the per-layer [F•KFAC]_ii⁻¹ r[i])."""
        return self.base.apply_inverse(self.residual)

    def split(self, v: Tensor) -> list[Tensor]:
        return self.base.split(v)


COARSE_SPACES: dict[str, type["CoarseSpace"]] = {}
"""Coarse-space name → class, filled by every :class:`CoarseSpace` subclass that sets ``name``."""


class CoarseSpace:
    """Produces the raw blocks ``V_i [p_i, m_i]`` (before orthonormalization).

    A subclass sets ``name`` (its key, registered in :data:`COARSE_SPACES`) and, when it has a
    size, a field named ``k``, ``m`` or ``q`` (:func:`make_coarse_space` passes it).
    """

    name: str = "coarse"

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__ and cls.__dict__["name"] not in ("user",):
            COARSE_SPACES[cls.__dict__["name"]] = cls

    def build(self, ctx: CoarseContext) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _krylov(block, v: Tensor, m: int) -> Tensor:
    """``[v, B⁻¹v, …, B⁻⁽ᵐ⁻¹⁾v]`` (3.29), each iterate normalised (the span is unchanged)."""
    cols = [v]
    for _ in range(m - 1):
        w = block.apply_inverse(cols[-1])
        n = w.norm()
        cols.append(w / n if n > 0 else w)
    return torch.cat(cols, dim=1)


class Nicolaides(CoarseSpace):
    """V_i = 1 ∈ R^{p_i} (3.24)."""

    name = "nicolaides"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [torch.ones(b.p, 1, dtype=ctx.rhs.dtype, device=ctx.rhs.device) for b in ctx.base.blocks]


SPECTRAL_DEGENERACY_RTOL = 1e-8
"""Damped Kronecker eigenvalues within this relative distance of the k-th smallest form one
cluster (the factor eigenvalues carry ~1e-16 relative round-off; genuinely distinct eigenvalues
of these SPD blocks are far further apart)."""

SPECTRAL_COMPONENT_RTOL = 1e-10
"""A component (of the residual, of 1) in a large degenerate eigenspace smaller than this relative
to the vector is round-off, not a direction: it is dropped rather than normalised into noise."""

SPECTRAL_MAX_EIGENSPACE = 8
"""A degenerate cluster up to this size is taken whole; a larger one contributes the component of
the layer's residual in it (then of the constant vector, when more columns are asked for)."""


@dataclass
class Spectral(CoarseSpace):
    """The k eigenvectors of the smallest eigenvalues of [F•KFAC]_ii, v_min(Ã) ⊗ v_min(G̃) for k = 1 (3.28).

    When the k-th smallest eigenvalue is degenerate (multiplicity > the columns still needed, e.g.
    G = I for a linear output layer with ``mse``, or a rank-deficient A when B < d_in'), "the k
    smallest eigenvectors" is not a subspace but an arbitrary pick of the eigensolver. The choice
    is then made deterministic and basis-free: the whole eigenspace when it has at most
    :data:`SPECTRAL_MAX_EIGENSPACE` dimensions, otherwise the orthogonal projection of the layer's
    residual r[i] (3.13) on it — the member of the eigenspace most aligned with r[i] — followed,
    for further columns, by that of the constant vector (a component below
    :data:`SPECTRAL_COMPONENT_RTOL` of its vector is round-off and dropped). ``multiplicities`` (per layer) and
    ``note`` record what happened.
    """

    k: int = 1
    name = "spectral"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        for b in ctx.base.blocks:
            if not hasattr(b, "eig"):
                raise ValueError(f"the spectral coarse space needs Kronecker blocks; the one-level block {b.name} has none")
        out, self.multiplicities, degenerate = [], [], []
        residual = None
        for i, b in enumerate(ctx.base.blocks):
            eig = b.eig.reshape(-1)
            k = min(self.k, eig.numel())
            t = float(torch.sort(eig).values[k - 1])
            tol = SPECTRAL_DEGENERACY_RTOL * abs(t)
            below = (eig < t - tol).nonzero()[:, 0]
            cluster = ((eig - t).abs() <= tol).nonzero()[:, 0]
            needed = k - below.numel()
            self.multiplicities.append(int(cluster.numel()))
            if cluster.numel() <= max(needed, SPECTRAL_MAX_EIGENSPACE):
                idx = torch.cat([below, cluster])
                if cluster.numel() > needed:
                    degenerate.append(f"layer {i} ×{cluster.numel()} (whole eigenspace)")
                out.append(b.eigenvectors(idx // b.d_in, idx % b.d_in))
                continue
            if residual is None:
                residual = ctx.split(ctx.residual)
            mask = torch.zeros_like(eig, dtype=torch.bool)
            mask[cluster] = True
            mask = mask.reshape(b.eig.shape)
            cols = [b.eigenvectors(below // b.d_in, below % b.d_in)]
            for v in (residual[i], torch.ones_like(residual[i]))[:needed]:
                Xh = b.to_eigenbasis(v) * mask  # the component in the eigenspace, in eigen-coordinates
                c = b.from_eigenbasis(Xh)
                if float(c.norm()) > SPECTRAL_COMPONENT_RTOL * float(v.norm()):  # else v has none: round-off only
                    cols.append(c)
            degenerate.append(f"layer {i} ×{cluster.numel()} (residual component)")
            out.append(torch.cat(cols, dim=1))
        self.degenerate = degenerate
        if degenerate:
            top = max(self.multiplicities)
            self.note = (f"degenerate smallest eigenvalue in {len(degenerate)} of {len(out)} layers "
                         f"(multiplicity up to {top}): see space.degenerate")
        else:
            self.note = ""
        return out


@dataclass
class KrylovNicolaides(CoarseSpace):
    """[v, B_i⁻¹v, …, B_i⁻⁽ᵐ⁻¹⁾v] with v = 1 (3.29)."""

    m: int = 2
    name = "krylov-nicolaides"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [_krylov(b, torch.ones(b.p, 1, dtype=ctx.rhs.dtype, device=ctx.rhs.device), self.m) for b in ctx.base.blocks]


class Residuals(CoarseSpace):
    """V_i = [F•KFAC]_ii⁻¹ r[i] (3.32): F•KFAC⁻¹r lies in the span."""

    name = "residuals"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return ctx.split(ctx.preconditioned_residual)  # [F•KFAC]_ii⁻¹ r[i] per layer


@dataclass
class KrylovResiduals(CoarseSpace):
    """The Krylov block (3.29) started from v = [F•KFAC]_ii⁻¹ r[i]."""

    m: int = 2
    name = "krylov-residuals"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        return [_krylov(b, v, self.m) for b, v in zip(ctx.base.blocks, ctx.split(ctx.preconditioned_residual))]


@dataclass
class Taylor(CoarseSpace):
    """[w_1[i], …, w_q[i]], w_1 = F•KFAC⁻¹r, w_{j+1} = F•KFAC⁻¹F•w_j (3.37)–(3.38)."""

    q: int = 2
    name = "taylor"

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        ws = [ctx.preconditioned_residual]
        for _ in range(self.q - 1):
            w = ctx.base.apply_inverse(ctx.fisher.apply(ws[-1]))
            n = w.norm()
            ws.append(w / n if n > 0 else w)
        W = torch.cat(ws, dim=1)
        return ctx.split(W)


class UserSpace(CoarseSpace):
    """User-supplied blocks ``V_i [p_i, m_i]`` (or ``[p_i]``)."""

    name = "user"

    def __init__(self, blocks: Sequence[Tensor]) -> None:
        self.blocks = [b.reshape(b.shape[0], -1) for b in blocks]

    def build(self, ctx: CoarseContext) -> list[Tensor]:
        sizes = ctx.base.sizes
        if len(self.blocks) != len(sizes):
            raise ValueError(f"user coarse space: expected {len(sizes)} blocks V_i (one per layer), got {len(self.blocks)}")
        for i, (b, p) in enumerate(zip(self.blocks, sizes)):
            if b.shape[0] != p:
                raise ValueError(f"user coarse space: block {i} has {b.shape[0]} rows, layer {i} has p_i = {p}")
        return [b.to(ctx.rhs.dtype) for b in self.blocks]


def make_coarse_space(coarse: str | CoarseSpace | Sequence[Tensor], *, k: int = 1, m: int = 2, q: int = 2) -> CoarseSpace:
    """A :class:`CoarseSpace` from a name, an instance, or a list of user blocks ``V_i``."""
    if isinstance(coarse, CoarseSpace):
        return coarse
    if isinstance(coarse, str):
        if coarse not in COARSE_SPACES:
            raise ValueError(f"unknown coarse space '{coarse}' (choose one of {', '.join(COARSE_SPACES)} or pass blocks V_i)")
        for nm, val in (("k", k), ("m", m), ("q", q)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"coarse space parameter {nm} must be a positive integer, got {val!r}")
        cls = COARSE_SPACES[coarse]
        sizes = {nm: val for nm, val in (("k", k), ("m", m), ("q", q)) if nm in getattr(cls, "__dataclass_fields__", {})}
        return cls(**sizes)
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
    return torch.from_numpy(np.ascontiguousarray(Q[:, :r])).to(device=V.device, dtype=V.dtype)


class CoarseBasis(FisherOperator):
    """R_0 = blockdiag(V_1, …, V_ℓ)ᵀ (3.21) as an ``m × p`` operator; ``.T`` is R_0ᵀ (``p × m``).

    The constructor takes orthonormal blocks; :meth:`from_raw` orthonormalizes a coarse space's
    raw blocks (:func:`orthonormalize`) and records how many columns were dependent.

    Args:
        blocks: ``V_i [p_i, m_i]`` with orthonormal columns (m_i may be 0).
        raw_dims: the column counts before orthonormalization (default: ``m_i``).

    Attributes:
        V: the blocks; sizes: ``[p_i]``; dims: ``[m_i]``; m: Σ m_i; raw_dims.
    """

    symmetric = False
    name = "R_0"

    def __init__(self, blocks: Sequence[Tensor], raw_dims: Sequence[int] | None = None) -> None:
        self.V = list(blocks)
        self.sizes = [v.shape[0] for v in self.V]
        self.dims = [v.shape[1] for v in self.V]
        self.m = sum(self.dims)
        self.raw_dims = list(raw_dims) if raw_dims is not None else list(self.dims)
        super().__init__(self.m, self.V[0].dtype, cols=sum(self.sizes))
        self.device = self.V[0].device

    @classmethod
    def from_raw(cls, raw: Sequence[Tensor], *, rtol: float = 1e-10, dtype: torch.dtype = torch.float64) -> "CoarseBasis":
        """Orthonormal bases of the spans of raw blocks ``V_i [p_i, r_i]`` (QR with pivoting; columns
        under ``rtol`` dropped): the span, hence the correction, is unchanged."""
        return cls([orthonormalize(v.to(dtype), rtol) for v in raw], [v.shape[1] for v in raw])

    def _matmat(self, X: Tensor) -> Tensor:
        """``R_0 X``: ``[p, c] -> [m, c]``."""
        parts = torch.split(X, self.sizes, dim=0)
        return torch.cat([v.T @ x for v, x in zip(self.V, parts)], dim=0)

    def _rmatmat(self, beta: Tensor) -> Tensor:
        """``R_0ᵀ β``: ``[m, c] -> [p, c]``."""
        parts = torch.split(beta, self.dims, dim=0)
        return torch.cat([v @ b for v, b in zip(self.V, parts)], dim=0)

    def has_adjoint(self) -> bool:
        return True

    def gram(self) -> Tensor:
        """R_0R_0ᵀ = blockdiag(V_iᵀV_i) ``[m, m]`` (the identity for orthonormal blocks, up to round-off)."""
        if not self.m:
            return torch.zeros(0, 0, dtype=self.dtype, device=self.V[0].device)
        return torch.block_diag(*[v.T @ v for v in self.V])

    def __repr__(self) -> str:
        return f"CoarseBasis(m={self.m}, dims={self.dims}, p={self.cols})"
