"""KFAC's block products through the range of a factor with a null space (:meth:`KroneckerBlock._apply`).

A wide conv layer's A built from fewer rows than its dimension has exact zero eigenvalues
(:func:`fisherlab.jacobian.psd_eigh_from_rows`); its products then skip the null eigenvectors. They
must equal the dense Kronecker matrices (tiny sizes, the threshold lowered) and the full-eigenbasis
products (at the threshold), for every damping mode, on either side.
"""

from __future__ import annotations

import pytest
import torch

from fisherlab.jacobian import psd_eigh_from_rows
from fisherlab.operators import kfac as kfac_mod
from fisherlab.operators.kfac import DampingMode, KroneckerBlock

NULL_RTOL = 1e-11
"""Products of orthonormal eigenbases with condition ≲ 1e4 (λ = 1e-3 against O(1) factors) in float64."""

MODES = [m.value for m in DampingMode]


def _factor(n: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = RᵀR/rows of rank ``rows`` < n: its eigenpairs from the rows (exact zeros first) and A itself."""
    R = torch.randn(rows, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s, Q = psd_eigh_from_rows(R, 1.0 / rows)
    return s, Q, R.T @ R / rows


def _block(side: str, mode: str, big: int, small: int, rank: int):
    sN, QN, N = _factor(big, rank, 0)  # the factor with a null space
    sF, QF, F = _factor(small, 3 * small, 1)  # full rank
    if side == "A":
        return KroneckerBlock((sN, QN, sF, QF), 1e-3, mode, factors=(N, F))
    return KroneckerBlock((sF, QF, sN, QN), 1e-3, mode, factors=(F, N))


def _full(block: KroneckerBlock, V: torch.Tensor, f) -> torch.Tensor:
    return block.from_eigenbasis(block.to_eigenbasis(V) * f(block.eig))


def _close(x, y, rtol=NULL_RTOL) -> bool:
    return float((x - y).norm()) <= rtol * float(y.norm())


@pytest.mark.parametrize("side", ["A", "G"])
@pytest.mark.parametrize("mode", MODES)
def test_range_products_equal_the_dense_kronecker(side, mode, monkeypatch):
    monkeypatch.setattr(kfac_mod, "NULL_SPACE_MIN_DIM", 8)
    b = _block(side, mode, big=12, small=5, rank=4)
    assert b.null == (side, 8)
    D = torch.kron(b.A_damped, b.G_damped) if b.mode.factored else torch.kron(b.A, b.G) + 1e-3 * torch.eye(b.p, dtype=torch.float64)
    V = torch.randn(b.p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _close(b.apply(V), D @ V)
    assert _close(b.solve(V), torch.linalg.solve(D, V))
    evals, evecs = torch.linalg.eigh(D)
    assert _close(b.power(V, -0.5), (evecs * evals.rsqrt()) @ evecs.T @ V)


@pytest.mark.parametrize("side", ["A", "G"])
@pytest.mark.parametrize("mode", ["pi", "tikhonov"])
def test_range_products_equal_the_full_eigenbasis_at_the_threshold(side, mode):
    b = _block(side, mode, big=kfac_mod.NULL_SPACE_MIN_DIM + 44, small=7, rank=40)
    assert b.null == (side, kfac_mod.NULL_SPACE_MIN_DIM + 4)
    V = torch.randn(b.p, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for f, got in ((lambda e: e, b.apply(V)), (torch.reciprocal, b.solve(V)), (lambda e: e.pow(-0.5), b.power(V, -0.5))):
        assert _close(got, _full(b, V, f))


def test_a_small_null_space_keeps_the_full_products():
    b = _block("A", "pi", big=kfac_mod.NULL_SPACE_MIN_DIM, small=4, rank=int(0.9 * kfac_mod.NULL_SPACE_MIN_DIM))
    assert b.null is None


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_factors_decomposed_from_rows_are_never_formed(monkeypatch, case_id):
    """A factor decomposed from its rows (B·T ≤ d_in'/2) is not formed by ``kfac_eigh``; its
    eigenpairs still rebuild the KFAC factor (2.25)–(2.27)."""
    from fisherlab import jacobian
    from fisherlab.jacobian import Jacobian

    from oprefs import cached_capture

    monkeypatch.setattr(jacobian, "LOWRANK_EIGH_MIN_DIM", 1)
    jac = Jacobian.coerce(cached_capture(case_id, "cross_entropy", "mc", B=1, n_samples=2, storage="factored"))
    for lj in jac.layers:
        sA, QA, sG, QG = lj.kfac_eigh
        assert "kfac_factors" not in lj.__dict__  # computed from the rows alone
        A, G = lj.kfac_factors
        assert _close((QA * sA) @ QA.T, A) and _close((QG * sG) @ QG.T, G)
