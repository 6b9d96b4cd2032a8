"""The released code's protocol as options (issue 13 item 3), each against a dense float64 reference.

Damping variants of KFAC, both coarse right-hand sides, the λ·p_i coarse diagonal, the max-abs
basis, the coefficient, a given coarse matrix, the true gap identity, the logged gap, the EMA
recursions of the optimizers, the Fisher sub-batch and the presets (docs/PROTOCOL.md).
"""

from __future__ import annotations

import math

import pytest
import torch

import fisherlab
from cases import MODELS, build_model, make_batch
from fisherlab.errors import ConfigError
from fisherlab.operators import KFAC, TKO, DampingMode, Protocol, TwoLevelKFAC, coarse_matrix
from fisherlab.optim import KFACOptimizer, TKOOptimizer, TwoLevelKFACOptimizer
from fisherlab.testing import dense_fisher_from_capture, dense_kfac_factors
from oprefs import DAMPING, cached_capture, dense_fbullet, eye, kfac_factors_reference

RTOL = 1e-9
"""Float64 operator vs dense reference on the tiny nets (both ~1e-15 relative; the dense solves
of λ = 0.1 references lose a few digits)."""
ATOL = 1e-12

CASES = ["mlp", "cnn"]
SPACES = ["nicolaides", "residuals", "krylov-nicolaides"]
LAM = DAMPING


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=ATOL * max(1.0, float(b.abs().max()))))


def capture(case: str):
    """Factored storage: conv_damping="released-code" (in the preset) needs the positions T."""
    return cached_capture(case, "cross_entropy", "mc", storage="factored")


def energy(Fb: torch.Tensor, g: torch.Tensor):
    """𝔈(ζ) = ‖ζ − F•⁻¹∇h‖²_F• with the dense exact ζ (4.1)."""
    z = torch.linalg.solve(Fb, g)
    return lambda x: float((x - z) @ Fb @ (x - z))


def layer_size_diag(op) -> torch.Tensor:
    return torch.diag(torch.tensor([float(p) for p, m in zip(op.basis.sizes, op.basis.dims) for _ in range(m)], dtype=torch.float64))


def dense_pieces(op, cap):
    """Dense K⁻¹, R_0ᵀ, F•, F_coarse, ∇h of an operator's pieces."""
    Fb = dense_fbullet(cap, LAM)
    R = torch.block_diag(*op.basis.V)
    Kinv = torch.linalg.inv(op.base.to_dense())
    return Fb, R, Kinv, R.T @ Fb @ R, cap.grad.double()


# ---- damping variants ----------------------------------------------------------------------


def _dense_factored(cap, mode: str) -> torch.Tensor:
    blocks = []
    for A, G in kfac_factors_reference(cap):
        a, b = A.shape[0], G.shape[0]
        if mode == "tikhonov":
            blocks.append(torch.kron(A, G) + LAM * eye(a * b))
            continue
        if mode == "pi":
            pi = math.sqrt((torch.trace(A) / a) / (torch.trace(G) / b))
            sa, sg = pi * math.sqrt(LAM), math.sqrt(LAM) / pi
        elif mode == "sqrt":
            sa = sg = math.sqrt(LAM)
        else:
            sa = sg = LAM
        blocks.append(torch.kron(A + sa * eye(a), G + sg * eye(b)))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("mode", ["pi", "tikhonov", "sqrt", "lambda"])
@pytest.mark.parametrize("case", CASES)
def test_damping_variants_match_dense(case, mode):
    cap = capture(case)
    K = KFAC.from_capture(cap, LAM, mode)
    D = _dense_factored(cap, mode)
    assert close(K.to_dense(), D)
    g = cap.grad.double()
    assert close(K.solve(g), torch.linalg.solve(D, g))
    if mode in ("sqrt", "lambda"):
        shift = math.sqrt(LAM) if mode == "sqrt" else LAM
        b = K.blocks[0]
        assert close(b.A_damped, b.A + shift * eye(b.d_in)) and close(b.G_damped, b.G + shift * eye(b.d_out))


