"""The paper's settings (fisherlab.experiments.paper, issue 13): the output-averaged loss units
against dense references on a tiny net, the unit conversion, Fig. 5 both ways on one batch, and
the verdict table's pure functions on synthetic numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fisherlab.experiments import paper as R
from fisherlab.experiments.paper import verdicts as V
from fisherlab.experiments.paper.results import ProblemResult, RunResult
from fisherlab.experiments.paper.runner import released_rows
from fisherlab.experiments.paper.units import mean_loss_capture
from fisherlab.jacobian import Jacobian
from fisherlab.layout import Layout
from fisherlab.operators import KFAC, ExactFisher

from cases import D_Y, MODELS, make_capture

RTOL = 1e-10
"""float64 identities (scalings by d_y and d_y²)."""


def _dense(cap, lam: float) -> torch.Tensor:
    """F• = F + λI as a dense [p, p] matrix (tiny nets only)."""
    jac = Jacobian.from_capture(cap, torch.float64)
    return ExactFisher(jac, lam).apply(torch.eye(cap.grad.numel(), dtype=torch.float64))


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_mean_loss_capture_is_the_capture_of_the_output_averaged_loss(case):
    cap, model, x, y = make_capture(MODELS[case], "bce_logits", "mc", B=3, n_samples=2)
    cap_m = mean_loss_capture(cap, D_Y)
    # ∇h of torch's mean reduction (over batch and outputs) = fisherlab's summed ∇h / d_y
    model.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    torch_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    ours = Layout.from_model(model, warn=False).to_torch_order(cap_m.grad)
    torch.testing.assert_close(ours, torch_grad, rtol=RTOL, atol=1e-14)
    # F_mean = F / d_y²: F•_mean(λ/d²) = F•(λ)/d²
    lam = 0.3
    torch.testing.assert_close(_dense(cap_m, lam / D_Y**2), _dense(cap, lam) / D_Y**2, rtol=RTOL, atol=1e-14)
    assert cap_m.loss_value == pytest.approx(cap.loss_value / D_Y, rel=RTOL)
    assert mean_loss_capture(cap, 1) is cap


def test_pi_damped_kfac_is_scale_equivariant_but_the_released_shifts_are_not():
    cap, *_ = make_capture(MODELS["mlp"], "bce_logits", "mc", B=3, n_samples=2)
    d, alpha = float(D_Y), 1e-2
    cap_m = mean_loss_capture(cap, d)
    # the paper's equations: ζ_mean(α) = d·ζ(α d²), so lr·d and ω·d map the runs exactly
    z_m = KFAC.from_capture(cap_m, alpha, "pi").solve(cap_m.grad)
    z = KFAC.from_capture(cap, alpha * d**2, "pi").solve(cap.grad)
    torch.testing.assert_close(z_m, d * z, rtol=1e-8, atol=1e-12)
    # the released code's (A+λI)⊗(G+λI) is not: it must see the paper's units themselves
    z_m = KFAC.from_capture(cap_m, alpha, "lambda").solve(cap_m.grad)
    z = KFAC.from_capture(cap, alpha * d**2, "lambda").solve(cap.grad)
    assert float((z_m - d * z).norm() / z_m.norm()) > 0.1


def test_summed_units_converts_each_optimizer():
    ae = R.paper_config(quick=True).fig2[0]
    assert ae.output_factor() == 784.0
    lr, wd, extra = R.summed_units(ae, "kfac", 0.1, 1e-3)
    assert (lr, wd) == pytest.approx((78.4, 0.784)) and extra == {}
    lr, wd, extra = R.summed_units(ae, "sgd", 0.1, 1e-3)
    assert (lr, wd) == pytest.approx((0.1 / 784, 0.784)) and extra == {}
    _, _, extra = R.summed_units(ae, "adam", 1e-3, 1e-3)
    assert extra["eps"] == pytest.approx(784e-8)
    cnn = R.paper_config(quick=True).fig5[0]
    assert cnn.output_factor() == 1.0 and R.summed_units(cnn, "kfac", 0.1, 1e-3)[:2] == pytest.approx((0.1, 1e-3))


def test_released_rows_on_one_batch():
    cap, *_ = make_capture(MODELS["mlp"], "bce_logits", "mc", B=4, n_samples=1)
    sub, *_ = make_capture(MODELS["mlp"], "bce_logits", "mc", B=2, n_samples=1, seed=5)
    rows = {r["method"]: r for r in released_rows(cap, sub, 0.05, 3, ["nicolaides", "residuals", "tko"])}
    for r in rows.values():
        assert r["protocol"] == "released-code" and r["step"] == 3 and r["warning"] == ""
        assert all(math.isfinite(r[k]) for k in ("gap", "logged_gap", "reduction_ratio", "ratio_vs_fine"))
        assert r["reduction_ratio"] >= 0
    # with R_0∇h on the right, the released Nicolaides two-level step is TKO's (same basis, fine level)
    assert rows["nicolaides"]["gap"] == pytest.approx(rows["tko"]["gap"], rel=1e-9)
    # the logged gap uses the sub-batch's coarse matrix: it is not the true error change
    assert rows["residuals"]["logged_gap"] != pytest.approx(rows["residuals"]["gap"], rel=1e-6)


# ---- the verdict table's pure functions ----------------------------------------------------------

TWO = ("kfac-2l-nicolaides", "kfac-2l-residuals", "tko")


def _finals(kfac: list[float], **per_method: list[float]) -> dict:
    out = {"kfac": dict(enumerate(kfac))}
    for m, v in per_method.items():
        out[m.replace("_", "-")] = dict(enumerate(v))
    return out


def test_overlay_claim_uses_the_worst_method_over_seeds():
    ok = {"ae": _finals([1.0, 1.1, 0.9], **{m.replace("-", "_"): [1.01, 1.12, 0.91] for m in TWO})}
    c = V.overlay_claim(ok, methods=TWO, rtol=0.05)
    assert c.holds is True and c.value.n == 3 and "3/3" in c.text
    bad = {"ae": {**ok["ae"], "tko": {0: 1.2, 1: 1.3, 2: 1.1}}}
    c = V.overlay_claim(bad, methods=TWO, rtol=0.05)
    assert c.holds is False and "PREVIOUS" in c.text and c.value.mean > 0.15
    div = {"ae": {**ok["ae"], "tko": {0: math.inf, 1: 1.1, 2: 0.9}}}
    assert V.overlay_claim(div, methods=TWO).holds is False
    assert V.overlay_claim({}, methods=TWO).holds is None


def test_gain_claim_median_per_seed_then_interval():
    f = _finals([1.0, 1.0], **{m.replace("-", "_"): [0.95, 0.93] for m in TWO})
    c = V.gain_claim(f, methods=TWO)
    assert c.holds is True and c.value.mean == pytest.approx(0.06) and c.value.n == 2
    assert V.gain_claim(_finals([1.0, 1.0], **{m.replace("-", "_"): [1.0, 1.0] for m in TWO}), methods=TWO).holds is False
    assert V.gain_claim(_finals([1.0], **{m.replace("-", "_"): [0.5] for m in TWO}), methods=TWO).holds is False  # not small


def test_gap_sign_claim_judges_the_true_gap_and_reports_the_logged_one():
    true = {"residuals": [(0, -1.0), (0, 0.5), (1, -2.0), (1, -1.0)], "tko": [(0, -1.0), (1, -1.0)]}
    logged = {"residuals": [(0, -1.0), (0, -0.1), (1, -2.0), (1, -1.0)], "tko": [(0, -1.0), (1, -1.0)]}
    c = V.gap_sign_claim(true, logged=logged)
    assert c.holds is False and "RESIDU" in c.text and "logged gap ≤ 0: 6/6" in c.text
    assert c.value.n == 2 and c.value.mean == pytest.approx((2 / 3 + 1) / 2)
    assert V.gap_sign_claim(logged).holds is True
    assert V.gap_sign_claim({"taylor": [(0, math.nan)]}).holds is False  # a missing gap is a violation
    assert V.gap_sign_claim({}).holds is None


def test_closeness_and_ngd_claims():
    c = V.closeness_claim({"residuals": [0.01, 0.02], "nicolaides": [0.9, 0.8], "taylor": [0.1, 0.2]}, closeness_max=0.5)
    assert c.holds is False and "NICO" in c.text and "2/3" in c.text
    assert c.value.mean == pytest.approx(0.15)  # the median method (TAYLOR)
    assert V.closeness_claim({"residuals": [0.01, 0.02]}).holds is True
    f = {"ae": _finals([1.0, 1.0], ngd=[1.2, 1.1]), "dl": _finals([1.0, 1.0], ngd=[0.9, 0.95])}
    c = V.ngd_claim(f)
    assert c.holds is False and "dl" in c.text and c.value.mean < 0 and "1/2" in c.text
    assert V.ngd_claim({"ae": f["ae"]}).holds is True


def test_claim_rows_one_row_per_claim_one_cell_per_protocol():
    d = {"fig2_finals": {"ae": _finals([1.0, 1.0], **{m.replace("-", "_"): [1.0, 1.0] for m in TWO}, ngd=[1.1, 1.2])},
         "fig4a_finals": None, "gaps": {"residuals": [(0, -1.0)]}, "logged": None, "ratios": {"residuals": [0.1]}}
    rows = V.claim_rows({"paper": d, "released-code": d}, R.Criteria())
    assert [c.key for c in rows] == list(V.CLAIMS)
    assert all(set(c.cells) == {"paper", "released-code"} for c in rows)
    by = {c.key: c.cells["paper"] for c in rows}
    assert by["i"].holds is True and by["ii"].holds is None and by["iii"].holds is True and by["v"].holds is True


def _run(opt: str, seed: int, protocol: str, final: float) -> RunResult:
    return RunResult(opt, opt, 0.1, 1e-4, [], False, "", 0.0, [], final, seed=seed, protocol=protocol)


def test_finals_by_seed_falls_back_to_the_paper_runs_of_unchanged_optimizers():
    cfg = R.paper_config(quick=True)
    reps = [_run("kfac", s, p, 1.0 + s) for s in (0, 1) for p in ("paper", "released-code")] + [_run("ngd", s, "paper", 2.0 + s) for s in (0, 1)]
    pr = ProblemResult(cfg.fig2[0], [], {}, {}, reps)
    assert pr.finals_by_seed("released-code") == {"kfac": {0: 1.0, 1: 2.0}, "ngd": {0: 2.0, 1: 3.0}}


def test_fig5_both_ways_marks_where_the_log_hides_an_increase(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PathCollection

    from fisherlab.experiments.paper.report import divergence_rows, plot_gaps_both_ways

    def rings(ax):
        return [c for c in ax.collections if isinstance(c, PathCollection) and c.get_offsets().shape[0]]

    rows = []
    for seed in (0, 1):
        for step in (1, 10):
            rows.append({"problem": "ae", "seed": seed, "trajectory": "KFAC", "protocol": "paper", "method": "residuals",
                         "step": step, "gap": -1.0 - seed, "logged_gap": -1.0 - seed})
            rows.append({"problem": "ae", "seed": seed, "trajectory": "KFAC", "protocol": "released-code", "method": "residuals",
                         "step": step, "gap": 0.5 if step == 10 else -0.5, "logged_gap": -0.2})
    fig = plot_gaps_both_ways(rows, tmp_path / "f", methods=["residuals"])
    try:
        assert len(fig.axes) == 3 and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
        (marked,) = rings(fig.axes[1])
        assert marked.get_offsets().shape[0] == 2  # both seeds at step 10
        assert not rings(fig.axes[0]) and not rings(fig.axes[2])
    finally:
        plt.close(fig)
    (d,) = divergence_rows(rows)
    assert d["paper_true_mean"] == pytest.approx(-1.5) and d["released_true_share_pos"] == pytest.approx(0.5)
    assert d["released_logged_share_pos"] == 0 and d["released_true_pos_logged_neg"] == pytest.approx(0.5)


def test_optimizer_loss_scale_steps_on_the_scaled_capture():
    """``loss_scale=c``: each step's capture is ``Capture.scaled(c)`` of fisherlab's (g, ∇h × c,
    G × c², ā and A unchanged), the same as the reproduction's mean_loss_capture with c = 1/d."""
    import fisherlab
    from fisherlab.optim import KFACOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    c = 0.25
    ref = fisherlab.capture(model, x, y, loss="mse", fisher="empirical", dtype=torch.float64)
    got = KFACOptimizer(model, lr=0.1, damping=1e-2, loss="mse", fisher="empirical", loss_scale=c)._capture(x, y)
    assert got.equals(ref.scaled(c)) and got.equals(mean_loss_capture(ref, 1 / c))
    torch.testing.assert_close(got.grad, c * ref.grad, rtol=1e-15, atol=0)
    for lg, lr_ in zip(got.layers, ref.layers):
        torch.testing.assert_close(lg.g, c * lr_.g, rtol=1e-15, atol=0)
        assert torch.equal(lg.a, lr_.a)
    assert ref.scaled(1.0) is ref
    with pytest.raises(fisherlab.errors.ConfigError, match="loss_scale"):
        KFACOptimizer(model, lr=0.1, damping=1e-2, loss="mse", loss_scale=0.0)
