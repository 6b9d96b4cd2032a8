"""SPECTRAL on a degenerate smallest Kronecker eigenvalue: the multiplicity is reported and the
answer does not depend on the eigensolver's choice of basis inside the eigenspace."""

from __future__ import annotations

import pytest
import torch

import fisherlab
from fisherlab.operators import KFAC, ExactFisher, KroneckerBlock, TwoLevelKFAC
from fisherlab.operators.coarse import SPECTRAL_MAX_EIGENSPACE, Spectral

from oprefs import DAMPING, cached_capture, quiet_measurements

INVARIANCE_RTOL = 1e-10
"""The same span from two orthonormal bases of one eigenspace: float64 QR, ~1e-14, margin 1e4."""


def _rotated(kfac: KFAC, layer: int, seed: int) -> KFAC:
    """KFAC with the G-eigenbasis of ``layer`` replaced by another orthonormal basis — a valid
    eigendecomposition when G = c·I (every basis is an eigenbasis)."""
    blocks = list(kfac.blocks)
    sA, QA, sG, QG = blocks[layer].eigh
    R = torch.linalg.qr(torch.randn(QG.shape, dtype=QG.dtype, generator=torch.Generator().manual_seed(seed)))[0]
    blocks[layer] = KroneckerBlock((sA, QA, sG, QG @ R), kfac.damping, kfac.damping_mode, factors=blocks[layer].factors)
    return KFAC(blocks)


@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
@pytest.mark.parametrize("k", [1, 2])
def test_degenerate_spectral_is_deterministic(case_id, k):
    cap = cached_capture(case_id, "mse", "exact")  # exact-mode mse: the output layer has G = I exactly
    last = len(cap.layout.layers) - 1
    kfac = KFAC.from_capture(cap, DAMPING)
    A, G = kfac.blocks[last].factors
    assert torch.allclose(G, G[0, 0] * torch.eye(G.shape[0], dtype=G.dtype))  # the premise: G ∝ I
    exact = ExactFisher(cap, DAMPING)
    ref = TwoLevelKFAC.from_capture(cap, DAMPING, Spectral(k), base=kfac, exact=exact)
    zeta = ref.solve(cap.grad)
    for seed in range(3):
        other = TwoLevelKFAC.from_capture(cap, DAMPING, Spectral(k), base=_rotated(kfac, last, seed), exact=exact)
        assert float((other.solve(cap.grad) - zeta).norm()) <= INVARIANCE_RTOL * float(zeta.norm())
    space = ref.space
    assert space.multiplicities[last] > k  # reported
    assert "degenerate smallest eigenvalue" in space.note and any(f"layer {last} ×" in d for d in space.degenerate)


def test_compare_reports_the_multiplicity():
    cap = cached_capture("mlp", "mse", "exact")
    with quiet_measurements():
        row = fisherlab.compare(cap, DAMPING, ["spectral"]).row("spectral")
    assert "degenerate smallest eigenvalue" in row["note"]


def test_large_eigenspace_uses_the_residual_component():
    """A cluster larger than SPECTRAL_MAX_EIGENSPACE contributes one column: the residual's component."""
    cap = cached_capture("mlp", "mse", "exact")
    kfac = KFAC.from_capture(cap, DAMPING, "tikhonov")  # eigenvalues s_G s_A + λ: rank-deficient A ⇒ a big λ-cluster
    op = TwoLevelKFAC.from_capture(cap, DAMPING, Spectral(1), base=kfac)
    big = [i for i, mlt in enumerate(op.space.multiplicities) if mlt > SPECTRAL_MAX_EIGENSPACE]
    assert big, op.space.multiplicities
    for i in big:
        assert op.coarse_dims[i] <= 1  # the residual's component (none when r has no part in it)
    assert op.gap() <= 0