@pytest.mark.parametrize("mode", ["sqrt", "lambda"])
def test_released_code_conv_damping(mode):
    """The released code's conv normalisation (factors A/T and G, step / T): on fisherlab's
    factors (A + TλI) ⊗ (G + λI) for "lambda", (A + √(λT)I) ⊗ (G + √(λ/T)I) for "sqrt";
    Linear layers (T = 1) as the literal mode."""
    cap = capture("cnn")
    K = KFAC.from_capture(cap, LAM, mode, conv_damping="released-code")
    blocks = []
    for (A, G), lc in zip(kfac_factors_reference(cap), cap.layers):
        T = lc.a.shape[1] if lc.spec.kind.value == "conv2d" else 1
        sa, sg = (T * LAM, LAM) if mode == "lambda" else (math.sqrt(LAM * T), math.sqrt(LAM / T))
        blocks.append(torch.kron(A + sa * eye(A.shape[0]), G + sg * eye(G.shape[0])))
    assert [b.positions for b in K.blocks] == [9, 4, 1]
    assert close(K.to_dense(), torch.block_diag(*blocks))
    with pytest.raises(fisherlab.errors.FisherlabError, match="storage='factored'"):
        KFAC.from_capture(cached_capture("cnn", "cross_entropy", "mc"), LAM, mode, conv_damping="released-code")


def test_damping_mode_parse_names_all_four():
    with pytest.raises(ValueError, match="'pi', 'tikhonov', 'sqrt', 'lambda'"):
        DampingMode.parse("sqrt-pi")


# ---- the operators' options ----------------------------------------------------------------


