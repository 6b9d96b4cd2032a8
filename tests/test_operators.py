"""Every operator against its dense float64 reference (MATH.md §3–§5), over model cases × Fisher modes.

The references are built here from the formulas, from ``dense_fisher_from_capture`` and
``dense_kfac_factors``; the operators are only asked for their coarse blocks V_i, whose spans are
checked separately against independent dense constructions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from fisherlab.errors import DampingError, FisherlabError
from fisherlab.operators import KFAC, TKO, BlockDiagonalFisher, ExactFisher, TwoLevelKFAC

from oprefs import (
    DAMPING,
    cached_capture,
    dense_blocks,
    dense_fbullet,
    dense_kfac,
    dense_R0T,
    dense_two_level_inverse,
    eye,
    kfac_factors_reference,
    pi_of,
    same_span,
)

OP_RTOL = 1e-10
"""Direct (Cholesky/eigh) float64 algebra on matrices with condition numbers ≲ 1e3: ~1e-13, margin 1e3."""
CG_RTOL = 1e-7
"""CG stops at a relative residual 1e-10; the solution error is ≤ cond(F•) × that (cond ≲ 1e3 at λ = 0.1)."""
SPAN_TOL = 1e-8
"""Residual of a reference column (normalised) outside the operator's span: Krylov columns lose ~cond digits."""

LOSS = "cross_entropy"
COARSE = ["nicolaides", "spectral", "krylov-nicolaides", "residuals", "krylov-residuals", "taylor"]
OPERATORS = (
    ["exact-woodbury", "exact-cg", "exact-cg-noprec", "block-diagonal", "kfac", "kfac-tikhonov"]
    + [f"2l-{c}" for c in COARSE]
    + ["tko", "tko-kronecker"]
)


