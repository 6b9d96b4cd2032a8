"""Device and precision plumbing (issue 14): every device code path runs on the CPU here (an
explicit ``device="cpu"``); the CUDA test runs only where a GPU is present. Also the factor
eigendecomposition from rows (the ResNet-18 setup fix) against LAPACK's ``eigh``."""

from __future__ import annotations

import math

import pytest
import torch

import fisherlab
from fisherlab.errors import FisherlabError
from fisherlab import jacobian as jm
from fisherlab.jacobian import Jacobian, MixedLayerJacobian
from fisherlab.operators import KFAC, ExactFisher

from cases import MODELS, make_capture

IDENTICAL = 1e-12
"""The same float64 algebra on the same device: equal to round-off (relative)."""
MIXED_RTOL = 1e-4
"""float32 products and Grams (eps ≈ 6e-8) on a tiny, well-conditioned case at λ = 0.1: errors
~1e-6 relative; 1e-4 leaves a margin of 100."""
COLUMNS = ("energy_error", "relative_error", "gap", "euclidean_relative_error", "cosine")
METHODS = ["exact", "block-diagonal", "kfac", "kfac-tikhonov", "nicolaides", "residuals"]


@pytest.fixture(scope="module")
def cnn_capture():
    return make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, n_samples=2)[0]


def _same_table(a, b, rtol, scale):
    for ra, rb in zip(a.rows, b.rows):
        for col in COLUMNS:
            atol = rtol * (1.0 if col in ("relative_error", "cosine", "euclidean_relative_error") else scale)
            assert rb[col] == pytest.approx(ra[col], rel=rtol, abs=atol, nan_ok=True), (ra["method"], col)


def test_compare_device_cpu_explicit_equals_default(cnn_capture):
    ref = fisherlab.compare(cnn_capture, 0.1, METHODS)
    got = fisherlab.compare(cnn_capture, 0.1, METHODS, device="cpu")
    _same_table(ref, got, IDENTICAL, ref.meta["zeta_norm2"])


def test_jacobian_to_moves_factors_once(cnn_capture):
    jac = Jacobian.coerce(cnn_capture, device="cpu")
    assert jac.device == torch.device("cpu") and jac.dtype == torch.float64
    assert Jacobian.coerce(jac, device="cpu") is jac  # already there: not copied
    moved = jac.to("cpu", torch.float32)
    assert moved.dtype == torch.float32 and moved is not jac
    op = ExactFisher(jac, 0.1)
    assert op.device == jac.device
    v = torch.randn(jac.p, dtype=torch.float32)  # a float32 CPU vector is converted by the front end
    assert (op @ v).dtype == torch.float64
    K = KFAC.from_capture(jac, 0.1)
    assert K.device == jac.device
    assert torch.allclose(K.to_dense() @ K.solve(v.double()), v.double(), rtol=1e-10, atol=1e-10)


def test_mixed_precision_error_is_small(cnn_capture):
    ref = fisherlab.compare(cnn_capture, 0.1, METHODS)
    got = fisherlab.compare(cnn_capture, 0.1, METHODS, precision="mixed", device="cpu")
    jac = Jacobian.coerce(cnn_capture, precision="mixed")
    assert all(isinstance(lj, MixedLayerJacobian) for lj in jac.layers) and jac.dtype == torch.float64
    assert jac.layers[0].dense_rows().dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in jac.layers[-1].kfac_eigh)  # factorizations in float64
    _same_table(ref, got, MIXED_RTOL, ref.meta["zeta_norm2"])


def test_unknown_precision_is_one_line(cnn_capture):
    with pytest.raises(FisherlabError, match="precision must be one of"):
        fisherlab.compare(cnn_capture, 0.1, ["kfac"], precision="half")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compare_on_cuda_equals_cpu(cnn_capture):
    ref = fisherlab.compare(cnn_capture, 0.1, METHODS)
    got = fisherlab.compare(cnn_capture, 0.1, METHODS, device="cuda")
    _same_table(ref, got, 1e-9, ref.meta["zeta_norm2"])  # another BLAS: round-off order differs


@pytest.mark.parametrize("n,r", [(64, 10), (80, 40)])
def test_psd_eigh_from_rows_matches_lapack(n, r):
    g = torch.Generator().manual_seed(n + r)
    rows = torch.randn(r, n, generator=g, dtype=torch.float64)
    rows[-1] = rows[0] + rows[1]  # a rank deficiency inside the rows too
    M = rows.T @ rows / 7
    s, Q = jm.psd_eigh_from_rows(rows, 1 / 7)
    s_ref = torch.linalg.eigvalsh(M)
    assert torch.allclose(s, s_ref.clamp_min(0), atol=1e-12 * float(s_ref[-1]))
    assert float((Q.T @ Q - torch.eye(n, dtype=M.dtype)).abs().max()) < 1e-12
    assert float((M @ Q - Q * s).norm() / M.norm()) < 1e-13
    # the KFAC-style damped inverse is the same operator
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = 1e-2 * float(s_ref[-1])
    got = Q @ ((Q.T @ X) / (s + d)[:, None])
    want = torch.linalg.solve(M + d * torch.eye(n, dtype=M.dtype), X)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_lowrank_eigh_rule_keeps_small_factors_on_lapack():
    assert not jm.lowrank_eigh_applies(100, 500)  # small: LAPACK, tiny cases keep their numbers
    assert jm.lowrank_eigh_applies(512, 4609)  # ResNet-18 layer4 at B = 32
    assert not jm.lowrank_eigh_applies(8192, 4609)  # more rows than the dimension
    assert math.isfinite(jm.LOWRANK_EIGH_MAX_FILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_in_the_library(cnn_capture):
    """``device="cuda"`` where there is none: a ConfigError naming the keyword, never torch's
    AssertionError from deep inside (operators, compare)."""
    from fisherlab.errors import ConfigError
    from fisherlab.jacobian import Jacobian

    with pytest.raises(ConfigError, match=r"^device 'cuda': CUDA is not available on this machine; use device='cpu'$"):
        fisherlab.compare(cnn_capture, 0.1, ["kfac"], device="cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Jacobian.coerce(cnn_capture, device="cuda:0")
