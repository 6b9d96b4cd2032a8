"""The per-example Jacobian core (MATH.md §3) against dense J = capture.per_example_gradients().

U = Jᵀ/√B with J [N, p]: Uᵀx = J x/√B, Uy = Jᵀy/√B, K_i = J_iJ_iᵀ/B; every model case ×
storage (factored/dense) × Fisher mode, float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import fisherlab.jacobian as jacobian_mod
from fisherlab.errors import FisherlabError
from fisherlab.jacobian import Jacobian
from fisherlab.testing import dense_kfac_factors

from oprefs import cached_capture

RTOL = 1e-12
"""float64 products of O(1) numbers over ≤ a few hundred terms: round-off ~1e-15, margin 1e3."""
F32_RTOL = 2e-5
"""float32-stored capture vs float64 capture: ~100 ulps of float32 (2^-23 ≈ 1.2e-7) through the forward/backward pass."""
COLS = 3  # right-hand sides per product (the products are batched over columns)


def close(x, y, rtol=RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


@pytest.fixture(params=["factored", "dense"])
def storage(request):
    return request.param


@pytest.fixture
def cap(model_case, mode, storage):
    return cached_capture(model_case.id, "cross_entropy", mode, storage=storage)


@pytest.fixture
def jac(cap):
    return Jacobian.from_capture(cap)


@pytest.fixture
def J(cap):
    """Dense per-example rows J [N, p] in float64."""
    return cap.per_example_gradients().double()


def test_storage_is_the_requested_one(cap, storage):
    assert all(lc.storage.value == storage for lc in cap.layers)


def test_rmatmat_is_J_x(cap, jac, J):
    x = torch.randn(cap.p, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert close(jac.rmatmat(x), J @ x / math.sqrt(cap.B))


def test_matmat_is_Jt_y(cap, jac, J):
    y = torch.randn(cap.N, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert close(jac.matmat(y), J.T @ y / math.sqrt(cap.B))


def test_layer_grams(cap, jac):
    for lj, lc in zip(jac.layers, cap.layers):
        Ji = lc.jacobian().double()
        assert close(lj.gram(), Ji @ Ji.T / cap.B), lj.spec.name


def test_total_gram(cap, jac, J):
    assert close(jac.gram, J @ J.T / cap.B)


def test_products_with_a_single_column(cap, jac, J):
    x = torch.randn(cap.p, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert close(jac.rmatmat(x), J @ x / math.sqrt(cap.B))


def test_products_split_into_column_chunks(cap, jac, J, monkeypatch):
    """The temporaries bound splits the columns; the result must not depend on it."""
    monkeypatch.setattr(jacobian_mod, "_MAX_TEMP_NUMEL", 1)
    x = torch.randn(cap.p, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(cap.N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert close(jac.rmatmat(x), J @ x / math.sqrt(cap.B))
    assert close(jac.matmat(y), J.T @ y / math.sqrt(cap.B))


# ---- conv Gram: the two factored paths -----------------------------------------------------
@pytest.fixture(params=["pairs", "dense"])
def gram_path(request, monkeypatch):
    monkeypatch.setattr(jacobian_mod, "conv_gram_path", lambda *a, path=request.param: path)
    return request.param


@pytest.mark.parametrize("case_id", ["cnn", "cnn-nobias"])
def test_conv_gram_paths_agree(case_id, mode, gram_path):
    cap = cached_capture(case_id, "cross_entropy", mode, storage="factored")
    jac = Jacobian.from_capture(cap)
    conv = [(lj, lc) for lj, lc in zip(jac.layers, cap.layers) if lj.T > 1]
    assert conv
    for lj, lc in conv:
        Ji = lc.jacobian().double()
        assert close(lj.gram(), Ji @ Ji.T / cap.B), (lj.spec.name, gram_path)


def test_conv_gram_path_choice_is_by_cost():
    assert jacobian_mod.conv_gram_path(B=2, K=1, T=100, d_in=4, d_out=2) == "dense"  # tiny p_i, many positions
    assert jacobian_mod.conv_gram_path(B=2, K=1, T=2, d_in=500, d_out=500) == "pairs"  # huge p_i, few positions


# ---- KFAC factors ----------------------------------------------------------------------------
@pytest.mark.parametrize("storage_kfac", ["factored", "dense"])
def test_kfac_factors_match_the_loop_reference(model_case, mode, storage_kfac):
    cap_f = cached_capture(model_case.id, "cross_entropy", mode, storage="factored")
    ref = dense_kfac_factors(cap_f)  # loops over examples and positions
    cap = cached_capture(model_case.id, "cross_entropy", mode, storage=storage_kfac)
    jac = Jacobian.from_capture(cap)
    for lj, (A, G) in zip(jac.layers, ref):
        A_, G_ = lj.kfac_factors
        assert close(A_, A) and close(G_, G), lj.spec.name


# ---- dtypes -------------------------------------------------------------------------------------
def test_float32_capture_computed_in_float64(model_case, mode, storage):
    cap32 = cached_capture(model_case.id, "cross_entropy", mode, storage=storage, dtype=torch.float32)
    cap64 = cached_capture(model_case.id, "cross_entropy", mode, storage=storage)
    j32, j64 = Jacobian.from_capture(cap32), Jacobian.from_capture(cap64)
    assert j32.dtype == torch.float64  # computed in float64 from float32 storage
    assert close(j32.gram, j64.gram, F32_RTOL)
    x = torch.randn(cap64.p, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert close(j32.rmatmat(x), j64.rmatmat(x), F32_RTOL)
    y = torch.randn(cap64.N, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert close(j32.matmat(y), j64.matmat(y), F32_RTOL)


def test_empty_capture_is_refused():
    cap = cached_capture("mlp", "cross_entropy", "mc")
    empty = type(cap)(**{**cap.__dict__, "layers": []})
    with pytest.raises(FisherlabError, match="empty capture"):
        Jacobian.from_capture(empty)


def test_bad_product_shapes_are_refused():
    jac = Jacobian.from_capture(cached_capture("mlp", "cross_entropy", "mc", storage="factored"))
    with pytest.raises(ValueError, match="matrix"):
        jac.layers[0].rmatmat(torch.zeros(jac.layers[0].p, dtype=torch.float64))


# ---- one protocol, two implementations -------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["mlp", "cnn", "linear-positions"])
def test_factored_and_dense_implementations_answer_the_protocol_alike(case_id):
    """The same layer as factors and as dense rows: every protocol method agrees (float64)."""
    from cases import EXTRA_MODELS, MODELS, make_capture
    from fisherlab.jacobian import DenseLayerJacobian, FactoredLayerJacobian, LayerJacobian

    case = {**MODELS, **EXTRA_MODELS}[case_id]
    cap, *_ = make_capture(case, "cross_entropy", "mc", storage="factored")
    gen = torch.Generator().manual_seed(0)
    for lc in cap.layers:
        fac = LayerJacobian(lc.spec, cap.B, cap.K, a=lc.a.double(), g=lc.g.double())
        A, G = fac.kfac_factors
        den = LayerJacobian(lc.spec, cap.B, cap.K, dense=fac.dense_rows(), A_stored=A, G_stored=G)
        assert isinstance(fac, FactoredLayerJacobian) and isinstance(den, DenseLayerJacobian)
        assert fac.factored and not den.factored
        x = torch.randn(fac.p, 3, dtype=torch.float64, generator=gen)
        y = torch.randn(fac.N, 2, dtype=torch.float64, generator=gen)
        QA = torch.linalg.qr(torch.randn(A.shape, dtype=torch.float64, generator=gen))[0]
        QG = torch.linalg.qr(torch.randn(G.shape, dtype=torch.float64, generator=gen))[0]
        pairs = [
            (fac.rmatmat(x), den.rmatmat(x)),
            (fac.matmat(y), den.matmat(y)),
            (fac.gram(), den.gram()),
            (fac.diagonal(), den.diagonal()),
            (fac.eigenbasis_second_moments(QA, QG), den.eigenbasis_second_moments(QA, QG)),
            (fac.rotated(QA, QG).dense_rows(), den.rotated(QA, QG).dense_rows()),
        ]
        for got, want in pairs:
            assert float((got - want).norm()) <= 1e-12 * max(float(want.norm()), 1e-300)
        assert all(torch.equal(p, q) for p, q in zip(fac.kfac_factors, den.kfac_factors))


def test_held_rows_give_the_same_products(cap, jac, J, monkeypatch):
    """Factored layers holding dense rows (:meth:`Jacobian.hold_rows`) answer Uᵀx, Uy and J_i from
    the rows, equal to the dense reference; released, they are back on the factors."""
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)  # every factored layer
    x = torch.randn(cap.p, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randn(cap.N, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    factored = [lj.spec.name for lj in jac.layers if lj.factored]
    assert jac.hold_rows(0) == []  # nothing fits in no memory
    with jac.holding_rows(2**40) as held:
        assert held == sorted(factored, key=lambda n: -jac.layers[jac.layout.index(n)].T)  # most positions first
        assert all(lj.rows_held for lj in jac.layers if lj.spec.name in held)
        assert close(jac.rmatmat(x), J @ x / math.sqrt(cap.B)) and close(jac.matmat(y), J.T @ y / math.sqrt(cap.B))
        for lj in jac.layers:  # into a given out, layer by layer
            out = torch.empty(lj.p, COLS, dtype=torch.float64)
            ref = J[:, lj.spec.offset : lj.spec.stop].T @ y / math.sqrt(cap.B)
            assert lj.matmat(y, out=out) is out and close(out, ref)
    assert not any(getattr(lj, "rows_held", False) for lj in jac.layers)
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 10**9)
    assert jac.hold_rows(2**40) == []  # too few positions for rows to pay


def test_held_rows_of_a_mixed_precision_jacobian(cap, J, monkeypatch):
    """A mixed-precision Jacobian holds its rows in float32, as its products run: the products
    through them are J x and Jᵀy to float32 round-off, returned in float64."""
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)
    jac = Jacobian.coerce(cap, precision="mixed")
    x = torch.randn(cap.p, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.randn(cap.N, COLS, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with jac.holding_rows(2**40) as held:
        assert held == [lj.spec.name for lj in sorted((lj for lj in jac.layers if lj.factored), key=lambda lj: -lj.T)]
        assert all(lj.dense_rows().dtype == torch.float64 for lj in jac.layers)  # mixed: returned in float64
        ux, uy = jac.rmatmat(x), jac.matmat(y)
    assert ux.dtype == uy.dtype == torch.float64
    assert close(ux, J @ x / math.sqrt(cap.B), F32_RTOL) and close(uy, J.T @ y / math.sqrt(cap.B), F32_RTOL)
