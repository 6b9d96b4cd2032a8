"""The diagonal of F and EKFAC's eigenbasis second moments (issue 14, the fast paths of
``LayerJacobian.diagonal`` / ``eigenbasis_second_moments`` and ``ekfac.range_second_moments``)
against the straightforward dense float64 definitions on the tiny Linear and Conv2d cases:

* ``diag(F_ii) = (1/B) Σ_n j_n∘j_n`` from the dense rows ``J_i = lj.dense_rows()`` (and F_ii from
  autograd, :func:`fisherlab.testing.dense_fisher_from_capture`);
* ``S = diag(QᵀF_iiQ)``, ``Q = Q_A ⊗ Q_G``: the rows rotated by the p_i × p_i Kronecker product,
  ``(J_i Q)∘²`` summed over the rows;
* the loops they replaced (``_second_moments_reference``), K = 1 and K > 1 mc draws, factored and
  dense storage, every chunking branch (chunk sizes monkeypatched down), and the low-rank A of
  ``psd_eigh_from_rows`` whose exact-zero eigenvalues are skipped.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fisherlab import jacobian
from fisherlab.jacobian import Jacobian, LayerJacobian, psd_eigh_from_rows
from fisherlab.operators import EKFAC, DiagonalFisher
from fisherlab.operators.ekfac import range_second_moments
from fisherlab.testing import dense_fisher_from_capture

from oprefs import DAMPING, cached_capture

RTOL = 1e-12
"""The same sums in other orders, float64, p_i ≤ 40: ~1e-15 relative; margin 1e3."""
AUTOGRAD_RTOL = 1e-10
"""Against F from per-example autograd gradients (an independent computation): ~1e-14; margin."""

CASES = ["mlp", "mlp-nobias", "cnn", "cnn-nobias"]
DRAWS = [1, 3]  # K: mc vectors per example


def close(x, y, rtol=RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


def layers_of(case_id, K, storage, B=3):
    cap = cached_capture(case_id, "cross_entropy", "mc", B=B, n_samples=K, storage=storage)
    return cap, Jacobian.coerce(cap).layers


def block(lj):
    """The layer's rows and columns of a p × p matrix."""
    sl = slice(lj.spec.offset, lj.spec.stop)
    return sl, sl


def dense(Q):
    """Q with row-major strides (``torch.kron`` fails on a column-major ``[n, 1]``, which
    ``contiguous()`` leaves as it is)."""
    return Q.new_empty(Q.shape).copy_(Q)


def random_orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0]


def dense_diagonal(lj):
    J = lj.dense_rows()
    return (J * J).sum(0) / lj.B


def dense_second_moments(lj, QA, QG):
    """``S [d_out, k]``: ``(1/B) Σ_n ((Q_A ⊗ Q_G)ᵀ j_n)∘²`` (vec index ``c·d_out + r``)."""
    Y = lj.dense_rows() @ torch.kron(dense(QA), dense(QG))
    return (Y * Y).sum(0).reshape(QA.shape[1], QG.shape[1]).T / lj.B


def bases(lj, gen):
    """The layer's KFAC eigenbasis and a random orthogonal pair."""
    _, QA, _, QG = lj.kfac_eigh
    yield QA, QG
    yield random_orthogonal(QA.shape[0], gen), random_orthogonal(QG.shape[0], gen)


@pytest.mark.parametrize("storage", ["factored", "dense"])
@pytest.mark.parametrize("K", DRAWS)
@pytest.mark.parametrize("case_id", CASES)
def test_diagonal_and_second_moments_equal_the_dense_definitions(case_id, K, storage):
    cap, layers = layers_of(case_id, K, storage)
    gen = torch.Generator().manual_seed(0)
    F = dense_fisher_from_capture(cap)
    for lj in layers:
        d = lj.diagonal()
        assert d.shape == (lj.p,) and close(d, dense_diagonal(lj))
        assert close(d, torch.diagonal(F[block(lj)]), AUTOGRAD_RTOL)
        if lj.factored:
            assert close(d, lj._second_moments_reference(None, None).mT.reshape(-1))
        for QA, QG in bases(lj, gen):
            S = lj.eigenbasis_second_moments(QA, QG)
            assert S.shape == (lj.spec.d_out, lj.spec.d_in_bar)
            assert close(S, dense_second_moments(lj, QA, QG))
            assert close(S, lj._second_moments_reference(QA, QG))


