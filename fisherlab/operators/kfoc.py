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
* ``"lanczos"``: iterations on the implicit maps ``R: X ↦ (1/B) Σ_n M_nᵀ X M_n`` and
  ``Rᵀ: Y ↦ (1/B) Σ_n M_n Y M_nᵀ`` (the issue's "power/Lanczos iterations on the per-example
  factors"). The products (:data:`PRODUCT_FORMS`, chosen per layer by flops, :func:`product_form`):
  ``"per-example"`` through ``M [N, d_out, d_in']`` (``2·N·d_out·d_in'·(d_in' + d_out)``), or, for
  factored layers with positions, ``"factored"`` through the ``[T, T]`` cores
  ``R X = (1/B) Σ_b Ā_bᵀ (Σ_k G_{bk} X G_{bk}ᵀ) Ā_b`` (``Ā_b = ā[b] [T, d_in']``,
  ``G_{bk} = g[b, k] [T, d_out]``; ``2·(N·T·d_out² + N·T²·d_out + B·T²·d_in' + B·T·d_in'²)``, M never
  formed), in the orthonormal bases of the rows of ā and g where they are fewer than the dimension
  (:data:`REDUCE_MAX_FILL`: exact, d_in' → B·T). r = 1 (KFOC): Lanczos on the normal map of the
  smaller side from the layer's KFAC factor (:func:`_lanczos_top`, stop :data:`LANCZOS_TOL`); r ≥ 2:
  scipy's ARPACK ``svds`` on the same products and start (``"arpack"``: ``svds`` for every r).
  ResNet-18 at B = 32: see ``analysis/bench/kfoc_bench.py`` (before: ARPACK from ones at tol = 0 on
  the per-example products, 43 products a layer, 3·10¹¹–8·10¹¹ flops each on layer4).

The top pair's eigendecompositions are shared by KFOC and KPSVD (:func:`top_pair_eigh`), from the
rows of the ``"factors"`` path where the factors are wide (:data:`ROWS_EIGH_MIN_DIM`), or from the
reduced bases of ``"lanczos"`` (``eigh`` of the reduced pair, the complement at 0).

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
from ..errors import FisherlabError
from ..jacobian import Jacobian, LayerJacobian, factor_eigh, psd_eigh_from_rows
from .algebra import BlockDiagonal
from .base import check_damping
from .kfac import DampingMode, KroneckerBlock

__all__ = ["KFOC", "KroneckerSVD", "kronecker_svd", "top_pair_eigh", "product_form", "product_flops",
           "DENSE_REARRANGEMENT_NUMEL", "LANCZOS_TOL", "PRODUCT_FORMS"]

DENSE_REARRANGEMENT_NUMEL = 2**22
"""``"auto"`` forms R densely when ``d_in'²·d_out²`` is at most this (32 MiB in float64) and its
full SVD is cheap (:data:`DENSE_SVD_FLOPS`) or every term is asked for."""
DENSE_SVD_FLOPS = 10**8
"""``"auto"`` takes ``"lanczos"`` instead of a full SVD of R whose ~4·m·n·min(m, n) flops exceed this
and the ~:data:`LANCZOS_MATVECS` implicit products' (a 625 × 4624 R, tiny-gpt's head at width 0.5:
12 s by SVD, 0.2 s by Lanczos)."""
LANCZOS_MATVECS = 60
"""Products by R or Rᵀ the ``"auto"`` rules expect the iterative solver to need (ARPACK from ones: 43
measured; the r = 1 Lanczos from the KFAC start: 11–29 on ResNet-18)."""

LANCZOS_TOL = 1e-10
"""The r = 1 Lanczos (:func:`_lanczos_top`) stops when the top Ritz pair of the normal map ``H = RᵀR``
(or ``RRᵀ``, the smaller side) has residual ``‖Hv − θv‖ ≤ LANCZOS_TOL·θ``; the unit singular vectors
are then off by ≲ LANCZOS_TOL·θ/(θ − θ₂) (the Ritz-vector bound). ``tol=0`` in :func:`kronecker_svd` is
the old machine-precision stop (``tests/test_kfoc_solver.py`` measures both against the dense SVD)."""
LANCZOS_BASIS = 40
"""Lanczos vectors kept (full reorthogonalisation) before an explicit restart from the Ritz vector."""
LANCZOS_MAX_PRODUCTS = 4000
"""Products by R or Rᵀ after which the r = 1 Lanczos gives up (one-line error naming the layer)."""
PRODUCT_FORMS = ("linear", "factored", "per-example")
"""How R's products are formed: ``"linear"`` (factored, T = 1: a scalar per example),
``"factored"`` (positions: through the ``[T, T]`` cores of the factors, :func:`_factored_products`),
``"per-example"`` (through ``M = per_example_matrices()``, :func:`_per_example_products`)."""
PER_EXAMPLE_MAX_NUMEL = 2**27
"""``"auto"`` never forms ``M [N, d_out, d_in']`` of more numbers than this (1 GiB in float64)."""
REDUCE_MAX_FILL = 0.5
"""``"factored"`` products run in an orthonormal basis of the rows of ā (g) when they number at most
this fraction of d_in' (d_out): ``āᵀ = Q_a Rq`` (QR), so ``R = (Q_a⊗Q_a) R̂ (Q_g⊗Q_g)ᵀ`` exactly, and
the products cost ``B·T·(B·T)²`` instead of ``B·T·d_in'²`` (layer4 of ResNet-18 at B = 32: 512 rows
for d_in' = 4609)."""
_PRODUCT_TEMP_NUMEL = 2**25
"""Temporaries of one chunk of a product (256 MiB in float64)."""

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
    reduced: tuple[Tensor | None, Tensor, Tensor | None, Tensor] | None = None
    """``"lanczos"`` only: ``(Q_a [d_in', r_a] or None, Â_1, Q_g [d_out, r_g] or None, Ĝ_1)``, the
    top pair in the orthonormal bases it was computed in (``A_1 = Q_a Â_1 Q_aᵀ``; None: the identity),
    for its eigendecomposition without a d_in' × d_in' ``eigh`` (:func:`top_pair_eigh`)."""
    products: int = 0
    """Products by R or Rᵀ the iterative solver used (0 for the direct ones)."""
    product: str = ""
    """``"lanczos"``: the product form (:data:`PRODUCT_FORMS`), ``"+reduced"`` when in a reduced basis."""

    @property
    def r(self) -> int:
        return int(self.sigma.shape[0])


def _linear_products(a: Tensor, g: Tensor, B: int):
    """``(R X, Rᵀ Y)`` of a Linear layer (T = 1) from ``a [B, d_in']``, ``g [B, K, d_out]``: scalars per example."""

    def R(X: Tensor) -> Tensor:
        q = torch.einsum("bkr,crs,bks->cb", g, X.to(g.dtype), g)
        return torch.einsum("bi,cb,bj->cij", a, q, a) / B

    def RT(Y: Tensor) -> Tensor:
        q = torch.einsum("bi,cij,bj->cb", a, Y.to(a.dtype), a)
        return torch.einsum("bkr,cb,bks->crs", g, q, g) / B

    return R, RT


def _per_example_products(M: Tensor, B: int):
    """``(R X, Rᵀ Y)`` from the per-example matrices ``M [N, d_out, d_in']`` (:data:`PRODUCT_FORMS`
    ``"per-example"``): ``R X = (1/B) Σ_n M_nᵀ (X M_n)`` and ``Rᵀ Y = (1/B) Σ_n (M_n Y) M_nᵀ``, each
    as one ``[d, N·d_out or N·d_in'] × [·, d]`` GEMM per chunk of examples (never an
    ``[N, d_in', d_in']`` temporary), on two contiguous copies of M made once."""
    N, d_out, d_in = M.shape
    step = max(1, _PRODUCT_TEMP_NUMEL // max(d_out * d_in, 1))
    Mc = M.contiguous()  # [N, d_out, d_in']: rows (n, r)
    Mr = M.transpose(0, 1).reshape(d_out, N * d_in)  # [d_out, (n, j)]

    def R(X: Tensor) -> Tensor:
        out = M.new_zeros(X.shape[0], d_in, d_in)
        for c in range(X.shape[0]):
            for s in range(0, N, step):
                Ms = Mc[s : s + step]
                out[c].addmm_(Ms.reshape(-1, d_in).T, (X[c].to(M.dtype) @ Ms).reshape(-1, d_in))
        return out / B

    def RT(Y: Tensor) -> Tensor:
        out = M.new_zeros(Y.shape[0], d_out, d_out)
        for c in range(Y.shape[0]):
            for s in range(0, N, step):
                Z = (Mc[s : s + step] @ Y[c].to(M.dtype)).transpose(0, 1).reshape(d_out, -1)  # [d_out, (n, j)]
                out[c].addmm_(Z, Mr[:, s * d_in : (s + step) * d_in].T)
        return out / B

    return R, RT


def _factored_products(a: Tensor, g: Tensor, B: int):
    """``(R X, Rᵀ Y)`` from the factors ``a [B, T, d_a]``, ``g [B, K, T, d_g]`` of a layer with positions
    (:data:`PRODUCT_FORMS` ``"factored"``): with ``Ā_b = a[b] [T, d_a]``, ``G_{bk} = g[b, k] [T, d_g]``
    (so ``M_{bk} = G_{bk}ᵀ Ā_b``),

        R X = (1/B) Σ_b Ā_bᵀ (Σ_k G_{bk} X G_{bk}ᵀ) Ā_b,    Rᵀ Y = (1/B) Σ_{b,k} G_{bkᵀ} (Ā_b Y Ā_bᵀ) G_{bk},

    through the ``[T, T]`` cores, in chunks of examples (temporaries under :data:`_PRODUCT_TEMP_NUMEL`);
    the last contraction is one ``[d, chunk·T] × [chunk·T, d]`` GEMM. ~:func:`product_flops`."""
    _, K, T, d_g = g.shape
    d_a = a.shape[-1]
    step = max(1, _PRODUCT_TEMP_NUMEL // max(K * T * (max(T, d_g) + d_a), 1))

    def R(X: Tensor) -> Tensor:
        out = a.new_zeros(X.shape[0], d_a, d_a)
        for c in range(X.shape[0]):
            for s in range(0, B, step):
                ab, gb = a[s : s + step], g[s : s + step]
                n = ab.shape[0]
                gf = gb.reshape(n * K, T, d_g)
                S = ((gf @ X[c].to(a.dtype)) @ gf.mT).reshape(n, K, T, T).sum(1)  # [n, T, T]
                out[c].addmm_(ab.reshape(-1, d_a).T, (S @ ab).reshape(-1, d_a))
        return out / B

    def RT(Y: Tensor) -> Tensor:
        out = a.new_zeros(Y.shape[0], d_g, d_g)
        for c in range(Y.shape[0]):
            for s in range(0, B, step):
                ab, gb = a[s : s + step], g[s : s + step]
                S = (ab @ Y[c].to(a.dtype)) @ ab.mT  # [n, T, T]
                out[c].addmm_(gb.reshape(-1, d_g).T, (S[:, None] @ gb).reshape(-1, d_g))
        return out / B

    return R, RT


def product_flops(lj: LayerJacobian, form: str) -> int:
    """Flops of one product by R or Rᵀ of layer ``lj`` in ``form`` (:data:`PRODUCT_FORMS`), plus, for
    ``"per-example"`` on factors, forming ``M [N, d_out, d_in']`` once spread over
    :data:`LANCZOS_MATVECS` products."""
    B, N, T, d_in, d_out = lj.B, lj.N, lj.T, lj.spec.d_in_bar, lj.spec.d_out
    if form == "linear":
        return 2 * N * d_out * d_out + 2 * B * d_in * d_in
    if form == "factored":
        return 2 * (N * T * d_out * d_out + N * T * T * d_out + B * T * T * d_in + B * T * d_in * d_in)
    form_M = 2 * N * T * d_out * d_in // LANCZOS_MATVECS if lj.factored else 0
    return 2 * N * d_out * d_in * (d_in + d_out) + form_M


def product_form(lj: LayerJacobian) -> str:
    """The form of R's products for layer ``lj`` (:data:`PRODUCT_FORMS`): ``"linear"`` (factored,
    T = 1), ``"per-example"`` (dense rows), else the cheaper of ``"factored"`` and ``"per-example"``
    by :func:`product_flops` (``"factored"`` too when ``M`` would exceed :data:`PER_EXAMPLE_MAX_NUMEL`)."""
    if not lj.factored:
        return "per-example"
    if lj.T == 1:
        return "linear"
    if lj.N * lj.p > PER_EXAMPLE_MAX_NUMEL:
        return "factored"
    return "factored" if product_flops(lj, "factored") <= product_flops(lj, "per-example") else "per-example"


def _rearranged_maps(lj: LayerJacobian, form: str = "auto"):
    """``(R X, Rᵀ Y)`` for batches ``X [c, d_out, d_out]``, ``Y [c, d_in', d_in']`` in ``form``
    (:data:`PRODUCT_FORMS`; ``"auto"``: :func:`product_form`)."""
    form = product_form(lj) if form == "auto" else form
    if form == "linear" or form == "factored":
        if not lj.factored or (form == "linear") != (lj.T == 1):
            raise ValueError(f"layer '{lj.spec.name}': the {form!r} products need a factored layer with "
                             f"{'one position' if form == 'linear' else 'positions'}")
        if form == "linear":
            return _linear_products(lj.a[:, 0], lj.g[:, :, 0], lj.B)  # type: ignore[index]
        return _factored_products(lj.a, lj.g, lj.B)  # type: ignore[arg-type]
    if form != "per-example":
        raise ValueError(f"product form must be 'auto' or one of {PRODUCT_FORMS}, got {form!r}")
    return _per_example_products(lj.per_example_matrices(), lj.B)


def kronecker_svd(lj: LayerJacobian, r: int = 1, solver: str = "auto", *, product: str = "auto",
                  start: str = "kfac", tol: float = LANCZOS_TOL, reduce: str = "auto") -> KroneckerSVD:
    """The top ``r`` Kronecker terms of layer ``lj``'s exact block (see the module docstring).

    ``r`` is clipped to the rank the solver can resolve (the ``"factors"`` path: the numerical rank
    of the ``[B, B]`` Grams; ``"dense"``: min(d_in'², d_out²); ``"lanczos"``/``"arpack"``: min − 1,
    except the r = 1 Lanczos).

    The iterative solvers: ``"lanczos"`` — r = 1 by :func:`_lanczos_top` (stops at ``tol``, see
    :data:`LANCZOS_TOL`), r ≥ 2 by scipy's ARPACK ``svds``; ``"arpack"`` — ``svds`` for every r
    (``tol=0``, ``start="ones"``, ``product="per-example"``, ``reduce="never"``: the solver as it was
    before issue 14). Their options: ``product`` (:data:`PRODUCT_FORMS` or ``"auto"``,
    :func:`product_form`); ``start``: ``"kfac"`` (the layer's KFAC factor of the smaller side,
    normalised: usually close to the top pair) or ``"ones"``; ``reduce``: ``"auto"``
    (:data:`REDUCE_MAX_FILL`), ``"always"`` or ``"never"`` (the ``"factored"`` form's reduced bases).
    """
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    linear = lj.a is not None and lj.g is not None and lj.T == 1
    if solver == "auto":
        solver = "factors" if linear else _dense_or_lanczos(lj, r)
    rows, reduced, products, form = None, None, 0, ""
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
    elif solver in ("lanczos", "arpack"):
        if start not in ("kfac", "ones") or reduce not in ("auto", "always", "never") or tol < 0:
            raise ValueError(f"layer '{lj.spec.name}': start must be 'kfac' or 'ones', reduce 'auto', 'always' or "
                             f"'never', tol ≥ 0; got {start!r}, {reduce!r}, {tol!r}")
        sigma, A, G, reduced, products, form = _svd_lanczos(lj, r, solver == "arpack", product, start, tol, reduce)
    else:
        raise ValueError(f"solver must be 'auto', 'factors', 'dense', 'lanczos' or 'arpack', got {solver!r}")
    # unit singular vectors -> balanced factors; the sign making tr A_k ≥ 0 (A_1, G_1 PSD then)
    sign = torch.where(torch.diagonal(A, dim1=1, dim2=2).sum(1) < 0, -1.0, 1.0).to(A.dtype)
    scale = sigma.clamp_min(0).sqrt() * sign
    A = A * scale[:, None, None]
    G = G * scale[:, None, None]
    if rows is not None:
        a, alpha, g, beta = rows
        rows = (a, alpha * scale, g, beta * scale)
    if reduced is not None:
        Qa, Ah, Qg, Gh = reduced
        reduced = (Qa, Ah * scale[0], Qg, Gh * scale[0])
    return KroneckerSVD(sigma, A, G, solver, rows, reduced, products, form)


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
    elif ks.reduced is not None:
        Qa, Ah, Qg, Gh = ks.reduced
        sA, QA = _lifted_eigh(Qa, _symmetric(Ah), A1)
        sG, QG = _lifted_eigh(Qg, _symmetric(Gh), G1)
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


def _lifted_eigh(Q: Tensor | None, Mh: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending eigenpairs of ``M = Q Mh Qᵀ`` (``Q [d, k]`` orthonormal; ``None``: ``eigh(M)``):
    ``eigh(Mh)`` rotated by Q, and 0 on the complement of Q's range (one complete QR)."""
    if Q is None:
        return torch.linalg.eigh(M)
    d, k = Q.shape
    s, W = torch.linalg.eigh(Mh)
    if k == d:
        return s, Q @ W
    Qc = torch.linalg.qr(Q, mode="complete")[0][:, k:]  # [d, d - k]: Q's orthogonal complement
    evals = torch.cat([s, s.new_zeros(d - k)])
    order = torch.argsort(evals, stable=True)
    return evals[order], torch.cat([Q @ W, Qc], 1)[:, order]


def _dense_or_lanczos(lj: LayerJacobian, r: int) -> str:
    """``"dense"`` when R fits (:data:`DENSE_REARRANGEMENT_NUMEL`) and either every term is asked
    for or its full SVD costs less than :data:`DENSE_SVD_FLOPS` or the Lanczos products; else ``"lanczos"``."""
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    m, n = d_in**2, d_out**2
    if m * n > DENSE_REARRANGEMENT_NUMEL:
        return "lanczos"
    svd = 4 * m * n * min(m, n)
    lanczos = LANCZOS_MATVECS * product_flops(lj, product_form(lj)) // 2
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


def _reduced_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q [d, n], x̂ [..., n])`` with ``x = x̂ Qᵀ`` exactly for the rows ``x [..., d]`` (n = min(their
    number, d)): the reduced QR ``x_flatᵀ = Q Rq``, ``x̂ = Rqᵀ``."""
    d = x.shape[-1]
    Q, Rq = torch.linalg.qr(x.reshape(-1, d).T)
    return Q, Rq.T.reshape(*x.shape[:-1], Rq.shape[0])


def _implicit_rearrangement(lj: LayerJacobian, product: str, start: str, reduce: str):
    """R of layer ``lj`` as products, possibly in reduced bases (:data:`REDUCE_MAX_FILL`):
    ``(R, RT, d_a, d_g, Q_a, Q_g, start_factor, form)`` with ``R: [c, d_g, d_g] -> [c, d_a, d_a]``,
    ``Q_a [d_in', d_a]`` / ``Q_g [d_out, d_g]`` (None: the identity), and ``start_factor()`` the
    (reduced) KFAC factor of the smaller side, unnormalised, or None (``start="ones"`` or none stored)."""
    form = product_form(lj) if product == "auto" else product
    d_a, d_g = lj.spec.d_in_bar, lj.spec.d_out
    Qa = Qg = None
    if form == "factored" and lj.factored and lj.T > 1:
        a, g = lj.a, lj.g
        assert a is not None and g is not None
        BT, NT = a.shape[0] * a.shape[1], g.shape[0] * g.shape[1] * g.shape[2]
        if reduce == "always" or (reduce == "auto" and BT <= REDUCE_MAX_FILL * d_a):
            Qa, a = _reduced_rows(a)
        if reduce == "always" or (reduce == "auto" and NT <= REDUCE_MAX_FILL * d_g):
            Qg, g = _reduced_rows(g)
        d_a, d_g = a.shape[-1], g.shape[-1]
        R, RT = _factored_products(a, g, lj.B)
        side_rows = a.reshape(-1, d_a) if d_a * d_a < d_g * d_g else g.reshape(-1, d_g)
        if Qa is not None or Qg is not None:
            form += "+reduced"
    else:
        R, RT = _rearranged_maps(lj, form)
        side_rows = None

    def start_factor() -> Tensor | None:
        if start == "ones":
            return None
        if side_rows is not None:
            return side_rows.T @ side_rows
        try:
            A, G = lj.kfac_factors
        except FisherlabError:  # dense rows stored without their factors
            return None
        return A if d_a * d_a < d_g * d_g else G

    return R, RT, d_a, d_g, Qa, Qg, start_factor, form


def _svd_lanczos(lj: LayerJacobian, r: int, arpack: bool = False, product: str = "auto", start: str = "kfac",
                 tol: float = LANCZOS_TOL, reduce: str = "auto"):
    """The top ``r`` unit singular triplets of the implicit rearrangement (float64):
    ``(sigma [k], A [k, d_in', d_in'], G [k, d_out, d_out], reduced, products, form)`` (see
    :func:`kronecker_svd`)."""
    R, RT, d_a, d_g, Qa, Qg, start_factor, form = _implicit_rearrangement(lj, product, start, reduce)
    f64 = torch.float64
    count, raw = [0], [f64]  # products so far; their dtype (float32 under precision="mixed")

    def mv(x: Tensor) -> Tensor:  # [d_g²] -> [d_a²]
        count[0] += 1
        out = R(x.reshape(1, d_g, d_g).to(lj.device))
        raw[0] = out.dtype
        return out.reshape(-1).to(f64)

    def rmv(y: Tensor) -> Tensor:  # [d_a²] -> [d_g²]
        count[0] += 1
        out = RT(y.reshape(1, d_a, d_a).to(lj.device))
        raw[0] = out.dtype
        return out.reshape(-1).to(f64)

    small_g = d_g * d_g <= d_a * d_a  # Lanczos on the smaller side: H = RᵀR on vec(G) or RRᵀ on vec(A)
    n = d_g * d_g if small_g else d_a * d_a
    S0 = start_factor()
    v0 = torch.ones(n, dtype=f64, device=lj.device) if S0 is None else S0.reshape(-1).to(f64)
    if float(v0.norm()) == 0.0:
        v0 = torch.ones(n, dtype=f64, device=lj.device)
    if r == 1 and not arpack:
        H = (lambda v: rmv(mv(v))) if small_g else (lambda v: mv(rmv(v)))
        try:
            _, v = _lanczos_top(H, v0, tol, LANCZOS_MAX_PRODUCTS // 2, lambda: torch.finfo(raw[0]).eps)
        except RuntimeError as e:
            raise FisherlabError(f"layer '{lj.spec.name}': {e}") from None
        w = mv(v) if small_g else rmv(v)
        sigma = w.norm()
        w = w / sigma.clamp_min(torch.finfo(f64).tiny)
        u, vh = (w, v) if small_g else (v, w)
        S, U, Vh = sigma.reshape(1), u.reshape(1, -1), vh.reshape(1, -1)
    else:
        from scipy.sparse.linalg import LinearOperator, svds

        shape = (d_a * d_a, d_g * d_g)
        k = min(r, min(shape) - 1)
        if k < 1:
            raise ValueError(f"layer '{lj.spec.name}': the Lanczos Kronecker SVD needs min(d_in'², d_out²) > 1")
        np_mv = lambda x: mv(torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1).copy())).cpu().numpy()  # noqa: E731
        np_rmv = lambda y: rmv(torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(-1).copy())).cpu().numpy()  # noqa: E731
        op = LinearOperator(shape, matvec=np_mv, rmatvec=np_rmv, dtype=np.float64)
        # svds hands tol² to eigsh, whose stop is ‖Hv − θv‖ ≤ tol·θ: the same rule as _lanczos_top's
        Un, Sn, Vhn = svds(op, k=k, tol=tol ** 0.5, v0=v0.cpu().numpy(), maxiter=10_000)
        order = np.argsort(Sn)[::-1]
        S = torch.from_numpy(Sn[order].copy()).to(lj.device)
        U = torch.from_numpy(np.ascontiguousarray(Un[:, order].T)).to(lj.device)
        Vh = torch.from_numpy(np.ascontiguousarray(Vhn[order])).to(lj.device)
    k = S.shape[0]
    Ah, Gh = U.reshape(k, d_a, d_a), Vh.reshape(k, d_g, d_g)
    reduced = (Qa, Ah[0], Qg, Gh[0]) if (Qa is not None or Qg is not None) else None
    A = Ah if Qa is None else Qa @ Ah @ Qa.T
    G = Gh if Qg is None else Qg @ Gh @ Qg.T
    return S, A, G, reduced, count[0], form


def _lanczos_top(H, v0: Tensor, tol: float, max_steps: int, eps=lambda: 2.0**-52) -> tuple[float, Tensor]:
    """``(θ, v)``: the top eigenpair of the symmetric PSD map ``H`` (``[n] -> [n]``, float64) by Lanczos
    from ``v0``, full reorthogonalisation, :data:`LANCZOS_BASIS` vectors then an explicit restart from
    the Ritz vector; stops when ``‖Hv − θv‖ = β_j |s_j| ≤ max(tol, 64ε)·θ`` (ε of the products' dtype:
    float32 under ``precision="mixed"``) or on an invariant subspace."""
    n = v0.numel()
    m = min(LANCZOS_BASIS, n)
    V = v0.new_zeros(m, n)
    v = v0 / v0.norm()
    steps = 0
    while True:
        V[0] = v
        alpha, beta = [], []
        for j in range(m):
            w = H(V[j])
            steps += 1
            alpha.append(float(V[j] @ w))
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w -= V[: j + 1].T @ (V[: j + 1] @ w)
            b = float(w.norm())
            Tm = torch.diag(torch.tensor(alpha, dtype=torch.float64))
            if j:
                off = torch.tensor(beta, dtype=torch.float64)
                Tm += torch.diag(off, 1) + torch.diag(off, -1)
            th, Sv = torch.linalg.eigh(Tm)
            theta, s = float(th[-1]), Sv[:, -1].to(V.device)
            v = V[: j + 1].T @ s
            thr = max(tol, 64 * eps())
            if b * abs(float(s[-1])) <= thr * abs(theta) or b <= n * torch.finfo(torch.float64).eps * abs(theta):
                return theta, v / v.norm()
            if steps >= max_steps:
                raise RuntimeError(f"the top Kronecker pair's Lanczos did not reach the residual {thr:g}·θ in {2 * steps} products")
            if j + 1 < m:
                V[j + 1] = w / b
                beta.append(b)
        v = v / v.norm()


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
        svd_options: dict | None = None,
    ) -> "KFOC":
        """``svd_options``: keyword options of :func:`kronecker_svd` (``product``, ``start``, ``tol``, ``reduce``)."""
        jac = Jacobian.coerce(source, dtype)
        lam = check_damping(damping)
        blocks, svds = [], []
        for lj in jac.layers:
            ks = kronecker_svd(lj, 1, solver, **(svd_options or {}))
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
