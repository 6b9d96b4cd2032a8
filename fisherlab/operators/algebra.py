"""The operator algebra: composition, sums, scaling, adjoints, inverses, identity, block-diagonal,
small dense matrices (ARCHITECTURE.md ``operators/algebra.py``).

Every derived operator of fisherlab is an expression in these (the two-level inverse (3.15)
``(I − R_0ᵀF_coarse⁻¹R_0F•)F•KFAC⁻¹ + R_0ᵀF_coarse⁻¹R_0``, its error operator (3.16), TKO (3.17),
the projector Π = R_0ᵀF_coarse⁻¹R_0F•), so each formula is written once, where it is defined.

| expression | class | ``@`` | ``solve`` | ``.T`` |
|---|---|---|---|---|
| ``A @ B`` | :class:`Composition` | A(B v) | B⁻¹(A⁻¹ w) | Bᵀ Aᵀ |
| ``A + B``, ``A - B`` | :class:`Sum` | Σ cᵢ Aᵢ v | — (:class:`NotInvertibleError`) | Σ cᵢ Aᵢᵀ |
| ``c * A`` | :class:`Scaled` | c A v | A⁻¹ w / c | c Aᵀ |
| ``A.T`` | :class:`Adjoint` | Aᵀ v | A⁻ᵀ w | A |
| ``A.inverse()`` | :class:`Inverse` | A⁻¹ v | A w | A⁻ᵀ |
| ``Identity(p)`` | :class:`Identity` | v | w | itself |
| ``BlockDiagonal([B_i])`` | :class:`BlockDiagonal` | per block | per block | per block |
| ``Matrix(M, spd=...)`` | :class:`Matrix` | M v | Cholesky (SPD) or LU | Mᵀ |

Results of ``apply`` may alias their input for :class:`Identity`; nothing here writes into an
input or into another operator's result.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import FisherlabError
from .base import FisherOperator, NotInvertibleError

__all__ = [
    "Adjoint",
    "BlockDiagonal",
    "Composition",
    "Identity",
    "Inverse",
    "Matrix",
    "Scaled",
    "Sum",
    "spd_cholesky",
]


def spd_cholesky(M: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a matrix that theory says is SPD; a one-line error naming ``what``
    (with its extreme eigenvalues) if it is not."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        ev = torch.linalg.eigvalsh(M)
        raise FisherlabError(
            f"{what} is not positive definite (smallest eigenvalue {float(ev[0]):.3e}, "
            f"largest {float(ev[-1]):.3e}); increase the damping or check the capture"
        )
    return L


def _device_of(ops: Sequence[FisherOperator]) -> torch.device | None:
    """The device of the operands (``None``: the CPU default); they must agree."""
    devices = {str(op.device) for op in ops if op.device is not None}
    if len(devices) > 1:
        raise ValueError(f"operators on different devices cannot be combined: {sorted(devices)}")
    return next((op.device for op in ops if op.device is not None), None)


def _check_dtypes(ops: Sequence[FisherOperator]) -> torch.dtype:
    dtypes = {op.dtype for op in ops}
    if len(dtypes) != 1:
        raise ValueError(f"operators of different dtypes cannot be combined: {sorted(map(str, dtypes))}")
    return ops[0].dtype


class Identity(FisherOperator):
    """``I_p``."""

    name = "identity"

    def __init__(self, p: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> None:
        super().__init__(p, dtype)
        self.device = None if device is None else torch.device(device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V

    def _solve(self, W: Tensor) -> Tensor:
        return W


class Composition(FisherOperator):
    """``A_1 A_2 ⋯ A_k`` (applied right to left). Nested compositions are flattened."""

    symmetric = False

    def __init__(self, *ops: FisherOperator) -> None:
        flat: list[FisherOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Composition) else [op])
        for left, right in zip(flat, flat[1:]):
            if left.cols != right.p:
                raise ValueError(f"cannot compose {left.name} {left.shape} with {right.name} {right.shape}")
        super().__init__(flat[0].p, _check_dtypes(flat), cols=flat[-1].cols)
        self.device = _device_of(flat)
        self.ops = flat
        self.name = " @ ".join(op.name for op in flat)

    def _matmat(self, V: Tensor) -> Tensor:
        for op in reversed(self.ops):
            V = op.apply(V)
        return V

    def _solve(self, W: Tensor) -> Tensor:
        for op in self.ops:
            W = op.apply_inverse(W)
        return W

    def _rmatmat(self, V: Tensor) -> Tensor:
        for op in self.ops:  # (A B)ᵀ = Bᵀ Aᵀ: Aᵀ first
            V = op.apply_adjoint(V)
        return V

    def _rsolve(self, W: Tensor) -> Tensor:
        for op in reversed(self.ops):  # (A B)⁻ᵀ = A⁻ᵀ B⁻ᵀ: B⁻ᵀ first
            W = op.apply_adjoint_inverse(W)
        return W

    def has_adjoint(self) -> bool:
        return all(op.has_adjoint() for op in self.ops)


class Sum(FisherOperator):
    """``Σ_i c_i A_i`` (``A + B``, ``A - B``). Nested sums are flattened."""

    def __init__(self, ops: Sequence[FisherOperator], coefs: Sequence[float]) -> None:
        flat_ops: list[FisherOperator] = []
        flat_c: list[float] = []
        for op, c in zip(ops, coefs):
            if isinstance(op, Sum):
                flat_ops.extend(op.ops)
                flat_c.extend(c * ci for ci in op.coefs)
            else:
                flat_ops.append(op)
                flat_c.append(float(c))
        shapes = {op.shape for op in flat_ops}
        if len(shapes) != 1:
            raise ValueError(f"cannot add operators of shapes {sorted(shapes)}")
        super().__init__(flat_ops[0].p, _check_dtypes(flat_ops), cols=flat_ops[0].cols)
        self.device = _device_of(flat_ops)
        self.ops, self.coefs = flat_ops, flat_c
        self.symmetric = all(op.symmetric for op in flat_ops)
        self.name = " + ".join(f"{c:g}·{op.name}" for c, op in zip(flat_c, flat_ops))

    def _combine(self, hook: str, V: Tensor) -> Tensor:
        out: Tensor | None = None
        for op, c in zip(self.ops, self.coefs):
            y = getattr(op, hook)(V)
            term = y if c == 1.0 else c * y
            out = term if out is None else out + term
        assert out is not None
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        return self._combine("apply", V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self._combine("apply_adjoint", V)

    def _solve(self, W: Tensor) -> Tensor:
        raise NotInvertibleError(f"'{self.name}': a sum of operators has no direct solve (use CG on its to_scipy())")

    def has_adjoint(self) -> bool:
        return all(op.has_adjoint() for op in self.ops)


class Scaled(FisherOperator):
    """``c A`` for a number c."""

    def __init__(self, op: FisherOperator, c: float) -> None:
        super().__init__(op.p, op.dtype, cols=op.cols)
        self.device = op.device
        self.op, self.c = op, float(c)
        self.symmetric = op.symmetric
        self.name = f"{self.c:g}·{op.name}"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.c * self.op.apply(V)

    def _solve(self, W: Tensor) -> Tensor:
        return self.op.apply_inverse(W) / self.c

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.c * self.op.apply_adjoint(V)

    def _rsolve(self, W: Tensor) -> Tensor:
        return self.op.apply_adjoint_inverse(W) / self.c

    def has_adjoint(self) -> bool:
        return self.op.has_adjoint()


class Adjoint(FisherOperator):
    """``Aᵀ``: its product is A's adjoint product, its adjoint is A."""

    symmetric = False

    def __init__(self, op: FisherOperator) -> None:
        super().__init__(op.cols, op.dtype, cols=op.p)
        self.device = op.device
        self.op = op
        self.name = f"{op.name}ᵀ"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op.apply_adjoint(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.op.apply(V)

    def _solve(self, W: Tensor) -> Tensor:
        return self.op.apply_adjoint_inverse(W)

    def _rsolve(self, W: Tensor) -> Tensor:
        return self.op.apply_inverse(W)

    @property
    def T(self) -> FisherOperator:
        return self.op

    def has_adjoint(self) -> bool:
        return True


class Inverse(FisherOperator):
    """``A⁻¹`` as an operator: ``@`` is A's solve, ``solve`` is A's product."""

    def __init__(self, op: FisherOperator) -> None:
        if op.p != op.cols:
            raise NotInvertibleError(f"{op.name} is {op.shape}: only square operators have an inverse")
        super().__init__(op.p, op.dtype)
        self.device = op.device
        self.op = op
        self.symmetric = op.symmetric
        self.name = f"{op.name}⁻¹"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op.apply_inverse(V)

    def _solve(self, W: Tensor) -> Tensor:
        return self.op.apply(W)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.op.apply_adjoint_inverse(V)  # (A⁻¹)ᵀ = (Aᵀ)⁻¹

    def _rsolve(self, W: Tensor) -> Tensor:
        return self.op.apply_adjoint(W)

    def inverse(self) -> FisherOperator:
        return self.op

    def has_adjoint(self) -> bool:
        return self.op.has_adjoint()


class BlockDiagonal(FisherOperator):
    """``blockdiag(B_1, …, B_ℓ)`` over the layers (the shape of (3.7) and of KFAC), ``[p, p]``
    with ``p = Σ p_i``; each block is a square operator ``[p_i, p_i]``.

    Args:
        blocks: the diagonal blocks (any operators).
        name: a name for tables and errors.
    """

    def __init__(self, blocks: Sequence[FisherOperator], *, name: str = "block-diagonal") -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("a block-diagonal operator needs at least one block")
        for b in blocks:
            if b.p != b.cols:
                raise ValueError(f"block {b.name} is {b.shape}: diagonal blocks must be square")
        super().__init__(sum(b.p for b in blocks), _check_dtypes(blocks))
        self.device = _device_of(blocks)
        self.blocks = blocks
        self.sizes = [b.p for b in blocks]
        self.symmetric = all(b.symmetric for b in blocks)
        self.name = name

    def split(self, V: Tensor) -> list[Tensor]:
        """``V [p, c]`` → the per-block rows ``[p_i, c]`` (views)."""
        return list(torch.split(V, self.sizes, dim=0))

    def _each(self, hook: str, V: Tensor) -> Tensor:
        return torch.cat([getattr(b, hook)(v) for b, v in zip(self.blocks, self.split(V))], dim=0)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._each("apply", V)

    def _solve(self, W: Tensor) -> Tensor:
        return self._each("apply_inverse", W)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self._each("apply_adjoint", V)

    def _rsolve(self, W: Tensor) -> Tensor:
        return self._each("apply_adjoint_inverse", W)

    def block(self, i: int) -> FisherOperator:
        return self.blocks[i]

    def has_adjoint(self) -> bool:
        return all(b.has_adjoint() for b in self.blocks)


class Matrix(FisherOperator):
    """A small dense matrix ``M [m, n]`` as an operator (coarse operators, test references).

    Args:
        M: the matrix.
        spd: symmetric positive definite: solves by a Cholesky factor computed once (a one-line
            error naming ``what`` if M is not SPD); otherwise by LU.
        what: what M is, for error messages (``"F_coarse = R_0F•R_0ᵀ"``).
    """

    def __init__(self, M: Tensor, *, spd: bool = False, what: str = "matrix", dtype: torch.dtype | None = None) -> None:
        if M.dim() != 2:
            raise ValueError(f"{what}: expected a matrix, got shape {tuple(M.shape)}")
        super().__init__(M.shape[0], dtype or M.dtype, cols=M.shape[1])
        self.device = M.device
        self.M = M.to(self.dtype)
        self.spd = spd
        self.symmetric = spd
        self.name = what
        self._factor: Tensor | None = None

    def _matmat(self, V: Tensor) -> Tensor:
        return self.M @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.M.T @ V

    def _solve(self, W: Tensor) -> Tensor:
        if self.p != self.cols:
            raise NotInvertibleError(f"{self.name} is {self.shape}: not square")
        if not self.spd:
            return torch.linalg.solve(self.M, W)
        return torch.cholesky_solve(W, self.cholesky)

    def _rsolve(self, W: Tensor) -> Tensor:
        return self._solve(W) if self.spd else torch.linalg.solve(self.M.T, W)

    @property
    def cholesky(self) -> Tensor:
        """The lower Cholesky factor of an SPD M (computed once)."""
        if self._factor is None:
            self._factor = spd_cholesky(self.M, self.name)
        return self._factor

    def has_adjoint(self) -> bool:
        return True


FisherOperator.register_algebra(compose=Composition, sum=Sum, scale=Scaled, adjoint=Adjoint, inverse=Inverse)
