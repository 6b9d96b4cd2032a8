"""The block approximations of issue 11 against their dense float64 definitions, and their exact
properties: FOOF = KFAC with G = I; EKFAC's diagonal is diag(QᵀF_iiQ) (the Frobenius-optimal one in
the KFAC eigenbasis); KFAC-reduce by loops, = KFAC when T = 1; unit-wise / mini-block = masked exact
blocks, = the exact block on a one-output layer; KFOC = the best rank-1 Kronecker product from the
SVD of the dense rearrangement; KPSVD with every term = the exact block; a two-level correction over
each base has gap (4.6) ≤ 0 equal to the direct difference; composed registry keys.

Operator protocol (``@``, ``solve``, ``to_dense``, ``to_scipy``) for every registered method:
tests/test_methods.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import fisherlab
from fisherlab import methods
from fisherlab.methods import METHODS, Family
from fisherlab.operators import (
    EKFAC,
    FOOF,
    KFAC,
    KFOC,
    KPSVD,
    ExactFisher,
    KFACReduce,
    SubBlockFisher,
    TwoLevelKFAC,
    kronecker_svd,
)
from fisherlab.errors import FisherlabError
from fisherlab.jacobian import Jacobian
from fisherlab.testing import dense_kronecker_terms, dense_layer_blocks, dense_reduce_factors

from oprefs import DAMPING, cached_capture, dense_fbullet, eye, kfac_factors_reference, pi_of

RTOL = 1e-10
"""Direct float64 algebra on p ≤ 73 (condition ≲ 1e3 at λ = 0.1): ~1e-13, margin 1e3."""
LANCZOS_RTOL = 1e-8
"""ARPACK at tol = 0 stops at ~1e-12 relative residual of the singular triplet; margin 1e4."""

CASES = ["mlp", "mlp-nobias", "cnn", "cnn-nobias"]


def close(x, y, rtol=RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


def cap_of(case_id, mode="mc", storage="auto"):
    return cached_capture(case_id, "cross_entropy", mode, storage=storage)


def kron_damped(A, G, lam, mode):
    if mode == "pi":
        pi = pi_of(A, G)
        return torch.kron(A + pi * math.sqrt(lam) * eye(A.shape[0]), G + math.sqrt(lam) / pi * eye(G.shape[0]))
    return torch.kron(A, G) + lam * eye(A.shape[0] * G.shape[0])


# ---- FOOF --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping_mode", ["tikhonov", "pi"])
@pytest.mark.parametrize("case_id", CASES)
def test_foof_is_kfac_with_identity_gradient_factor(case_id, damping_mode):
    cap = cap_of(case_id)
    op = FOOF.from_capture(cap, DAMPING, damping_mode)
    ref = torch.block_diag(*[kron_damped(A, eye(G.shape[0]), DAMPING, damping_mode) for A, G in kfac_factors_reference(cap)])
    assert close(op.to_dense(), ref)
    if damping_mode == "tikhonov":  # Benzing's update: X ↦ X (A + λI)⁻¹
        A = kfac_factors_reference(cap)[0][0]
        alt = torch.kron(A + DAMPING * eye(A.shape[0]), eye(cap.layout.layers[0].d_out))
        assert close(op.blocks[0].to_dense(), alt)


# ---- EKFAC -------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["factored", "dense"])
@pytest.mark.parametrize("mode", ["mc", "exact"])
@pytest.mark.parametrize("case_id", CASES)
def test_ekfac_diagonal_is_the_frobenius_optimal_one_in_the_kfac_eigenbasis(case_id, mode, storage):
    cap = cap_of(case_id, mode, storage)
    op = EKFAC.from_capture(cap, DAMPING)
    dense = []
    for blk, F_ii, (A, G) in zip(op.blocks, dense_layer_blocks(cap), kfac_factors_reference(cap)):
        # the basis is the KFAC factors' eigenbasis
        assert close(A @ blk.QA, blk.QA * blk.sA.clamp_min(0), 1e-9) and close(G @ blk.QG, blk.QG * blk.sG.clamp_min(0), 1e-9)
        Q = torch.kron(blk.QA, blk.QG)
        s = torch.diagonal(Q.T @ F_ii @ Q)  # argmin_D ‖F_ii − Q D Qᵀ‖_F over diagonal D
        assert close(blk.second_moments.mT.reshape(-1), s)
        best = torch.linalg.matrix_norm(F_ii - Q @ torch.diag(s) @ Q.T)
        other = torch.linalg.matrix_norm(F_ii - Q @ torch.diag(s * 1.01 + 1e-6) @ Q.T)
        assert best < other
        dense.append(Q @ torch.diag(s + DAMPING) @ Q.T)
    assert close(op.to_dense(), torch.block_diag(*dense))


def test_ekfac_is_the_exact_block_for_one_example_of_a_linear_net():
    cap = cached_capture("mlp", "cross_entropy", "mc", B=1, n_samples=1)
    assert close(EKFAC.from_capture(cap, DAMPING).to_dense(), torch.block_diag(*dense_layer_blocks(cap)) + DAMPING * eye(cap.p))


# ---- KFAC-reduce -------------------------------------------------------------------------------


@pytest.mark.parametrize("damping_mode", ["pi", "tikhonov"])
@pytest.mark.parametrize("case_id", CASES)
def test_kfac_reduce_against_its_loop_factors(case_id, damping_mode):
    cap = cap_of(case_id, storage="factored")
    op = KFACReduce.from_capture(cap, DAMPING, damping_mode)
    ref = torch.block_diag(*[kron_damped(A, G, DAMPING, damping_mode) for A, G in dense_reduce_factors(cap)])
    assert close(op.to_dense(), ref)
    if "cnn" in case_id:  # positions: reduce is not expand
        assert not close(op.to_dense(), KFAC.from_capture(cap, DAMPING, damping_mode).to_dense(), 1e-3)


@pytest.mark.parametrize("damping_mode", ["pi", "tikhonov"])
@pytest.mark.parametrize("mode", ["mc", "exact"])
def test_kfac_reduce_is_kfac_when_one_position(mode, damping_mode):
    cap = cap_of("mlp", mode)
    assert close(KFACReduce.from_capture(cap, DAMPING, damping_mode).to_dense(), KFAC.from_capture(cap, DAMPING, damping_mode).to_dense())


def test_kfac_reduce_refuses_dense_layers_in_one_line():
    with pytest.raises(FisherlabError, match="stored dense: KFAC-reduce needs"):
        methods.build("kfac-reduce", cap_of("cnn", storage="dense"), DAMPING)


# ---- unit-wise, mini-block ---------------------------------------------------------------------


def masked_blocks(cap, size):
    """Each F_ii with only the entries of one output unit and one column chunk kept, + λI."""
    out = []
    for s, F_ii in zip(cap.layout.layers, dense_layer_blocks(cap)):
        d_in, d_out = s.d_in_bar, s.d_out
        idx = torch.arange(d_in * d_out)
        col, row = idx // d_out, idx % d_out
        chunk = col // (d_in if size is None else size)
        mask = (row[:, None] == row[None, :]) & (chunk[:, None] == chunk[None, :])
        out.append(F_ii * mask + DAMPING * eye(s.numel))
    return torch.block_diag(*out)


@pytest.mark.parametrize("path", ["auto", "dense", "woodbury"])
@pytest.mark.parametrize("size", [None, 1, 2, 4])
@pytest.mark.parametrize("case_id", CASES)
def test_sub_blocks_are_the_masked_exact_blocks(case_id, size, path):
    cap = cap_of(case_id, "exact")
    if path == "woodbury" and "cnn" in case_id:
        with pytest.raises(ValueError, match="Woodbury path needs a factored layer with one position"):
            SubBlockFisher.from_capture(cap, DAMPING, size, path=path)
        return
    op = SubBlockFisher.from_capture(cap, DAMPING, size, path=path)
    D = op.to_dense()
    assert close(D, masked_blocks(cap, size))
    v = torch.randn(cap.p, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert close(op.solve(op @ v), v)


@pytest.mark.parametrize("size", [None, 3])
def test_woodbury_sub_blocks_on_active_examples_are_exact(size):
    """Units whose w_{b,r} vanish for some examples (ReLU) factorise only their active examples."""
    from fisherlab.operators.unitwise import SubBlockLayer

    g = torch.Generator().manual_seed(5)
    B, d_in, d_out = 40, 7, 5
    a = torch.randn(B, d_in, generator=g, dtype=torch.float64)
    w = torch.rand(B, d_out, generator=g, dtype=torch.float64)
    w[torch.rand(B, d_out, generator=g) < 0.5] = 0.0
    w[:, 0] = 0.0  # a dead unit
    w[:, 1] = 1.0  # every example active
    s = d_in if size is None else size
    nc = math.ceil(d_in / s)
    Ap = torch.nn.functional.pad(a, (0, nc * s - d_in)).reshape(B, nc, s)
    ref = SubBlockLayer.dense(torch.einsum("br,bci,bcj->rcij", w, Ap, Ap), d_in, DAMPING)
    op = SubBlockLayer.woodbury(a, w, s, DAMPING)
    assert len(op.groups) > 1  # several active-set sizes
    v = torch.randn(op.p, 3, generator=g, dtype=torch.float64)
    assert close(op.to_dense(), ref.to_dense())
    assert close(op.solve(v), ref.solve(v))


def test_mini_block_of_size_one_is_the_diagonal():
    cap = cap_of("cnn")
    assert close(methods.build("mini-block", cap, DAMPING, size=1).to_dense(), methods.build("diagonal", cap, DAMPING).to_dense())


def test_unit_wise_is_the_exact_block_of_a_one_output_layer():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)
    cap = fisherlab.capture(model, x, y, loss="mse", fisher="exact", device="cpu", dtype=torch.float64)
    op = methods.build("unit-wise", cap, DAMPING)
    last = cap.layout.layers[-1]
    F_last = dense_layer_blocks(cap)[-1]
    assert close(op.blocks[-1].to_dense(), F_last + DAMPING * eye(last.numel))


# ---- KFOC, KPSVD -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mc", "exact"])
@pytest.mark.parametrize("case_id", CASES)
def test_kfoc_is_the_best_rank_one_kronecker_product(case_id, mode):
    cap = cap_of(case_id, mode)
    op = KFOC.from_capture(cap, DAMPING, "tikhonov")
    for blk, s, F_ii in zip(op.blocks, cap.layout.layers, dense_layer_blocks(cap)):
        best = dense_kronecker_terms(F_ii, s.d_in_bar, s.d_out, 1)
        A, G = blk.factors
        assert close(torch.kron(A, G), best, 1e-9)
        assert float(torch.linalg.eigvalsh(A)[0]) >= -1e-12 * float(A.norm())  # the PSD choice
    assert close(op.to_dense(), torch.block_diag(*[torch.kron(*b.factors) for b in op.blocks]) + DAMPING * eye(cap.p))
    pi = KFOC.from_capture(cap, DAMPING)  # default: π-damped like KFAC
    assert close(pi.to_dense(), torch.block_diag(*[kron_damped(*b.factors, DAMPING, "pi") for b in op.blocks]))


@pytest.mark.parametrize("solver", ["factors", "dense", "lanczos"])
def test_kronecker_svd_solvers_agree(solver):
    cap = cap_of("mlp", "exact")
    jac = Jacobian.coerce(cap)
    for lj, s, F_ii in zip(jac.layers, cap.layout.layers, dense_layer_blocks(cap)):
        ks = kronecker_svd(lj, 1, solver)
        ref = dense_kronecker_terms(F_ii, s.d_in_bar, s.d_out, 1)
        assert close(torch.kron(ks.A[0], ks.G[0]), ref, LANCZOS_RTOL if solver == "lanczos" else 1e-9), solver


def test_kronecker_svd_lanczos_on_positions():
    cap = cap_of("cnn", "mc")
    jac = Jacobian.coerce(cap)
    lj, s, F_ii = jac.layers[0], cap.layout.layers[0], dense_layer_blocks(cap)[0]
    ks = kronecker_svd(lj, 2, "lanczos")
    assert close(torch.kron(ks.A[0], ks.G[0]) + torch.kron(ks.A[1], ks.G[1]), dense_kronecker_terms(F_ii, s.d_in_bar, s.d_out, 2), LANCZOS_RTOL)


@pytest.mark.parametrize("case_id", CASES)
def test_kpsvd_with_every_term_is_the_exact_block(case_id):
    cap = cap_of(case_id, "exact")
    op = KPSVD.from_capture(cap, DAMPING, r=10**6)
    assert close(op.to_dense(), torch.block_diag(*dense_layer_blocks(cap)) + DAMPING * eye(cap.p), 1e-9)
    w = cap.grad.double()
    assert close(op.solve(w), torch.linalg.solve(op.to_dense(), w), 1e-9)
    assert all(r >= 1 for r in op.ranks)


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_kpsvd_is_the_truncated_kronecker_svd(case_id, r):
    cap = cap_of(case_id, "exact")
    op = KPSVD.from_capture(cap, DAMPING, r=r)
    ref = torch.block_diag(*[dense_kronecker_terms(F, s.d_in_bar, s.d_out, r) for s, F in zip(cap.layout.layers, dense_layer_blocks(cap))])
    assert close(op.to_dense(), ref + DAMPING * eye(cap.p), 1e-9)
    w = cap.grad.double()
    assert close(op @ op.solve(w), w, 1e-9)  # r = 1: eigenbases; r ≥ 2: CG


@pytest.mark.parametrize("cg_path", ["rows", "dense"])
def test_kpsvd_cg_paths_solve_the_same_operator(cg_path):
    """CG in the (A_1, G_1) eigenbasis, terms k ≥ 2 by the factor rows or the rotated d × d terms."""
    cap = cap_of("mlp", "mc")
    op = KPSVD.from_capture(cap, DAMPING, r=3, cg_path=cg_path)
    assert all(b.path == cg_path for b in op.blocks)
    w = torch.stack([cap.grad.double(), torch.randn(cap.p, dtype=torch.float64, generator=torch.Generator().manual_seed(3))], 1)
    assert close(op.solve(w), torch.linalg.solve(op.to_dense(), w), 1e-9)


def test_kpsvd_r1_is_tikhonov_kfoc():
    cap = cap_of("cnn")
    assert close(KPSVD.from_capture(cap, DAMPING, r=1).to_dense(), KFOC.from_capture(cap, DAMPING, "tikhonov").to_dense(), 1e-9)


# ---- coarse corrections over every base; composed keys -----------------------------------------

BASES = ["diagonal", "foof", "ekfac", "kfac-reduce", "unit-wise", "mini-block", "kfoc", "kpsvd"]


@pytest.mark.parametrize("space", ["residuals", "krylov-nicolaides", "taylor"])
@pytest.mark.parametrize("base", BASES)
def test_two_level_gap_over_each_base_is_nonpositive_and_the_direct_difference(base, space):
    cap = cap_of("mlp", "mc")
    K = methods.build(base, cap, DAMPING)
    two = TwoLevelKFAC.from_capture(cap, DAMPING, space, base=K, exact=ExactFisher(cap, DAMPING))
    Fb = dense_fbullet(cap, DAMPING)
    w = cap.grad.double()
    zeta = torch.linalg.solve(Fb, w)
    z0 = torch.linalg.solve(K.to_dense(), w)
    z2 = two.solve(w)

    def E(x):
        return float((x - zeta) @ Fb @ (x - zeta))

    gap = two.gap()
    assert gap <= 0.0
    assert gap == pytest.approx(E(z2) - E(z0), rel=1e-8, abs=1e-12 * float(w @ zeta))


@pytest.mark.filterwarnings("ignore:compare. worse than the zero step")
def test_composed_keys_resolve_and_run_in_compare():
    keys = methods.composed_keys()
    assert "ekfac+residuals" in keys and "kpsvd+tko" in keys
    assert all(k not in METHODS for k in keys)  # METHODS keeps the base entries only
    m = methods.get("ekfac+residuals")
    assert m.family is Family.MULTIPLICATIVE and m.legend == "EKFAC+RESIDU" and methods.legend(m.key) == m.legend
    cap = cap_of("cnn", "mc")
    table = fisherlab.compare(cap, DAMPING, ["kfac", "ekfac", "ekfac+residuals", "mini-block+taylor"], options={"mini-block+taylor": {"size": 2, "q": 3}})
    kf, ek, two = table.row("kfac"), table.row("ekfac"), table.row("ekfac+residuals")
    assert two["energy_error"] <= ek["energy_error"] * (1 + RTOL)  # (4.6) ≤ 0 against its own base
    # the table's gap and ratio are against KFAC, for every row alike
    assert two["energy_error"] - kf["energy_error"] == pytest.approx(two["gap"], rel=1e-8, abs=1e-12 * table.meta["zeta_norm2"])
    assert two["reduction_ratio"] == pytest.approx(two["energy_error"] / kf["energy_error"], rel=1e-8)
    assert "over ekfac" in two["note"]
    op = methods.build("mini-block+taylor", cap, DAMPING, size=2, q=3)
    assert isinstance(op.base, SubBlockFisher) and op.base.blocks[0].size == 2


def test_composed_key_errors_are_one_line():
    with pytest.raises(ValueError, match="'residuals' is not a one-level method"):
        methods.get("residuals+residuals")
    with pytest.raises(ValueError, match="'ekfac' is not a coarse correction"):
        methods.get("kfoc+ekfac")
    with pytest.raises(ValueError, match="method 'ekfac\\+residuals' has no option size"):
        methods.build("ekfac+residuals", cap_of("mlp"), DAMPING, size=3)
