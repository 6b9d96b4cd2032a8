"""The setup cache (issue 14 item 4): a second analysis — of any kind — reuses the Grams and
eigendecompositions of the first; a changed checkpoint invalidates them; a corrupted or foreign
cache file is detected by its checksum (or format) and rebuilt; the capture file is never written."""

from __future__ import annotations

import hashlib
import warnings

import h5py
import pytest
import torch

import fisherlab
from fisherlab import metrics
from fisherlab.cache import SetupCache, cache_folder
from fisherlab.errors import FisherlabError, MeasurementWarning
from fisherlab.jacobian import DenseLayerJacobian, FactoredLayerJacobian, Jacobian
from fisherlab.store import CaptureFile
from fisherlab.workflows import analysis

from cases import MODELS, make_capture

EQUAL = 1e-12
"""Cached and recomputed numbers: the same float64 values, read back exactly (only BLAS's
alignment-dependent summation order differs, at ~1e-15)."""
COLUMNS = ("energy_error", "relative_error", "error_span", "error_null", "gap", "euclidean_relative_error", "cosine")
METHODS = ["exact", "block-diagonal", "kfac", "spectral", "zero"]
"""The exact solve (Woodbury), the blocks' own Grams, KFAC's factor eigenpairs, a coarse space."""


@pytest.fixture
def capture_file(tmp_path):
    """Two checkpoints of the tiny CNN (conv and Linear layers)."""
    path = tmp_path / "run.h5"
    for i in range(2):
        cap = make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, n_samples=2, seed=i)[0]
        fisherlab.save(cap, path, checkpoint=f"c{i}", step=i)
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts every per-layer Gram and every eigendecomposition computed."""
    calls = {"gram": 0, "eigh": 0}
    for kind in (FactoredLayerJacobian, DenseLayerJacobian):
        real = kind._compute_gram

        def gram(self, real=real):
            calls["gram"] += 1
            return real(self)

        monkeypatch.setattr(kind, "_compute_gram", gram)
    real_eigh = torch.linalg.eigh

    def eigh(*a, **k):
        calls["eigh"] += 1
        return real_eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def _compare(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        return metrics.compare_file(path, 0.1, METHODS, progress=False, **kw)


def _same(ref, got):
    for ra, rb in zip(ref.rows, got.rows, strict=True):
        for col in COLUMNS:
            assert rb[col] == pytest.approx(ra[col], rel=EQUAL, abs=EQUAL * abs(ra["energy_error"] or 1.0), nan_ok=True), (ra["method"], col)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_analysis_recomputes_no_gram(capture_file, counted):
    before = _digest(capture_file)
    ref = _compare(capture_file, cache=False)
    first = _compare(capture_file)
    assert counted["gram"] > 0 and counted["eigh"] > 0
    assert all("wrote grams" in m["cache"] for m in first.meta["checkpoints"])
    counted.update(gram=0, eigh=0)
    second = _compare(capture_file)
    assert counted == {"gram": 0, "eigh": 0}  # Grams, K's and the KFAC factors' eigenpairs all read
    assert all(m["cache"].startswith("read grams, gram_eigh, kfac_eigh, woodbury") for m in second.meta["checkpoints"])
    _same(ref, first)
    _same(ref, second)
    assert _digest(capture_file) == before  # the capture file is never written
    assert all(r["setup_s"] >= 0 for r in second.rows) and "setup they share" in second.format()


def test_other_analyses_share_the_cache(capture_file, counted, tmp_path):
    _compare(capture_file)
    counted.update(gram=0, eigh=0)
    ref = analysis.run_interactions(capture_file, tmp_path / "a", progress=False, figures=False, cache=False)
    assert counted["gram"] > 0
    counted.update(gram=0)
    got = analysis.run_interactions(capture_file, tmp_path / "b", progress=False, figures=False)
    assert counted["gram"] == 0
    for name in ref:
        assert torch.allclose(torch.as_tensor(got[name][0].norms2), torch.as_tensor(ref[name][0].norms2), rtol=EQUAL, atol=0)
    analysis.run_damping_sweep(capture_file, [0.1, 1.0], tmp_path / "c", checkpoint="c1", methods=["exact", "kfac", "zero"],
                               progress=False, figures=False)
    assert counted["gram"] == 0


def test_changed_checkpoint_invalidates_its_entries(capture_file, counted):
    _compare(capture_file)
    capture_file.unlink()  # the same names, other data
    for i in range(2):
        cap = make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, n_samples=2, seed=10 + i)[0]
        fisherlab.save(cap, capture_file, checkpoint=f"c{i}", step=i)
    counted.update(gram=0, eigh=0)
    got = _compare(capture_file)
    assert counted["gram"] > 0
    assert all("stale" in m["cache"] and "wrote grams" in m["cache"] for m in got.meta["checkpoints"])
    _same(_compare(capture_file, cache=False), got)


def test_corrupted_cache_is_detected_and_rebuilt(capture_file, counted):
    ref = _compare(capture_file, cache=False)
    _compare(capture_file)
    with CaptureFile(capture_file) as cf:
        entry = SetupCache(capture_file).entry("c0", cf.fingerprint("c0"))
    grams = entry._file("grams")
    with h5py.File(grams, "r+") as f:  # one number changed, its checksum left as it was
        f["grams/0"][0, 0] = f["grams/0"][0, 0] + 1.0
    entry._file("gram_eigh").write_bytes(b"not an HDF5 file")
    counted.update(gram=0, eigh=0)
    got = _compare(capture_file)
    note = got.meta["checkpoints"][0]["cache"]
    assert "checksum mismatch" in note and "unreadable" in note
    assert counted["gram"] > 0
    _same(ref, got)
    counted.update(gram=0, eigh=0)
    _compare(capture_file)  # rebuilt: read back without a recomputation
    assert counted["gram"] == 0


def test_cache_off_and_cache_dir(capture_file, tmp_path):
    _compare(capture_file, cache=False)
    assert not cache_folder(capture_file).exists()
    where = tmp_path / "elsewhere"
    _compare(capture_file, cache_dir=where)
    assert not cache_folder(capture_file).exists() and cache_folder(capture_file, where).is_dir()
    assert cache_folder(capture_file, where).parent == where
    assert not list(cache_folder(capture_file, where).rglob("*.tmp"))  # published whole, nothing left behind


def test_seeded_jacobian_uses_the_seed(capture_file):
    jac = Jacobian.from_capture(fisherlab.load(capture_file, "c0"))
    K = [torch.eye(jac.N, dtype=torch.float64) * (i + 1) for i in range(len(jac.layers))]
    jac.seed_setup(grams=K)
    assert all(torch.equal(a, b) for a, b in zip(jac.grams, K))
    assert torch.equal(jac.layers[0].gram(), K[0])
    with pytest.raises(FisherlabError, match="seeded Gram"):
        jac.layers[0].seed_gram(torch.zeros(2, 2, dtype=torch.float64))


@pytest.fixture
def counted_moments(monkeypatch):
    """Counts every diagonal and every EKFAC second-moment computation (both λ-independent)."""
    calls = {"diagonal": 0, "moments": 0}
    for kind in (FactoredLayerJacobian, DenseLayerJacobian):
        real_d, real_m = kind._compute_diagonal, kind.eigenbasis_second_moments

        def diagonal(self, real=real_d):
            calls["diagonal"] += 1
            return real(self)

        def moments(self, QA, QG, real=real_m):
            calls["moments"] += 1
            return real(self, QA, QG)

        monkeypatch.setattr(kind, "_compute_diagonal", diagonal)
        monkeypatch.setattr(kind, "eigenbasis_second_moments", moments)
    return calls


def test_diagonal_and_ekfac_moments_are_cached_across_dampings(capture_file, counted_moments):
    """DIAGONAL's diag(F) and EKFAC's re-fitted eigenvalues do not depend on λ: a damping sweep (or a
    second run) computes them once."""
    keys = ["exact", "diagonal", "ekfac", "zero"]
    run = lambda lam, **kw: metrics.compare_file(capture_file, lam, keys, progress=False, **kw)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        ref = [run(lam, cache=False) for lam in (0.1, 1.0)]
        counted_moments.update(diagonal=0, moments=0)
        first = run(0.1)
        assert counted_moments["diagonal"] > 0 and counted_moments["moments"] > 0
        assert all("diagonal" in m["cache"] and "ekfac_moments" in m["cache"] for m in first.meta["checkpoints"])
        counted_moments.update(diagonal=0, moments=0)
        second = run(1.0)  # another λ: the same diagonal and moments
    assert counted_moments == {"diagonal": 0, "moments": 0}
    assert all("read" in m["cache"] and "ekfac_moments" in m["cache"].split(";")[0] for m in second.meta["checkpoints"])
    _same(ref[0], first)
    _same(ref[1], second)


def test_ekfac_moments_of_another_eigenbasis_are_not_used(capture_file, counted_moments):
    """An eigenbasis is not unique: moments computed in the basis of a KFAC eigendecomposition that
    is no longer cached (recomputed, so possibly rotated in a degenerate eigenspace) are recomputed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        ref = metrics.compare_file(capture_file, 0.1, ["exact", "ekfac"], progress=False, cache=False)
        metrics.compare_file(capture_file, 0.1, ["exact", "ekfac"], progress=False)
        with CaptureFile(capture_file) as cf:
            entry = SetupCache(capture_file).entry("c0", cf.fingerprint("c0"))
        entry._file("kfac_eigh").unlink()
        counted_moments.update(moments=0)
        got = metrics.compare_file(capture_file, 0.1, ["exact", "ekfac"], progress=False)
    assert counted_moments["moments"] > 0  # c0's moments were recomputed in its new basis
    _same(ref, got)
    with h5py.File(entry._file("ekfac_moments"), "r") as f, h5py.File(entry._file("kfac_eigh"), "r") as e:
        for i in f:
            assert f[i].attrs["basis"] == f"{int(e[f'{i}/QA'].attrs['crc32']):08x}-{int(e[f'{i}/QG'].attrs['crc32']):08x}"


