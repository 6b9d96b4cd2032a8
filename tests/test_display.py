"""Jupyter and terminal display: short reprs, HTML tables, to_pandas, progress bars, --help."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch import nn

import fisherlab
import fisherlab.datasets
import fisherlab.metrics
from fisherlab.cli.main import build_parser
from fisherlab.io import progress


@pytest.fixture(scope="module")
def capture_and_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="empirical", device="cpu")
    table = fisherlab.compare(cap, 0.1, ["kfac", "block-diagonal", "nicolaides"])
    return cap, table


def test_short_reprs(capture_and_table):
    cap, table = capture_and_table
    r = repr(cap)
    assert r.startswith("<Capture") and "B=6" in r and "tensor(" not in r and "\n" not in r
    assert "tensor(" not in repr(cap.layers[0]) and "a [6, 1, 4]" in repr(cap.layers[0])
    t = repr(table)
    assert t.startswith("<ComparisonTable: 3 methods") and "\n" not in t
    ds = fisherlab.datasets.load("random-vectors", n=8)
    assert repr(ds) == "Dataset('random-vectors', task=regression, n=8, x: [10] float32, y: 10 float32, 10 classes)"


def test_html_and_pandas(capture_and_table, monkeypatch):
    _, table = capture_and_table
    h = table._repr_html_()
    assert h.startswith("<table") and h.count("<tr>") == 1 + len(table.summary()) and "KFAC" in h and "λ = 0.1" in h
    pd = pytest.importorskip("pandas")
    df = table.to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df["method"]) == [r["method"] for r in table.rows]
    assert len(table.to_pandas(summary=True)) == len(table.summary())
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs pandas, which is not installed") as err:
        table.to_pandas()
    assert "\n" not in str(err.value)


def test_compare_file_is_exported():
    assert fisherlab.compare_file is fisherlab.metrics.compare_file and "compare_file" in fisherlab.__all__


def test_progress_bars(monkeypatch):
    progress._tqdm_class.cache_clear()
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: None)  # no ipywidgets
    from tqdm.std import tqdm as plain

    assert progress._tqdm_class() is plain  # never tqdm.auto, whose notebook branch warns "IProgress not found"
    progress._tqdm_class.cache_clear()
    assert progress.want_progress(None, stream=io.StringIO()) is False  # a log file: no \r
    assert progress.want_progress(True, stream=io.StringIO()) is True  # unless asked
    assert progress.want_progress(None, quiet=True) is False and progress.want_progress(False) is False


def _help(*argv: str) -> str:
    parser = build_parser()
    sub = parser
    for a in argv:
        sub = next(act for act in sub._actions if hasattr(act, "choices") and isinstance(act.choices, dict)).choices[a]
    return sub.format_help()


def test_help_shows_defaults_and_every_optimizer():
    from fisherlab.train import OPTIMIZERS

    text = " ".join(_help("train").split())
    for name in OPTIMIZERS:
        assert name in text.replace("- ", "-")
    cap = " ".join(_help("capture").split())
    assert "(default: mc)" in cap and "--n N" in cap and "--n-data" not in cap
    for target in ("errors", "spectra"):
        t = " ".join(_help("analyze", target).split())
        assert "--damping DAMPING the damping value, in --damping-scale (default: 0.001)" in t and "(default: max)" in t
        assert "no progress bar and no tables" in t


def test_cli_flag_spellings():
    p = build_parser()
    a = p.parse_args(["capture", "--checkpoints", "c.pt", "-B", "2", "--n-data", "7"])  # the old spelling still works
    b = p.parse_args(["capture", "--checkpoints", "c.pt", "-B", "2", "--n", "7"])
    assert a.n_data == b.n_data == 7 and a.out is None and a.progress is None
    e = p.parse_args(["analyze", "errors", "runs/ae.h5", "--no-progress", "-q"])
    assert e.progress is False and e.quiet and e.out is None
    from fisherlab.cli.analyze_cmd import default_out

    assert str(default_out(e.file)) == "runs/ae.analysis"
