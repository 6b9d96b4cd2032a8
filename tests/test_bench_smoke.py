"""The capture benchmark runs (``--quick``: tiny models, one thread) so that it cannot rot."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "analysis" / "bench" / "capture_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("capture_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    yield mod
    torch.set_num_threads(threads)  # --quick runs on one thread; leave the session as it was


def test_quick_run_prints_table_and_writes_csv(bench, tmp_path, capsys):
    out = tmp_path / "bench.csv"
    rows = bench.main(["--quick", "--reps", "1", "--csv", str(out)])
    text = capsys.readouterr().out
    assert "capture/plain" in text and "torch.func/capture" in text
    expected = {(p, m) for m in bench.METHODS for p in ("mnist-ae", "cnn") if p in bench.EXTRA.get(m, (p,))}
    assert {(r["problem"], r["method"]) for r in rows} == expected
    assert all(r["median_s"] > 0 and r["ratio_to_plain"] > 0 for r in rows)
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_memory_probe_runs(bench):
    mem = bench._measure_memory_here("cnn", "capture mc K=1", quick=True)
    assert mem["peak_delta_bytes"] >= 0 and mem["result_bytes"] > 0