OPTIONS = [
    {},
    {"coarse_rhs": "gradient"},
    {"coarse_diagonal": "layer-size"},
    {"coarse_rhs": "gradient", "coarse_diagonal": "layer-size", "coefficient": 0.3},
    {"coefficient": 2.5},
    {"protocol": "released-code"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("case", CASES)
def test_two_level_step_and_gap_match_dense(case, space, opts):
    """solve = ζ_KFAC + c R_0ᵀF̂⁻¹(R_0r | R_0∇h); the product is its inverse; gap() is the true
    error change against the dense exact ζ, with no ζ in the operator."""
    cap = capture(case)
    op = TwoLevelKFAC.from_capture(cap, LAM, space, **opts)
    Fb, R, Kinv, Fc, g = dense_pieces(op, cap)
    diag = R.T @ R if op.coarse_diagonal == "exact" else layer_size_diag(op)
    F_hat = Fc - LAM * R.T @ R + LAM * diag
    zk = Kinv @ g
    rhs = R.T @ (g - Fb @ zk) if op.coarse_rhs == "residual" else R.T @ g
    beta = torch.linalg.solve(F_hat, rhs)
    step = zk + op.coefficient * R @ beta
    assert close(op.F_hat, F_hat) and close(op.F_coarse, Fc)
    assert close(op.beta()[:, 0], beta)
    assert close(op.solve(g), step)
    assert close(op @ op.solve(g), g)  # forward = the inverse of the step's map
    e = energy(Fb, g)
    assert op.gap() == pytest.approx(e(step) - e(zk), rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("opts", [{}, {"coarse_diagonal": "layer-size", "coefficient": 0.5}, {"protocol": "released-code"}],
                         ids=["paper", "layer-size,c", "released-code"])
@pytest.mark.parametrize("case", CASES)
def test_tko_options_match_dense(case, opts):
    cap = capture(case)
    op = TKO(cap, LAM, "exact", coarse="nicolaides", **opts)
    Fb, R, Kinv, Fc, g = dense_pieces(op, cap)
    diag = R.T @ R if op.coarse_diagonal == "exact" else layer_size_diag(op)
    F_hat = Fc - LAM * R.T @ R + LAM * diag
    step = Kinv @ g + op.coefficient * R @ torch.linalg.solve(F_hat, R.T @ g)
    assert close(op.solve(g), step)
    assert close(op @ op.solve(g), g)
    e = energy(Fb, g)
    assert op.gap() == pytest.approx(e(step) - e(Kinv @ g), rel=1e-8, abs=1e-14)
    with pytest.raises(ValueError, match="R_0w by definition"):
        TKO(cap, LAM, "exact", coarse_rhs="residual")


def test_tko_kronecker_layer_size_diagonal():
    """The released ``tpselepedis`` matrix: V_iᵀ(A_ij ⊗ G_ij)V_j for every i, j (undamped
    diagonal blocks) + λ·p_i on the diagonal."""
    cap = capture("mlp")
    op = TKO(cap, LAM, "kronecker", coarse_diagonal="layer-size")
    a = [lj.a[:, 0] for lj in op.jac.layers]  # [B, d_in']
    gs = [lj.g[:, :, 0].reshape(-1, lj.spec.d_out) for lj in op.jac.layers]  # [B·K, d_out]
    B = op.jac.B
    M = torch.zeros(op.coarse_dim, op.coarse_dim, dtype=torch.float64)
    for i, Vi in enumerate(op.V):
        for j, Vj in enumerate(op.V):
            M[i, j] = float(Vi.T @ torch.kron(a[i].T @ a[j] / B, gs[i].T @ gs[j] / B) @ Vj)
    M += LAM * layer_size_diag(op)
    assert close(op.F_tko, M)


def test_layer_size_diagonal_is_exact_for_all_ones():
    """With the released code's max-abs basis the Nicolaides columns are all ones, so λ·p_i is
    λVᵢᵀVᵢ: the step equals the exact-diagonal one; with the orthonormal basis it over-damps."""
    cap = capture("mlp")
    g = cap.grad.double()
    exact = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_normalization="max-abs")
    size = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_normalization="max-abs", coarse_diagonal="layer-size")
    assert all(bool((v == 1).all()) for v in size.V)
    assert close(size.F_hat, exact.F_coarse) and close(size.solve(g), exact.solve(g))
    ortho = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_diagonal="layer-size")
    assert not close(ortho.solve(g), exact.solve(g), rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_max_abs_basis_spans_the_orthonormal_one(case):
    cap = capture(case)
    g = cap.grad.double()
    ortho = TwoLevelKFAC.from_capture(cap, LAM, "krylov-residuals")
    scaled = TwoLevelKFAC.from_capture(cap, LAM, "krylov-residuals", coarse_normalization="max-abs")
    for V in scaled.V:
        assert close(V.abs().amax(dim=0), torch.ones(V.shape[1], dtype=torch.float64))
    assert scaled.coarse_dims == ortho.coarse_dims
    assert close(scaled.solve(g), ortho.solve(g))  # exact F_coarse: the correction depends on the span only


def test_given_coarse_matrix_and_coarse_matrix_of_a_jacobian():
    cap = capture("cnn")
    op = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides")
    Fb, R, Kinv, Fc, g = dense_pieces(op, cap)
    F_tilde = 0.5 * Fc + 0.1 * eye(op.coarse_dim)
    approx = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_matrix=F_tilde)
    zk = Kinv @ g
    assert close(approx.solve(g), zk + R @ torch.linalg.solve(F_tilde, R.T @ (g - Fb @ zk)))
    assert close(coarse_matrix(op.exact.jac, op.basis, damping=LAM), Fc)
    assert close(coarse_matrix(op.exact, op.basis, diagonal="layer-size"), Fc - LAM * R.T @ R + LAM * layer_size_diag(op))
    with pytest.raises(ValueError, match=r"coarse_matrix must be a \[3, 3\]"):
        TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_matrix=torch.eye(2, dtype=torch.float64))


# ---- the logged gap --------------------------------------------------------------------------