@pytest.mark.parametrize("storage", ["factored", "dense"])
@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_any_columns_of_the_bases_give_those_columns(case_id, storage):
    _, layers = layers_of(case_id, 2, storage)
    gen = torch.Generator().manual_seed(1)
    for lj in layers:
        QA = random_orthogonal(lj.spec.d_in_bar, gen)[:, 1::2]
        QG = random_orthogonal(lj.spec.d_out, gen)[:, : max(1, lj.spec.d_out - 1)]
        S = lj.eigenbasis_second_moments(QA, QG)
        assert S.shape == (QG.shape[1], QA.shape[1]) and close(S, dense_second_moments(lj, QA, QG))


@pytest.mark.parametrize("storage", ["factored", "dense"])
def test_every_chunking_branch_gives_the_same_numbers(monkeypatch, storage):
    """Temporaries capped at a few numbers: rotated column blocks, column tiles and example chunks
    all split with remainders (B = 5, K = 3, the conv layers' T = 9 and 4)."""
    _, layers = layers_of("cnn", 3, storage, B=5)
    gen = torch.Generator().manual_seed(2)
    want = [(dense_diagonal(lj), [(QA, QG, dense_second_moments(lj, QA, QG)) for QA, QG in bases(lj, gen)]) for lj in layers]
    for max_temp, chunk in [(7, 5), (50, 40), (200, 1000)]:
        monkeypatch.setattr(jacobian, "_MAX_TEMP_NUMEL", max_temp)
        monkeypatch.setattr(jacobian, "_SQUARE_SUM_CHUNK_NUMEL", chunk)
        for lj, (d, moments) in zip(layers, want):
            assert close(lj.diagonal(), d)
            for QA, QG, S in moments:
                assert close(lj.eigenbasis_second_moments(QA, QG), S)


def test_the_null_space_of_a_low_rank_a_is_skipped_to_round_off():
    """A wide conv layer at a small batch: A = āᵀā/B has rank B·T < d_in'; psd_eigh_from_rows gives
    its null space exact zero eigenvalues, where ā·Q_A[:, c] = 0: skipping those columns equals
    the full rotation to round-off, and both equal the dense definition."""
    gen = torch.Generator().manual_seed(3)
    B, K, T, d_in, d_out = 2, 3, 4, 30, 5
    spec = dataclasses.replace(layers_of("cnn", 1, "factored")[1][0].spec, d_in=d_in, d_out=d_out, bias=False)
    a = torch.randn(B, T, d_in, dtype=torch.float64, generator=gen)
    g = torch.randn(B, K, T, d_out, dtype=torch.float64, generator=gen)
    lj = LayerJacobian(spec, B, K, a=a, g=g)
    sA, QA = psd_eigh_from_rows(a.reshape(B * T, d_in), 1.0 / B)
    assert int((sA == 0).sum()) == d_in - B * T
    QG = random_orthogonal(d_out, gen)
    full = lj.eigenbasis_second_moments(QA, QG)
    skipped = range_second_moments(lj, sA, QA, QG)
    assert close(skipped, full) and close(skipped, dense_second_moments(lj, QA, QG))
    assert torch.all(skipped[:, sA == 0] == 0)
    # zeros not first (another basis order): the same, by indexing
    perm = torch.randperm(d_in, generator=gen)
    assert close(range_second_moments(lj, sA[perm], QA[:, perm], QG), full[:, perm])
    # no zero: the full computation
    assert close(range_second_moments(lj, sA + 1.0, QA, QG), full)


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_ekfac_with_a_low_rank_a_is_diag_of_the_rotated_block(monkeypatch, case_id):
    """B = 1 and every factor decomposed from its rows (rank ≤ T < d_in'/2): EKFAC skips the null
    columns and still equals diag(QᵀF_iiQ) + λ from autograd's F."""
    monkeypatch.setattr(jacobian, "LOWRANK_EIGH_MIN_DIM", 1)
    cap = cached_capture(case_id, "cross_entropy", "mc", B=1, n_samples=2, storage="factored")
    F = dense_fisher_from_capture(cap)
    op = EKFAC.from_capture(cap, DAMPING)
    skipped = 0
    for blk, lj in zip(op.blocks, Jacobian.coerce(cap).layers):
        skipped += int((blk.sA == 0).sum())
        Q = torch.kron(dense(blk.QA), dense(blk.QG))
        s = torch.diagonal(Q.T @ F[block(lj)] @ Q)
        assert close(blk.second_moments.mT.reshape(-1), s, AUTOGRAD_RTOL)
    assert skipped > 0  # the low-rank branch ran


@pytest.mark.parametrize("storage", ["factored", "dense"])
def test_diagonal_operator_is_diag_f_plus_damping(storage):
    cap = cached_capture("cnn", "cross_entropy", "mc", n_samples=3, storage=storage)
    op = DiagonalFisher.from_capture(cap, DAMPING)
    assert close(op.diagonal(), torch.diagonal(dense_fisher_from_capture(cap)) + DAMPING, AUTOGRAD_RTOL)
