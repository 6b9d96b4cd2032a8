"""Intervals over batches and draws: coverage of a seeded simulation, and compare over several
captures of one checkpoint (rows per sample, a summary with mean ± half-width)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import fisherlab
from fisherlab.intervals import mean_interval

from cases import MODELS, build_model, make_batch

COVERAGE_TOL = 0.05
"""|coverage − 0.95| over 2,000 seeded trials: the binomial standard deviation is 0.005, so 0.05 is
10σ — a failure means the interval is wrong, not unlucky."""


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_95_percent_intervals_cover_the_mean(n, dist):
    rng = np.random.default_rng(0)
    trials = 2000
    if dist == "normal":
        samples, mean = rng.normal(3.0, 2.0, size=(trials, n)), 3.0
    else:  # skewed, like relative errors; n = 4 is where the t interval is least exact
        samples, mean = rng.lognormal(0.0, 0.25, size=(trials, n)), math.exp(0.25**2 / 2)
    covered = 0
    for row in samples:
        iv = mean_interval(row)
        covered += iv.low <= mean <= iv.high
    assert abs(covered / trials - 0.95) <= COVERAGE_TOL


def test_one_sample_has_no_interval():
    iv = mean_interval([2.0])
    assert iv.mean == 2.0 and math.isnan(iv.half_width) and iv.format(".2f") == "2.00"
    assert mean_interval([float("nan"), 1.0, 3.0]).n == 2


def _captures(n_batches=3, n_draws=2):
    case = MODELS["mlp"]
    model = build_model(case)
    caps = []
    for b in range(n_batches):
        x, y = make_batch(case, "cross_entropy", B=4, seed=10 + b)
        for d in range(n_draws):
            cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="mc", n_samples=1,
                                    generator=torch.Generator().manual_seed(100 * b + d), device="cpu", dtype=torch.float64)
            cap.meta["sample"] = {"of": "c0", "batch": b, "draw": d}
            caps.append(cap)
    return caps


def test_compare_over_samples_reports_mean_and_interval(tmp_path):
    caps = _captures()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = fisherlab.compare(caps, fisherlab.Damping(1e-2, "max"), ["zero", "kfac", "residuals"])
        singles = [fisherlab.compare(c, fisherlab.Damping(1e-2, "max"), ["zero", "kfac", "residuals"]) for c in caps]
    assert table.n_samples == 6 and len(table.rows) == 18
    assert {(r["batch"], r["draw"]) for r in table.rows} == {(b, d) for b in range(3) for d in range(2)}
    summary = {s["method"]: s for s in table.summary()}
    for name in ("kfac", "residuals"):
        values = [t.row(name)["relative_error"] for t in singles]
        iv = mean_interval(values)
        assert summary[name]["relative_error"] == pytest.approx(iv.mean, rel=1e-12)
        assert summary[name]["relative_error_hw"] == pytest.approx(iv.half_width, rel=1e-12)
        assert summary[name]["samples"] == 6
    assert summary["zero"]["relative_error"] == pytest.approx(1.0)
    text = str(table)
    assert "±" in text and "over 6 samples" in text
    rows = list(__import__("csv").DictReader(table.to_csv(tmp_path / "all.csv").open()))
    assert len(rows) == 18  # every sample
    srows = list(__import__("csv").DictReader(table.to_csv(tmp_path / "sum.csv", summary=True).open()))
    assert len(srows) == 3 and "relative_error_hw" in srows[0]


def test_worse_than_zero_is_flagged_once_per_table():
    caps = _captures(1, 1)
    with pytest.warns(fisherlab.errors.MeasurementWarning, match="worse than the zero step") as rec:
        t = fisherlab.compare(caps[0], 1e-6, ["zero", "kfac", "kfac-tikhonov", "diagonal"])
    assert sum("worse than the zero step" in str(w.message) for w in rec) == 1
    flagged = [r["method"] for r in t.rows if r["worse_than_zero"]]
    assert flagged and all("worse than the zero step" in t.row(m)["note"] for m in flagged)
    assert t.row("zero")["relative_error"] == pytest.approx(1.0) and not t.row("zero")["worse_than_zero"]
    assert t.meta["exact_residual"] < fisherlab.metrics.EXACT_RESIDUAL_TOL
    assert 0.0 <= t.meta["rhs_outside_span"] <= 1.0


def test_rhs_outside_the_span_is_zero_for_the_empirical_fisher():
    """The empirical Fisher's rows are the true-label gradients: ∇h, their mean, lies in their span."""
    case = MODELS["mlp"]
    model = build_model(case)
    x, y = make_batch(case, "cross_entropy", B=4)
    emp = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="empirical", device="cpu", dtype=torch.float64)
    mc = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="mc", generator=torch.Generator().manual_seed(0),
                           device="cpu", dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert fisherlab.compare(emp, 0.1, ["kfac"]).meta["rhs_outside_span"] == pytest.approx(0.0, abs=1e-10)
        assert fisherlab.compare(mc, 0.1, ["kfac"]).meta["rhs_outside_span"] > 1e-3
