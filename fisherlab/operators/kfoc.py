"""KFOC: per layer the Frobenius-optimal single Kronecker product of the exact block, and the
Kronecker-product SVD (Van Loan–Pitsianis) it comes from (shared with :mod:`.kpsvd`).

The exact block ``F_ii = (1/B) Σ_n j_n j_nᵀ`` ``[p_i, p_i]`` (p_i = d_out·d_in') has the
*rearrangement* ``R(F_ii) [d_in'², d_out²]``,

    R[(c, c'), (r, r')] = F_ii[(c, r), (c', r')] = (1/B) Σ_n M_n[r, c] M_n[r', c'],
    M_n = MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ   [d_out, d_in'],

with ``‖F_ii − A ⊗ G‖_F = ‖R − vec(A) vec(G)ᵀ‖_F`` (the vec convention makes ``torch.kron(A, G)``
the matrix of ``X ↦ G X Aᵀ``). So the best sum of r Kronecker products is the truncated SVD of R:
``F_ii ≈ Σ_{k≤r} σ_k U_k ⊗ V_k`` with unit singular vectors ``vec(U_k)``, ``vec(V_k)``
(symmetric or antisymmetric matrices, since R commutes with transposing both sides; the top pair of
a PSD F_ii can be taken PSD). fisherlab stores ``A_k = √σ_k U_k``, ``G_k = √σ_k V_k``.

How, without forming F_ii (:func:`kronecker_svd`):

* ``"factors"`` (Linear, T = 1, factored): ``R = PᵀQ/B`` with ``P[b] = vec(ā_bā_bᵀ)`` and
  ``Q[b] = Σ_k vec(g_{b,k}g_{b,k}ᵀ)``, whose Grams are Hadamard squares of the small Grams
  (``PPᵀ = (ĀĀᵀ)∘²``, ``QQᵀ[b,c] = Σ_{k,l} (g_{bk}·g_{cl})²``). Eigendecompose both ``[B, B]``
  Grams, take the SVD of the ``[B, B]`` core, and read every singular pair off as
  ``A = Āᵀ diag(α) Ā``, ``G = Σ_{b,k} β_b g_{bk}g_{bk}ᵀ`` — exact, no iteration, rank ≤ B;
* ``"dense"`` (small layers with positions or dense rows): R formed from the per-example matrices
  (``N·d_in'²·d_out²``), full SVD — ``"auto"`` only where that SVD is cheap or every term is asked
  for (:func:`_dense_or_lanczos`);
* ``"lanczos"``: scipy's ``svds`` (ARPACK Lanczos bidiagonalisation) on the implicit maps
  ``X ↦ (1/B) Σ_n M_nᵀ X M_n`` and ``Y ↦ (1/B) Σ_n M_n Y M_nᵀ`` by batched GEMMs (the issue's
  "power/Lanczos iterations on the per-example factors"; ~43 products for the top triplet on
  tiny-gpt's layers).

The top pair's eigendecompositions are shared by KFOC and KPSVD (:func:`top_pair_eigh`), from the
rows of the ``"factors"`` path where the factors are wide (:data:`ROWS_EIGH_MIN_DIM`).

KFOC = the r = 1 term, ``[F•KFOC]_ii = A_1 ⊗ G_1`` damped like KFAC (π (2.30) by default, or exact
Tikhonov), as a :class:`~fisherlab.operators.kfac.KroneckerBlock` — so it is KFAC with the
Frobenius-optimal factors in place of the expectation-factorised ones (they coincide when
F_ii is itself a Kronecker product).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..capturing.record import Capture
from ..jacobian import Jacobian, LayerJacobian, factor_eigh, psd_eigh_from_rows
from .algebra import BlockDiagonal
from .base import check_damping
from .kfac import DampingMode, KroneckerBlock

__all__ = ["KFOC", "KroneckerSVD", "kronecker_svd", "top_pair_eigh", "DENSE_REARRANGEMENT_NUMEL"]

DENSE_REARRANGEMENT_NUMEL = 2**22
"""``"auto"`` forms R densely when ``d_in'²·d_out²`` is at most this (32 MiB in float64) and its
full SVD is cheap (:data:`DENSE_SVD_FLOPS`) or every term is asked for."""
DENSE_SVD_FLOPS = 10**8
"""``"auto"`` takes ``"lanczos"`` instead of a full SVD of R whose ~4·m·n·min(m, n) flops exceed this
and the ~:data:`LANCZOS_MATVECS` implicit products' (a 625 × 4624 R, tiny-gpt's head at width 0.5:
12 s by SVD, 0.2 s by Lanczos)."""
LANCZOS_MATVECS = 60
"""Products by R or Rᵀ the ``"auto"`` rule expects ARPACK to need for the top few triplets (43 measured)."""

_RANK_RTOL = 1e-13
"""Gram eigenvalues under this fraction of the largest are dropped (round-off directions)."""


@dataclass
class KroneckerSVD:
    """The top Kronecker terms of one layer's block: ``F_ii ≈ Σ_k A[k] ⊗ G[k]``.

    Attributes:
        sigma: singular values of R, descending ``[r]``.
        A: ``[r, d_in', d_in']``; G: ``[r, d_out, d_out]`` (``A[k]``, ``G[k]`` each of norm √σ_k,
            the first pair PSD with positive traces).
        solver: ``"factors"``, ``"dense"`` or ``"lanczos"``.
    """

    sigma: Tensor
    A: Tensor
    G: Tensor
    solver: str
    rows: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    """``"factors"`` only: ``(a [B, d_in'], α [B, r], g [N, d_out], β [N, r])`` with
    ``A[k] = aᵀ diag(α[:, k]) a`` and ``G[k] = gᵀ diag(β[:, k]) g`` (rank ≤ B), for products
    that never touch the d × d factors (:class:`~fisherlab.operators.kpsvd.KPSVDBlock`)."""

    @property
    def r(self) -> int:
        return int(self.sigma.shape[0])


def _rearranged_maps(lj: LayerJacobian):
    """``(R X, Rᵀ Y)`` for batches ``X [c, d_out, d_out]``, ``Y [c, d_in', d_in']``."""
    if lj.a is not None and lj.g is not None and lj.T == 1:
        a = lj.a[:, 0]  # [B, d_in']
        g = lj.g[:, :, 0]  # [B, K, d_out]

        def R(X: Tensor) -> Tensor:
            q = torch.einsum("bkr,crs,bks->cb", g, X, g)
            return torch.einsum("bi,cb,bj->cij", a, q, a) / lj.B

        def RT(Y: Tensor) -> Tensor:
            q = torch.einsum("bi,cij,bj->cb", a, Y, a)
            return torch.einsum("bkr,cb,bks->crs", g, q, g) / lj.B

        return R, RT
    M = lj.per_example_matrices()  # [N, d_out, d_in']
    Mt = M.mT

    def R(X: Tensor) -> Tensor:  # (1/B) Σ_n M_nᵀ X M_n by batched GEMMs (a 3-operand einsum plans every call)
        return (Mt.unsqueeze(0) @ X.unsqueeze(1) @ M.unsqueeze(0)).sum(1) / lj.B

    def RT(Y: Tensor) -> Tensor:  # (1/B) Σ_n M_n Y M_nᵀ
        return (M.unsqueeze(0) @ Y.unsqueeze(1) @ Mt.unsqueeze(0)).sum(1) / lj.B

    return R, RT


def kronecker_svd(lj: LayerJacobian, r: int = 1, solver: str = "auto") -> KroneckerSVD:
    """The top ``r`` Kronecker terms of layer ``lj``'s exact block (see the module docstring).

    ``r`` is clipped to the rank the solver can resolve (the ``"factors"`` path: the numerical rank
    of the ``[B, B]`` Grams; ``"dense"``: min(d_in'², d_out²); ``"lanczos"``: min − 1).
    """
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    linear = lj.a is not None and lj.g is not None and lj.T == 1
    if solver == "auto":
        solver = "factors" if linear else _dense_or_lanczos(lj, r)
    rows = None
    if solver == "factors":
        if not linear:
            raise ValueError(f"layer '{lj.spec.name}': the 'factors' Kronecker SVD needs a factored layer with one position")
        sigma, A, G, rows = _svd_from_factors(lj, r)
    elif solver == "dense":
        if lj.a is not None and lj.g is not None and lj.T == 1:
            a, g = lj.a[:, 0], lj.g[:, :, 0]
            P = (a[:, :, None] * a[:, None, :]).reshape(lj.B, -1)
            Q = torch.einsum("bkr,bks->brs", g, g).reshape(lj.B, -1)
            Rm = P.T @ Q / lj.B
        else:
            M = lj.per_example_matrices()
            Rm = torch.einsum("nri,nsj->ijrs", M, M).reshape(d_in * d_in, d_out * d_out) / lj.B
        U, S, Vh = torch.linalg.svd(Rm, full_matrices=False)
        k = min(r, S.shape[0])
        sigma, A, G = S[:k], U[:, :k].T.reshape(k, d_in, d_in), Vh[:k].reshape(k, d_out, d_out)
    elif solver == "lanczos":
        sigma, A, G = _svd_lanczos(lj, r)
    else:
        raise ValueError(f"solver must be 'auto', 'factors', 'dense' or 'lanczos', got {solver!r}")
    # unit singular vectors -> balanced factors; the sign making tr A_k ≥ 0 (A_1, G_1 PSD then)
    sign = torch.where(torch.diagonal(A, dim1=1, dim2=2).sum(1) < 0, -1.0, 1.0).to(A.dtype)
    scale = sigma.clamp_min(0).sqrt() * sign
    A = A * scale[:, None, None]
    G = G * scale[:, None, None]
    if rows is not None:
        a, alpha, g, beta = rows
        rows = (a, alpha * scale, g, beta * scale)
    return KroneckerSVD(sigma, A, G, solver, rows)


_TOP_PAIR_EIGH: "weakref.WeakKeyDictionary[LayerJacobian, tuple]" = weakref.WeakKeyDictionary()


def top_pair_eigh(lj: LayerJacobian, ks: KroneckerSVD) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s_A, Q_A, s_G, Q_G)`` of the symmetrised top pair ``(A_1, G_1)`` of ``ks`` (layer ``lj``).

    Computed once per layer and top pair: KFOC and KPSVD of one Jacobian (a ``compare``) share the
    two eigendecompositions, reused only when the pair is bit-for-bit the one decomposed before.
    """
    A1, G1 = _symmetric(ks.A[0]), _symmetric(ks.G[0])
    hit = _TOP_PAIR_EIGH.get(lj)
    if hit is not None and torch.equal(hit[0], A1) and torch.equal(hit[1], G1):
        return hit[2]
    if ks.rows is not None:
        a, alpha, g, beta = ks.rows
        sA, QA = _psd_eigh(A1, a, alpha[:, 0])
        sG, QG = _psd_eigh(G1, g, beta[:, 0])
        eigh = (sA, QA, sG, QG)
    else:
        eigh = factor_eigh(A1, G1)
    _TOP_PAIR_EIGH[lj] = (A1, G1, eigh)
    return eigh


ROWS_EIGH_MIN_DIM = 512
"""The top pair's factors ``rowsᵀ diag(w) rows`` of at least this dimension, built from at most half
as many rows, are eigendecomposed from their rows (:func:`~fisherlab.jacobian.psd_eigh_from_rows`;
mnist-ae's 785–1001-wide factors at B = 256); smaller ones by ``eigh`` (the suite's exact numbers)."""


def _psd_eigh(M: Tensor, rows: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``M = rowsᵀ diag(w) rows`` (the PSD top pair: w ≥ 0 up to round-off)."""
    r, n = rows.shape
    wmax = float(w.abs().max()) if w.numel() else 0.0
    if n < ROWS_EIGH_MIN_DIM or 2 * r > n or wmax == 0.0 or float(w.min()) < -1e-12 * wmax:
        return torch.linalg.eigh(M)
    return psd_eigh_from_rows(rows * w.clamp_min(0).sqrt()[:, None], 1.0)


def _dense_or_lanczos(lj: LayerJacobian, r: int) -> str:
    """``"dense"`` when R fits (:data:`DENSE_REARRANGEMENT_NUMEL`) and either every term is asked
    for or its full SVD costs less than :data:`DENSE_SVD_FLOPS` or the Lanczos products; else ``"lanczos"``."""
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    m, n = d_in**2, d_out**2
    if m * n > DENSE_REARRANGEMENT_NUMEL:
        return "lanczos"
    svd = 4 * m * n * min(m, n)
    lanczos = LANCZOS_MATVECS * lj.N * d_in * d_out * (d_in + d_out)
    return "dense" if r >= min(m, n) - 1 or svd <= max(DENSE_SVD_FLOPS, lanczos) else "lanczos"


def _svd_from_factors(lj: LayerJacobian, r: int) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Exact SVD of ``R = PᵀQ/B`` through the ``[B, B]`` Grams (Linear, T = 1); also the rows
    ``(a, α, g, β)`` of the unit singular pairs (see :attr:`KroneckerSVD.rows`)."""
    a = lj.a[:, 0]  # type: ignore[index]  # [B, d_in']
    g = lj.g[:, :, 0]  # type: ignore[index]  # [B, K, d_out]
    B, K, d_out = g.shape
    Gp = (a @ a.T).pow(2)
    gf = g.reshape(B * K, d_out)
    Gq = (gf @ gf.T).pow(2).reshape(B, K, B, K).sum((1, 3))

    def half(Gm: Tensor) -> tuple[Tensor, Tensor]:
        lam, V = torch.linalg.eigh(Gm)
        keep = lam > _RANK_RTOL * lam[-1].clamp_min(torch.finfo(Gm.dtype).tiny)
        return lam[keep], V[:, keep]

    lp, Vp = half(Gp)
    lq, Vq = half(Gq)
    core = (lp.sqrt()[:, None] * (Vp.T @ Vq) * lq.sqrt()[None, :]) / B
    Us, S, Vsh = torch.linalg.svd(core, full_matrices=False)
    k = min(r, S.shape[0])
    # term by term, so that each term's numbers do not depend on r (KFOC and KPSVD share the top pair)
    alpha = torch.stack([Vp @ (Us[:, j] / lp.sqrt()) for j in range(k)], 1)  # [B, k]: vec(U_k) = Pᵀ α_k
    beta = torch.stack([Vq @ (Vsh[j] / lq.sqrt()) for j in range(k)], 1)  # [B, k]: vec(V_k) = Qᵀ β_k
    beta_rows = beta.repeat_interleave(K, dim=0)  # [N, k]
    A = torch.stack([(a * alpha[:, j, None]).T @ a for j in range(k)])
    G = torch.stack([(gf * beta_rows[:, j, None]).T @ gf for j in range(k)])
    return S[:k], A, G, (a, alpha, gf, beta_rows)


def _svd_lanczos(lj: LayerJacobian, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """scipy ``svds`` on the implicit rearrangement (float64)."""
    from scipy.sparse.linalg import LinearOperator, svds

    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    R, RT = _rearranged_maps(lj)
    dt = (lj.a if lj.a is not None else lj.dense).dtype  # type: ignore[union-attr]
    shape = (d_in * d_in, d_out * d_out)

    def mv(x: np.ndarray) -> np.ndarray:
        X = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1).copy()).reshape(1, d_out, d_out)
        return R(X.to(dt)).reshape(-1).double().numpy()

    def rmv(y: np.ndarray) -> np.ndarray:
        Y = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(-1).copy()).reshape(1, d_in, d_in)
        return RT(Y.to(dt)).reshape(-1).double().numpy()

    k = min(r, min(shape) - 1)
    if k < 1:
        raise ValueError(f"layer '{lj.spec.name}': the Lanczos Kronecker SVD needs min(d_in'², d_out²) > 1")
    op = LinearOperator(shape, matvec=mv, rmatvec=rmv, dtype=np.float64)
    v0 = np.ones(min(shape), dtype=np.float64)
    U, S, Vh = svds(op, k=k, tol=0, v0=v0, maxiter=10_000)
    order = np.argsort(S)[::-1]
    U, S, Vh = U[:, order], S[order], Vh[order]
    A = torch.from_numpy(np.ascontiguousarray(U.T)).reshape(k, d_in, d_in)
    G = torch.from_numpy(np.ascontiguousarray(Vh)).reshape(k, d_out, d_out)
    return torch.from_numpy(S.copy()), A, G


class KFOC(BlockDiagonal):
    """F•KFOC = blockdiag of the damped Frobenius-optimal Kronecker products, ``[p, p]``.

    ``KFOC(blocks)`` takes ready :class:`KroneckerBlock` s; :meth:`from_capture` computes the top
    Kronecker term of every layer (:func:`kronecker_svd`, r = 1).

    Attributes:
        blocks, damping, damping_mode; svd: the per-layer :class:`KroneckerSVD` (from_capture).
    """

    def __init__(self, blocks: list[KroneckerBlock]) -> None:
        super().__init__(blocks, name="kfoc")
        self.damping = blocks[0].damping
        self.damping_mode = blocks[0].mode
        self.svd: list[KroneckerSVD] = []

    @classmethod
    def from_capture(
        cls,
        source: Capture | Jacobian,
        damping: float,
        damping_mode: str | DampingMode = "pi",
        *,
        solver: str = "auto",
        dtype: torch.dtype = torch.float64,
    ) -> "KFOC":
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks, svds = [], []
        for lj in jac.layers:
            ks = kronecker_svd(lj, 1, solver)
            A, G = _symmetric(ks.A[0]), _symmetric(ks.G[0])
            blocks.append(KroneckerBlock(top_pair_eigh(lj, ks), lam, damping_mode, factors=(A, G)))
            svds.append(ks)
        op = cls(blocks)
        op.svd = svds
        return op

    @property
    def factors(self) -> list[tuple[Tensor, Tensor]]:
        return [b.factors for b in self.blocks]


def _symmetric(M: Tensor) -> Tensor:
    return (M + M.mT) / 2
