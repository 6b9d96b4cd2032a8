"""Bounded memory (issue 14 item 3): a budget the in-memory path exceeds streams the layers from the
file one at a time, with the in-memory numbers; a budget nothing fits is refused in one line naming
the flag, before anything is read; a stopped multi-checkpoint run keeps the rows it finished."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch import nn

import fisherlab
from fisherlab import metrics, planning
from fisherlab.cli.main import main as cli
from fisherlab.errors import MemoryBudgetError, MeasurementWarning
from fisherlab.jacobian import Jacobian, StreamedLayerJacobian
from fisherlab.store import CaptureFile
from fisherlab.workflows import analysis

from cases import MODELS, ModelCase, make_capture

EQUAL = 1e-12
"""Streamed and in-memory numbers: the same float64 operations on the same stored arrays."""
COLUMNS = ("energy_error", "relative_error", "error_span", "error_null", "reduction_ratio", "gap",
           "euclidean_relative_error", "cosine")
METHODS = ["exact", "block-diagonal", "kfac", "ekfac", "spectral", "residuals", "zero"]


def _deep() -> nn.Module:
    """20 layers: two convolutions, then 18 Linear layers (small widths)."""
    layers: list[nn.Module] = [nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(8, 5)]
    for _ in range(16):
        layers += [nn.Tanh(), nn.Linear(5, 5)]
    layers += [nn.Tanh(), nn.Linear(5, 4)]
    return nn.Sequential(*layers)


CASES = {"mlp": MODELS["mlp"], "cnn": MODELS["cnn"], "deep20": ModelCase("deep20", _deep, (2, 6, 6), True)}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def capture_file(request, tmp_path_factory):
    case = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "run.h5"
    for i in range(2):
        cap = make_capture(case, "cross_entropy", "mc", B=3, n_samples=2, seed=i)[0]
        fisherlab.save(cap, path, checkpoint=f"c{i}", step=i)
    if request.param == "deep20":
        assert len(cap.layers) == 20
    return path


def _budget_between(path) -> int:
    """A budget the streamed plan fits and the in-memory plan does not."""
    fj = planning.jacobian_from_file(path, "c0", methods=METHODS, stream=True)
    try:
        streamed = planning.plan_compare(fj.jac, METHODS, memory=1, streamed=True).peak
        resident = planning.plan_compare(fj.jac, METHODS, memory=1, streamed=False).peak
    finally:
        fj.close()
    assert streamed < resident
    return streamed


def _same(ref, got):
    assert len(ref.rows) == len(got.rows)
    for ra, rb in zip(ref.rows, got.rows):
        assert (ra["method"], ra["checkpoint"]) == (rb["method"], rb["checkpoint"])
        for col in COLUMNS:
            assert rb[col] == pytest.approx(ra[col], rel=EQUAL, abs=EQUAL * abs(ra["energy_error"] or 1.0), nan_ok=True), (ra["method"], col)


def test_budget_limited_compare_streams_and_equals_in_memory(capture_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        ref = metrics.compare_file(capture_file, 0.1, METHODS, progress=False, cache=False)
        got = metrics.compare_file(capture_file, 0.1, METHODS, progress=False, cache=False, memory=_budget_between(capture_file))
    assert [m["streamed"] for m in ref.meta["checkpoints"]] == [False, False]
    assert [m["streamed"] for m in got.meta["checkpoints"]] == [True, True]
    _same(ref, got)


def test_streamed_jacobian_reads_one_layer_at_a_time(capture_file):
    fj = planning.jacobian_from_file(capture_file, "c0", stream=True)
    try:
        jac = fj.jac
        assert all(isinstance(lj, StreamedLayerJacobian) for lj in jac.layers)
        slot = jac.layers[0].slot
        assert slot.value is None  # nothing read yet
        x = torch.randn(jac.p, 2, dtype=torch.float64)
        jac.rmatmat(x)
        assert slot.loads == len(jac.layers) and slot.value is not None  # each layer once, the last one held
        ref = Jacobian.from_capture(fisherlab.load(capture_file, "c0"))
        assert torch.allclose(jac.rmatmat(x), ref.rmatmat(x), rtol=EQUAL, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(jac.grams, ref.grams))
        moved = jac.to("cpu", torch.float64)  # still streamed, still one layer held at a time
        assert len({id(lj.slot) for lj in moved.layers}) == 1 and torch.equal(moved.rmatmat(x), jac.rmatmat(x))
    finally:
        fj.close()


def test_streamed_interactions_equal_in_memory(capture_file, tmp_path):
    ref = analysis.run_interactions(capture_file, tmp_path / "a", figures=False, progress=False, cache=False)
    got = analysis.run_interactions(capture_file, tmp_path / "b", figures=False, progress=False, cache=False,
                                    memory=_budget_between(capture_file))
    for name in ref:
        assert torch.allclose(torch.as_tensor(got[name][0].norms2), torch.as_tensor(ref[name][0].norms2), rtol=EQUAL, atol=0)


def test_impossible_budget_is_refused_before_reading(capture_file, monkeypatch):
    reads = []
    monkeypatch.setattr(CaptureFile, "read_layer", lambda *a, **k: reads.append(a))
    with pytest.raises(MemoryBudgetError) as err:
        metrics.compare_file(capture_file, 0.1, METHODS, progress=False, cache=False, memory=1000)
    msg = str(err.value)
    assert "\n" not in msg and "--memory" in msg and "streaming the layers" in msg
    assert reads == []


def test_cli_refuses_in_one_line(capture_file, tmp_path, capsys):
    rc = cli(["analyze", "errors", str(capture_file), "--memory", "1KiB", "--out", str(tmp_path / "o"), "--quiet", "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--memory" in err


@pytest.mark.parametrize("target", ["errors", "spectra", "interactions", "damping-sweep"])
def test_every_analyze_subcommand_takes_the_resource_options(target, capsys):
    with pytest.raises(SystemExit):
        cli(["analyze", target, "--help"])
    text = capsys.readouterr().out
    for flag in ("--device", "--memory", "--no-cache", "--cache-dir"):
        assert flag in text, (target, flag)


def test_stopped_run_keeps_the_finished_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    for i in range(3):
        cap = make_capture(MODELS["mlp"], "mse", "mc", B=3, n_samples=1, seed=i)[0]
        fisherlab.save(cap, path, checkpoint=f"c{i}", step=i)
    real, calls = metrics.compare, []

    def stopping(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the run during the third checkpoint
        return real(*a, **k)

    monkeypatch.setattr(metrics, "compare", stopping)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        analysis.run_error_reduction(path, 0.1, out, methods=["kfac", "zero"], progress=False, figures=False, cache=False)
    with open(out / "errors.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["checkpoint"] for r in rows}) == ["c0", "c1"] and len(rows) == 4
    assert (out / "errors_summary.csv").is_file()