def test_logged_gap_residual_rhs_is_nonpositive_by_construction():
    """rhs R_0r, F̂ = F_c/10: logged = −(R_0r)ᵀF̂⁻¹R_0r ≤ 0, while the step overshoots 10-fold
    and the true error change is +80·(R_0r)ᵀF_c⁻¹R_0r > 0."""
    cap = capture("mlp")
    op = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides")
    u = op.R0(op.context.residual)[:, 0]
    q = float(u @ torch.linalg.solve(op.F_coarse, u))
    approx = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_matrix=op.F_coarse / 10)
    assert approx.logged_gap() == pytest.approx(-10 * q, rel=1e-8)
    assert approx.gap() == pytest.approx(80 * q, rel=1e-8)
    assert approx.logged_gap() <= 0 < approx.gap()


def test_logged_gap_can_be_nonpositive_while_the_true_change_is_positive():
    """A constructed tiny case with coarse_rhs="gradient": an SPD F̃ with F̃v = R_0∇h/α for a v
    with vᵀR_0∇h = δ > 0 and vᵀR_0r > δ/2 gives β = αv, logged = α(δ − 2vᵀR_0r) < 0 and, α
    large, a true change α²vᵀF_cv − 2αvᵀR_0r > 0."""
    cap = capture("mlp")
    op = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_rhs="gradient")
    g = op.R0(op.context.rhs.reshape(-1, 1))[:, 0]
    u = op.R0(op.context.residual)[:, 0]
    delta = 1e-3 * float(u.norm() * g.norm())
    v = u - (float(u @ g) - delta) / float(g @ g) * g
    assert float(v @ g) == pytest.approx(delta) and float(v @ u) > delta / 2
    alpha = 4 * float(v @ u) / float(v @ op.F_coarse @ v)
    F_tilde = torch.outer(g, g) / (alpha * float(g @ v)) + eye(3) - torch.outer(v, v) / float(v @ v)
    approx = TwoLevelKFAC.from_capture(cap, LAM, "nicolaides", coarse_rhs="gradient", coarse_matrix=F_tilde)
    assert close(approx.beta()[:, 0], alpha * v, rtol=1e-7)
    assert approx.logged_gap() <= 0
    assert approx.gap() > 0
    Fb, R, Kinv, _, grad = dense_pieces(approx, cap)
    e = energy(Fb, grad)
    assert approx.gap() == pytest.approx(e(approx.solve(grad)) - e(Kinv @ grad), rel=1e-7)


# ---- the presets -----------------------------------------------------------------------------


def test_presets_set_what_they_say():
    paper, code = Protocol.paper(), Protocol.released_code()
    assert Protocol.parse("released-code") == code and Protocol.parse(None) == paper
    assert (code.coarse_rhs, code.coarse_diagonal, code.coarse_normalization) == ("gradient", "layer-size", "max-abs")
    assert (code.damping_mode, code.fine_damping_mode) == ("sqrt", "lambda")
    assert (code.factor_decay, code.coarse_decay, code.fisher_subbatch) == ("auto", "auto", 0.25)
    assert (code.factor_update_period, code.inverse_update_period, code.coarse_update_period) == (100, 100, 100)
    assert (code.weight_decay_mode, code.kl_clip, code.conv_damping) == ("after", None, "released-code")
    assert code.with_options(coefficient=1e-3).coefficient == 1e-3 and code.with_options(coefficient=1e-3).name == "custom"
    with pytest.raises(ValueError, match="'paper' or 'released-code'"):
        Protocol.parse("code")
    op = TwoLevelKFAC.from_capture(capture("mlp"), LAM, "spectral", protocol="released-code", coefficient=0.1)
    assert (op.coarse_rhs, op.coarse_diagonal, op.coefficient, op.base.damping_mode.value) == ("gradient", "layer-size", 0.1, "lambda")
    model = build_model(MODELS["mlp"])
    kw = dict(lr=0.1, damping=LAM, loss="cross_entropy", seed=0)
    two = TwoLevelKFACOptimizer(model, protocol="released-code", **kw)
    assert (two.damping_mode, two.coarse_rhs, two.factor_decay, two.fisher_subbatch) == ("lambda", "gradient", "auto", 0.25)
    assert (two.factor_update_period, two.inverse_update_period, two.coarse_update_period) == (100, 100, 100)
    assert KFACOptimizer(model, protocol="released-code", **kw).damping_mode == "sqrt" and two.weight_decay_mode == "after"
    assert TKOOptimizer(model, protocol="released-code", fine_damping_mode="pi", **kw).damping_mode == "pi"
    paper_opt = TwoLevelKFACOptimizer(model, **kw)
    assert (paper_opt.damping_mode, paper_opt.coarse_rhs, paper_opt.factor_decay, paper_opt.fisher_subbatch) == ("pi", "residual", 0.0, None)
    with pytest.raises(ConfigError, match="coarse_decay"):
        TwoLevelKFACOptimizer(model, coarse_decay=1.5, **kw)
    with pytest.raises(ConfigError, match="fisher_subbatch"):
        TwoLevelKFACOptimizer(model, fisher_subbatch=0, **kw)


