"""The operator protocol shared by every curvature approximation.

Public methods validate and convert; subclasses implement the hooks ``_matmat`` and ``_solve``
on ``[p, c]`` float64 blocks (STYLE.md habit 1):

* ``op @ v`` / ``op.matvec(v)``: ``[p]`` or ``[p, c]`` → same shape;
* ``op.solve(w)``: ``op⁻¹ w``;
* ``op.to_dense()``: ``[p, p]`` (tiny models and tests only);
* ``op.to_scipy()``: a :class:`scipy.sparse.linalg.LinearOperator` (``matvec``; ``rmatvec``
  for symmetric operators);
* ``op.inverse()``: the operator ``op⁻¹`` (its ``@`` is ``solve``);
* ``op.shape``, ``op.dtype``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DampingError, FisherlabError

__all__ = ["FisherOperator", "InverseOperator", "check_damping", "BlockOperator"]

MAX_DENSE_P = 20_000
"""``to_dense`` refuses larger operators: it exists for tiny nets and tests."""


def check_damping(damping: float) -> float:
    """λ as a float; a one-line :class:`DampingError` unless it is finite and > 0."""
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise DampingError(f"damping must be a number > 0, got {damping!r}") from None
    if not math.isfinite(lam) or lam <= 0:
        raise DampingError(f"damping λ must be finite and > 0 (the regularized Fisher F + λI), got {damping!r}")
    return lam


class FisherOperator:
    """A p × p operator on fisherlab-ordered parameter vectors.

    Attributes:
        p: dimension.
        dtype: compute dtype (float64 by default).
        symmetric: whether the operator is symmetric (then ``to_scipy`` has ``rmatvec``).
        name: short method name (``"kfac"``, ``"nicolaides"``, …).
    """

    symmetric: bool = True
    name: str = "operator"

    def __init__(self, p: int, dtype: torch.dtype = torch.float64) -> None:
        self.p = int(p)
        self.dtype = dtype

    # ---- hooks -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no matvec")

    def _solve(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no solve")

    # ---- public ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    def _as_block(self, v: Tensor | np.ndarray, what: str) -> tuple[Tensor, bool]:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, Tensor):
            raise TypeError(f"{what}: expected a tensor, got {type(v).__name__}")
        if v.dim() not in (1, 2) or v.shape[0] != self.p:
            raise ValueError(f"{self.name}.{what}: expected shape [{self.p}] or [{self.p}, c], got {tuple(v.shape)}")
        vec = v.dim() == 1
        V = v.reshape(self.p, -1).to(self.dtype)
        return V, vec

    def matvec(self, v: Tensor) -> Tensor:
        """``op v`` for ``v [p]`` or ``[p, c]``."""
        V, vec = self._as_block(v, "matvec")
        out = self._matmat(V)
        return out[:, 0] if vec else out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def solve(self, w: Tensor) -> Tensor:
        """``op⁻¹ w`` for ``w [p]`` or ``[p, c]``."""
        W, vec = self._as_block(w, "solve")
        out = self._solve(W)
        return out[:, 0] if vec else out

    def to_dense(self) -> Tensor:
        """``[p, p]`` by applying the operator to the identity. Tiny models only."""
        if self.p > MAX_DENSE_P:
            raise FisherlabError(
                f"{self.name}.to_dense: p = {self.p:,} is too large for a dense matrix (limit {MAX_DENSE_P:,})"
            )
        return self._matmat(torch.eye(self.p, dtype=self.dtype))

    def inverse(self) -> "InverseOperator":
        """The operator ``op⁻¹`` (``@`` solves)."""
        return InverseOperator(self)

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` on float64 numpy vectors."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(self.p, -1).to(self.dtype)
            out = self._matmat(X).double().numpy()
            return out.reshape(x.shape) if x.ndim == 1 else out

        kw = dict(matvec=mv, matmat=mv)
        if self.symmetric:
            kw.update(rmatvec=mv, rmatmat=mv)
        return LinearOperator(self.shape, dtype=np.float64, **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, p={self.p})"


class InverseOperator(FisherOperator):
    """``op⁻¹`` as an operator: ``@`` is ``op.solve``, ``solve`` is ``op @``."""

    def __init__(self, op: FisherOperator) -> None:
        super().__init__(op.p, op.dtype)
        self.op = op
        self.symmetric = op.symmetric
        self.name = f"{op.name}⁻¹"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._solve(V)

    def _solve(self, W: Tensor) -> Tensor:
        return self.op._matmat(W)


class BlockOperator:
    """One diagonal block ``[p_i, p_i]`` of a block-diagonal operator: ``matmat``/``solve`` on ``[p_i, c]``."""

    p: int

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def solve(self, W: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class BlockDiagonalOperator(FisherOperator):
    """``blockdiag(B_1, …, B_ℓ)`` over the layers (the shape of (3.7) and of KFAC)."""

    def __init__(self, blocks: Sequence[BlockOperator], sizes: Sequence[int], dtype: torch.dtype = torch.float64) -> None:
        super().__init__(sum(sizes), dtype)
        self.blocks = list(blocks)
        self.sizes = list(sizes)

    def _split(self, V: Tensor) -> list[Tensor]:
        return list(torch.split(V, self.sizes, dim=0))

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.cat([b.matmat(v) for b, v in zip(self.blocks, self._split(V))], dim=0)

    def _solve(self, W: Tensor) -> Tensor:
        return torch.cat([b.solve(w) for b, w in zip(self.blocks, self._split(W))], dim=0)

    def block(self, i: int) -> BlockOperator:
        return self.blocks[i]
