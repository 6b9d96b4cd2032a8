"""The anatomy of every error against a dense projector, on the tiny Linear and Conv2d cases:
𝔈 = 𝔈_span + 𝔈_null exactly, each part as the dense P = Jᵀ(JJᵀ)⁺J gives it, the same split of
‖ζ‖²_F•, the per-layer norms and the coefficients along the top eigenvectors of F."""

from __future__ import annotations

import warnings

import pytest
import torch

import fisherlab
from fisherlab.testing import dense_fisher_from_capture

from oprefs import DAMPING, cached_capture

SPLIT_RTOL = 1e-10
"""span + null against 𝔈 (one float64 sum of two non-negative parts): ~1e-15, margin 1e5."""
DENSE_RTOL = 1e-8
"""Each part against the dense projector (a pseudo-inverse of the N × N Gram, cond ≲ 1e6 on these
batches, ×1e-16): ~1e-10, margin 1e2."""

CASES = [("mlp", "cross_entropy", "mc"), ("cnn", "mse", "exact"), ("cnn-nobias", "bce_logits", "empirical")]
METHODS = ["zero", "kfac", "diagonal", "residuals", "tko"]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    cap = cached_capture(*request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # worse-than-zero flags at this λ
        table = fisherlab.compare(cap, DAMPING, METHODS)
    J = cap.per_example_gradients().double() / cap.B**0.5  # Uᵀ: [N, p]
    P = J.T @ torch.linalg.pinv(J @ J.T, rtol=1e-10, hermitian=True) @ J
    F = dense_fisher_from_capture(cap)
    Fb = F + DAMPING * torch.eye(cap.p, dtype=torch.float64)
    zeta = torch.linalg.solve(Fb, cap.grad.double())
    return cap, table, P, F, Fb, zeta


def _increment(cap, name, zeta):
    if name == "zero":
        return torch.zeros_like(zeta)
    return fisherlab.methods.build(name, cap, DAMPING).solve(cap.grad.double())


def _close(a, b, rtol, scale):
    assert abs(a - b) <= rtol * scale, (a, b)


@pytest.mark.parametrize("name", METHODS)
def test_span_null_split_matches_the_dense_projector(case, name):
    cap, table, P, F, Fb, zeta = case
    r = table.row(name)
    e = _increment(cap, name, zeta) - zeta
    E = float(e @ Fb @ e)
    span = float(e @ F @ e) + DAMPING * float((P @ e).pow(2).sum())
    null = DAMPING * float(((torch.eye(cap.p, dtype=torch.float64) - P) @ e).pow(2).sum())
    _close(r["error_span"] + r["error_null"], r["energy_error"], SPLIT_RTOL, r["energy_error"])
    _close(r["energy_error"], E, DENSE_RTOL, E)
    _close(r["error_span"], span, DENSE_RTOL, E)
    _close(r["error_null"], null, DENSE_RTOL, E)


def test_zeta_split(case):
    cap, table, P, F, Fb, zeta = case
    m = table.meta
    z2 = float(zeta @ Fb @ zeta)
    null = DAMPING * float(((torch.eye(cap.p, dtype=torch.float64) - P) @ zeta).pow(2).sum())
    _close(m["zeta_span"] + m["zeta_null"], m["zeta_norm2"], SPLIT_RTOL, z2)
    _close(m["zeta_null"], null, DENSE_RTOL, z2)
    assert m["zeta_null_share"] == pytest.approx(null / z2, rel=DENSE_RTOL, abs=DENSE_RTOL)


@pytest.mark.parametrize("name", ["kfac", "residuals"])
def test_per_layer_errors(case, name):
    cap, table, P, F, Fb, zeta = case
    e = _increment(cap, name, zeta) - zeta
    rows = [r for r in table.layers if r["method"] == name]
    assert [r["layer"] for r in rows] == list(range(len(cap.layout.layers)))
    for r, s in zip(rows, cap.layout.layers):
        ei = e[s.offset : s.stop]
        Fi = Fb[s.offset : s.stop, s.offset : s.stop]
        assert r["error_norm"] == pytest.approx(float(ei.norm()), rel=DENSE_RTOL)
        assert r["error_fisher"] == pytest.approx(float(ei @ Fi @ ei), rel=DENSE_RTOL)


def test_top_modes(case):
    cap, table, P, F, Fb, zeta = case
    ev, V = torch.linalg.eigh(F)
    rows = [r for r in table.modes if r["method"] == "kfac"]
    e = _increment(cap, "kfac", zeta) - zeta
    for r in rows:
        v = V[:, -1 - r["mode"]]
        assert r["eigenvalue"] == pytest.approx(float(ev[-1 - r["mode"]]) + DAMPING, rel=DENSE_RTOL)
        assert abs(r["coefficient"]) == pytest.approx(abs(float(v @ e)), rel=1e-6, abs=1e-9 * float(e.norm()))
        assert abs(r["zeta_coefficient"]) == pytest.approx(abs(float(v @ zeta)), rel=1e-6, abs=1e-9 * float(zeta.norm()))
