"""Paper reproduction (fisherlab.experiments.paper, analysis/reproduce_paper.py): the quick mode of the
paper's settings end to end (both protocols, two seeds), the files it writes, the sign of the
multiplicative gaps, and the verdict criteria on synthetic inputs."""

from __future__ import annotations

import csv
import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from fisherlab.experiments import paper as R

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The script's ``--quick`` mode, in-process, with one thread (what the test suite can afford)."""
    out = tmp_path_factory.mktemp("reproduce")
    n = torch.get_num_threads()
    script = runpy.run_path(str(ROOT / "analysis" / "reproduce_paper.py"), run_name="reproduce_paper")
    try:
        rc = script["main"](["--quick", "--settings", "paper", "--out", str(out), "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- end to end ---------------------------------------------------------------------------------


def test_quick_writes_every_file(quick_run):
    for stem in ("fig2", "fig4a", "fig5"):
        png, pdf = quick_run / f"{stem}.png", quick_run / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"
    png = quick_run / "fig5_both.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("fig2_curves", "fig2_final", "fig2_grid", "fig4a_curves", "fig4a_final", "fig4a_grid", "fig5_gap",
                 "fig5_both", "fig5_divergence", "runs", "claims"):
        assert (quick_run / f"{name}.csv").is_file(), name
    summary = json.loads((quick_run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert set(summary["verdicts"]) >= {"i", "ii", "iii"}
    assert set(summary["claims"]) == set(R.verdicts.CLAIMS)
    assert set(summary["claims"]["iii"]) == {"paper", "released-code"}


def test_quick_trains_every_seed_and_protocol(quick_run):
    cfg = R.paper_config(quick=True)
    rows = _rows(quick_run / "runs.csv")
    for p in cfg.fig2 + [cfg.fig4a]:
        got = {(r["optimizer"], int(r["seed"]), r["protocol"]) for r in rows if r["problem"] == p.key}
        want = {(o, s, pr) for o in p.optimizers for s in cfg.problem_seeds(p) for pr in cfg.problem_protocols(p)
                if pr == "paper" or o in R.config.RELEASED_CODE_OPTIMIZERS}
        assert got == want, p.key
    released = [r for r in rows if r["protocol"] == "released-code"]
    assert released and all('"protocol": "released-code"' in r["options"] for r in released)
    assert all('"protocol"' not in r["options"] for r in rows if r["protocol"] == "paper")
    curves = _rows(quick_run / "fig2_curves.csv")
    assert {"step", "loss", "wall_time", "gap", "logged_gap"} <= set(curves[0])


def test_report_has_the_verdict_table_with_three_columns(quick_run):
    text = (quick_run / "report.md").read_text()
    assert "| claim | the paper's statement | fisherlab under the paper's equations | fisherlab under the released-code protocol |" in text
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert [line.split("|")[1].strip() for line in table] == [f"({k})" for k in R.verdicts.CLAIMS]
    for line in table:
        cells = line.split("|")[3:5]
        assert all(("**holds**" in c) or ("**does not hold**" in c) or ("**undecided**" in c) for c in cells), line
    assert "FACES" in text and "mean-loss" in text and "sub-batch" in text
    assert "random-vectors" in text or "fashion-mnist" in text  # which data Fig. 4(a) used is stated
    assert "fig5_both.png" in text


def test_multiplicative_gaps_are_never_positive(quick_run):
    gap_rows = _rows(quick_run / "fig5_gap.csv")
    assert {r["method"] for r in gap_rows} == {"nicolaides", "residuals", "tko"}  # the quick problem's gap methods
    for r in gap_rows:
        assert float(r["reduction_ratio"]) >= 0
        if r["method"] in R.MULTIPLICATIVE_GAP_METHODS:
            assert float(r["gap"]) <= 0.0, r
            assert float(r["reduction_ratio"]) <= 1.0 + 1e-9, r
    own = [r for r in _rows(quick_run / "fig2_curves.csv") if r["optimizer"] in R.TWO_LEVEL]
    assert own and all(float(r["gap"]) <= 0.0 for r in own)


def test_fig5_both_ways_pairs_the_protocols_on_the_same_batches(quick_run):
    rows = [r for r in _rows(quick_run / "fig5_both.csv") if r["trajectory"] == "KFAC"]
    key = lambda r: (r["problem"], r["seed"], r["step"], r["method"])  # noqa: E731
    paper = {key(r) for r in rows if r["protocol"] == "paper"}
    released = {key(r) for r in rows if r["protocol"] == "released-code"}
    assert released and released <= paper
    for r in rows:
        if r["protocol"] == "paper":
            assert r["gap"] == r["logged_gap"]  # the paper's equations log the true gap
    div = _rows(quick_run / "fig5_divergence.csv")
    assert {"paper_true_mean", "released_true_mean", "released_logged_mean", "released_true_pos_logged_neg"} <= set(div[0])


def test_a_diverging_run_is_recorded_not_raised():
    cfg = R.default_config(quick=True, fig4a=False)
    p = cfg.fig2[0]
    r = R.run_training(p, "sgd", 1e8, None, 3, cfg)
    assert r.diverged and "non-finite" in r.error
    assert r.final == math.inf


def test_figures_redraw_from_their_csvs(quick_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fisherlab import plots

    try:
        fig = plots.plot_training_curves(quick_run / "fig2_curves.csv", title="Fig. 2")
        assert len(fig.axes) == 2
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert labels == [R.legend(o) for o in R.paper_config(quick=True).fig2[0].optimizers]
        fig = plots.plot_gap_trajectories(quick_run / "fig5_gap.csv")
        assert len(fig.axes) == 3
        assert len(fig.axes[0].get_lines()) == 3 + 1  # one per quick gap method + the zero line
    finally:
        plt.close("all")


def test_verdicts_module_is_pure():
    import ast

    from fisherlab.experiments.paper import verdicts

    tree = ast.parse(Path(verdicts.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"torch", "os", "pathlib", "csv", "json", "matplotlib", "h5py"}


# ---- criteria on synthetic inputs ------------------------------------------------------------


def test_final_loss_is_the_tail_mean_and_inf_when_diverged():
    assert R.final_loss([9.0, 1.0, 2.0, 3.0], 3) == pytest.approx(2.0)
    assert R.final_loss([1.0, 2.0], 5) == pytest.approx(1.5)
    assert R.final_loss([1.0, 2.0], 2, diverged=True) == math.inf
    assert R.final_loss([1.0, float("nan")], 2) == math.inf
    assert R.final_loss([], 3) == math.inf


def _finals(kfac: float, **others: float) -> dict:
    d = {"kfac": kfac}
    d.update({k.replace("_", "-"): v for k, v in others.items()})
    return d


TWO = {m: 1.0 for m in R.TWO_LEVEL + ("tko",)}


def test_overlay_holds_within_tolerance_and_fails_outside():
    v = R.overlay_verdict({"kfac": 100.0, **{m: 100.0 + 4.9 * (i % 2 * 2 - 1) for i, m in enumerate(TWO)}}, rtol=0.05)
    assert v.holds is True and len(v.rows) == 7
    v = R.overlay_verdict({"kfac": 100.0, **{m: 100.0 for m in TWO}, "kfac-2l-taylor": 106.0}, rtol=0.05)
    assert v.holds is False and "TAYLOR" in v.summary
    v = R.overlay_verdict({"kfac": 100.0, **{m: 100.0 for m in TWO}, "tko": math.inf}, rtol=0.05)
    assert v.holds is False  # a diverged two-level method is not ≈ KFAC
    assert R.overlay_verdict({"kfac": math.inf, **TWO}).holds is None
    assert R.overlay_verdict({"kfac": 1.0}).holds is None


def test_gain_needs_a_small_positive_median():
    base = {"kfac": 1.0}
    assert R.gain_verdict({**base, **{m: 0.95 for m in TWO}}).holds is True  # 5 % gain
    assert R.gain_verdict({**base, **{m: 1.0 for m in TWO}}).holds is False  # no gain
    assert R.gain_verdict({**base, **{m: 1.02 for m in TWO}}).holds is False  # a loss
    v = R.gain_verdict({**base, **{m: 0.5 for m in TWO}}, gain_max=0.25)
    assert v.holds is False and "small" in v.summary  # a large gain is not the paper's *small* gain
    # the median decides: 4 of 7 methods gain 5 %, 3 diverge
    mixed = {**base, **{m: 0.95 for m in list(TWO)[:4]}, **{m: math.inf for m in list(TWO)[4:]}}
    v = R.gain_verdict(mixed)
    assert v.holds is True and v.rows[-1]["gain"] == -math.inf
    assert R.gain_verdict({"kfac": math.inf, **TWO}).holds is None


def test_gap_verdict_judges_multiplicative_methods_only():
    neg = {m: [-1.0, -0.5, -1e-30] for m in R.MULTIPLICATIVE_GAP_METHODS}
    v = R.gap_verdict({**neg, "tko": [-1.0, 3.0]})
    assert v.holds is True  # TKO's positive gap is reported, not judged
    tko = next(r for r in v.rows if r["method"] == "tko")
    assert tko["judged"] is False and tko["max_gap"] == 3.0 and tko["n_negative"] == 1
    v = R.gap_verdict({**neg, "residuals": [-1.0, 1e-9]})
    assert v.holds is False and "RESIDU" in v.summary
    assert R.gap_verdict({**neg, "taylor": [-1.0, float("nan")]}).holds is False  # a missing gap is a violation
    assert R.gap_verdict({**neg, "spectral": [0.0]}).holds is True  # ≤ 0: no reduction, no violation
    assert R.gap_verdict({**neg, "spectral": [1e-12]}, atol=1e-9).holds is True
    assert R.gap_verdict({"tko": [-1.0]}).holds is None


def test_baseline_verdict():
    assert R.baseline_verdict({"kfac": 1.0, "sgd": 2.0, "adam": 1.5}).holds is True
    assert R.baseline_verdict({"kfac": 1.0, "sgd": 2.0, "adam": 0.5}).holds is False
    assert R.baseline_verdict({"kfac": math.inf, "sgd": 2.0}).holds is False
    assert R.baseline_verdict({"kfac": 1.0}).holds is None
