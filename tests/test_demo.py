"""`fisherlab demo --tiny`: the main job end to end (train → capture → compare → figures → report)."""

import csv
import math

import fisherlab
from fisherlab.cli import main
from fisherlab.workflows.demo import DemoConfig, run_demo
from fisherlab.methods import Family, default_keys, keys
from fisherlab.operators import GAP_RTOL

TWO_LEVEL = keys(Family.MULTIPLICATIVE)


def test_tiny_demo_writes_a_complete_report(tmp_path):
    res = run_demo(tmp_path, DemoConfig.tiny(), progress=False, echo=lambda *a: None)
    cfg = DemoConfig.tiny()
    # the capture file holds every checkpoint and loads back
    infos = fisherlab.store.list_checkpoints(res.capture_file)
    # cfg.batches independent batches per checkpoint, each a checkpoint of its own
    assert [i.step for i in infos if i.complete] == [s for s in cfg.checkpoint_steps for _ in range(cfg.batches)]
    cap = fisherlab.load(res.capture_file, infos[-1].name)
    assert cap.B == cfg.capture_batch and cap.fisher.value == cfg.fisher
    assert cap.meta["sample"]["batches"] == cfg.batches
    # every method at every checkpoint, with the theory's signs
    rows = list(csv.DictReader((tmp_path / "errors.csv").open()))
    assert len(rows) == len(default_keys()) * len(cfg.checkpoint_steps) * cfg.batches
    for r in rows:
        if r["method"] in TWO_LEVEL:
            # ratio = 1 + gap/𝔈_KFAC: ≤ 1 exactly when the gap is ≤ 0, which holds up to the family's
            # round-off tolerance, GAP_RTOL · (𝔈_KFAC + ‖ζ‖²_F•)
            E_kfac = float(r["energy_error"]) - float(r["gap"])
            zeta2 = float(r["energy_error"]) / float(r["relative_error"])
            assert float(r["gap"]) <= GAP_RTOL * (E_kfac + zeta2)
            assert 0.0 <= float(r["reduction_ratio"]) <= 1.0 + GAP_RTOL * (E_kfac + zeta2) / E_kfac
        if r["method"] == "tko-kronecker":  # mnist-ae is all Linear: the Kronecker TKO is defined
            assert not math.isnan(float(r["energy_error"]))
    for name in ["error_reduction", "spectra_", "interactions_", "damping_sweep", "method_errors_", "kfac_block_errors_"]:
        pngs = [p for p in tmp_path.glob(f"{name}*.png") if p.stat().st_size > 0]
        pdfs = [p for p in tmp_path.glob(f"{name}*.pdf") if p.stat().st_size > 0]
        assert pngs and pdfs, name
    report = res.report.read_text()
    for section in ["## Headline", "## Errors at the last checkpoint", "## Figures", "## Structure", "## Time"]:
        assert section in report
    assert "Two-level gaps (4.6) ≤ 0 at every checkpoint, batch and coarse space: yes" in report
    assert "of ‖ζ‖²_F• lies in the null space" in report and "The closest practical method is" in report
    assert "± " in report  # intervals over the batches


def test_demo_cli_tiny(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "KFAC" in out and "report" in out
    assert (tmp_path / "report.md").is_file()
