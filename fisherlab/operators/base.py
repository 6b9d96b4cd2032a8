"""The operator protocol shared by every curvature approximation (STYLE.md habit 1).

An operator maps ``[n, c]`` float blocks to ``[m, c]`` (``shape = (m, n)``; the curvature
operators are square, ``p × p``). Subclasses implement hooks on ready ``[n, c]`` blocks in the
operator's dtype; the public methods validate and convert:

| hook | public, validating | public, block-level (no conversion) | meaning |
|---|---|---|---|
| ``_matmat`` | ``op @ v``, ``op.matvec(v)`` | ``op.apply(V)`` | ``op V`` |
| ``_solve`` | ``op.solve(w)`` | ``op.apply_inverse(W)`` | ``op⁻¹ W`` |
| ``_rmatmat`` | ``op.rmatvec(v)``, ``op.T @ v`` | ``op.apply_adjoint(V)`` | ``opᵀ V`` (``_matmat`` when symmetric) |
| ``_rsolve`` | ``op.T.solve(w)`` | ``op.apply_adjoint_inverse(W)`` | ``op⁻ᵀ W`` (``_solve`` when symmetric) |

``op @ other_operator`` composes, and ``+``, ``-``, scalar ``*``, ``op.T`` and ``op.inverse()``
build operators (:mod:`fisherlab.operators.algebra`); ``op.to_dense()`` (tiny models and tests
only) and ``op.to_scipy()`` (a :class:`scipy.sparse.linalg.LinearOperator`, with ``rmatvec``
whenever the adjoint is known) work for every operator, composed or not.

Modules never call another object's underscore hook: compositions use ``apply``,
``apply_inverse`` and ``apply_adjoint``.
"""

from __future__ import annotations

import math
import numpy as np
import torch
from torch import Tensor

from ..damping import resolve_damping
from ..errors import FisherlabError

__all__ = ["FisherOperator", "check_damping", "MAX_DENSE_P", "NotInvertibleError"]

MAX_DENSE_P = 20_000
"""``to_dense`` refuses larger operators: it exists for tiny nets and tests."""


class NotInvertibleError(FisherlabError, ValueError):
    """The operator has no inverse that can be applied (a sum, a rectangular basis, …)."""


def check_damping(damping: float) -> float:
    """λ as a float; a one-line :class:`DampingError` unless it is finite and > 0 (a
    :class:`fisherlab.Damping` in the absolute scale is accepted; other scales need a capture:
    :func:`fisherlab.damping.resolve_damping`)."""
    return resolve_damping(damping)