# ---- the optimizers: running averages and the sub-batch --------------------------------------


def _steps(opt, case: str, n: int):
    """n steps on n different batches (exact Fisher: no draws); per step the batch factors, the
    batch coarse matrix in that step's basis and the operator."""
    out = []
    for t in range(n):
        x, y = make_batch(MODELS[case], "cross_entropy", B=4, seed=10 + t)
        opt.step(inputs=x, targets=y)
        op = opt.last_operator
        Fd = op.exact.to_dense()
        R = torch.block_diag(*op.basis.V)
        out.append(([lj.kfac_factors for lj in op.exact.jac.layers], R.T @ Fd @ R, op))
    return out


@pytest.mark.parametrize("decay", [0.3, "auto"])
@pytest.mark.parametrize("case", CASES)
def test_ema_of_factors_and_coarse_matrix_over_three_steps(case, decay):
    """A ← ρ_kA + (1 − ρ_k)A_batch (ρ_k = min(1 − 1/k, 0.95) for "auto", k the 0-based step),
    the same for G and for F̃ (refreshed every step), by a hand recursion."""
    model = build_model(MODELS[case])
    opt = TwoLevelKFACOptimizer(model, lr=0.05, damping=LAM, loss="cross_entropy", fisher="exact", seed=0,
                                factor_decay=decay, coarse_decay=decay, record_gap=True)
    steps = _steps(opt, case, 3)
    rho = [0.0, 0.0, 0.5] if decay == "auto" else [0.0, 0.3, 0.3]
    A = G = F = None
    for k, (batch, Fc, op) in enumerate(steps):
        r = rho[k]
        A = [b[0] if a is None else r * a + (1 - r) * b[0] for a, b in zip(A or [None] * len(batch), batch)]
        G = [b[1] if gg is None else r * gg + (1 - r) * b[1] for gg, b in zip(G or [None] * len(batch), batch)]
        F = Fc if F is None else r * F + (1 - r) * Fc
        assert close(op.F_hat, F)
        assert close(op.base.to_dense(), KFAC.from_factors(list(zip(A, G)), LAM).to_dense())
    for (a, gg), (A_opt, G_opt) in zip(zip(A, G), opt.factors):
        assert close(A_opt, a) and close(G_opt, gg)
    h = opt.history[-1]
    assert h["gap"] == pytest.approx(op.gap()) and h["logged_gap"] == pytest.approx(op.logged_gap())


