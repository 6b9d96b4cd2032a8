"""Dense float64 references for the operator tests (test_jacobian, test_operators, test_identities).

Everything here is written from the formulas of MATH.md / the paper, independently of
``fisherlab.operators``: p × p matrices for tiny nets only. Captures are cached per process
(a capture costs ~0.2 s; the operators never modify one).
"""

from __future__ import annotations

import math
import contextlib
import warnings
from functools import lru_cache

import torch
from torch import Tensor

from cases import MODELS, build_model, make_batch, make_capture
from fisherlab.testing import dense_fisher_from_capture, dense_kfac_factors

DAMPING = 0.1
"""λ of the operator tests: small enough that F matters, large enough for well-conditioned references."""


@lru_cache(maxsize=None)
def cached_capture(case_id: str, loss: str, mode: str, B: int = 3, n_samples: int = 2, storage: str = "auto",
                   dtype: torch.dtype = torch.float64, seed: int = 0):
    if dtype == torch.float64:
        cap, *_ = make_capture(MODELS[case_id], loss, mode, B=B, n_samples=n_samples, seed=seed, storage=storage)
        return cap
    # the same model, batch and draws as make_capture, stored in ``dtype``
    import fisherlab

    case = MODELS[case_id]
    model = build_model(case, seed)
    x, y = make_batch(case, loss, B, seed + 1)
    return fisherlab.capture(
        model, x, y, loss=loss, fisher=mode, n_samples=n_samples,
        generator=torch.Generator().manual_seed(seed + 2), device="cpu", dtype=dtype, storage=storage,
    )


def eye(p: int) -> Tensor:
    return torch.eye(p, dtype=torch.float64)


def dense_fbullet(cap, lam: float) -> Tensor:
    """F• = JᵀJ/B + λI ``[p, p]`` (2.17)."""
    F = dense_fisher_from_capture(cap)
    return F + lam * eye(F.shape[0])


def exact_zeta(cap, lam: float) -> Tensor:
    """ζ = F•⁻¹∇h (3.2) by a dense solve."""
    return torch.linalg.solve(dense_fbullet(cap, lam), cap.grad.double())


def pi_of(A: Tensor, G: Tensor) -> float:
    """π = √[(tr A/dim A)/(tr G/dim G)] (2.30), written out here independently."""
    return math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))


def kfac_factors_reference(cap) -> list[tuple[Tensor, Tensor]]:
    """(A_i, G_i) by the loops of :func:`dense_kfac_factors` for factored layers; the stored
    factors for dense-stored layers (those are checked against the loops in test_jacobian)."""
    if all(lc.a is not None for lc in cap.layers):
        return dense_kfac_factors(cap)
    out = []
    for lc in cap.layers:
        if lc.a is not None:
            out.append(dense_kfac_factors(type(cap)(**{**cap.__dict__, "layers": [lc]}))[0])
        else:
            out.append((lc.A.double(), lc.G.double()))
    return out


def dense_kfac(cap, lam: float, damping_mode: str = "pi") -> Tensor:
    """blockdiag(Ã_i ⊗ G̃_i) (2.30) or blockdiag(A_i ⊗ G_i + λI), from the loop factors of
    :func:`fisherlab.testing.dense_kfac_factors` (the vec convention makes torch.kron(A, G) the
    matrix of X ↦ G X Aᵀ)."""
    blocks = []
    for A, G in kfac_factors_reference(cap):
        if damping_mode == "pi":
            pi = pi_of(A, G)
            At = A + pi * math.sqrt(lam) * eye(A.shape[0])
            Gt = G + math.sqrt(lam) / pi * eye(G.shape[0])
            blocks.append(torch.kron(At, Gt))
        else:
            blocks.append(torch.kron(A, G) + lam * eye(A.shape[0] * G.shape[0]))
    return torch.block_diag(*blocks)


def dense_blocks(M: Tensor, cap) -> Tensor:
    """The layer-diagonal blocks of ``M`` as a block-diagonal matrix."""
    return torch.block_diag(*[M[s.offset : s.stop, s.offset : s.stop] for s in cap.layout.layers])


def dense_R0T(V: list[Tensor]) -> Tensor:
    """R_0ᵀ = blockdiag(V_1, …, V_ℓ) ``[p, m]`` (3.21)."""
    return torch.block_diag(*V)


def dense_two_level_inverse(Fb: Tensor, Kinv: Tensor, R0T: Tensor) -> Tensor:
    """(3.15): F•2L⁻¹ = K⁻¹ + R_0ᵀF_c⁻¹R_0(I − F•K⁻¹), F_c = R_0F•R_0ᵀ (3.12)."""
    Fc = R0T.T @ Fb @ R0T
    return Kinv + R0T @ torch.linalg.solve(Fc, R0T.T) @ (eye(Fb.shape[0]) - Fb @ Kinv)


def fnorm2(Fb: Tensor, x: Tensor) -> float:
    """‖x‖²_F• = xᵀF•x."""
    return float(x @ Fb @ x)


def same_span(V: Tensor, W: Tensor, tol: float) -> bool:
    """span(V) = span(W) for orthonormal V: same rank and W's columns unchanged by V Vᵀ."""
    Wn = W / W.norm(dim=0, keepdim=True).clamp_min(1e-300)
    rank_W = int(torch.linalg.matrix_rank(Wn, rtol=1e-10))
    return V.shape[1] == rank_W and float((Wn - V @ (V.T @ Wn)).norm()) <= tol




@contextlib.contextmanager
def quiet_measurements():
    """Silence compare's MeasurementWarning (worse-than-zero flags of the tiny problems at λ = 0.1):
    for tests that check numbers, not the flags (tests/test_intervals.py checks those)."""
    from fisherlab.errors import MeasurementWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        yield