class FisherOperator:
    """A linear operator ``[m, n]`` on fisherlab-ordered parameter vectors (square: ``p × p``).

    Args:
        p: number of rows (and of columns unless ``cols`` is given).
        dtype: compute dtype (float64 by default).
        cols: number of columns for rectangular operators (e.g. the coarse basis R_0, m × p).

    Attributes:
        p: rows; shape: ``(rows, cols)``; dtype.
        symmetric: whether ``opᵀ = op`` (then the adjoint hook is the product hook).
        name: short method name (``"kfac"``, ``"nicolaides"``, …).
    """

    symmetric: bool = True
    name: str = "operator"
    device: torch.device | None = None
    """Where the operator's tensors live (``None``: wherever its inputs are; CPU for ``to_dense``).
    Operators built on a :class:`~fisherlab.jacobian.Jacobian` take its device."""

    _algebra: dict[str, type] = {}
    """The expression classes (``compose``, ``sum``, ``scale``, ``adjoint``, ``inverse``), registered
    by :mod:`fisherlab.operators.algebra` when it is imported (``fisherlab.operators`` always
    imports it), so that this module needs nothing from the algebra built on it."""

    @classmethod
    def register_algebra(cls, **classes: type) -> None:
        cls._algebra.update(classes)

    def _expr(self, kind: str) -> type:
        try:
            return self._algebra[kind]
        except KeyError:  # pragma: no cover - only when fisherlab.operators.algebra was never imported
            raise RuntimeError("the operator algebra is not loaded: import fisherlab.operators") from None

    def __init__(self, p: int, dtype: torch.dtype = torch.float64, *, cols: int | None = None) -> None:
        self.p = int(p)
        self.cols = self.p if cols is None else int(cols)
        self.dtype = dtype

    # ---- hooks (on ready [n, c] blocks of self.dtype) -------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no product")

    def _solve(self, W: Tensor) -> Tensor:
        raise NotInvertibleError(f"{self.name}: this operator ({type(self).__name__}) has no solve")

    def _rmatmat(self, V: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmat(V)
        raise NotImplementedError(f"{self.name}: the adjoint of {type(self).__name__} is not implemented")

    def _rsolve(self, W: Tensor) -> Tensor:
        if self.symmetric:
            return self._solve(W)
        raise NotInvertibleError(f"{self.name}: the adjoint of {type(self).__name__} has no solve")

    # ---- block level: what compositions call ------------------------------------------------
    def apply(self, V: Tensor) -> Tensor:
        """``op V`` for a ready block ``V [n, c]`` in :attr:`dtype` (no conversion, no copy)."""
        return self._matmat(V)

    def apply_inverse(self, W: Tensor) -> Tensor:
        """``op⁻¹ W`` for a ready block ``W [m, c]``."""
        return self._solve(W)

    def apply_adjoint(self, V: Tensor) -> Tensor:
        """``opᵀ V`` for a ready block ``V [m, c]``."""
        return self._rmatmat(V)

    def apply_adjoint_inverse(self, W: Tensor) -> Tensor:
        """``op⁻ᵀ W`` for a ready block ``W [n, c]``."""
        return self._rsolve(W)

    # ---- validating front ends ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.cols)

    def _as_block(self, v: Tensor | np.ndarray, what: str, rows: int) -> tuple[Tensor, bool]:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, Tensor):
            raise TypeError(f"{self.name}.{what}: expected a tensor, got {type(v).__name__}")
        if v.dim() not in (1, 2) or v.shape[0] != rows:
            raise ValueError(f"{self.name}.{what}: expected shape [{rows}] or [{rows}, c], got {tuple(v.shape)}")
        return v.reshape(rows, -1).to(device=self.device, dtype=self.dtype), v.dim() == 1

    def matvec(self, v: Tensor) -> Tensor:
        """``op v`` for ``v [n]`` or ``[n, c]``."""
        V, vec = self._as_block(v, "matvec", self.cols)
        out = self._matmat(V)
        return out[:, 0] if vec else out

    def __matmul__(self, other):
        """``op @ B`` composes when ``B`` is an operator, and multiplies a vector/block otherwise."""
        if isinstance(other, FisherOperator):
            return self._expr("compose")(self, other)
        return self.matvec(other)

    def solve(self, w: Tensor) -> Tensor:
        """``op⁻¹ w`` for ``w [m]`` or ``[m, c]``."""
        W, vec = self._as_block(w, "solve", self.p)
        out = self._solve(W)
        return out[:, 0] if vec else out

    def rmatvec(self, v: Tensor) -> Tensor:
        """``opᵀ v`` for ``v [m]`` or ``[m, c]``."""
        V, vec = self._as_block(v, "rmatvec", self.p)
        out = self._rmatmat(V)
        return out[:, 0] if vec else out

    # ---- algebra --------------------------------------------------------------------------
    def inverse(self) -> "FisherOperator":
        """The operator ``op⁻¹`` (its ``@`` solves; it composes like any operator)."""
        return self._expr("inverse")(self)

    @property
    def T(self) -> "FisherOperator":
        """The adjoint ``opᵀ`` (the operator itself when symmetric)."""
        if self.symmetric and self.p == self.cols:
            return self
        return self._expr("adjoint")(self)

    def __add__(self, other: "FisherOperator") -> "FisherOperator":
        return self._expr("sum")([self, other], [1.0, 1.0])

    def __sub__(self, other: "FisherOperator") -> "FisherOperator":
        return self._expr("sum")([self, other], [1.0, -1.0])

    def __mul__(self, c: float) -> "FisherOperator":
        if isinstance(c, FisherOperator):
            raise TypeError("use @ to compose operators; * scales by a number")
        return self._expr("scale")(self, float(c))

    __rmul__ = __mul__

    def __neg__(self) -> "FisherOperator":
        return self * -1.0

    # ---- materialisation ------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """``[m, n]`` by applying the operator to the identity. Tiny models only."""
        if max(self.p, self.cols) > MAX_DENSE_P:
            raise FisherlabError(
                f"{self.name}.to_dense: {self.p:,} × {self.cols:,} is too large for a dense matrix (limit {MAX_DENSE_P:,})"
            )
        return self._matmat(torch.eye(self.cols, dtype=self.dtype, device=self.device))

    def has_adjoint(self) -> bool:
        """Whether :meth:`apply_adjoint` is available (symmetric, or an adjoint hook)."""
        return self.symmetric or type(self)._rmatmat is not FisherOperator._rmatmat

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` on float64 numpy vectors (``rmatvec``
        whenever the adjoint is known)."""
        from scipy.sparse.linalg import LinearOperator

        def wrap(hook, rows):
            def f(x: np.ndarray) -> np.ndarray:
                X = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(rows, -1).to(device=self.device, dtype=self.dtype)
                out = hook(X).double().cpu().numpy()
                return out.reshape(-1) if x.ndim == 1 else out

            return f

        mv = wrap(self.apply, self.cols)
        kw = dict(matvec=mv, matmat=mv)
        if self.has_adjoint():
            rmv = wrap(self.apply_adjoint, self.p)
            kw.update(rmatvec=rmv, rmatmat=rmv)
        return LinearOperator(self.shape, dtype=np.float64, **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, shape={self.shape})"