def test_coarse_update_period_reuses_the_matrix():
    model = build_model(MODELS["mlp"])
    opt = TwoLevelKFACOptimizer(model, lr=0.05, damping=LAM, loss="cross_entropy", fisher="exact", seed=0,
                                coarse_update_period=2, factor_update_period=2, inverse_update_period=2)
    (f1, F1, op1), (f2, F2, op2), (f3, F3, op3) = _steps(opt, "mlp", 3)
    assert close(op1.F_hat, F1) and close(op2.F_hat, F1) and close(op3.F_hat, F3)
    assert op2.base is op1.base and op3.base is not op1.base
    assert not close(op2.F_hat, F2, rtol=1e-6)  # the true batch matrix moved; gap() uses it
    assert op2.gap() != pytest.approx(op2.logged_gap())


@pytest.mark.parametrize("case", CASES)
def test_subbatch_fisher_is_the_drawn_subbatch(case):
    """Factors and coarse matrix of s examples drawn with replacement by the optimizer's
    generator = the dense ones of a capture of x[idx] (loops of fisherlab.testing)."""
    model = build_model(MODELS[case])
    x, y = make_batch(MODELS[case], "cross_entropy", B=6, seed=3)
    opt = TwoLevelKFACOptimizer(model, lr=0.05, damping=LAM, loss="cross_entropy", fisher="exact", seed=7, fisher_subbatch=4)
    ref_model = build_model(MODELS[case])  # the parameters before the step
    opt.step(inputs=x, targets=y)
    idx = opt.last_subbatch
    assert torch.equal(idx, torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(7)))
    sub = fisherlab.capture(ref_model, x[idx], y[idx], loss="cross_entropy", fisher="exact", storage="factored", dtype=torch.float64)
    for (A, G), (A_ref, G_ref) in zip(opt.factors, dense_kfac_factors(sub)):
        assert close(A, A_ref) and close(G, G_ref)
    op = opt.last_operator
    R = torch.block_diag(*op.basis.V)
    F_sub = dense_fisher_from_capture(sub) + LAM * eye(R.shape[0])
    assert close(op.F_hat, R.T @ F_sub @ R)
    assert close(op.F_coarse, R.T @ op.exact.to_dense() @ R)  # the true one: the whole batch
    assert TwoLevelKFACOptimizer(model, lr=0.05, damping=LAM, loss="cross_entropy", fisher_subbatch=0.5)._subbatch_size(6) == 3


def test_state_dict_restores_the_running_state():
    case = "mlp"
    kw = dict(lr=0.05, damping=LAM, loss="cross_entropy", fisher="mc", seed=0, protocol="released-code",
              coarse_update_period=2, factor_update_period=1, inverse_update_period=1)
    model = build_model(MODELS[case])
    opt = TwoLevelKFACOptimizer(model, **kw)
    batches = [make_batch(MODELS[case], "cross_entropy", B=4, seed=20 + t) for t in range(3)]
    for x, y in batches[:2]:
        opt.step(inputs=x, targets=y)
    state = opt.state_dict()
    clone = build_model(MODELS[case])
    clone.load_state_dict(model.state_dict())
    opt2 = TwoLevelKFACOptimizer(clone, **{**kw, "seed": 99})
    opt2.load_state_dict(state)
    assert close(opt2.coarse_average, opt.coarse_average)
    x, y = batches[2]
    opt.step(inputs=x, targets=y)
    opt2.step(inputs=x, targets=y)
    assert close(opt2.last_operator.F_hat, opt.last_operator.F_hat)
    assert torch.allclose(torch.nn.utils.parameters_to_vector(clone.parameters()),
                          torch.nn.utils.parameters_to_vector(model.parameters()), rtol=1e-10, atol=1e-12)


# ---- the training-loop departures: weight decay after preconditioning, KL clipping ------------


def _one_step(opt_cls, model, x, y, **kw):
    opt = opt_cls(model, lr=0.1, loss="cross_entropy", fisher="exact", seed=0, damping=LAM, **kw)
    opt.step(inputs=x, targets=y)
    return opt


