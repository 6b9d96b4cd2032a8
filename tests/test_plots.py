"""Plot functions (fisherlab.plots): the figure objects (axes, labels, lines, bars), not pixels."""

from __future__ import annotations

import numpy as np
import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import fisherlab  # noqa: E402
from cases import MODELS, make_capture  # noqa: E402
from fisherlab import plots  # noqa: E402
from fisherlab import spectra as S  # noqa: E402
from fisherlab import structure as St  # noqa: E402

LAM = 1e-2
METHODS = ["kfac", "block-diagonal", "nicolaides", "residuals", "tko"]
STEPS = [0, 10, 20]




@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def capture():
    return make_capture(MODELS["mlp"], "cross_entropy", "mc")[0]


@pytest.fixture(scope="module")
def rows_over_checkpoints():
    rows = []
    for i, step in enumerate(STEPS):
        cap = make_capture(MODELS["mlp"], "cross_entropy", "mc", seed=i)[0]
        for r in fisherlab.compare(cap, LAM, METHODS).rows:
            rows.append(dict(r, checkpoint=f"c{i}", step=step, damping=LAM))
    return rows


@pytest.fixture(scope="module")
def rows_over_dampings(capture):
    rows = []
    for lam in (1e-3, 1e-2, 1e-1):
        rows += [dict(r, damping=lam) for r in fisherlab.compare(capture, lam, METHODS).rows]
    return rows


def _written(tmp_path, stem):
    for ext in ("png", "pdf"):
        f = tmp_path / f"{stem}.{ext}"
        assert f.exists() and f.stat().st_size > 0, f


def _same_colour(a, b) -> bool:
    return mcolors.to_hex(a) == mcolors.to_hex(b)


def test_error_reduction_figure(rows_over_checkpoints, tmp_path):
    fig = plots.plot_error_reduction(rows_over_checkpoints, tmp_path / "fig5")
    _written(tmp_path, "fig5")
    ax_gap, ax_ratio = fig.axes
    shown = [m for m in METHODS if fisherlab.methods.get(m).family.coarse]  # the paper's Fig. 5: coarse corrections
    for ax in (ax_gap, ax_ratio):
        assert len(ax.lines) == len(shown) + 1  # one per method + the dashed reference
        assert ax.get_xlabel() == "training step"
        for line, m in zip(ax.lines, shown):
            assert list(line.get_xdata()) == STEPS
            assert _same_colour(line.get_color(), plots.color_for(m))
    ratios = [r["reduction_ratio"] for r in rows_over_checkpoints if r["method"] in shown]
    assert ax_ratio.get_yscale() == ("log" if max(ratios) / min(ratios) > 20 else "linear")
    assert "KFAC" in ax_ratio.get_ylabel() and "gap" in ax_gap.get_ylabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [plots.legend_for(m) for m in shown] == ["NICO", "RESIDU", "PREVIOUS"]


def test_error_reduction_from_csv(rows_over_checkpoints, tmp_path):
    table = fisherlab.ComparisonTable(rows=[dict(r) for r in rows_over_checkpoints])
    path = table.to_csv(tmp_path / "errors.csv")
    fig = plots.plot_error_reduction(path, methods=["nicolaides", "tko"])
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]
    rows = plots.read_rows(path)
    assert isinstance(rows[0]["gap"], float) and rows[0]["step"] == 0


def _dot_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()][::-1]  # top to bottom


def test_method_errors_dots(rows_over_checkpoints, tmp_path):
    one = [r for r in rows_over_checkpoints if r["checkpoint"] == "c0"]
    fig = plots.plot_method_errors(one, tmp_path / "dots")
    _written(tmp_path, "dots")
    assert len(fig.axes) == 2
    practical = [m for m in METHODS if fisherlab.methods.practical(m)]
    order = practical + [m for m in METHODS if m not in practical]  # exact references last, apart
    assert _dot_labels(fig.axes[0]) == [plots.legend_for(m) for m in order]  # shared by both panels
    for ax in fig.axes:
        assert ax.get_xscale() == "log"  # dots, not bars, on the log axis
        assert not ax.patches
        colours = [mcolors.to_hex(c.lines[0].get_color()) for c in ax.containers]
        assert colours == [mcolors.to_hex(plots.color_for(m)) for m in order]


def test_method_errors_skip_missing_values(rows_over_checkpoints):
    one = [dict(r) for r in rows_over_checkpoints if r["checkpoint"] == "c0"]
    one[0]["relative_error"] = None  # a method reported n/a
    fig = plots.plot_method_errors(one)
    assert [len(ax.containers) for ax in fig.axes] == [len(METHODS) - 1, len(METHODS)]


