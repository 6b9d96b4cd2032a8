"""The exact regularized Fisher F• = F + λI (2.17) and its exact block diagonal (3.7).

Both work through ``U = J/√B`` (:mod:`fisherlab.jacobian`) and never form p × p:

* matvec ``F•v = U(Uᵀv) + λv`` (A4)–(A14);
* solve by **Woodbury**, ``F•⁻¹w = (w − U(λI_N + K)⁻¹Uᵀw)/λ`` with one Cholesky of the
  N × N matrix ``λI + K`` (MATH.md §3), or by **conjugate gradients** on the matvec,
  preconditioned by KFAC, when the N × N Gram would not fit (exact-mode captures of wide
  outputs: N = d_y·B).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..capturing.record import Capture
from ..jacobian import Jacobian, LayerJacobian
from ..damping import Damping, resolve_damping
from .algebra import BlockDiagonal, spd_cholesky
from .base import FisherOperator, check_damping
from .kfac import KFAC

__all__ = ["ExactFisher", "BlockDiagonalFisher", "ExactBlock", "spd_cholesky", "SolveInfo"]

GRAM_BUDGET_BYTES = 2 * 2**30
"""Default memory budget for the N × N Woodbury matrix (``solver="auto"``)."""


@dataclass
class SolveInfo:
    """How the last :meth:`ExactFisher.solve` ran."""

    solver: str
    seconds: float = 0.0
    iterations: list[int] = field(default_factory=list)
    converged: bool = True


class ExactFisher(FisherOperator):
    """F• = F + λI, ``F = U Uᵀ`` (2.17), ``[p, p]``.

    Args:
        source: a :class:`Capture` (or a ready :class:`Jacobian`).
        damping: λ > 0.
        solver: ``"auto"`` (Woodbury when the N × N matrix fits ``gram_budget_bytes`` and N < p,
            else CG), ``"woodbury"`` or ``"cg"``. The choice is in :attr:`solver` and
            :meth:`report`.
        preconditioner: for CG, an operator whose ``inverse()`` preconditions (e.g. a
            :class:`~fisherlab.operators.KFAC`), ``None``, or the rules ``"kfac"`` (π-damped KFAC of
            the same Jacobian) and ``"auto"`` (the default; :func:`cg_preconditioner_rule`):
            KFAC when N ≥ p, none when N < p. F = UUᵀ has rank ≤ N, so plain CG on F + λI
            converges in at most N + 1 steps in exact arithmetic, whereas F•KFAC⁻¹F• spreads the
            spectrum: on the exact-mode MNIST autoencoder (N = 12,544 ≪ p = 2.8 M) plain CG
            converged in 90 iterations and KFAC-preconditioned CG had not after 189
            (``analysis/bench/woodbury_bench.py``).
        cg_rtol: relative residual tolerance of CG.
        cg_maxiter: CG iteration cap (default ``max(100, 10·min(N, p))``... bounded by 10,000).
        gram_budget_bytes: memory allowed for the Woodbury matrix.
    """

    name = "exact"

    def __init__(
        self,
        source: Capture | Jacobian,
        damping: float | Damping,
        *,
        solver: Literal["auto", "woodbury", "cg"] = "auto",
        preconditioner: FisherOperator | Literal["auto", "kfac"] | None = "auto",
        cg_rtol: float = 1e-10,
        cg_maxiter: int | None = None,
        gram_budget_bytes: int = GRAM_BUDGET_BYTES,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.jac = Jacobian.coerce(source, dtype)
        self.damping = resolve_damping(damping, self.jac)
        super().__init__(self.jac.p, dtype)
        self.device = self.jac.device
        N, p = self.jac.N, self.jac.p
        gram_bytes = N * N * torch.finfo(dtype).bits // 8
        if solver == "auto":
            solver = "woodbury" if (gram_bytes <= gram_budget_bytes and N < p) or N <= 2048 else "cg"
        if solver not in ("woodbury", "cg"):
            raise ValueError(f"solver must be 'auto', 'woodbury' or 'cg', got {solver!r}")
        self.solver = solver
        self.gram_bytes = gram_bytes
        self._precond: FisherOperator | None = None
        if isinstance(preconditioner, FisherOperator):
            if preconditioner.shape != self.shape:
                raise ValueError(f"preconditioner has shape {preconditioner.shape}, F• is {self.shape}")
            self._precond = preconditioner
            preconditioner = preconditioner.name
        elif preconditioner == "auto":
            preconditioner = cg_preconditioner_rule(N, p)
        elif preconditioner not in ("kfac", None):
            raise ValueError(f"preconditioner must be an operator, 'auto', 'kfac' or None, got {preconditioner!r}")
        self.preconditioner = preconditioner
        self.cg_rtol = cg_rtol
        self.cg_maxiter = cg_maxiter or min(10_000, max(100, 10 * min(N, p)))
        self._chol: Tensor | None = None
        self.last_solve = SolveInfo(solver)

    # ---- description -------------------------------------------------------------------
    def report(self) -> str:
        """One line: which solver and why."""
        gib = self.gram_bytes / 2**30
        if self.solver == "woodbury":
            return f"woodbury: Cholesky of the {self.jac.N}×{self.jac.N} matrix λI + UᵀU ({gib:.3g} GiB)"
        pc = "KFAC-preconditioned " if self.preconditioner else ""
        return (
            f"cg: {pc}conjugate gradients on the factor matvec (the {self.jac.N}×{self.jac.N} "
            f"Woodbury matrix would need {gib:.3g} GiB)"
        )

    # ---- products ----------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        """``F•V = U(UᵀV) + λV``."""
        return self.jac.matmat(self.jac.rmatmat(V)) + self.damping * V

    def fisher_norm2(self, V: Tensor) -> Tensor:
        """``‖v‖²_{F•} = ‖Uᵀv‖² + λ‖v‖²`` per column of ``V [p, c]`` (or a scalar for ``[p]``)."""
        V2 = V.reshape(self.p, -1).to(self.dtype)
        out = self.jac.rmatmat(V2).pow(2).sum(0) + self.damping * V2.pow(2).sum(0)
        return out[0] if V.dim() == 1 else out

    # ---- solves ------------------------------------------------------------------------
    @property
    def woodbury_cholesky(self) -> Tensor:
        """Cholesky factor of ``λI_N + K`` ``[N, N]`` (computed once)."""
        if self._chol is None:
            M = self.jac.gram.clone()
            M.diagonal().add_(self.damping)
            self._chol = spd_cholesky(M, "λI + UᵀU (Woodbury matrix)")
        return self._chol

    def _solve(self, W: Tensor) -> Tensor:
        t0 = time.perf_counter()
        if self.solver == "woodbury":
            Y = self.jac.rmatmat(W)
            Z = torch.cholesky_solve(Y, self.woodbury_cholesky)
            out = self.jac.matmat(Z)
            torch.sub(W, out, out=out).div_(self.damping)  # in place: no second p-sized allocation
            self.last_solve = SolveInfo("woodbury", time.perf_counter() - t0)
            return out
        out, iters, ok = self._cg(W)
        self.last_solve = SolveInfo("cg", time.perf_counter() - t0, iters, ok)
        return out

    def preconditioner_operator(self) -> FisherOperator | None:
        """The KFAC operator whose inverse preconditions CG (built on first use)."""
        if self.preconditioner is None:
            return None
        if self._precond is None:
            self._precond = KFAC.from_capture(self.jac, self.damping, "pi")
        return self._precond

    def _cg(self, W: Tensor) -> tuple[Tensor, list[int], bool]:
        from scipy.sparse.linalg import cg

        A = self.to_scipy()
        pc = self.preconditioner_operator()
        M = pc.inverse().to_scipy() if pc is not None else None
        cols, iters, ok = [], [], True
        for j in range(W.shape[1]):
            count = [0]

            def cb(_xk, count=count):
                count[0] += 1

            b = W[:, j].double().cpu().numpy()
            x, info = cg(A, b, rtol=self.cg_rtol, atol=0.0, maxiter=self.cg_maxiter, M=M, callback=cb)
            if info != 0:
                ok = False
                warnings.warn(
                    f"ExactFisher: CG did not reach rtol={self.cg_rtol:g} in {self.cg_maxiter} iterations "
                    f"(column {j})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            cols.append(torch.from_numpy(np.ascontiguousarray(x)))
            iters.append(count[0])
        return torch.stack(cols, 1).to(device=W.device, dtype=self.dtype), iters, ok


class ExactBlock(FisherOperator):
    """``[F•]_ii = U_iU_iᵀ + λI`` of one layer, ``[p_i, p_i]``; solved by Woodbury on K_i (N × N)
    when N ≤ p_i, by a Cholesky of the p_i × p_i block when the layer is smaller than the batch."""

    def __init__(self, lj: LayerJacobian, damping: float) -> None:
        super().__init__(lj.p, _dtype_of(lj))
        self.device = lj.device
        self.lj = lj
        self.lam = check_damping(damping)
        self._chol: Tensor | None = None
        self.small = lj.p < lj.N
        self.name = f"exact block '{lj.spec.name}'"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.lj.matmat(self.lj.rmatmat(V)) + self.lam * V

    @property
    def cholesky(self) -> Tensor:
        """Cholesky factor of ``λI + U_iᵀU_i`` (N × N) or of ``[F•]_ii`` (p_i × p_i), computed once."""
        if self._chol is None:
            if self.small:
                Jr = self.lj.dense_rows()
                M = Jr.T @ Jr / self.lj.B
            else:
                M = self.lj.gram()
            M = M.clone()
            M.diagonal().add_(self.lam)
            self._chol = spd_cholesky(M, f"the exact diagonal block of layer '{self.lj.spec.name}'")
        return self._chol

    def _solve(self, W: Tensor) -> Tensor:
        L = self.cholesky
        if self.small:
            return torch.cholesky_solve(W, L)
        Z = torch.cholesky_solve(self.lj.rmatmat(W), L)
        return (W - self.lj.matmat(Z)) / self.lam


def _dtype_of(lj: LayerJacobian) -> torch.dtype:
    return lj.result_dtype


def cg_preconditioner_rule(N: int, p: int) -> str | None:
    """The ``"auto"`` CG preconditioner: π-KFAC when N ≥ p, none when N < p (F = UUᵀ has rank
    ≤ N, so plain CG converges in ≤ N + 1 steps; measured in ``analysis/bench/woodbury_bench.py``)."""
    return "kfac" if N >= p else None


class BlockDiagonalFisher(BlockDiagonal):
    """The exact diagonal blocks of F•: ``blockdiag([F•]_11, …, [F•]_ℓℓ)`` (3.7).

    Args:
        source: a :class:`Capture` or :class:`Jacobian`.
        damping: λ > 0.
    """

    def __init__(self, source: Capture | Jacobian, damping: float | Damping, *, dtype: torch.dtype = torch.float64) -> None:
        self.jac = Jacobian.coerce(source, dtype)
        self.damping = resolve_damping(damping, self.jac)
        super().__init__([ExactBlock(lj, self.damping) for lj in self.jac.layers], name="block-diagonal")