@pytest.mark.parametrize("mode", ["preconditioned", "after"])
def test_weight_decay_mode(mode):
    """"preconditioned": θ ← θ − α K⁻¹(∇h + ωθ); "after" (torch SGD's, the released scripts):
    θ ← θ − α(K⁻¹∇h + ωθ)."""
    case, wd = MODELS["mlp"], 0.3
    x, y = make_batch(case, "cross_entropy", B=4, seed=5)
    model = build_model(case)
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    cap = fisherlab.capture(build_model(case), x, y, loss="cross_entropy", fisher="exact", dtype=torch.float64)
    K = KFAC.from_capture(cap, LAM, "pi")
    th = cap.layout.parameters_vector(build_model(case)).double()
    zeta = K.solve(cap.grad.double() + wd * th) if mode == "preconditioned" else K.solve(cap.grad.double()) + wd * th
    opt = _one_step(KFACOptimizer, model, x, y, weight_decay=wd, weight_decay_mode=mode)
    assert opt.weight_decay_mode == mode
    expected = theta0 - 0.1 * cap.layout.to_torch_order(zeta)
    assert close(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), expected)


def test_kl_clip_rescales_the_step():
    """ζ·min(1, √(c / Σ_p|⟨ζ_p, ∇h_p⟩|)) over the weight and bias tensors (constraint_norm)."""
    case, c = MODELS["mlp"], 1e-4
    x, y = make_batch(case, "cross_entropy", B=4, seed=5)
    model = build_model(case)
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    cap = fisherlab.capture(build_model(case), x, y, loss="cross_entropy", fisher="exact", dtype=torch.float64)
    z = cap.layout.to_torch_order(KFAC.from_capture(cap, LAM, "sqrt").solve(cap.grad.double()))
    g = cap.layout.to_torch_order(cap.grad.double())
    total, off = 0.0, 0
    for p in build_model(case).parameters():
        total += abs(float(z[off : off + p.numel()] @ g[off : off + p.numel()]))
        off += p.numel()
    scale = min(1.0, math.sqrt(c / total))
    assert scale < 1
    opt = _one_step(KFACOptimizer, model, x, y, kl_clip=c, damping_mode="sqrt")
    assert opt.history[-1]["kl_scale"] == pytest.approx(scale, rel=1e-10)
    assert close(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta0 - 0.1 * scale * z)
    with pytest.raises(ConfigError, match="kl_clip"):
        KFACOptimizer(build_model(case), lr=0.1, loss="cross_entropy", damping=LAM, kl_clip=-1.0)


def test_natural_gradient_fisher_subbatch():
    """ζ = (F_sub + λI)⁻¹∇h: the Fisher of the drawn sub-batch, the gradient of the batch."""
    from fisherlab.optim import NaturalGradient

    case = MODELS["cnn"]
    x, y = make_batch(case, "cross_entropy", B=5, seed=6)
    model = build_model(case)
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = _one_step(NaturalGradient, model, x, y, fisher_subbatch=3)
    idx = opt.last_subbatch
    full = fisherlab.capture(build_model(case), x, y, loss="cross_entropy", fisher="exact", dtype=torch.float64)
    sub = fisherlab.capture(build_model(case), x[idx], y[idx], loss="cross_entropy", fisher="exact", dtype=torch.float64)
    zeta = torch.linalg.solve(dense_fbullet(sub, LAM), full.grad.double())
    assert close(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta0 - 0.1 * full.layout.to_torch_order(zeta))


def test_explicit_none_overrides_the_preset():
    """fisher_subbatch=None / kl_clip=None given explicitly switch them off under a preset that sets them."""
    model = build_model(MODELS["mlp"])
    kw = dict(lr=0.1, damping=LAM, loss="cross_entropy", seed=0)
    assert TwoLevelKFACOptimizer(model, protocol="released-code", fisher_subbatch=None, **kw).fisher_subbatch is None
    proto = Protocol.released_code().with_options(kl_clip=1e-2)
    assert KFACOptimizer(model, protocol=proto, **kw).kl_clip == 1e-2
    assert KFACOptimizer(model, protocol=proto, kl_clip=None, **kw).kl_clip is None