def close(x, y, rtol=OP_RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def build(case_id: str, mode: str, name: str):
    """(operator, dense reference matrix of its ``@``) for one case."""
    cap = cached_capture(case_id, LOSS, mode)
    Fb = dense_fbullet(cap, DAMPING)
    if name == "exact-woodbury":
        return ExactFisher(cap, DAMPING, solver="woodbury"), Fb
    if name == "exact-cg":
        return ExactFisher(cap, DAMPING, solver="cg", preconditioner="kfac"), Fb
    if name == "exact-cg-noprec":
        return ExactFisher(cap, DAMPING, solver="cg", preconditioner=None), Fb
    if name == "block-diagonal":
        return BlockDiagonalFisher(cap, DAMPING), dense_blocks(Fb, cap)
    if name == "kfac":
        return KFAC(cap, DAMPING, "pi"), dense_kfac(cap, DAMPING, "pi")
    if name == "kfac-tikhonov":
        return KFAC(cap, DAMPING, "tikhonov"), dense_kfac(cap, DAMPING, "tikhonov")
    Kd = dense_kfac(cap, DAMPING, "pi")
    Kinv = torch.linalg.inv(Kd)
    if name.startswith("2l-"):
        op = TwoLevelKFAC(cap, DAMPING, name[3:])
        R0T = dense_R0T(op.V)
        return op, torch.linalg.inv(dense_two_level_inverse(Fb, Kinv, R0T))
    if name in ("tko", "tko-kronecker"):
        op = TKO(cap, DAMPING, "exact" if name == "tko" else "kronecker")
        R0T = dense_R0T(op.V)
        Fc = R0T.T @ (Fb if name == "tko" else dense_kronecker_fbar(cap, DAMPING)) @ R0T
        return op, torch.linalg.inv(Kinv + R0T @ torch.linalg.solve(Fc, R0T.T))  # (3.17)
    raise KeyError(name)


def dense_kronecker_fbar(cap, lam):
    """F̄• of (3.18b): A_ij ⊗ G_ij off the diagonal (A_ij = (1/B)Σ_b ā_i ā_jᵀ, G_ij = (1/B)Σ_{b,k} g_i g_jᵀ),
    the π-damped KFAC blocks Ã_i ⊗ G̃_i on it. Linear layers (T = 1) only."""
    L = len(cap.layers)
    a = [lc.a[:, 0].double() for lc in cap.layers]
    g = [lc.g[:, :, 0].double() for lc in cap.layers]  # [B, K, d_out]
    diag = dense_blocks(dense_kfac(cap, lam, "pi"), cap)
    rows = []
    for i in range(L):
        row = []
        for j in range(L):
            si, sj = cap.layout.layers[i], cap.layout.layers[j]
            if i == j:
                row.append(diag[si.offset : si.stop, sj.offset : sj.stop])
            else:
                Aij = sum(torch.outer(a[i][b], a[j][b]) for b in range(cap.B)) / cap.B
                Gij = sum(torch.outer(g[i][b, k], g[j][b, k]) for b in range(cap.B) for k in range(cap.K)) / cap.B
                row.append(torch.kron(Aij, Gij))
        rows.append(torch.cat(row, 1))
    return torch.cat(rows, 0)


@pytest.fixture
def case(model_case, mode):
    return model_case, mode


@pytest.fixture(params=OPERATORS)
def op_ref(request, model_case, mode):
    if request.param == "tko-kronecker" and model_case.conv:
        pytest.skip("the Kronecker F_coarse (3.18) is defined for Linear layers (error tested below)")
    return build(model_case.id, mode, request.param)


# ---- the protocol against the dense references -----------------------------------------------
def test_matvec(op_ref):
    op, M = op_ref
    v = rand(op.p, seed=1)
    assert (op @ v).shape == (op.p,)
    assert close(op @ v, M @ v)


def test_matmat_on_blocks_and_numpy(op_ref):
    op, M = op_ref
    V = rand(op.p, 3, seed=2)
    assert close(op @ V, M @ V)
    assert close(op @ V.numpy(), M @ V)


def test_solve(op_ref):
    op, M = op_ref
    w = rand(op.p, 1 if op.name == "exact" and op.solver == "cg" else 2, seed=3)
    tol = CG_RTOL if op.name == "exact" and op.solver == "cg" else OP_RTOL
    assert close(op.solve(w), torch.linalg.solve(M, w), tol)
    assert close(op.inverse() @ w[:, 0], torch.linalg.solve(M, w[:, 0]), tol)


def test_to_dense(op_ref):
    op, M = op_ref
    assert op.to_dense().shape == (op.p, op.p) == op.shape
    assert close(op.to_dense(), M)


def test_to_scipy_agrees_with_matmul(op_ref):
    op, _ = op_ref
    A = op.to_scipy()
    v = rand(op.p, seed=4)
    assert A.shape == op.shape
    assert np.allclose(A @ v.numpy(), (op @ v).numpy(), rtol=1e-14, atol=0)
    V = rand(op.p, 2, seed=5)
    assert np.allclose(A @ V.numpy(), (op @ V).numpy(), rtol=1e-14, atol=0)
    if op.symmetric:
        assert np.allclose(A.T @ v.numpy(), (op @ v).numpy(), rtol=1e-14, atol=0)


# ---- ExactFisher --------------------------------------------------------------------------------
def test_exact_reports_its_solver(case):
    (mc, mode) = case
    wood, _ = build(mc.id, mode, "exact-woodbury")
    cg, _ = build(mc.id, mode, "exact-cg")
    plain, _ = build(mc.id, mode, "exact-cg-noprec")
    assert wood.report().startswith("woodbury") and cg.report().startswith("cg")
    assert "KFAC-preconditioned" in cg.report() and "KFAC" not in plain.report()
    cap = cached_capture(mc.id, LOSS, mode)
    assert ExactFisher(cap, DAMPING).solver == "woodbury"  # auto: N × N tiny


def test_exact_cg_records_iterations_and_preconditioning_helps(case):
    (mc, mode) = case
    cap = cached_capture(mc.id, LOSS, mode)
    w = cap.grad.double()
    cg, _ = build(mc.id, mode, "exact-cg")
    plain, _ = build(mc.id, mode, "exact-cg-noprec")
    cg.solve(w)
    plain.solve(w)
    assert cg.last_solve.solver == "cg" and cg.last_solve.converged and plain.last_solve.converged
    assert 0 < cg.last_solve.iterations[0] <= cap.p + 1 and 0 < plain.last_solve.iterations[0] <= 2 * cap.p


def test_exact_fisher_norm(case):
    (mc, mode) = case
    op, Fb = build(mc.id, mode, "exact-woodbury")
    V = rand(op.p, 2, seed=6)
    assert close(op.fisher_norm2(V), torch.einsum("pc,pq,qc->c", V, Fb, V))


# ---- BlockDiagonalFisher ------------------------------------------------------------------------
def test_block_diagonal_with_layers_smaller_and_larger_than_N():
    """mlp, exact Fisher, B = 8: N = 32; p_i = 36 > N (Woodbury on K_i), 21 and 16 < N (p_i × p_i Cholesky)."""
    cap = cached_capture("mlp", LOSS, "exact", B=8)
    op = BlockDiagonalFisher(cap, DAMPING)
    assert {b.small for b in op.blocks} == {True, False}
    M = dense_blocks(dense_fbullet(cap, DAMPING), cap)
    w = rand(op.p, 2, seed=7)
    assert close(op.solve(w), torch.linalg.solve(M, w))
    assert close(op.to_dense(), M)


# ---- KFAC ---------------------------------------------------------------------------------------
def test_kfac_factors_and_pi(case):
    (mc, mode) = case
    op, _ = build(mc.id, mode, "kfac")
    cap = cached_capture(mc.id, LOSS, mode)
    for (A, G), (A_, G_), pi in zip(kfac_factors_reference(cap), op.factors, op.pi):
        assert close(A_, A) and close(G_, G)
        assert pi == pytest.approx(pi_of(A, G), rel=1e-13)


def test_kfac_damped_factors(case):
    (mc, mode) = case
    op, _ = build(mc.id, mode, "kfac")
    for b in op.blocks:
        s = DAMPING**0.5
        assert close(b.A_damped, b.A + b.pi * s * eye(b.d_in)) and close(b.G_damped, b.G + s / b.pi * eye(b.d_out))


@pytest.mark.parametrize("damping_mode", ["pi", "tikhonov"])
def test_kfac_eigenvalues_are_products_of_factor_eigenvalues(case, damping_mode):
    (mc, mode) = case
    op, M = build(mc.id, mode, "kfac" if damping_mode == "pi" else "kfac-tikhonov")
    ev = torch.sort(op.eigenvalues()).values
    assert close(ev, torch.linalg.eigvalsh(M))
    for b in op.blocks:
        sA, sG = torch.linalg.eigvalsh(b.A_damped), torch.linalg.eigvalsh(b.G_damped)
        prod = torch.outer(sG, sA) + (DAMPING if damping_mode == "tikhonov" else 0.0)
        assert close(torch.sort(b.eig.reshape(-1)).values, torch.sort(prod.reshape(-1)).values)


def test_kfac_bad_damping_mode():
    with pytest.raises(ValueError, match="damping_mode"):
        KFAC(cached_capture("mlp", LOSS, "mc"), DAMPING, "heuristic")


# ---- two-level: solve = ζ_KFAC + R_0ᵀβ*, and the coarse spaces ---------------------------------
@pytest.mark.parametrize("coarse", COARSE)
def test_two_level_solve_is_zeta_kfac_plus_coarse_step(case, coarse):
    (mc, mode) = case
    op, _ = build(mc.id, mode, f"2l-{coarse}")
    cap = cached_capture(mc.id, LOSS, mode)
    z = op.solve(cap.grad)
    assert close(op.zeta_kfac, op.kfac.solve(cap.grad))
    assert close(z, op.zeta_kfac + op.R0T(op.beta())[:, 0])
    assert op.coarse_dim == sum(op.coarse_dims) == sum(v.shape[1] for v in op.V)
    for v in op.V:  # orthonormal blocks
        assert close(v.T @ v, eye(v.shape[1]))


SPECTRAL_RTOL = 1e-8  # the documented cluster tolerance of fisherlab.operators.coarse.Spectral
SPECTRAL_CAP = 8  # and its largest eigenspace taken whole


def spectral_reference(Kii: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """The documented SPECTRAL rule, from a dense eigendecomposition: the k smallest eigenvectors,
    with a degenerate k-th eigenvalue's whole eigenspace when it has ≤ 8 dimensions, else the
    eigenvectors below it plus the component of the layer's residual r in that eigenspace."""
    ev, Q = torch.linalg.eigh(Kii)
    k = min(k, ev.numel())
    t = float(ev[k - 1])
    below = Q[:, ev < t - SPECTRAL_RTOL * abs(t)]
    E = Q[:, (ev - t).abs() <= SPECTRAL_RTOL * abs(t)]
    needed = k - below.shape[1]
    if E.shape[1] <= max(needed, SPECTRAL_CAP):
        return torch.cat([below, E], 1)
    cols = [below]
    for v in (r, torch.ones_like(r))[:needed]:  # then the constant vector's component
        c = E @ (E.T @ v)
        if float(c.norm()) > 1e-10 * float(v.norm()):  # else only round-off: dropped
            cols.append(c)
    return torch.cat(cols, 1)


def expected_blocks(cap, coarse: str) -> list[torch.Tensor]:
    """The raw V_i of MATH.md §5, built densely and independently of fisherlab.operators."""
    Fb = dense_fbullet(cap, DAMPING)
    Kd = dense_kfac(cap, DAMPING, "pi")
    w = cap.grad.double()
    r = w - Fb @ torch.linalg.solve(Kd, w)  # (3.13)
    out = []
    for s in cap.layout.layers:
        sl = slice(s.offset, s.stop)
        Kii = Kd[sl, sl]
        one = torch.ones(s.numel, 1, dtype=torch.float64)
        if coarse == "nicolaides":
            out.append(one)
        elif coarse == "spectral":
            out.append(spectral_reference(Kii, r[sl, None], 1))
        elif coarse == "krylov-nicolaides":
            out.append(torch.cat([one, torch.linalg.solve(Kii, one)], 1))
        elif coarse == "residuals":
            out.append(torch.linalg.solve(Kii, r[sl, None]))
        elif coarse == "krylov-residuals":
            v = torch.linalg.solve(Kii, r[sl, None])
            out.append(torch.cat([v, torch.linalg.solve(Kii, v)], 1))
    if coarse == "taylor":
        w1 = torch.linalg.solve(Kd, r)
        w2 = torch.linalg.solve(Kd, Fb @ w1)
        out = [torch.stack([w1[s.offset : s.stop], w2[s.offset : s.stop]], 1) for s in cap.layout.layers]
    return out


@pytest.mark.parametrize("coarse", COARSE)
def test_coarse_space_spans_the_formula(case, coarse):
    (mc, mode) = case
    op, _ = build(mc.id, mode, f"2l-{coarse}")
    cap = cached_capture(mc.id, LOSS, mode)
    Kd = dense_kfac(cap, DAMPING, "pi")
    for i, (V, W, s) in enumerate(zip(op.V, expected_blocks(cap, coarse), cap.layout.layers)):
        assert same_span(V, W, SPAN_TOL), (coarse, i)


def test_spectral_k_smallest_eigenpairs(case):
    (mc, mode) = case
    cap = cached_capture(mc.id, LOSS, mode)
    op = TwoLevelKFAC(cap, DAMPING, "spectral", k=3)
    Kd = dense_kfac(cap, DAMPING, "pi")
    Fb = dense_fbullet(cap, DAMPING)
    w = cap.grad.double()
    r = w - Fb @ torch.linalg.solve(Kd, w)
    for s, V, b in zip(cap.layout.layers, op.V, op.kfac.blocks):
        Kii = Kd[s.offset : s.stop, s.offset : s.stop]
        ev = torch.linalg.eigvalsh(Kii)
        assert same_span(V, spectral_reference(Kii, r[s.offset : s.stop, None], 3), SPAN_TOL)
        # every column lies in an eigenspace of the smallest eigenvalues: R_0 B R_0ᵀ has their values
        assert close(torch.sort(torch.linalg.eigvalsh(V.T @ b.apply(V))).values, ev[: V.shape[1]])


# ---- TKO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coarse_operator", ["exact", "kronecker"])
def test_tko_solve(case, coarse_operator):
    """solve = K⁻¹w + R_0ᵀF_c⁻¹R_0w with F_c exact (3.12) or from the dense F̄• of (3.18)."""
    (mc, mode) = case
    cap = cached_capture(mc.id, LOSS, mode)
    if coarse_operator == "kronecker" and mc.conv:
        with pytest.raises(FisherlabError, match="Linear layers"):
            TKO(cap, DAMPING, "kronecker")
        return
    op = TKO(cap, DAMPING, coarse_operator)
    Kd = dense_kfac(cap, DAMPING, "pi")
    R0T = dense_R0T(op.V)
    Fbar = dense_fbullet(cap, DAMPING) if coarse_operator == "exact" else dense_kronecker_fbar(cap, DAMPING)
    Fc = R0T.T @ Fbar @ R0T
    assert close(op.F_tko, Fc)
    w = rand(op.p, 2, seed=8)
    assert close(op.solve(w), torch.linalg.solve(Kd, w) + R0T @ torch.linalg.solve(Fc, R0T.T @ w))
    assert close(op.beta()[:, 0], torch.linalg.solve(Fc, R0T.T @ cap.grad.double()))


def test_tko_kronecker_error_names_the_layer():
    cap = cached_capture("cnn", LOSS, "mc")
    with pytest.raises(FisherlabError) as e:
        TKO(cap, DAMPING, "kronecker")
    msg = str(e.value)
    assert "\n" not in msg and "(3.18)" in msg and cap.layout.layers[0].name in msg


def test_tko_unknown_coarse_operator():
    with pytest.raises(ValueError, match="coarse_operator"):
        TKO(cached_capture("mlp", LOSS, "mc"), DAMPING, "diagonal")


# ---- errors -------------------------------------------------------------------------------------
CONSTRUCTORS = {
    "exact": lambda cap, lam: ExactFisher(cap, lam),
    "block-diagonal": lambda cap, lam: BlockDiagonalFisher(cap, lam),
    "kfac": lambda cap, lam: KFAC(cap, lam),
    "two-level": lambda cap, lam: TwoLevelKFAC(cap, lam, "nicolaides"),
    "tko": lambda cap, lam: TKO(cap, lam),
}


@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
@pytest.mark.parametrize("lam", [0.0, -1e-3, float("nan"), float("inf"), float("-inf"), "abc", None])
def test_bad_damping(kind, lam):
    with pytest.raises(DampingError) as e:
        CONSTRUCTORS[kind](cached_capture("mlp", LOSS, "mc"), lam)
    assert "\n" not in str(e.value) and "damping" in str(e.value)


@pytest.mark.parametrize("name", ["exact-woodbury", "block-diagonal", "kfac", "2l-nicolaides", "tko"])
@pytest.mark.parametrize("shape", [(5,), (74,), (73, 2, 1), (2, 73)])
def test_wrong_vector_shape(name, shape):
    op, _ = build("mlp", "mc", name)
    assert op.p == 73
    for method in (op.matvec, op.solve):
        with pytest.raises(ValueError, match=r"expected shape \[73\] or \[73, c\]"):
            method(torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
def test_empty_capture(kind):
    cap = cached_capture("mlp", LOSS, "mc")
    empty = type(cap)(**{**cap.__dict__, "layers": []})
    with pytest.raises(FisherlabError, match="empty capture"):
        CONSTRUCTORS[kind](empty, DAMPING)


def test_unknown_coarse_space():
    with pytest.raises(ValueError, match="unknown coarse space 'wavelets'"):
        TwoLevelKFAC(cached_capture("mlp", LOSS, "mc"), DAMPING, "wavelets")


@pytest.mark.parametrize("param", ["k", "m", "q"])
def test_bad_coarse_parameters(param):
    with pytest.raises(ValueError, match=f"parameter {param}"):
        TwoLevelKFAC(cached_capture("mlp", LOSS, "mc"), DAMPING, "taylor", **{param: 0})


def test_user_blocks_with_wrong_rows():
    cap = cached_capture("mlp", LOSS, "mc")
    blocks = [torch.ones(s.numel + (i == 1), 1, dtype=torch.float64) for i, s in enumerate(cap.layout.layers)]
    with pytest.raises(ValueError, match="block 1"):
        TwoLevelKFAC(cap, DAMPING, blocks)
    with pytest.raises(ValueError, match="one per layer"):
        TwoLevelKFAC(cap, DAMPING, blocks[:1])


def test_mismatched_damping_of_a_shared_kfac():
    cap = cached_capture("mlp", LOSS, "mc")
    with pytest.raises(ValueError, match="kfac operator has damping"):
        TwoLevelKFAC(cap, DAMPING, "nicolaides", kfac=KFAC(cap, 2 * DAMPING))
    with pytest.raises(ValueError, match="exact operator has damping"):
        TKO(cap, DAMPING, exact=ExactFisher(cap, 2 * DAMPING))
    shared = KFAC(cap, DAMPING)  # the same λ: accepted and reused
    assert TwoLevelKFAC(cap, DAMPING, "nicolaides", kfac=shared).kfac is shared


def test_bad_solver_name():
    with pytest.raises(ValueError, match="solver"):
        ExactFisher(cached_capture("mlp", LOSS, "mc"), DAMPING, solver="lu")


def test_cg_preconditioner_auto_is_kfac_only_when_F_can_have_full_rank():
    """F = UUᵀ has rank ≤ N: plain CG needs ≤ N + 1 steps when N < p, so "auto" drops KFAC there."""
    from cases import MODELS, make_capture

    small, *_ = make_capture(MODELS["mlp"], "mse", "exact", B=3)  # N = 12 < p = 73
    large, *_ = make_capture(MODELS["mlp"], "mse", "exact", B=20)  # N = 80 ≥ p = 73
    assert ExactFisher(small, DAMPING, solver="cg").preconditioner is None
    assert ExactFisher(large, DAMPING, solver="cg").preconditioner == "kfac"
    with pytest.raises(ValueError, match="preconditioner"):
        ExactFisher(small, DAMPING, preconditioner="jacobi")
