"""Spectra (fisherlab.spectra) against dense float64 eigenvalues of tiny nets (MATH.md §7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import make_capture
from fisherlab import spectra as S
from fisherlab.operators import KFAC, ExactFisher, TwoLevelKFAC
from fisherlab.testing import dense_fisher_from_capture

LAM = 1e-2
EIG_ATOL = 1e-10  # float64 eigenvalues of p ≤ 119 matrices with entries O(1): round-off only
EIG_RTOL = 1e-9  # relative to the largest |eigenvalue| (preconditioned/error operators go through solves)
IMAG_ATOL = 1e-8  # E is non-symmetric, its spectrum real in theory: numpy's eigvals leaves round-off
LANCZOS_RTOL = 1e-7  # ARPACK at tol=1e-10 on well-separated ends
DENSITY_ATOL = 1e-3  # trapezoid rule of a Gaussian-broadened density over a padded 400-point grid
SLQ_IDENTITY_RTOL = 1e-9  # Gauss quadrature is exact for degree ≤ 2m−1: SLQ moment = Hutchinson
N_SE = 4.0  # the Hutchinson estimate lies within 4 standard errors of tr(A^k)/p (seeded probes)
SPACES = ["nicolaides", "spectral", "residuals", "taylor"]




@pytest.fixture
def small_capture(model_case):
    """One loss and mode per model, for the slower checks."""
    return make_capture(model_case, "cross_entropy", "mc")[0]


@pytest.fixture
def lanczos_capture(model_case):
    """B = 8: full-rank KFAC factors. With B = 3 the tiny nets have exactly degenerate extreme
    eigenvalues (rank-deficient factors), which ARPACK resolves only slowly."""
    return make_capture(model_case, "cross_entropy", "mc", B=8)[0]


def _expand(s: S.Spectrum) -> np.ndarray:
    """All p eigenvalues of an exact spectrum (values repeated by multiplicity)."""
    counts = np.round(s.counts()).astype(int)
    assert counts.sum() == s.p
    return np.repeat(s.values, counts)


def _dense_F(cap) -> torch.Tensor:
    return dense_fisher_from_capture(cap) + LAM * torch.eye(cap.layout.p, dtype=torch.float64)


# ---- the four operators, exact or dense, against dense references ------------------------------


def test_fisher_spectrum_exact_matches_dense(tiny_capture):
    cap = tiny_capture[0]
    s = S.fisher_spectrum(cap, LAM)
    ref = torch.linalg.eigvalsh(_dense_F(cap)).numpy()
    assert s.method == "exact" and s.complete
    np.testing.assert_allclose(_expand(s), ref, atol=EIG_ATOL)
    assert s.condition_number == pytest.approx(ref[-1] / ref[0], rel=1e-9)
    assert s.moment(1) == pytest.approx(ref.mean(), rel=1e-12)


def test_fisher_top_eigenvectors(small_capture):
    F = _dense_F(small_capture)
    s = S.fisher_spectrum(small_capture, LAM, n_vectors=2)
    V = s.vectors
    top = torch.as_tensor(s.values[-2:][::-1].copy())
    torch.testing.assert_close(F @ V, V * top, atol=1e-10, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("damping_mode", ["pi", "tikhonov"])
def test_kfac_spectrum_is_products_of_factor_eigenvalues(tiny_capture, damping_mode):
    K = KFAC(tiny_capture[0], LAM, damping_mode)
    s = S.kfac_spectrum(K)
    ref = torch.linalg.eigvalsh(K.to_dense()).numpy()
    assert s.operator == K.name and s.complete
    np.testing.assert_allclose(s.values, ref, atol=EIG_ATOL, rtol=EIG_RTOL)
    assert s.condition_number == pytest.approx(ref[-1] / ref[0], rel=1e-9)


def test_preconditioned_spectrum_matches_dense(tiny_capture):
    cap = tiny_capture[0]
    K, F = KFAC(cap, LAM), ExactFisher(cap, LAM)
    s = S.preconditioned_spectrum(kfac=K, exact=F)
    ev = np.linalg.eigvals(np.linalg.solve(K.to_dense().numpy(), _dense_F(cap).numpy()))
    ref = np.sort(ev.real)
    assert s.method == "dense"
    np.testing.assert_allclose(s.values, ref, atol=EIG_RTOL * ref.max())
    assert S.PreconditionedFisher(K, F).symmetric


@pytest.mark.parametrize("space", SPACES)
def test_error_spectrum_matches_dense_eigvals(tiny_capture, space):
    cap = tiny_capture[0]
    tl = TwoLevelKFAC(cap, LAM, space)
    s = S.error_spectrum(tl)
    E = S.TwoLevelErrorOperator(tl).to_dense().numpy()
    ev = np.linalg.eigvals(E)
    scale = max(1.0, np.abs(ev).max())
    assert np.abs(ev.imag).max() <= IMAG_ATOL * scale
    np.testing.assert_allclose(s.values, np.sort(ev.real), atol=EIG_RTOL * scale * 10)
    assert (np.abs(s.values) <= EIG_RTOL * scale * 10).sum() >= tl.coarse_dim  # m zero eigenvalues


def test_error_operator_symmetrized_is_symmetric_and_similar(small_capture):
    tl = TwoLevelKFAC(small_capture, LAM, "residuals")
    E = S.TwoLevelErrorOperator(tl)
    Sd = E.symmetrized().to_dense().numpy()
    np.testing.assert_allclose(Sd, Sd.T, atol=1e-10)
    np.testing.assert_allclose(np.linalg.eigvalsh(Sd), np.sort(np.linalg.eigvals(E.to_dense().numpy()).real), atol=1e-9)


def test_fisher_square_root(small_capture):
    F = ExactFisher(small_capture, LAM)
    root = S.FisherSquareRoot(F.jac, LAM)
    I = torch.eye(F.p, dtype=torch.float64)
    half = root.power(I, 0.5)
    torch.testing.assert_close(half @ half, _dense_F(small_capture), atol=1e-10, rtol=0)
    torch.testing.assert_close(root.power(half, -0.5), I, atol=1e-10, rtol=0)


# ---- Lanczos extremes ----------------------------------------------------------------------------


def test_lanczos_extremes_match_dense(lanczos_capture):
    cap = lanczos_capture
    K, F = KFAC(cap, LAM), ExactFisher(cap, LAM)
    k = 2
    dense = {
        "fisher": S.fisher_spectrum(F).values,
        "kfac": S.kfac_spectrum(K).values,
        "preconditioned": S.preconditioned_spectrum(kfac=K, exact=F, method="dense").values,
    }
    lanczos = {
        "fisher": S.fisher_spectrum(F, method="lanczos", k=k),
        "kfac": S.kfac_spectrum(K, method="lanczos", k=k),
        "preconditioned": S.preconditioned_spectrum(kfac=K, exact=F, method="lanczos", k=k),
    }
    for name, s in lanczos.items():
        ref = dense[name]
        assert s.method == "lanczos" and s.info["converged"]
        np.testing.assert_allclose(s.values[-k:], ref[-k:], rtol=LANCZOS_RTOL, err_msg=name)
        np.testing.assert_allclose(s.values[0], ref[0], rtol=LANCZOS_RTOL, err_msg=name)
        assert s.condition_number == pytest.approx(ref[-1] / ref[0], rel=LANCZOS_RTOL)


def test_error_lanczos_extremes_match_dense(lanczos_capture):
    tl = TwoLevelKFAC(lanczos_capture, LAM, "nicolaides")
    dense = S.error_spectrum(tl, method="dense").values
    s = S.error_spectrum(tl, method="lanczos", k=1)
    assert s.info["converged"] and s.info["deflated"] == tl.coarse_dim
    scale = np.abs(dense).max()
    np.testing.assert_allclose([s.values[0], s.values[-1]], [dense[0], dense[-1]], atol=LANCZOS_RTOL * scale)
    assert s.spectral_radius == pytest.approx(np.abs(dense).max(), rel=LANCZOS_RTOL)


# ---- stochastic Lanczos quadrature ---------------------------------------------------------------


def _operators(cap):
    K, F = KFAC(cap, LAM), ExactFisher(cap, LAM)
    return {"fisher": F, "kfac": K, "preconditioned": S.PreconditionedFisher(K, F)}


@pytest.mark.parametrize("which", ["fisher", "kfac", "preconditioned"])
def test_slq_density_integrates_to_one(small_capture, which):
    s = S.slq(_operators(small_capture)[which], n_probes=8, n_steps=20, seed=3)
    assert s.method == "slq" and s.complete
    for log in (True, False):
        grid = s.grid(400, log=log)
        assert np.trapezoid(s.density(grid, log=log), grid) == pytest.approx(1.0, abs=DENSITY_ATOL)
    assert s.cdf(s.grid(50))[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("which", ["fisher", "kfac", "preconditioned"])
def test_slq_moments_equal_hutchinson_and_dense(small_capture, which):
    op = _operators(small_capture)[which]
    n_probes, n_steps, seed = 64, 12, 5
    s = S.slq(op, n_probes=n_probes, n_steps=n_steps, seed=seed)
    Z = S.rademacher_probes(op.p, n_probes, seed)
    D = op.to_dense()
    ref = torch.linalg.eigvalsh(D).numpy()
    for k in (1, 2):
        per_probe = ((Z * (torch.linalg.matrix_power(D, k) @ Z)).sum(0) / op.p).numpy()
        # identity: Gauss quadrature is exact for degree ≤ 2m − 1
        assert s.moment(k) == pytest.approx(per_probe.mean(), rel=SLQ_IDENTITY_RTOL)
        # statistics: within N_SE standard errors of tr(A^k)/p
        se = per_probe.std(ddof=1) / np.sqrt(n_probes)
        assert abs(s.moment(k) - np.mean(ref**k)) <= N_SE * se + 1e-12


def test_slq_full_lanczos_recovers_extremes(small_capture):
    F = ExactFisher(small_capture, LAM)
    s = S.slq(F, n_probes=2, n_steps=F.p, seed=0)  # breaks down at the Krylov dimension N + 1
    ref = S.fisher_spectrum(F)
    assert s.lambda_max == pytest.approx(ref.lambda_max, rel=1e-10)
    assert s.lambda_min == pytest.approx(LAM, rel=1e-10)


def test_slq_error_operator_moment(small_capture):
    tl = TwoLevelKFAC(small_capture, LAM, "nicolaides")
    s = S.error_spectrum(tl, method="slq", n_probes=64, n_steps=10, seed=1)
    ref = S.error_spectrum(tl, method="dense")
    assert s.complete
    assert abs(s.moment(1) - ref.moment(1)) <= 0.1 * max(abs(ref.moment(1)), ref.spectral_radius / 10)


def test_slq_rejects_nonsymmetric(small_capture):
    E = S.TwoLevelErrorOperator(TwoLevelKFAC(small_capture, LAM, "nicolaides"))
    with pytest.raises(ValueError, match="symmetric"):
        S.slq(E)


# ---- results ------------------------------------------------------------------------------------


def test_spectrum_csv_roundtrip_and_binning(small_capture, tmp_path):
    s = S.kfac_spectrum(small_capture, LAM)
    back = S.Spectrum.read_csv(s.to_csv(tmp_path / "k.csv"))
    np.testing.assert_array_equal(back.values, s.values)
    np.testing.assert_array_equal(back.weights, s.weights)
    assert (back.operator, back.method, back.p, back.damping) == (s.operator, s.method, s.p, s.damping)
    b = s.binned(10)
    assert b.values.size <= 10 and b.weights.sum() == pytest.approx(1.0)
    assert b.moment(1) == pytest.approx(s.moment(1), rel=1e-12)
    row = s.summary()
    assert row["condition_number"] == pytest.approx(s.condition_number) and row["operator"] == "kfac"


def test_spectra_bundle(small_capture, tmp_path):
    out = S.spectra(small_capture, LAM, operators=("fisher", "kfac", "kfac-tikhonov", "preconditioned"), coarse=("nicolaides",))
    assert list(out) == ["fisher", "kfac", "kfac-tikhonov", "preconditioned", "error-nicolaides"]
    assert [s.method for s in out.values()] == ["exact", "exact", "exact", "dense", "dense"]
    path = S.write_summary_csv([s.summary() for s in out.values()], tmp_path / "summary.csv")
    assert len(path.read_text().strip().splitlines()) == 6


def test_condition_number_helper():
    assert S.condition_number([2.0, 8.0, 4.0]) == 4.0
    assert np.isnan(S.condition_number([-1.0, 3.0]))
    assert np.isnan(S.condition_number([]))


def test_bad_inputs(small_capture):
    with pytest.raises(ValueError, match="method"):
        S.operator_spectrum(ExactFisher(small_capture, LAM), "magic")
    with pytest.raises(ValueError, match="operator"):
        S.spectra(small_capture, LAM, operators=("hessian",))
    with pytest.raises(ValueError, match="damping"):
        S.fisher_spectrum(small_capture)


def test_preconditioned_operator_is_rotated_kfac_sandwich(small_capture):
    """S' = Qᵀ(F•KFAC^{-1/2} F• F•KFAC^{-1/2})Q with Q the orthogonal KFAC eigenbasis."""
    K, F = KFAC(small_capture, LAM), ExactFisher(small_capture, LAM)
    P = S.PreconditionedFisher(K, F)
    I = torch.eye(P.p, dtype=torch.float64)
    sandwich = K.power(F.apply(K.power(I, -0.5)), -0.5)
    torch.testing.assert_close(P.to_parameter_basis(P.to_dense()) @ P.to_parameter_basis(I).T, sandwich, atol=1e-10, rtol=0)
    torch.testing.assert_close(P.from_parameter_basis(P.to_parameter_basis(I)), I, atol=1e-12, rtol=0)
    torch.testing.assert_close(P.solve(P.matvec(I[:, :3])), I[:, :3], atol=1e-9, rtol=0)


