"""Unit-wise and mini-block Fishers: exact sub-blocks of each layer's block (ASDL's "unit-wise";
the "inner sub-block diagonal" approximations of the paper's conclusion).

Layer i's parameters are ``W_i [d_out, d_in']``. Its output unit r owns row ``W_i[r, :]``; a
*sub-block* is unit r's columns ``C_j = [j·s, (j+1)·s) ∩ [0, d_in')`` for a sub-block size s.
The operator keeps, of the exact block F_ii, only the entries coupling parameters of the same
sub-block:

    [F•UW]_(r,j) = (1/B) Σ_n m_{n,r,j} m_{n,r,j}ᵀ + λI   [s, s],   m_{n,r,j} = MAT(j_n)[r, C_j],

``MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ``. ``unit-wise``: s = d_in' (one block per output unit: Ollivier's
unit-wise natural gradient; on a one-output layer this is the exact block). ``mini-block``: a chosen
s (s = 1 is the exact diagonal). ``d_out·⌈d_in'/s⌉`` blocks per layer, never p_i × p_i.

Two ways per layer, the one with fewer factorisation flops (``"auto"``):

* ``"dense"`` — the ``[d_out, ⌈d_in'/s⌉, s, s]`` blocks with one Cholesky each. For a Linear
  layer (T = 1) ``m_{n,r,j} = g_{n,r} ā_b[C_j]``, so the block is
  ``Ā_jᵀ diag(w_r) Ā_j`` with ``w_{b,r} = (1/B) Σ_k g_{b,k,r}²``: one contraction, no per-example
  matrices. With positions or dense rows: from the per-example matrices ``[N, d_out, d_in']``.
* ``"woodbury"`` (Linear, T = 1) — ``C_(r,j) = diag(√w_r) Ā_j`` ``[B, s]``:
  ``(λI + CᵀC)⁻¹ = (I − Cᵀ(λI_B + CCᵀ)⁻¹C)/λ`` with ``CCᵀ = √w_r√w_rᵀ ∘ Ā_jĀ_jᵀ``, restricted to
  unit r's *active* examples (``w_{b,r} > 0``; an inactive one gives a row λe_b that decouples:
  the ReLU zeros), padded to a multiple of :data:`ACTIVE_SET_STEP`: an ``m_r × m_r`` Cholesky
  factor per unit and column chunk, the units of one size factorised in one batched call (the wide
  autoencoder layers: s = 785, B = 256, m_r ≈ 130 on ReLU layers). ``"auto"`` takes it when
  ``Σ_r m_r³ < d_out·s³``.

Solves are two batched triangular solves per group of blocks (``torch.cholesky_solve`` calls
LAPACK once per matrix on the CPU, ~10× slower for thousands of small blocks).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..jacobian import Jacobian, LayerJacobian
from ..errors import FisherlabError
from .algebra import BlockDiagonal
from .base import FisherOperator, check_damping

__all__ = ["SubBlockFisher", "SubBlockLayer"]


class SubBlockLayer(FisherOperator):
    """One layer's sub-block diagonal ``[p_i, p_i]`` (see the module docstring).

    Constructors take ready pieces: :meth:`dense` (blocks ``[d_out, nc, s, s]``) or
    :meth:`woodbury` (``Ā [B, d_in']``, weights ``w [B, d_out]``); :meth:`from_layer` chooses.

    Attributes:
        d_out, d_in: the layer's ``d_out`` and ``d_in'``; size: s; nc: sub-blocks per unit;
        path: ``"dense"`` or ``"woodbury"``; damping: λ; groups (Woodbury): ``(units, example
        indices [u, m] or None for all, √w [u, m], Cholesky factors [u·nc, m, m])`` per active-set size m.
    """

    def __init__(self, d_out: int, d_in: int, size: int, damping: float, dtype: torch.dtype, name: str) -> None:
        super().__init__(d_out * d_in, dtype)
        self.d_out, self.d_in, self.size = d_out, d_in, size
        self.nc = math.ceil(d_in / size)
        self.damping = check_damping(damping)
        self.name = f"sub-blocks(s={size}) '{name}'"
        self.path = ""

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_layer(cls, lj: LayerJacobian, damping: float, size: int | None = None, path: str = "auto") -> "SubBlockLayer":
        """The layer's sub-block diagonal with sub-blocks of ``size`` columns (``None``: d_in', unit-wise)."""
        d_out, d_in = lj.spec.d_out, lj.spec.d_in_bar
        s = d_in if size is None else max(1, min(int(size), d_in))
        linear = lj.a is not None and lj.g is not None and lj.T == 1
        w = lj.g[:, :, 0].pow(2).sum(1) / lj.B if linear else None  # type: ignore[index]  # [B, d_out]
        if path == "auto":  # the cheaper factorisation: d_out·nc blocks s × s, or Σ_r nc·m_r³
            path = "dense"
            if linear:
                m = _active_sizes((w > 0).sum(0), lj.B).double()  # type: ignore[operator]
                path = "woodbury" if float(m.pow(3).sum()) < d_out * s**3 else "dense"
        if path == "woodbury":
            if not linear:
                raise ValueError(f"layer '{lj.spec.name}': the Woodbury path needs a factored layer with one position")
            return cls.woodbury(lj.a[:, 0], w, s, damping, lj.spec.name)  # type: ignore[index,arg-type]
        if path != "dense":
            raise ValueError(f"path must be 'auto', 'dense' or 'woodbury', got {path!r}")
        nc = math.ceil(d_in / s)
        if linear:
            Ap = _pad(lj.a[:, 0], nc * s).reshape(lj.B, nc, s)  # type: ignore[index]
            blocks = torch.einsum("br,bci,bcj->rcij", w, Ap, Ap)
        else:
            M = _pad(lj.per_example_matrices(), nc * s).reshape(lj.N, d_out, nc, s)
            blocks = torch.einsum("nrci,nrcj->rcij", M, M) / lj.B
        return cls.dense(blocks, d_in, damping, lj.spec.name)

    @classmethod
    def dense(cls, blocks: Tensor, d_in: int, damping: float, name: str = "layer") -> "SubBlockLayer":
        """From the undamped blocks ``[d_out, nc, s, s]`` (zero-padded past column d_in')."""
        d_out, nc, s, _ = blocks.shape
        op = cls(d_out, d_in, s, damping, blocks.dtype, name)
        op.path = "dense"
        op.blocks = blocks
        damped = blocks + op.damping * torch.eye(s, dtype=blocks.dtype)
        op._chol = _batched_cholesky(damped.reshape(-1, s, s), f"the sub-blocks of '{name}'")
        return op

    @classmethod
    def woodbury(cls, a: Tensor, w: Tensor, size: int, damping: float, name: str = "layer") -> "SubBlockLayer":
        """From ``Ā [B, d_in']`` and ``w [B, d_out]`` (Linear, T = 1): block (r, j) = Ā_jᵀdiag(w_r)Ā_j + λI.

        Unit r's Woodbury matrix is restricted to its examples with ``w_{b,r} > 0`` (the others
        give rows λe_b that decouple: a ReLU layer's inactive examples), padded with inactive ones
        to a multiple of :data:`ACTIVE_SET_STEP`; units of one padded size are factorised together.
        """
        B, d_in = a.shape
        d_out = w.shape[1]
        op = cls(d_out, d_in, size, damping, a.dtype, name)
        op.path = "woodbury"
        op.Ap = _pad(a, op.nc * size).reshape(B, op.nc, size)  # [B, nc, s]
        op.sw = w.clamp_min(0).sqrt()  # [B, d_out]
        Ga = torch.einsum("bci,eci->cbe", op.Ap, op.Ap)  # [nc, B, B]
        swT = op.sw.T  # [d_out, B]
        active = swT > 0
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)  # each unit's active examples first
        m = _active_sizes(active.sum(1), B)  # [d_out]
        op.groups = []
        for mg in torch.unique(m).tolist():
            units = torch.nonzero(m == mg).flatten()
            if mg == B:  # every example: no gather
                idx, sw = None, swT[units]
                M = (sw[:, :, None] * sw[:, None, :]).unsqueeze(1)
                M = M.mul_(Ga) if op.nc == 1 else M * Ga  # [u, nc, B, B]
            else:
                idx = order[units, :mg]  # [u, m]
                sw = swT[units].gather(1, idx)  # [u, m] (0 at the padding)
                M = Ga[:, idx[:, :, None], idx[:, None, :]].transpose(0, 1)  # Ā_jĀ_jᵀ restricted: [u, nc, m, m]
                M = M.mul_(sw[:, None, :, None] * sw[:, None, None, :])
            M.diagonal(dim1=-2, dim2=-1).add_(op.damping)
            L = _batched_cholesky(M.reshape(-1, mg, mg), f"the Woodbury matrices of the sub-blocks of '{name}'")
            op.groups.append((units, idx, sw, L))
        return op

    # ---- products ----------------------------------------------------------------------------
    def _split(self, V: Tensor) -> Tensor:
        """``V [p_i, c] -> [c, d_out, nc, s]`` (MAT per column, columns zero-padded)."""
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # [c, d_out, d_in']
        return _pad(X, self.nc * self.size).reshape(c, self.d_out, self.nc, self.size)

    def _join(self, Y: Tensor) -> Tensor:
        """Inverse of :meth:`_split`."""
        c = Y.shape[0]
        X = Y.reshape(c, self.d_out, -1)[:, :, : self.d_in]
        return X.mT.reshape(c, -1).T

    def _matmat(self, V: Tensor) -> Tensor:
        X = self._split(V)
        if self.path == "dense":
            Y = torch.einsum("rcij,xrcj->xrci", self.blocks, X)
        else:
            Z = torch.einsum("bci,xrci->xrcb", self.Ap, X) * self.sw.T[None, :, None, :].pow(2)
            Y = torch.einsum("bci,xrcb->xrci", self.Ap, Z)
        return self._join(Y + self.damping * X)

    def _solve(self, W: Tensor) -> Tensor:
        X = self._split(W)  # [c, d_out, nc, s]
        c = X.shape[0]
        if self.path == "dense":
            rhs = X.permute(1, 2, 3, 0).reshape(-1, self.size, c)
            Y = _cholesky_solve(self._chol, rhs).reshape(self.d_out, self.nc, self.size, c).permute(3, 0, 1, 2)
            return self._join(Y)
        Z = torch.einsum("bci,xrci->xrcb", self.Ap, X)  # Ā_j x_(r,j)  [c, d_out, nc, B]
        Zs = torch.zeros_like(Z)
        for units, idx, sw, L in self.groups:  # C X, (λI + CCᵀ)⁻¹, Cᵀ on each unit's active examples
            u, mg = sw.shape
            at = None if idx is None else idx[None, :, None, :].expand(c, u, self.nc, mg)
            z = Z[:, units] if at is None else Z[:, units].gather(-1, at)
            z = z * sw[None, :, None, :]  # [c, u, nc, m]
            y = _cholesky_solve(L, z.permute(1, 2, 3, 0).reshape(-1, mg, c))
            y = y.reshape(u, self.nc, mg, c).permute(3, 0, 1, 2) * sw[None, :, None, :]
            Zs[:, units] = y if at is None else Z.new_zeros(c, u, self.nc, Z.shape[-1]).scatter_(-1, at, y)
        Y = (X - torch.einsum("bci,xrcb->xrci", self.Ap, Zs)) / self.damping
        return self._join(Y)


class SubBlockFisher(BlockDiagonal):
    """blockdiag over layers of the sub-block diagonals, ``[p, p]`` (``unit-wise``, ``mini-block``).

    ``SubBlockFisher(layers)`` takes ready :class:`SubBlockLayer` s; :meth:`from_capture` builds them.
    """

    def __init__(self, layers: list[SubBlockLayer], *, name: str = "unit-wise") -> None:
        super().__init__(layers, name=name)
        self.damping = layers[0].damping

    @classmethod
    def from_capture(
        cls,
        source: Capture | Jacobian,
        damping: float,
        size: int | None = None,
        *,
        path: str = "auto",
        dtype: torch.dtype = torch.float64,
    ) -> "SubBlockFisher":
        """Sub-blocks of ``size`` columns per output unit (``None``: whole units, unit-wise)."""
        if size is not None and (int(size) != size or size < 1):
            raise ValueError(f"mini-block size must be a positive integer, got {size!r}")
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        layers = [SubBlockLayer.from_layer(lj, lam, size, path) for lj in jac.layers]
        return cls(layers, name="unit-wise" if size is None else "mini-block")


ACTIVE_SET_STEP = 8
"""The Woodbury path pads each unit's active examples to a multiple of this (fewer batched factorisations)."""


def _active_sizes(n_active: Tensor, B: int) -> Tensor:
    """Each unit's Woodbury size: its active examples rounded up to :data:`ACTIVE_SET_STEP`, at most B."""
    step = ACTIVE_SET_STEP
    return ((n_active.clamp_min(1) + step - 1) // step * step).clamp_max(B)


def _pad(X: Tensor, n: int) -> Tensor:
    """Zero-pad the last axis of ``X`` to ``n``."""
    extra = n - X.shape[-1]
    return X if extra == 0 else torch.nn.functional.pad(X, (0, extra))


def _cholesky_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` for a batch ``L [n, s, s]``, ``rhs [n, s, c]``: two batched triangular solves
    (on the CPU ~10× faster than ``torch.cholesky_solve``, which calls LAPACK once per matrix)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rhs, upper=False), upper=True)


def _batched_cholesky(M: Tensor, what: str) -> Tensor:
    """Lower Cholesky factors of a batch ``[n, s, s]`` that theory says is SPD (a one-line error if not)."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0, 0])
        ev = torch.linalg.eigvalsh(M[bad])
        raise FisherlabError(
            f"{what}: block {bad} is not positive definite (smallest eigenvalue {float(ev[0]):.3e}); "
            f"increase the damping or check the capture"
        )
    return L
