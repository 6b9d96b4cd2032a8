"""Exact identities of the operators (STYLE.md habit 5): each holds to round-off, whatever the data.

(3.16) factorization of the two-level error operator; (4.6) gap = direct difference (also TKO);
multiplicative gap ≤ 0; taylor(1) = residuals; Krylov(m = 1) = its base space; a coarse space
spanning Rᵖ gives ζ; KFAC (Tikhonov) = exact block diagonal for one example of a Linear net;
Kronecker eigenvalues = factor eigenvalue products; Woodbury = dense solve. Property tests
(hypothesis) over random tiny MLPs for Woodbury and (4.6).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fisherlab
from fisherlab.operators import KFAC, TKO, BlockDiagonalFisher, ExactFisher, TwoLevelKFAC

from oprefs import (
    DAMPING,
    cached_capture,
    dense_fbullet,
    dense_kfac,
    dense_R0T,
    eye,
    fnorm2,
    same_span,
)

ID_RTOL = 1e-10
"""Identities in float64 through Cholesky/eigh/QR on matrices with cond ≲ 1e3 (λ = 0.1): ~1e-13, margin 1e3."""
SPAN_TOL = 1e-9
"""Residual of a unit column outside an orthonormal span that should contain it."""
PROP_ULPS = 1e3
"""Property tests: errors are allowed up to PROP_ULPS · ε · λ_max(F•)/λ relative to the natural
scale of the quantity. λ_max(F•)/λ ≥ κ(F•) bounds the dense solves, and it is the right scale for
Woodbury: (w − U(λI + K)⁻¹Uᵀw)/λ cancels terms of size ‖w‖ before dividing by λ, so its forward
error is ~ε‖K‖/λ even when κ(F•) is 1 (e.g. p = 1, F = 5.6, λ = 2e-3: κ = 1, ‖K‖/λ = 2.9e3)."""
EPS = torch.finfo(torch.float64).eps

LOSS = "cross_entropy"
COARSE = ["nicolaides", "spectral", "krylov-nicolaides", "residuals", "krylov-residuals", "taylor"]


def close(x, y, rtol=ID_RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


@pytest.fixture
def cap(model_case, mode):
    return cached_capture(model_case.id, LOSS, mode)


@pytest.fixture(params=COARSE)
def coarse(request):
    return request.param


def direct_gap(cap, lam, zeta_kfac, correction):
    """𝔈(β) − 𝔈(0) with 𝔈(β) = ‖ζ_KFAC + R_0ᵀβ − ζ‖²_F• (4.1), ζ by a dense solve."""
    Fb = dense_fbullet(cap, lam)
    zeta = torch.linalg.solve(Fb, cap.grad.double())
    return fnorm2(Fb, zeta_kfac + correction - zeta) - fnorm2(Fb, zeta_kfac - zeta), fnorm2(Fb, zeta)


# ---- (3.16) -------------------------------------------------------------------------------------
def test_error_operator_factorizes(cap, coarse):
    """I − F•2L⁻¹F• = (I − R_0ᵀF_c⁻¹R_0F•)(I − F•KFAC⁻¹F•) (3.16), all dense."""
    op = TwoLevelKFAC(cap, DAMPING, coarse)
    Fb = dense_fbullet(cap, DAMPING)
    I = eye(op.p)
    R0T = dense_R0T(op.V)
    Fc = R0T.T @ Fb @ R0T
    rhs = (I - R0T @ torch.linalg.solve(Fc, R0T.T @ Fb)) @ (I - torch.linalg.solve(dense_kfac(cap, DAMPING), Fb))
    lhs = I - op.inverse().to_dense() @ Fb
    assert close(lhs, rhs)
    assert close(op.error_operator(I), rhs)


# ---- (4.6) ----------------------------------------------------------------------------------------
def test_gap_equals_direct_difference(cap, coarse):
    op = TwoLevelKFAC(cap, DAMPING, coarse)
    d, scale = direct_gap(cap, DAMPING, op.zeta_kfac, op.R0T(op.beta())[:, 0])
    assert op.gap() == pytest.approx(d, rel=ID_RTOL, abs=ID_RTOL * scale)


@pytest.mark.parametrize("coarse_operator", ["exact", "kronecker"])
def test_tko_gap_equals_direct_difference(cap, model_case, coarse_operator):
    if coarse_operator == "kronecker" and model_case.conv:
        pytest.skip("the Kronecker F_coarse (3.18) is for Linear layers")
    op = TKO(cap, DAMPING, coarse_operator)
    d, scale = direct_gap(cap, DAMPING, op.zeta_kfac, op.R0T(op.beta())[:, 0])
    assert op.gap() == pytest.approx(d, rel=ID_RTOL, abs=ID_RTOL * scale)
    assert close(op.solve(cap.grad), op.zeta_kfac + op.R0T(op.beta())[:, 0])


def test_multiplicative_gap_is_nonpositive(cap, coarse):
    """For β* the gap is −(R_0r)ᵀF_c⁻¹(R_0r) ≤ 0, and no sign warning is raised."""
    op = TwoLevelKFAC(cap, DAMPING, coarse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = op.gap()
    R0r = op.R0(op.context.residual)
    assert g <= 0
    assert g == pytest.approx(-float(R0r.T @ torch.linalg.solve(op.F_coarse, R0r)), rel=ID_RTOL)


def test_gap_of_any_beta(cap):
    """(4.6) holds for any β, not only the minimizer."""
    op = TwoLevelKFAC(cap, DAMPING, "krylov-residuals")
    beta = torch.randn(op.coarse_dim, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d, scale = direct_gap(cap, DAMPING, op.zeta_kfac, op.R0T(beta)[:, 0])
    assert op.gap(beta) == pytest.approx(d, rel=ID_RTOL, abs=ID_RTOL * scale)


# ---- coarse-space identities ---------------------------------------------------------------------
def test_taylor_one_is_residuals(cap):
    t = TwoLevelKFAC(cap, DAMPING, "taylor", q=1)
    r = TwoLevelKFAC(cap, DAMPING, "residuals")
    assert t.coarse_dims == r.coarse_dims
    assert all(same_span(a, b, SPAN_TOL) for a, b in zip(t.V, r.V))
    assert close(t.solve(cap.grad), r.solve(cap.grad))


@pytest.mark.parametrize("krylov,base", [("krylov-nicolaides", "nicolaides"), ("krylov-residuals", "residuals")])
def test_krylov_with_one_vector_is_its_base(cap, krylov, base):
    k = TwoLevelKFAC(cap, DAMPING, krylov, m=1)
    b = TwoLevelKFAC(cap, DAMPING, base)
    assert k.coarse_dims == b.coarse_dims
    assert all(same_span(x, y, SPAN_TOL) for x, y in zip(k.V, b.V))
    assert close(k.solve(cap.grad), b.solve(cap.grad))


def test_full_coarse_space_gives_exact_zeta(cap):
    """V_i = I_{p_i}: R_0ᵀ spans Rᵖ, so ζ_KFAC + R_0ᵀβ* = ζ whatever KFAC is."""
    op = TwoLevelKFAC(cap, DAMPING, [eye(s.numel) for s in cap.layout.layers])
    assert op.coarse_dim == cap.p
    zeta = torch.linalg.solve(dense_fbullet(cap, DAMPING), cap.grad.double())
    assert close(op.solve(cap.grad), zeta)
    assert close(op.inverse().to_dense(), torch.linalg.inv(dense_fbullet(cap, DAMPING)))


def test_residuals_space_contains_the_kfac_correction(cap):
    """F•KFAC⁻¹r lies in span(R_0ᵀ) for residuals (3.32): β* applied to the first two-level step."""
    op = TwoLevelKFAC(cap, DAMPING, "residuals")
    w = op.kfac.solve(op.residual)
    assert float((w - op.R0T(op.R0(w[:, None]))[:, 0]).norm()) <= SPAN_TOL * float(w.norm())


# ---- KFAC identities ----------------------------------------------------------------------------
@pytest.fixture(params=["mlp", "mlp-nobias"])
def single_example(request):
    return request.param


@pytest.mark.parametrize("mode_1", ["mc", "empirical"])
def test_kfac_tikhonov_is_block_diagonal_for_one_example(single_example, mode_1):
    """B = 1, K = 1, Linear (T = 1): A_i = āāᵀ, G_i = ggᵀ, so A_i ⊗ G_i = (ā⊗g)(ā⊗g)ᵀ = j jᵀ = F_ii
    exactly, and the Tikhonov KFAC A_i⊗G_i + λI equals the exact block [F•]_ii. The π-damped
    (A + π√λI) ⊗ (G + √λ/π I) = A⊗G + λI + π√λ I⊗G + (√λ/π) A⊗I does not: its extra cross terms
    vanish only when A = G = 0."""
    cap = cached_capture(single_example, LOSS, mode_1, B=1, n_samples=1)
    assert cap.N == 1
    bd = BlockDiagonalFisher(cap, DAMPING).to_dense()
    assert close(KFAC(cap, DAMPING, "tikhonov").to_dense(), bd)
    assert not close(KFAC(cap, DAMPING, "pi").to_dense(), bd, 1e-3)


def test_kfac_eigenvalues_are_kronecker_products(cap):
    for mode_ in ("pi", "tikhonov"):
        op = KFAC(cap, DAMPING, mode_)
        for b in op.blocks:
            dense = torch.kron(b.A_damped, b.G_damped) + (DAMPING * eye(b.p) if mode_ == "tikhonov" else 0)
            sA, sG = torch.linalg.eigvalsh(b.A_damped), torch.linalg.eigvalsh(b.G_damped)
            prod = (sA[:, None] * sG[None, :]).reshape(-1) + (DAMPING if mode_ == "tikhonov" else 0)
            assert close(torch.sort(prod).values, torch.linalg.eigvalsh(dense))


def test_woodbury_is_dense_solve(cap):
    op = ExactFisher(cap, DAMPING, solver="woodbury")
    W = torch.randn(op.p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert close(op.solve(W), torch.linalg.solve(dense_fbullet(cap, DAMPING), W))


# ---- property tests over random tiny MLPs --------------------------------------------------------
@st.composite
def random_problem(draw):
    """A random 1–3 layer Linear net (widths 1–6, random biases), B ∈ 1..5, λ ∈ [1e-3, 10], any mode/loss."""
    n_layers = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 6)) for _ in range(n_layers + 1)]
    loss = draw(st.sampled_from(["mse", "bce_logits"] + (["cross_entropy"] if widths[-1] >= 2 else [])))
    mode = draw(st.sampled_from(["mc", "exact", "empirical"]))
    B = draw(st.integers(1, 5))
    K = draw(st.integers(1, 3))
    lam = draw(st.floats(1e-3, 10.0))
    biases = [draw(st.booleans()) for _ in range(n_layers)]
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(n_layers):
        mods.append(nn.Linear(widths[i], widths[i + 1], bias=biases[i]))
        if i < n_layers - 1:
            mods.append(nn.Tanh())
    model = nn.Sequential(*mods).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, widths[0], generator=g, dtype=torch.float64)
    d_y = widths[-1]
    if loss == "cross_entropy":
        y = torch.randint(0, d_y, (B,), generator=g)
    elif loss == "bce_logits":
        y = torch.rand(B, d_y, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(B, d_y, generator=g, dtype=torch.float64)
    cap = fisherlab.capture(model, x, y, loss=loss, fisher=mode, n_samples=K, generator=torch.Generator().manual_seed(seed),
                            device="cpu", dtype=torch.float64)
    return cap, lam


def kappa(Fb, lam):
    """λ_max(F•)/λ ≥ κ(F•): see PROP_ULPS."""
    return float(torch.linalg.eigvalsh(Fb)[-1]) / lam


@given(random_problem())
def test_property_woodbury_is_dense_solve(problem):
    cap, lam = problem
    Fb = dense_fbullet(cap, lam)
    op = ExactFisher(cap, lam, solver="woodbury")
    w = cap.grad.double() + torch.linspace(-1, 1, cap.p, dtype=torch.float64)  # nonzero even when ∇h = 0
    ref = torch.linalg.solve(Fb, w)
    err = float((op.solve(w) - ref).norm())
    assert err <= PROP_ULPS * EPS * kappa(Fb, lam) * float(ref.norm())


@given(random_problem(), st.sampled_from(COARSE + ["tko"]))
def test_property_gap_is_direct_difference(problem, coarse):
    cap, lam = problem
    op = TKO(cap, lam) if coarse == "tko" else TwoLevelKFAC(cap, lam, coarse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a sign warning is itself checked below
        g = op.gap()
    Fb = dense_fbullet(cap, lam)
    d, zeta_norm2 = direct_gap(cap, lam, op.zeta_kfac, op.R0T(op.beta())[:, 0])
    e0 = fnorm2(Fb, op.zeta_kfac - torch.linalg.solve(Fb, cap.grad.double()))
    tol = PROP_ULPS * EPS * kappa(Fb, lam) * (zeta_norm2 + e0 + fnorm2(Fb, op.zeta_kfac))
    assert math.isfinite(g) and abs(g - d) <= tol
    if coarse != "tko":
        assert g <= tol