ROWS_RTOL = 1e-9
"""The same SLQ run with the products through dense rows or through the factors: round-off only,
through a few dozen Lanczos steps."""


def test_spectra_with_dense_rows_held_are_the_same(small_capture, monkeypatch):
    """spectra() holds the factored layers with many positions as dense rows for its products
    (Jacobian.hold_rows) and releases them: the same spectra to round-off."""
    import fisherlab.jacobian as jacobian_mod

    run = lambda: S.spectra(small_capture, LAM, operators=("fisher", "preconditioned"), method="slq", n_probes=2, n_steps=8)  # noqa: E731
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 10**9)
    ref = run()
    held = []
    real = jacobian_mod.FactoredLayerJacobian.hold_rows

    def hold(self):
        held.append(self.spec.name)
        return real(self)

    monkeypatch.setattr(jacobian_mod.FactoredLayerJacobian, "hold_rows", hold)
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)
    got = run()
    assert held  # the path was taken
    for key in ref:
        a, b = ref[key].summary(), got[key].summary()
        for name, x in a.items():
            if isinstance(x, float) and np.isfinite(x):
                assert b[name] == pytest.approx(x, rel=ROWS_RTOL, abs=ROWS_RTOL * abs(x) + 1e-300), (key, name)


def test_preconditioned_operator_with_rotated_rows_held_is_the_same(model_case, monkeypatch):
    """PreconditionedFisher(rows_free=...) holds its rotated factored layers as dense rows for the
    products (within ROWS_MEMORY_SHARE of rows_free): the same operator to round-off; spectra()
    passes it the memory its own rows leave, and holds U's own rows only for products with U."""
    import fisherlab.jacobian as jacobian_mod

    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)  # every factored layer is a candidate
    cap = make_capture(model_case, "cross_entropy", "mc", B=2, n_samples=2, storage="factored")[0]
    K, F = KFAC(cap, LAM), ExactFisher(cap, LAM)
    ref, got = S.PreconditionedFisher(K, F), S.PreconditionedFisher(K, F, rows_free=2**40)
    assert ref.rows_held == [] and got.rows_held
    assert all(lj.rows_held for lj in got.jac.layers if lj.spec.name in got.rows_held)
    assert not any(lj.rows_held for lj in F.jac.layers)  # U's own layers untouched
    V = torch.randn(ref.p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = ref.matvec(V)
    torch.testing.assert_close(got.matvec(V), want, atol=1e-12 * float(want.abs().max()), rtol=0)
    rows = sum(lj.rows_bytes for lj in got.jac.layers if lj.spec.name in got.rows_held)
    small = S.PreconditionedFisher(K, F, rows_free=int(rows / jacobian_mod.ROWS_MEMORY_SHARE) - 1)
    assert len(small.rows_held) < len(got.rows_held)  # the share bounds them


def test_preconditioned_operator_leaves_out_the_null_space_of_A(model_case, monkeypatch):
    """With A's exact null space (eigenpairs from the rows, thresholds lowered for the tiny nets),
    the rotated Jacobian leaves those columns out (NullPrefixLayerJacobian): the same operator as
    the full rotation, and still the rotated KFAC sandwich."""
    import fisherlab.jacobian as jacobian_mod
    from fisherlab.operators import kfac as kfac_mod
    from fisherlab.operators.derived import rotated_jacobian

    monkeypatch.setattr(jacobian_mod, "LOWRANK_EIGH_MIN_DIM", 1)
    monkeypatch.setattr(kfac_mod, "NULL_SPACE_MIN_DIM", 1)
    monkeypatch.setattr(kfac_mod, "NULL_SPACE_MIN_SHARE", 0.0)
    cap = make_capture(model_case, "cross_entropy", "mc", B=2, n_samples=1, storage="factored")[0]
    K, F = KFAC(cap, LAM), ExactFisher(cap, LAM)
    P = S.PreconditionedFisher(K, F)
    pruned = [lj for lj in P.jac.layers if isinstance(lj, jacobian_mod.NullPrefixLayerJacobian)]
    assert pruned, "no layer with a null space of A"
    jac = F.jac
    full = jacobian_mod.Jacobian(jac.layout, [lj.rotated(b.QA, b.QG) for lj, b in zip(jac.layers, K.blocks)], jac.B, jac.K)
    assert not any(isinstance(lj, jacobian_mod.NullPrefixLayerJacobian) for lj in full.layers)  # every column kept
    assert rotated_jacobian(jac, K).p == full.p
    monkeypatch.setattr(P, "jac", full, raising=False)
    V = torch.randn(P.p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = P.matvec(V)
    monkeypatch.undo()
    P2 = S.PreconditionedFisher(K, F)
    torch.testing.assert_close(P2.matvec(V), ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    I = torch.eye(P2.p, dtype=torch.float64)
    sandwich = K.power(F.apply(K.power(I, -0.5)), -0.5)
    torch.testing.assert_close(P2.to_parameter_basis(P2.to_dense()) @ P2.to_parameter_basis(I).T, sandwich, atol=1e-10, rtol=0)
