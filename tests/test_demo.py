"""`fisherlab demo --tiny`: the main job end to end (train → capture → compare → figures → report)."""

import csv
import math

import fisherlab
from fisherlab.cli import main
from fisherlab.workflows.demo import DemoConfig, run_demo
from fisherlab.metrics import METHODS

TWO_LEVEL = ["nicolaides", "spectral", "krylov-nicolaides", "residuals", "krylov-residuals", "taylor"]


def test_tiny_demo_writes_a_complete_report(tmp_path):
    res = run_demo(tmp_path, DemoConfig.tiny(), progress=False, echo=lambda *a: None)
    cfg = DemoConfig.tiny()
    # the capture file holds every checkpoint and loads back
    infos = fisherlab.store.list_checkpoints(res.capture_file)
    assert [i.step for i in infos if i.complete] == cfg.checkpoint_steps
    cap = fisherlab.load(res.capture_file, infos[-1].name)
    assert cap.B == cfg.capture_batch and cap.fisher.value == cfg.fisher
    # every method at every checkpoint, with the theory's signs
    rows = list(csv.DictReader((tmp_path / "errors.csv").open()))
    assert len(rows) == len(METHODS) * len(cfg.checkpoint_steps)
    for r in rows:
        if r["method"] in TWO_LEVEL:
            assert float(r["gap"]) <= 0.0
            assert 0.0 <= float(r["reduction_ratio"]) <= 1.0
        if r["method"] == "tko-kronecker":  # mnist-ae is all Linear: the Kronecker TKO is defined
            assert not math.isnan(float(r["energy_error"]))
    for name in ["error_reduction", "spectra_", "interactions_", "damping_sweep", "method_errors_", "kfac_block_errors_"]:
        pngs = [p for p in tmp_path.glob(f"{name}*.png") if p.stat().st_size > 0]
        pdfs = [p for p in tmp_path.glob(f"{name}*.pdf") if p.stat().st_size > 0]
        assert pngs and pdfs, name
    report = res.report.read_text()
    for section in ["## Headline", "## Errors at the last checkpoint", "## Figures", "## Structure", "## Time"]:
        assert section in report
    assert "Two-level gaps (4.6) ≤ 0 at every checkpoint and for every coarse space: yes" in report


def test_demo_cli_tiny(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "KFAC" in out and "report" in out
    assert (tmp_path / "report.md").is_file()
