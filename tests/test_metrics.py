"""The comparison table (§4.4) against dense float64 computations."""

import csv
import math

import pytest
import torch

import fisherlab
from fisherlab.errors import DampingError, FisherlabError
from fisherlab.metrics import METHODS, ComparisonTable, build_method, compare
from fisherlab.operators import ExactFisher, as_jacobian
from fisherlab.testing import dense_fisher_from_capture

from cases import MODELS, make_capture

LAM = 0.05
RTOL = 1e-9  # dense float64 reference vs Woodbury/eigenbasis algebra on tiny nets
CONV_METHODS = [m for m in METHODS if m != "tko-kronecker"]


@pytest.fixture
def table_and_reference(tiny_capture):
    cap = tiny_capture[0]
    table = compare(cap, LAM)
    F = dense_fisher_from_capture(cap) + LAM * torch.eye(cap.p, dtype=torch.float64)
    w = cap.grad.double()
    zeta = torch.linalg.solve(F, w)
    return cap, table, F, w, zeta


def test_rows_match_dense_errors(table_and_reference):
    cap, table, F, w, zeta = table_and_reference
    jac = as_jacobian(cap)
    exact = ExactFisher(jac, LAM)
    zeta_norm2 = float(w @ zeta)
    zK = build_method("kfac", jac, LAM, rhs=w, exact=exact).solve(w)
    EK = float((zK - zeta) @ F @ (zK - zeta))
    for row in table:
        if math.isnan(row["energy_error"]):
            assert row["method"] == "tko-kronecker" and any(s.kind.value == "conv2d" for s in cap.layout.layers)
            continue
        if fisherlab.methods.get(row["method"]).builder is None:  # the ZERO row: x = 0
            x = torch.zeros_like(w)
        else:
            x = build_method(row["method"], jac, LAM, rhs=w, exact=exact).solve(w)
        E = float((x - zeta) @ F @ (x - zeta))
        assert row["energy_error"] == pytest.approx(E, rel=RTOL, abs=1e-14 * zeta_norm2)
        assert row["relative_error"] == pytest.approx(E / zeta_norm2, rel=RTOL, abs=1e-14)
        assert row["reduction_ratio"] == pytest.approx(E / EK, rel=RTOL, abs=1e-12)
        # the gap is computed without ζ; it must equal the direct difference
        assert row["gap"] == pytest.approx(E - EK, rel=1e-7, abs=1e-12 * zeta_norm2)
        assert row["euclidean_relative_error"] == pytest.approx(float((x - zeta).norm() / zeta.norm()), rel=RTOL)
        assert row["cosine"] == pytest.approx(float(x @ zeta / (x.norm() * zeta.norm())), rel=RTOL, nan_ok=True)


def test_two_level_rows_never_increase_the_error(table_and_reference):
    _, table, *_ = table_and_reference
    for name in ["nicolaides", "spectral", "krylov-nicolaides", "residuals", "krylov-residuals", "taylor"]:
        r = table.row(name)
        assert r["gap"] <= 1e-12 * table.meta["zeta_norm2"]
        assert -1e-12 <= r["reduction_ratio"] <= 1 + 1e-12
        assert r["coarse_dim"] >= 1


def test_table_prints_and_writes_csv(tmp_path):
    cap, *_ = make_capture(MODELS["mlp"], "cross_entropy", "mc", B=4)
    table = compare(cap, LAM, ["kfac", "nicolaides", "tko-kronecker"])
    text = str(table)
    for legend in ["KFAC", "NICO", "PREVIOUS-KRON"]:
        assert legend in text
    assert "λ = 0.05" in text
    path = table.to_csv(tmp_path / "t.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["method"] for r in rows] == ["kfac", "nicolaides", "tko-kronecker"]
    assert float(rows[1]["energy_error"]) == table.row("nicolaides")["energy_error"]  # full precision
    assert ComparisonTable.concat([table, table]).rows == table.rows + table.rows


def test_kronecker_tko_is_not_available_for_conv_nets():
    cap, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc", B=4)
    row = compare(cap, LAM, ["tko-kronecker"]).row("tko-kronecker")
    assert math.isnan(row["energy_error"]) and "Linear layers" in row["note"]


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping(damping):
    cap, *_ = make_capture(MODELS["mlp"], "mse", "empirical")
    with pytest.raises(DampingError, match="damping"):
        compare(cap, damping)


def test_unknown_method_and_zero_gradient():
    cap, *_ = make_capture(MODELS["mlp"], "mse", "empirical")
    with pytest.raises(ValueError, match="unknown method"):
        compare(cap, LAM, ["kfac", "magic"])
    cap.grad = torch.zeros_like(cap.grad)
    with pytest.raises(FisherlabError, match="zero"):
        compare(cap, LAM)


def test_analyze_cli_writes_errors_csv(tmp_path, capsys):
    from fisherlab.cli import main

    path = tmp_path / "run.h5"
    for i in range(2):
        cap, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, seed=i)
        fisherlab.save(cap, path, checkpoint=f"step{i}", step=i)
    assert main(["analyze", str(path), "--damping", "0.1", "--methods", "kfac,taylor", "--out", str(tmp_path), "--no-progress", "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step0" in out and "TAYLOR" in out
    rows = list(csv.DictReader((tmp_path / "errors.csv").open()))
    assert [(r["checkpoint"], r["method"]) for r in rows] == [
        ("step0", "kfac"), ("step0", "taylor"), ("step1", "kfac"), ("step1", "taylor")
    ]
    assert main(["analyze", str(path), "--damping", "0", "--out", str(tmp_path)]) == 2
    assert "damping" in capsys.readouterr().err


def test_analyze_subcommands_through_the_cli(tmp_path, capsys):
    from fisherlab.cli import main

    path = tmp_path / "run.h5"
    cap, *_ = make_capture(MODELS["mlp"], "cross_entropy", "mc", B=4)
    fisherlab.save(cap, path, checkpoint="c0", step=0)
    out = tmp_path / "res"
    common = ["--out", str(out), "--no-progress", "--no-figures"]
    assert main(["analyze", "spectra", str(path), "--damping", "0.1", *common]) == 0
    assert main(["analyze", "interactions", str(path), *common]) == 0
    assert main(["analyze", "damping-sweep", str(path), "--dampings", "0.01,0.1", "--methods", "kfac,residuals", *common]) == 0
    for name in ["spectra_summary.csv", "interactions.csv", "kfac_block_errors.csv", "damping_sweep.csv"]:
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "damping_sweep.csv").open()))
    assert sorted({float(r["damping_value"]) for r in rows}) == [0.01, 0.1]  # λ/λ_max (the default scale)
