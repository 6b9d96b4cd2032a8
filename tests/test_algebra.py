"""The operator algebra against dense float64 matrices on the tiny Linear and Conv2d cases.

Composition, sums, scaling, adjoints, inverses, identity, block-diagonal and ``to_scipy`` of
each, on real operators (F•, KFAC, a non-symmetric two-level operator, the coarse basis R_0) —
every expression compared with the same expression of their dense matrices.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from fisherlab.operators import (
    KFAC,
    BlockDiagonal,
    CoarseBasis,
    ExactFisher,
    Identity,
    Matrix,
    NotInvertibleError,
    TwoLevelKFAC,
)

from oprefs import DAMPING, cached_capture, dense_fbullet, eye

ALG_RTOL = 1e-10
"""Direct float64 algebra on matrices with condition numbers ≲ 1e3 (λ = 0.1): ~1e-13, margin 1e3."""

CASES = ["mlp", "cnn"]


def close(x, y, rtol=ALG_RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


@lru_cache(maxsize=None)
def ops(case_id: str):
    cap = cached_capture(case_id, "cross_entropy", "mc")
    F = ExactFisher(cap, DAMPING)
    K = KFAC(cap, DAMPING)
    T = TwoLevelKFAC(cap, DAMPING, "residuals", kfac=K, exact=F)
    return cap, F, K, T


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case_id", CASES)
def test_atoms_match_their_dense_references(case_id):
    cap, F, K, T = ops(case_id)
    assert close(F.to_dense(), dense_fbullet(cap, DAMPING))
    assert close(T.to_dense() @ T.inverse().to_dense(), eye(cap.p))


@pytest.mark.parametrize("case_id", CASES)
def test_composition_sum_scaling(case_id):
    cap, F, K, T = ops(case_id)
    Fd, Kd, Td = F.to_dense(), K.to_dense(), T.to_dense()
    assert close((F @ K).to_dense(), Fd @ Kd)
    assert close((F @ K @ T).to_dense(), Fd @ Kd @ Td)
    assert close((F + K).to_dense(), Fd + Kd)
    assert close((F - 2.5 * K).to_dense(), Fd - 2.5 * Kd)
    assert close((K * 3.0).to_dense(), 3 * Kd)
    assert close((-T).to_dense(), -Td)
    assert close((Identity(cap.p) - K.inverse() @ F).to_dense(), eye(cap.p) - torch.linalg.solve(Kd, Fd))


@pytest.mark.parametrize("case_id", CASES)
def test_inverses_compose(case_id):
    cap, F, K, T = ops(case_id)
    Fd, Kd, Td = F.to_dense(), K.to_dense(), T.to_dense()
    w = rand(cap.p, 3)
    assert close((F @ K).solve(w), torch.linalg.solve(Fd @ Kd, w))
    assert close((F @ K).inverse().to_dense(), torch.linalg.inv(Fd @ Kd))
    assert close((2.0 * T).solve(w), torch.linalg.solve(2 * Td, w))
    assert close((K.inverse() @ F).to_dense(), torch.linalg.solve(Kd, Fd))
    assert (K.inverse().inverse() is K)
    with pytest.raises(NotInvertibleError, match="sum of operators has no direct solve"):
        (F + K).solve(w)


@pytest.mark.parametrize("case_id", CASES)
def test_adjoints(case_id):
    cap, F, K, T = ops(case_id)
    Fd, Kd, Td = F.to_dense(), K.to_dense(), T.to_dense()
    assert F.T is F
    assert close(T.T.to_dense(), Td.T)
    assert close((F @ T).T.to_dense(), Td.T @ Fd)
    assert close((T + K).T.to_dense(), Td.T + Kd)
    assert close(T.inverse().T.to_dense(), torch.linalg.inv(Td).T)
    assert close(T.T.solve(rand(cap.p)), torch.linalg.solve(Td.T, rand(cap.p)))
    assert close((F @ T).T.inverse().to_dense(), torch.linalg.inv(Td.T @ Fd))
    assert T.T.T is T


@pytest.mark.parametrize("case_id", CASES)
def test_coarse_basis_is_a_rectangular_operator(case_id):
    cap, F, K, T = ops(case_id)
    R0 = T.basis
    assert isinstance(R0, CoarseBasis) and R0.shape == (T.coarse_dim, cap.p) and R0.T.shape == (cap.p, T.coarse_dim)
    R0d = R0.to_dense()
    assert close(R0.T.to_dense(), R0d.T)
    assert close(R0d @ R0d.T, torch.eye(R0.m, dtype=torch.float64))  # orthonormal blocks
    # F_coarse = R_0 F• R_0ᵀ, as the algebra composes it and as the dense matrices do
    assert close((R0 @ F @ R0.T).to_dense(), R0d @ F.to_dense() @ R0d.T)
    assert close(T.F_coarse, R0d @ F.to_dense() @ R0d.T)
    with pytest.raises(NotInvertibleError, match="only square"):
        R0.inverse()


def test_block_diagonal_and_matrix():
    A = Matrix(rand(3, 3) @ rand(3, 3).T + torch.eye(3, dtype=torch.float64), spd=True, what="A")
    B = Matrix(rand(2, 2, seed=1) + 3 * torch.eye(2, dtype=torch.float64), what="B")
    D = BlockDiagonal([A, B])
    Dd = torch.block_diag(A.M, B.M)
    w = rand(5, 2, seed=2)
    assert close(D.to_dense(), Dd) and close(D.solve(w), torch.linalg.solve(Dd, w))
    assert close(D.T.to_dense(), Dd.T) and close(D.T.solve(w), torch.linalg.solve(Dd.T, w))
    with pytest.raises(Exception, match="not positive definite"):
        Matrix(-torch.eye(2, dtype=torch.float64), spd=True, what="a negative matrix").solve(rand(2))


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("expr", ["F@K", "T", "T.T", "F-K", "Kinv@F", "R0"])
def test_to_scipy_of_each(case_id, expr):
    cap, F, K, T = ops(case_id)
    op = {"F@K": F @ K, "T": T, "T.T": T.T, "F-K": F - K, "Kinv@F": K.inverse() @ F, "R0": T.basis}[expr]
    dense = op.to_dense().numpy()
    L = op.to_scipy()
    x = rand(op.shape[1], seed=3).numpy()
    y = rand(op.shape[0], seed=4).numpy()
    assert L.shape == op.shape
    assert np.allclose(L.matvec(x), dense @ x, rtol=ALG_RTOL, atol=0)
    assert np.allclose(L.rmatvec(y), dense.T @ y, rtol=ALG_RTOL, atol=0)
    assert np.allclose(L.matmat(np.stack([x, 2 * x], 1)), dense @ np.stack([x, 2 * x], 1), rtol=ALG_RTOL, atol=0)


def test_shape_mismatch_is_one_line():
    _, F, _, T = ops("mlp")
    with pytest.raises(ValueError, match="cannot compose"):
        T.basis @ T.basis
    with pytest.raises(ValueError, match="cannot add"):
        F + T.basis
