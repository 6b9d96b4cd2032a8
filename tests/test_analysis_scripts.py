"""The analysis scripts (analysis/*.py) end to end on a tiny capture file with three checkpoints."""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import fisherlab  # noqa: E402
from cases import MODELS, make_capture  # noqa: E402
from fisherlab.cli import analyze_cmd  # noqa: E402
from fisherlab.workflows import analysis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "analysis"
CHECKPOINTS = ["step-0", "step-5", "step-10"]
METHODS = "kfac,nicolaides,residuals,tko"




@pytest.fixture(scope="module")
def capture_file(tmp_path_factory) -> Path:
    """A tiny mlp run: three checkpoints (different weights and batches)."""
    path = tmp_path_factory.mktemp("run") / "run.h5"
    for i, name in enumerate(CHECKPOINTS):
        cap = make_capture(MODELS["mlp"], "cross_entropy", "mc", seed=i)[0]
        fisherlab.save(cap, path, checkpoint=name, step=5 * i, fsync=False)
    return path


def _script(name: str):
    """The script's ``main`` (loaded like ``python analysis/<name>.py`` would, minus the process)."""
    return runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="fisherlab_script")["main"]


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _figures(out: Path, stem: str) -> None:
    for ext in ("png", "pdf"):
        f = out / f"{stem}.{ext}"
        assert f.exists() and f.stat().st_size > 0, f


def test_error_reduction_script(capture_file, tmp_path):
    out = tmp_path / "errors"
    assert _script("error_reduction")([str(capture_file), "--damping", "1e-2", "--methods", METHODS, "--out", str(out), "--no-progress"]) == 0
    rows = _csv(out / "errors.csv")
    assert len(rows) == len(CHECKPOINTS) * 4
    assert {r["checkpoint"] for r in rows} == set(CHECKPOINTS)
    for r in rows:
        if r["method"] == "nicolaides":
            assert float(r["gap"]) <= 1e-12 and 0 <= float(r["reduction_ratio"]) <= 1 + 1e-12
    _figures(out, "error_reduction")
    _figures(out, "method_errors_step-10")
    _figures(out, "error_anatomy_step-10")
    summary = _csv(out / "errors_summary.csv")
    assert len(summary) == len(CHECKPOINTS) * 4 and "relative_error_hw" in summary[0]
    assert _csv(out / "errors_layers.csv") and _csv(out / "errors_modes.csv")


def test_spectra_script(capture_file, tmp_path):
    out = tmp_path / "spectra"
    args = [str(capture_file), "--damping", "1e-2", "--checkpoints", "step-0,step-10", "--coarse", "nicolaides", "--out", str(out), "--no-progress"]
    assert _script("spectra")(args) == 0
    summary = _csv(out / "spectra_summary.csv")
    assert [(r["checkpoint"], r["operator"]) for r in summary] == [
        (c, o) for c in ("step-0", "step-10") for o in ("fisher", "kfac", "preconditioned", "error-nicolaides")
    ]
    p = int(summary[0]["p"])
    vals = _csv(out / "spectrum_step-0_kfac.csv")
    assert len(vals) == p and sum(float(r["weight"]) for r in vals) == pytest.approx(1.0)
    _figures(out, "spectra_step-0")
    _figures(out, "spectra_step-10")


def test_layer_interactions_script_subprocess(capture_file, tmp_path):
    """The one real process run: ``python analysis/layer_interactions.py FILE --out DIR``."""
    out = tmp_path / "structure"
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / "layer_interactions.py"), str(capture_file), "--checkpoints", "step-5,step-10", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "off-diagonal share" in res.stdout
    ell, done = 3, ["step-5", "step-10"]
    pairs = _csv(out / "interactions.csv")
    assert len(pairs) == len(done) * ell * ell
    assert all(float(r["rho"]) == pytest.approx(1.0) for r in pairs if r["i"] == r["j"])
    assert len(_csv(out / "kfac_block_errors.csv")) == len(done) * ell
    assert [r["checkpoint"] for r in _csv(out / "structure_summary.csv")] == done
    for c in done:
        _figures(out, f"interactions_{c}")
        _figures(out, f"kfac_block_errors_{c}")


def test_damping_sweep_script(capture_file, tmp_path):
    out = tmp_path / "sweep"
    args = [str(capture_file), "--dampings", "1e-1,1e-3,1e-2", "--methods", METHODS, "--out", str(out), "--no-progress"]
    assert _script("damping_sweep")(args) == 0
    rows = _csv(out / "damping_sweep.csv")
    assert len(rows) == 3 * 4 and {r["checkpoint"] for r in rows} == {"step-10"}
    # --dampings are in --damping-scale (default: max): λ/λ_max(F) as given, λ resolved on the capture
    assert sorted({float(r["damping_value"]) for r in rows}) == [1e-3, 1e-2, 1e-1]
    for r in rows:
        assert float(r["damping_relative"]) == pytest.approx(float(r["damping_value"]), rel=1e-12)
    lmax = {float(r["damping"]) / float(r["damping_value"]) for r in rows}
    assert max(lmax) == pytest.approx(min(lmax), rel=1e-12)  # one λ_max for the checkpoint
    args_abs = args + ["--damping-scale", "absolute"]
    assert _script("damping_sweep")(args_abs) == 0
    assert sorted({float(r["damping"]) for r in _csv(out / "damping_sweep.csv")}) == [1e-3, 1e-2, 1e-1]
    _figures(out, "damping_sweep")


def test_subcommands_register_and_errors(capture_file, tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="fisherlab analyze")
    analyze_cmd.register_subcommands(parser.add_subparsers(dest="what", required=True))
    args = parser.parse_args(["interactions", str(capture_file), "--out", str(tmp_path), "--no-figures", "--no-progress"])
    assert args.func(args) == 0
    assert [r["checkpoint"] for r in _csv(tmp_path / "structure_summary.csv")] == CHECKPOINTS  # by step
    with pytest.raises(fisherlab.errors.FisherlabError, match="no complete checkpoint named"):
        analysis.run_interactions(capture_file, tmp_path, checkpoints=["nope"], progress=False)
    with pytest.raises(fisherlab.errors.DampingError):
        analysis.run_damping_sweep(capture_file, [0.0], tmp_path, progress=False)
