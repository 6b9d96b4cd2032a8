"""KFOC's top-Kronecker-pair solver at scale (issue 14): the ``"factored"`` products of R through
the ``[T, T]`` cores, the reduced bases, and the r = 1 Lanczos from the KFAC start, against the
per-example form and the dense rearrangement of the exact block (float64, tiny Conv2d and
Linear-with-positions cases, factored storage)."""

from __future__ import annotations

import pytest
import torch

from fisherlab.jacobian import Jacobian
from fisherlab.operators import KFOC, kronecker_svd
from fisherlab.operators.kfoc import (
    LANCZOS_TOL,
    _factored_products,
    _rearranged_maps,
    _reduced_rows,
    product_form,
    top_pair_eigh,
)
from fisherlab.testing import dense_kronecker_terms, dense_layer_blocks, van_loan_rearrangement

from cases import D_Y, EXTRA_MODELS, MODELS, ModelCase, make_capture
from oprefs import DAMPING

PRODUCT_RTOL = 1e-12
"""Three orderings of the same float64 sums on d ≤ 19: ~1e-15, margin 1e3."""
WARM_RTOL = 1e-8
"""The r = 1 Lanczos stopped at LANCZOS_TOL = 1e-10 relative residual: the unit vectors are off by
≲ 1e-10·θ/(θ − θ₂) (relative gaps 0.34–0.93 on these cases; measured ≤ 1.3e-10 on wide-cnn, round-off
on the registry's layers, where the Krylov space is all of R^(d_out²) ≤ 9); margin ~70."""
TIGHT_RTOL = 1e-11
"""The same Lanczos run to the round-off stop (tol = 0: 64ε·θ residual), and ARPACK at tol = 0:
measured ≤ 1.8e-14; margin ~500."""

def _wide_cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 6×6 -> 6×6: d_out² = 64 < d_in'² = 784, T = 36
        nn.Tanh(),
        nn.Conv2d(8, 6, 3, stride=2),  # 6×6 -> 2×2: d_in' = 73, T = 4
        nn.Flatten(),
        nn.Linear(24, D_Y),
    )


WIDE = ModelCase("wide-cnn", _wide_cnn, (3, 6, 6), True)
"""Wider than the registry's cases so that the Lanczos stops on its tolerance, not on an invariant
subspace (the registry's conv layers have d_out² ≤ 9)."""

MIXED_RTOL = 1e-4
"""Float32 products (ε ≈ 1.2e-7), stop at 64ε·θ residual, relative gap ≈ 0.34: measured 2.9e-6; margin ~30."""

CASES = [("cnn", "mc"), ("cnn-nobias", "exact"), ("linear-positions", "mc"), ("linear-positions", "exact"),
         ("wide-cnn", "mc"), ("wide-cnn", "exact")]
_CAPTURES: dict = {}


def capture(case_id: str, mode: str, B: int = 3):
    key = (case_id, mode, B)
    if key not in _CAPTURES:
        case = WIDE if case_id == "wide-cnn" else MODELS.get(case_id) or EXTRA_MODELS[case_id]
        _CAPTURES[key] = make_capture(case, "cross_entropy", mode, B=B, storage="factored")[0]
    return _CAPTURES[key]


def positional_layers(cap):
    """``(lj, spec, F_ii)`` of every layer with T > 1."""
    jac = Jacobian.coerce(cap)
    out = [(lj, s, F) for lj, s, F in zip(jac.layers, cap.layout.layers, dense_layer_blocks(cap)) if lj.T > 1]
    assert out and all(lj.factored for lj, _, _ in out)
    return out


def rel(x, y):
    return float((x - y).norm()) / max(float(y.norm()), 1e-300)


