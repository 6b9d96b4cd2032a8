"""Smoke test of analysis/bench/woodbury_bench.py --quick: it runs, prints every figure, and its
Woodbury and CG solutions meet the accuracy target (the timings are not asserted).

Run as a subprocess: the script sets OMP_WAIT_POLICY=PASSIVE before torch loads (on a shared,
oversubscribed machine spin-waiting makes its small products ~1000× slower)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "analysis" / "bench" / "woodbury_bench.py"
REL_ERR_TARGET = 1e-5  # the target for the float32-capture solves vs the float64 reference


def test_woodbury_bench_quick():
    r = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("GEMM peak", "float64 reference", "(a) Woodbury", "(b) scipy CG", "ratio CG / Woodbury",
                   "peak memory", "RSS growth", "Gram step", "exact-mode autoencoder", "CG + KFAC precond.",
                   "CG (plain)"):
        assert needle in out, needle
    m = re.search(r"rel\. error Woodbury ([0-9.e+-]+), CG ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) <= REL_ERR_TARGET and float(m.group(2)) <= REL_ERR_TARGET, out