def test_seeded_diagonal_and_moments_are_checked(capture_file):
    jac = Jacobian.from_capture(fisherlab.load(capture_file, "c0"))
    lj = jac.layers[0]
    with pytest.raises(FisherlabError, match="seeded diagonal"):
        lj.seed_diagonal(torch.zeros(lj.p + 1, dtype=torch.float64))
    with pytest.raises(FisherlabError, match="seeded EKFAC second moments"):
        lj.seed_ekfac_second_moments(torch.zeros(2, 2, dtype=torch.float64))
    d = torch.arange(lj.p, dtype=torch.float64)
    jac.seed_setup(diagonals=[d] + [None] * (len(jac.layers) - 1))
    assert torch.equal(jac.layers[0].diagonal(), d)


def test_compare_with_dense_rows_held_equals_the_factored_one(capture_file, monkeypatch):
    """compare holds the factored layers with many positions as dense rows for its products
    (within the memory left free): the same table to round-off, the layers named in meta."""
    import fisherlab.jacobian as jacobian_mod

    keys = ["exact", "kfac", "residuals", "taylor", "diagonal", "zero"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 10**9)
        ref = metrics.compare_file(capture_file, 0.1, keys, progress=False, cache=False)
        monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)  # every factored layer (the Linear ones: T = 1 < K)
        got = metrics.compare_file(capture_file, 0.1, keys, progress=False, cache=False)
    assert all(m["dense_rows"] == [] for m in ref.meta["checkpoints"])
    assert all(m["dense_rows"] for m in got.meta["checkpoints"])
    _same(ref, got)
