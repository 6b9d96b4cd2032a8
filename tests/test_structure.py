"""Layer interactions and KFAC block errors (fisherlab.structure) against dense blocks (MATH.md §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import MODELS, make_capture
from fisherlab import structure as St
from fisherlab.jacobian import Jacobian
from fisherlab.testing import dense_fisher_from_capture

NORM_RTOL = 1e-12  # Gram route vs dense blocks: float64 round-off relative to ‖F‖²
ERR_ATOL = 1e-7  # relative KFAC block error from a difference of three O(‖F_ii‖²) terms




def _dense_blocks(cap) -> list[list[torch.Tensor]]:
    F = dense_fisher_from_capture(cap)
    sz = cap.layout.sizes
    return [list(torch.split(r, sz, 1)) for r in torch.split(F, sz, 0)]


def test_rho_diagonal_symmetric_bounded(tiny_capture):
    li = St.layer_interactions(tiny_capture[0])
    rho = li.rho
    np.testing.assert_allclose(np.diag(rho), 1.0, rtol=1e-14)
    np.testing.assert_allclose(rho, rho.T, rtol=0, atol=1e-15)
    assert (rho >= 0).all() and (rho <= 1 + 1e-12).all()  # Cauchy–Schwarz: tr(K_iK_j) ≤ ‖K_i‖‖K_j‖


def test_block_norms_match_dense(tiny_capture):
    cap = tiny_capture[0]
    blocks = _dense_blocks(cap)
    ref = np.array([[float(b.pow(2).sum()) for b in row] for row in blocks])
    li = St.layer_interactions(cap)
    np.testing.assert_allclose(li.norms2, ref, rtol=0, atol=NORM_RTOL * ref.max())
    diag = np.trace(ref)
    assert li.off_diagonal_share == pytest.approx((ref.sum() - diag) / ref.sum(), abs=1e-12)
    assert St.off_diagonal_share(cap) == pytest.approx(li.off_diagonal_share, abs=0)
    assert li.total_norm2 == pytest.approx(float(dense_fisher_from_capture(cap).pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("storage", ["auto", "factored", "dense"])
def test_kfac_block_errors_match_dense(model_case, mode, storage):
    cap = make_capture(model_case, "cross_entropy", mode, storage=storage)[0]
    blocks = _dense_blocks(cap)
    jac = Jacobian.from_capture(cap)
    ke = St.kfac_block_errors(jac)
    for i, lj in enumerate(jac.layers):
        A, G = lj.kfac_factors
        Fii = blocks[i][i]
        ref = float((Fii - torch.kron(A, G)).norm() / Fii.norm())
        assert ke.relative_error[i] == pytest.approx(ref, abs=ERR_ATOL), lj.spec.name
        assert ke.inner[i] == pytest.approx(float((Fii * torch.kron(A, G)).sum()), rel=1e-10)


def test_kfac_block_error_vanishes_for_one_example():
    """KFAC is the exact block of a Linear net for B = 1, K = 1 (STYLE.md habit 5)."""
    cap = make_capture(MODELS["mlp"], "mse", "empirical", B=1)[0]
    ke = St.kfac_block_errors(cap)
    assert (ke.relative_error <= ERR_ATOL).all()
    np.testing.assert_allclose(ke.cosine, 1.0, atol=1e-12)


def test_csv_exports(tiny_capture, tmp_path):
    cap = tiny_capture[0]
    li, ke = St.layer_interactions(cap), St.kfac_block_errors(cap)
    ell = len(cap.layout.sizes)
    lines = li.to_csv(tmp_path / "rho.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + ell * ell and "rho" in lines[0]
    lines = ke.to_csv(tmp_path / "kfac.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + ell and "relative_error" in lines[0]
    assert li.summary()["layers"] == ell


def test_csv_exports_round_trip_in_full_precision(tmp_path):
    """The CSV files go through fisherlab.io.tables: floats are written with repr, read back exactly."""
    from fisherlab.io.tables import read_csv

    cap = make_capture(MODELS["mlp"], "cross_entropy", "exact")[0]
    li, ke = St.layer_interactions(cap), St.kfac_block_errors(cap)
    rows = read_csv(li.to_csv(tmp_path / "rho.csv"), parse=True)
    assert [r["norm2"] for r in rows] == [float(v) for v in li.norms2.reshape(-1)]
    rows = read_csv(ke.to_csv(tmp_path / "kfac.csv"), parse=True)
    assert [r["relative_error"] for r in rows] == [float(v) for v in ke.relative_error]


def test_tables_format_numbers_and_write_files(tmp_path):
    import json
    import math

    from fisherlab.io.tables import fmt, markdown_table, read_csv, text_table, write_csv, write_json

    assert [fmt(None), fmt(math.nan, "+.3e"), fmt(np.float64("nan")), fmt(0.5, ".2f"), fmt(3, "{:d}")] == [
        "n/a", "n/a", "n/a", "0.50", "3"]
    assert markdown_table(["a", "b"], [[1, None]], align="lr") == ["| a | b |", "|:---|---:|", "| 1 |  |"]
    assert text_table([["x", "n"], ["long", "1"]], right={1}) == ["  x     n", "  long  1"]
    p = write_csv([{"a": 0.1, "b": None}, {"a": np.float64(1 / 3), "c": "s"}], tmp_path / "sub" / "t.csv")
    assert read_csv(p) == [{"a": "0.1", "b": "", "c": ""}, {"a": repr(1 / 3), "b": "", "c": "s"}]
    assert not list((tmp_path / "sub").glob("*.tmp"))  # written atomically
    with pytest.raises(TypeError, match="columns"):
        write_csv([[1, 2]], tmp_path / "u.csv")
    q = write_json({"p": tmp_path, "x": np.arange(2)}, tmp_path / "o.json")
    assert json.loads(q.read_text()) == {"p": str(tmp_path), "x": [0, 1]} and q.read_text().endswith("\n")
