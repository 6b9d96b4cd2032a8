"""Damping in the Fisher's scale: scaled dampings resolve to their documented values, and the
mean-loss units claim is proven on a dense tiny net, not asserted."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fisherlab
from fisherlab import Damping
from fisherlab.damping import fisher_scale
from fisherlab.errors import DampingError
from fisherlab.jacobian import Jacobian
from fisherlab.testing import dense_fisher_from_capture

from cases import MODELS, build_model, make_batch
from oprefs import cached_capture, quiet_measurements

UNITS_RTOL = 1e-10
"""The same float64 algebra in two unit systems (scaled by d_y, d_y²): ~1e-14, margin 1e4."""


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_scales_resolve_to_their_definitions(case_id):
    cap = cached_capture(case_id, "mse", "mc")
    F = dense_fisher_from_capture(cap)
    ev = torch.linalg.eigvalsh(F)
    top = float(ev[-1])
    rank = int((ev > 1e-10 * top).sum())
    assert Damping(1e-3, "max").resolve(cap) == pytest.approx(1e-3 * top, rel=1e-10)
    assert Damping(0.5, "mean").resolve(cap) == pytest.approx(0.5 * float(torch.trace(F)) / rank, rel=1e-10)
    d_y = cap.targets.shape[-1]
    assert Damping(2e-4, "mean-loss").resolve(cap) == pytest.approx(2e-4 * d_y**2, rel=1e-15)
    assert Damping(0.3).resolve(cap) == 0.3
    assert Damping(2e-4, "mean-loss").resolve(cached_capture(case_id, "cross_entropy", "mc")) == 2e-4
    op = fisherlab.ExactFisher(cap, Damping(1e-3, "max"))
    assert op.damping == pytest.approx(1e-3 * top, rel=1e-10)
    assert fisherlab.KFAC(cap, Damping(1e-3, "max")).damping == op.damping


def test_bad_dampings_are_one_line():
    with pytest.raises(DampingError, match="damping scale must be one of absolute, max, mean, mean-loss"):
        Damping(1.0, "huge")
    with pytest.raises(DampingError, match="finite and > 0"):
        Damping(-1.0, "max")
    with pytest.raises(DampingError, match="needs the capture"):
        fisherlab.damping.resolve_damping(Damping(1.0, "max"))


def _mean_loss_reference(case_id: str, alpha: float):
    """ζ for the loss averaged over its d_y outputs, L_mean = ½‖y − z‖²/d_y, from scratch: dense
    per-example gradients of L_mean by torch.func (empirical Fisher, true labels)."""
    case = MODELS[case_id]
    model = build_model(case)
    x, y = make_batch(case, "mse", B=3, seed=1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, yb):
        z = functional_call(model, p, (xb[None],))[0]
        return 0.5 * ((yb - z) ** 2).mean()

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    J = torch.cat([g[k].reshape(x.shape[0], -1) for k, _ in model.named_parameters()], 1)  # torch order
    F_mean = J.T @ J / x.shape[0]
    h_mean = J.mean(0)
    zeta = torch.linalg.solve(F_mean + alpha * torch.eye(F_mean.shape[0], dtype=torch.float64), h_mean)
    return model, x, y, zeta


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_mean_loss_units_are_the_papers(case_id):
    """ζ_mean(α) = d_y · ζ(α·d_y²): fisherlab's summed-loss ζ at Damping(α, "mean-loss"), times
    d_y, is the natural gradient of the output-averaged loss at λ = α, computed from scratch."""
    alpha = 1e-2
    model, x, y, zeta_mean = _mean_loss_reference(case_id, alpha)
    cap = fisherlab.capture(model, x, y, loss="mse", fisher="empirical", device="cpu", dtype=torch.float64)
    d_y = y.shape[-1]
    F = fisherlab.ExactFisher(cap, Damping(alpha, "mean-loss"))
    assert F.damping == pytest.approx(alpha * d_y**2)
    zeta = cap.to_torch_order(F.solve(cap.grad))
    assert float((d_y * zeta - zeta_mean).norm()) <= UNITS_RTOL * float(zeta_mean.norm())


def _scaled(cap, d: float):
    """The capture of the loss divided by d: every backpropagated vector g and ∇h divided by d."""
    layers = [
        fisherlab.LayerCapture(lc.spec, lc.positions, lc.a, None if lc.g is None else lc.g / d,
                               None if lc.dense is None else lc.dense / d, lc.A, None if lc.G is None else lc.G / d**2)
        for lc in cap.layers
    ]
    return fisherlab.Capture(cap.layout, layers, cap.grad / d, cap.loss_value / d, cap.loss, cap.fisher, cap.B, cap.K,
                             cap.targets, cap.sampled, cap.seed, dict(cap.model), dict(cap.meta))


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_every_relative_error_is_the_same_in_both_units(case_id):
    cap = cached_capture(case_id, "mse", "mc")
    d_y = cap.targets.shape[-1]
    alpha = 0.05
    with quiet_measurements():
        summed = fisherlab.compare(cap, Damping(alpha, "mean-loss"))
        mean = fisherlab.compare(_scaled(cap, d_y), alpha)
    assert summed.meta["damping"] == pytest.approx(alpha * d_y**2)
    for a, b in zip(summed.rows, mean.rows):
        assert a["method"] == b["method"]
        if not fisherlab.methods.get(a["method"]).scale_covariant:  # FOOF's A ⊗ I ignores the loss scale
            continue
        for col in ("relative_error", "reduction_ratio", "euclidean_relative_error", "cosine"):
            if not math.isnan(a[col]):
                assert a[col] == pytest.approx(b[col], rel=UNITS_RTOL, abs=1e-13), (a["method"], col)
    assert summed.meta["damping_scales"]["mean-loss"] == pytest.approx(alpha)



def test_table_reports_the_damping_in_every_scale():
    cap = cached_capture("mlp", "mse", "mc")
    scale = fisher_scale(Jacobian.from_capture(cap))
    t = fisherlab.compare(cap, Damping(1e-2, "max"), ["kfac"])
    assert t.meta["damping"] == pytest.approx(1e-2 * scale.lambda_max)
    assert t.meta["damping_scales"]["max"] == pytest.approx(1e-2)
    assert "λ = 0.01 × λ_max(F)" in str(t) and "λ/λ_max = 0.01" in str(t)


@pytest.mark.parametrize("lam", [1e300, 5e-324, 1e-200])
def test_dampings_that_over_or_underflow_are_refused(lam):
    with pytest.raises(DampingError, match="outside"):
        fisherlab.ExactFisher(cached_capture("mlp", "mse", "mc"), lam)