def probes(c, d, seed):
    return torch.randn(c, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case_id,mode", CASES)
def test_factored_products_equal_the_per_example_form_and_the_dense_rearrangement(case_id, mode):
    for lj, s, F in positional_layers(capture(case_id, mode)):
        Rm = van_loan_rearrangement(F, s.d_in_bar, s.d_out)  # [d_in'², d_out²]
        X, Y = probes(2, s.d_out, 1), probes(2, s.d_in_bar, 2)
        Rf, RTf = _rearranged_maps(lj, "factored")
        Rp, RTp = _rearranged_maps(lj, "per-example")
        dense_RX = (Rm @ X.reshape(2, -1).T).T.reshape(2, s.d_in_bar, s.d_in_bar)
        dense_RTY = (Rm.T @ Y.reshape(2, -1).T).T.reshape(2, s.d_out, s.d_out)
        assert rel(Rf(X), dense_RX) <= PRODUCT_RTOL and rel(Rp(X), dense_RX) <= PRODUCT_RTOL
        assert rel(RTf(Y), dense_RTY) <= PRODUCT_RTOL and rel(RTp(Y), dense_RTY) <= PRODUCT_RTOL


@pytest.mark.parametrize("B", [1, 3])
def test_products_in_the_reduced_bases_are_exact(B):
    """``āᵀ = Q_a Rq``: ``R X = Q_a R̂(Q_gᵀ X Q_g) Q_aᵀ`` whether the rows are fewer (B = 1) or more
    than the dimension (a rotation then)."""
    for lj, s, F in positional_layers(capture("cnn", "mc", B)):
        Qa, ah = _reduced_rows(lj.a)
        Qg, gh = _reduced_rows(lj.g)
        assert torch.allclose(ah @ Qa.T, lj.a, rtol=0, atol=1e-14 * float(lj.a.abs().max()))
        R, RT = _factored_products(ah, gh, lj.B)
        Rm = van_loan_rearrangement(F, s.d_in_bar, s.d_out)
        X, Y = probes(1, s.d_out, 3), probes(1, s.d_in_bar, 4)
        RX = Qa @ R(Qg.T @ X @ Qg) @ Qa.T
        RTY = Qg @ RT(Qa.T @ Y @ Qa) @ Qg.T
        assert rel(RX.reshape(-1), Rm @ X.reshape(-1)) <= PRODUCT_RTOL
        assert rel(RTY.reshape(-1), Rm.T @ Y.reshape(-1)) <= PRODUCT_RTOL


def test_auto_product_form_by_flops():
    lj = positional_layers(capture("cnn", "mc"))[0][0]
    assert product_form(lj) in ("factored", "per-example")
    lin = Jacobian.coerce(capture("cnn", "mc")).layers[-1]
    assert lin.T == 1 and product_form(lin) == "linear"
    with pytest.raises(ValueError, match="'linear' products need a factored layer with one position"):
        _rearranged_maps(lj, "linear")


def signed_pair(ks):
    return torch.kron(ks.A[0], ks.G[0])


@pytest.mark.parametrize("product,reduce", [("factored", "never"), ("factored", "always"), ("per-example", "never")])
@pytest.mark.parametrize("case_id,mode", CASES)
def test_warm_lanczos_top_pair_is_the_dense_svds(case_id, mode, product, reduce):
    """The r = 1 Lanczos from the KFAC start (both product forms, with/without reduced bases)
    against the top term of the dense SVD; A_1 with a positive trace, σ_1 to the same tolerance."""
    for lj, s, F in positional_layers(capture(case_id, mode)):
        ks = kronecker_svd(lj, 1, "lanczos", product=product, reduce=reduce)
        assert ks.product.startswith(product) and ks.products > 0
        assert rel(signed_pair(ks), dense_kronecker_terms(F, s.d_in_bar, s.d_out, 1)) <= WARM_RTOL
        sigma = torch.linalg.svdvals(van_loan_rearrangement(F, s.d_in_bar, s.d_out))[0]
        assert abs(float(ks.sigma[0] - sigma)) <= WARM_RTOL * float(sigma)
        assert float(torch.diagonal(ks.A[0]).sum()) > 0


@pytest.mark.parametrize("case_id,mode", [CASES[0], CASES[2], CASES[4]])
def test_lanczos_to_round_off_and_the_old_arpack_path(case_id, mode):
    """``tol=0`` (the round-off stop) and ``"arpack"`` from ones with the per-example products (the
    solver before issue 14) give the dense top pair to the tighter tolerance; the KFAC start needs
    no more products than ones."""
    for lj, s, F in positional_layers(capture(case_id, mode)):
        ref = dense_kronecker_terms(F, s.d_in_bar, s.d_out, 1)
        tight = kronecker_svd(lj, 1, "lanczos", tol=0.0)
        old = kronecker_svd(lj, 1, "arpack", product="per-example", start="ones", tol=0.0, reduce="never")
        assert rel(signed_pair(tight), ref) <= TIGHT_RTOL and rel(signed_pair(old), ref) <= TIGHT_RTOL
        ones = kronecker_svd(lj, 1, "lanczos", start="ones")
        warm = kronecker_svd(lj, 1, "lanczos")
        assert warm.products <= ones.products


def test_reduced_top_pair_eigh_is_the_eigh_of_the_lifted_pair():
    """B = 1: the reduced bases apply on both sides; the lifted eigendecomposition (Q W and the
    complement of Q at 0) diagonalises the symmetrised top pair."""
    lj, s, F = positional_layers(capture("cnn", "mc", 1))[-1]
    ks = kronecker_svd(lj, 1, "lanczos", product="factored", reduce="always")
    assert ks.reduced is not None and ks.reduced[0].shape[1] < s.d_in_bar
    sA, QA, sG, QG = top_pair_eigh(lj, ks)
    for M, ev, Q in ((ks.A[0], sA, QA), (ks.G[0], sG, QG)):
        M = (M + M.mT) / 2
        assert rel(Q @ torch.diag(ev) @ Q.T, M) <= PRODUCT_RTOL
        assert rel(Q.T @ Q, torch.eye(Q.shape[0], dtype=Q.dtype)) <= PRODUCT_RTOL
        assert bool((ev[1:] >= ev[:-1]).all())


def test_kfoc_with_the_new_solver_equals_the_dense_kfoc():
    cap = capture("cnn", "exact")
    new = KFOC.from_capture(cap, DAMPING, "tikhonov", solver="lanczos")
    old = KFOC.from_capture(cap, DAMPING, "tikhonov", solver="dense")
    assert rel(new.to_dense(), old.to_dense()) <= WARM_RTOL
    w = cap.grad.double()
    assert rel(new.solve(w), old.solve(w)) <= 1e3 * WARM_RTOL  # condition ≲ 1e3 at λ = 0.1


def test_lanczos_tolerance_is_the_named_default():
    assert 0 < LANCZOS_TOL <= 1e-9


def test_mixed_precision_lanczos_stops_at_float32_round_off():
    """Float32 products cannot reach LANCZOS_TOL: the stop is floored at 64ε of float32."""
    cap = capture("wide-cnn", "mc")
    lj = Jacobian.coerce(cap, precision="mixed").layers[0]
    F = dense_layer_blocks(cap)[0]
    s = cap.layout.layers[0]
    ks = kronecker_svd(lj, 1, "lanczos")
    assert ks.products < 100
    assert rel(signed_pair(ks), dense_kronecker_terms(F, s.d_in_bar, s.d_out, 1)) <= MIXED_RTOL