def test_error_anatomy_figure(rows_over_checkpoints, tmp_path):
    one = [r for r in rows_over_checkpoints if r["checkpoint"] == "c0"]
    fig = plots.plot_error_anatomy(one, tmp_path / "anatomy")
    _written(tmp_path, "anatomy")
    ax, ax_share = fig.axes
    assert len(ax.patches) == 2 * len(METHODS) and len(ax_share.patches) == len(METHODS)
    for r in one:  # solid + hatched = the relative error
        y = _dot_labels(ax).index(r["legend"])
        span, null = ax.patches[2 * y].get_width(), ax.patches[2 * y + 1].get_width()
        assert span + null == pytest.approx(r["relative_error"], rel=1e-9)


def test_spectra_overlay(capture, tmp_path):
    sp = S.spectra(capture, LAM, method="slq", n_probes=4, n_steps=10)
    fig = plots.plot_spectra(sp, tmp_path / "spectra")
    _written(tmp_path, "spectra")
    ax_d, ax_c, ax_r = fig.axes
    assert len(ax_d.lines) == len(ax_c.lines) == 3
    assert ax_d.get_xlabel() == "log10 eigenvalue" and "density" in ax_d.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"{s.label} ({s.method})" for s in sp.values()]
    assert ax_c.lines[0].get_ydata()[-1] == pytest.approx(1.0)  # a complete CDF ends at 1
    # (c): the informative eigenvalues of the discrete spectra (F• exact, KFAC exact; SLQ has none)
    discrete = [s for s in sp.values() if s.method in ("exact", "dense", "lanczos")]
    assert len([ln for ln in ax_r.lines if ln.get_linestyle() == "-"]) == len(discrete)
    F = sp["fisher"]
    above = np.sort(F.values[F.values > F.damping * (1 + 1e-9)])[::-1]
    assert list(ax_r.lines[0].get_ydata()) == list(above[: plots.MAX_RANKED])


def test_spectra_linear_axis_for_error_operator(capture):
    tl = fisherlab.TwoLevelKFAC(capture, LAM, "nicolaides")
    fig = plots.plot_spectra([S.error_spectrum(tl)])
    assert fig.axes[0].get_xlabel() == "eigenvalue" and len(fig.axes[0].lines) == 1


def test_interaction_heatmap(capture, tmp_path):
    li = St.layer_interactions(capture)
    fig = plots.plot_interactions(li, tmp_path / "rho")
    _written(tmp_path, "rho")
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # heatmap + colour bar
    ell = len(li.names)
    assert [t.get_text() for t in ax.get_xticklabels()] == li.names
    assert len(ax.texts) == ell * ell  # annotated (small ℓ)
    assert ax.get_xlabel() == "layer j" and ax.get_ylabel() == "layer i"
    fig2 = plots.plot_interactions(li.rho, annotate=False)
    assert len(fig2.axes[0].texts) == 0


def test_kfac_block_error_bars(capture, tmp_path):
    ke = St.kfac_block_errors(capture)
    fig = plots.plot_kfac_block_errors(ke, tmp_path / "kfac")
    _written(tmp_path, "kfac")
    assert len(fig.axes[0].patches) == len(ke.names)
    fig2 = plots.plot_kfac_block_errors(ke.to_csv(tmp_path / "kfac.csv"))
    assert [p.get_height() for p in fig2.axes[0].patches] == pytest.approx(list(ke.relative_error))


def test_damping_sweep_loglog(rows_over_dampings, tmp_path):
    fig = plots.plot_damping_sweep(rows_over_dampings, tmp_path / "sweep")
    _written(tmp_path, "sweep")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert len(ax.lines) == len(METHODS)
        xs = list(ax.lines[0].get_xdata())
        assert xs == [1e-3, 1e-2, 1e-1] or all(x < 1 for x in xs)  # λ, or λ/λ_max when the rows carry it
    fig3 = plots.plot_damping_sweep(rows_over_dampings, metrics=("reduction_ratio",), methods=["nicolaides"])
    assert len(fig3.axes) == 1 and len(fig3.axes[0].lines) == 1


def test_fixed_distinct_colours():
    names = ["NICO", "SPECTRAL", "RESIDU", "KRY-NICO", "KRY-RESIDU", "TAYLOR", "PREVIOUS", "KFAC", "KFAC-TIKHONOV", "BLOCK-DIAG", "EXACT"]
    cols = [plots.COLORS[n] for n in names]
    assert len(set(cols)) == len(cols)
    for m, lg in fisherlab.metrics.LEGENDS.items():
        assert plots.legend_for(m) == lg and plots.color_for(m) == plots.COLORS[lg]


def test_style_is_restored():
    before = dict(matplotlib.rcParams)
    with plots.style():
        assert matplotlib.rcParams["legend.frameon"] is False
    assert matplotlib.rcParams["legend.frameon"] == before["legend.frameon"]
