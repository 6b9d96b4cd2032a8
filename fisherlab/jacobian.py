"""The per-example Jacobian core (MATH.md §3): ``U = J/√B`` as a p × N operator.

``F = U Uᵀ`` with ``U_i = J_i/√B`` (p_i × N) per layer. Everything exact in fisherlab is built
from three products, batched over columns and written once for ``[batch, positions, features]``:

* ``Uᵀx`` (``rmatmat``): ``[p, c] -> [N, c]``, ``(Uᵀx)_{b,k} = Σ_t g_{b,k,t}ᵀ X ā_{b,t} / √B``
  with ``X = MAT(x_i)`` (A4)–(A9);
* ``Uy`` (``matmat``): ``[N, c] -> [p, c]``, ``vec(Σ_{b,k,t} y_{b,k} g_{b,k,t} ā_{b,t}ᵀ) / √B``
  (A10)–(A14);
* the per-layer Grams ``K_i = U_iᵀU_i`` ``[N, N]``: Linear (T = 1) as the Hadamard product of
  the two small Grams ``(ā_b·ā_c)(g_{b,k}·g_{c,l})/B``; Conv (T > 1) as
  ``⟨Ā_bᵀĀ_c, G_{b,k}ᵀG_{c,l}⟩_F/B`` or through dense rows, whichever the shapes make cheaper.

Inputs stay in their stored dtype (float32 by default) on disk and in the capture; the
products here run in ``dtype`` (float64 by default). Nothing forms a p × p matrix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator, Sequence
from functools import cached_property

import torch
from torch import Tensor

from .capturing.record import Capture, LayerCapture
from .kernels import dense_from_factors, kfac_factors_from
from .errors import FisherlabError
from ._validate import available_device
from .layout import LayerSpec, Layout

__all__ = ["LayerJacobian", "FactoredLayerJacobian", "DenseLayerJacobian", "MixedLayerJacobian", "StreamedLayerJacobian", "PRECISIONS", "Jacobian", "conv_gram_path", "factor_eigh", "psd_eigh_from_rows", "lowrank_eigh_applies", "range_second_moments", "ROWS_MIN_POSITIONS", "ROWS_MEMORY_SHARE", "NullPrefixLayerJacobian"]

# Columns processed at once by the factored products (bounds the [B, T, d_out, c] temporaries).
_MAX_TEMP_NUMEL = 2**25

LOWRANK_EIGH_MIN_DIM = 1024
"""Factors at least this large whose rows number at most :data:`LOWRANK_EIGH_MAX_FILL` of their
dimension are eigendecomposed from their rows (:func:`psd_eigh_from_rows`); smaller ones by LAPACK
``eigh`` directly (so the tiny cases of the suite keep their exact numbers)."""
LOWRANK_EIGH_MAX_FILL = 0.5


def lowrank_eigh_applies(rows: int, dim: int) -> bool:
    """Whether a ``dim × dim`` factor built from ``rows`` rows takes :func:`psd_eigh_from_rows`."""
    return dim >= LOWRANK_EIGH_MIN_DIM and rows <= LOWRANK_EIGH_MAX_FILL * dim


def conv_gram_path(B: int, K: int, T: int, d_in: int, d_out: int) -> str:
    """Which way a conv layer's Gram is cheaper (flop counts), ``"pairs"`` or ``"dense"``.

    ``"pairs"``: ``⟨Ā_bᵀĀ_c, G_{b,k}ᵀG_{c,l}⟩_F`` from the ``[(b,t),(c,s)]`` Grams of ā and g,
    ``(BT)²d_in' + (NT)²d_out + (NT)²``; ``"dense"``: the rows ``J_i [N, p_i]`` then ``J_iJ_iᵀ``,
    ``NT·d_in'·d_out + N²·d_in'·d_out``.
    """
    N = B * K
    cost_pairs = (B * T) ** 2 * d_in + (N * T) ** 2 * d_out + (N * T) ** 2
    cost_dense = N * T * d_in * d_out + N * N * d_in * d_out
    return "dense" if cost_dense <= cost_pairs else "pairs"


def factor_eigh(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(s_A, Q_A, s_G, Q_G)``: ascending eigenpairs of (undamped) KFAC factors."""
    sA, QA = torch.linalg.eigh(A)
    sG, QG = torch.linalg.eigh(G)
    return sA, QA, sG, QG


def psd_eigh_from_rows(rows: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Ascending eigenpairs ``(s [n], Q [n, n])`` of ``M = scale · rowsᵀ rows`` for ``rows [r, n]``
    with r < n, without an n × n ``eigh``.

    The nonzero eigenpairs of M are those of the r × r Gram ``C = scale · rows rowsᵀ = W S Wᵀ``,
    with eigenvectors ``v = √scale · rowsᵀ w / √s`` (``M v = s v``); eigenvalues below
    ``n·ε·s_max`` (where LAPACK's own eigenvalues of M are round-off) count as zero. The
    eigenvectors are re-orthonormalized (largest first) and completed to an orthonormal basis of
    Rⁿ by one complete Householder QR; the completion spans M's null space (eigenvalue 0 exactly).

    Measured (2 cores, float64): A of ResNet-18's ``layer4.1.conv2`` (n = 4609, r = B·T = 512 at
    B = 32) in 1.4 s instead of 29–45 s by ``torch.linalg.eigh``; the three 4609² factors were 85 % of
    ``compare``'s setup (``analysis/bench/scale_bench.py``). Agreement with ``eigh``:
    ``‖MQ − QS‖/‖M‖`` and ``‖QᵀQ − I‖`` ~1e-15, KFAC solves equal to ~1e-13 relative.
    """
    r, n = rows.shape
    C = (rows @ rows.T).mul_(scale)
    s, W = torch.linalg.eigh(C)
    top = float(s[-1]) if s.numel() else 0.0
    keep = s > n * torch.finfo(s.dtype).eps * top if top > 0 else torch.zeros_like(s, dtype=torch.bool)
    s_k, W_k = s[keep].flip(0), W[:, keep].flip(1)  # descending: the accurate vectors first
    k = int(s_k.numel())
    V = (rows.T @ W_k).mul_(math.sqrt(scale) / s_k.sqrt())  # [n, k]
    Q, R = torch.linalg.qr(V, mode="complete")  # [n, n]
    d = torch.sign(torch.diagonal(R)[:k])
    Q[:, :k] *= torch.where(d == 0, torch.ones_like(d), d)
    evals = torch.cat([s.new_zeros(n - k), s_k.flip(0)])
    evecs = torch.cat([Q[:, k:], Q[:, :k].flip(1)], dim=1)
    return evals, evecs


@dataclass(eq=False)
class LayerJacobian:
    """``U_i = J_i/√B`` of one layer: the protocol, with two implementations (STYLE.md habit 3).

    * :class:`FactoredLayerJacobian` — from the factors ``a [B, T, d_in']``, ``g [B, K, T, d_out]``;
    * :class:`DenseLayerJacobian` — from dense rows ``J [N, p_i]`` (and the stored KFAC factors
      ``A``, ``G``, which J no longer determines).

    Both answer ``rmatmat`` (Uᵢᵀx), ``matmat`` (Uᵢy), ``gram`` (Kᵢ), ``diagonal``,
    ``eigenbasis_second_moments``, ``kfac_factors``, ``kfac_eigh``, ``reduce_factors`` and
    ``dense_rows``; nothing outside the two classes branches on the storage kind. The record side
    of the same two kinds — which arrays a layer keeps and their shapes — is
    :func:`fisherlab.capturing.record.dataset_shapes`, the one table the store checks files against.

    ``LayerJacobian(spec, B, K, a=…, g=…)`` or ``LayerJacobian(spec, B, K, dense=…, A_stored=…,
    G_stored=…)`` builds the matching implementation.

    Attributes:
        spec: the layer.
        B, K: batch size and vectors per example (N = B·K).
        a, g: factors in ``dtype`` (factored; ``None`` for dense rows); dense: ``J_i`` (dense; else ``None``).
        A_stored, G_stored: the stored KFAC factors of a dense layer (else ``None``).
    """

    spec: LayerSpec
    B: int
    K: int
    a: Tensor | None = None
    g: Tensor | None = None
    dense: Tensor | None = None
    A_stored: Tensor | None = None
    G_stored: Tensor | None = None

    def __new__(cls, *args, **kw):
        if cls in _KINDS:  # the protocol class: pick the implementation from the arrays given
            dense = kw.get("dense", args[5] if len(args) > 5 else None)
            cls = _KINDS[cls][dense is not None]
        return super().__new__(cls)

    @classmethod
    def from_layer_capture(cls, lc: LayerCapture, B: int, K: int, dtype: torch.dtype = torch.float64,
                           device: torch.device | str | None = None) -> "LayerJacobian":
        cv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return LayerJacobian(lc.spec, B, K, cv(lc.a), cv(lc.g), cv(lc.dense), cv(lc.A), cv(lc.G))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LayerJacobian":
        """This layer's tensors on ``device`` in ``dtype`` (caches are not carried)."""
        cv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return LayerJacobian(self.spec, self.B, self.K, cv(self.a), cv(self.g), cv(self.dense),
                             cv(self.A_stored), cv(self.G_stored))

    # ---- what the two kinds share --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._array.device

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype of every product, Gram and factor this layer returns (its arrays' dtype)."""
        return self._array.dtype

    @property
    def _array(self) -> Tensor:  # pragma: no cover - implemented by both kinds
        raise NotImplementedError

    @property
    def N(self) -> int:
        return self.B * self.K

    @property
    def p(self) -> int:
        return self.spec.numel

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.B)

    factored: ClassVar[bool] = False
    """Whether the layer is held as factors (set by each implementation)."""

    @property
    def T(self) -> int:
        """Positions the layer sees (1 for dense rows, which do not record them)."""
        return 1

    @staticmethod
    def _column_chunks(x: Tensor, per_column: int) -> list[Tensor]:
        """Split the columns of ``x [r, c]`` so that temporaries stay under ``_MAX_TEMP_NUMEL``."""
        if x.dim() != 2:
            raise ValueError(f"expected a matrix [rows, columns], got shape {tuple(x.shape)}")
        step = max(1, _MAX_TEMP_NUMEL // max(per_column, 1))
        c = x.shape[1]
        return [x[:, i : i + step] for i in range(0, c, step)] if c > step else [x]

    def per_example_matrices(self) -> Tensor:
        """``MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ`` ``[N, d_out, d_in']`` (not scaled): the per-example
        gradients of the layer as matrices. ``N·p_i`` numbers: for sub-block and Kronecker-SVD
        methods on layers with positions or dense rows."""
        return self.dense_rows().reshape(self.N, self.spec.d_in_bar, self.spec.d_out).mT

    @cached_property
    def reduce_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s_A, Q_A, s_G, Q_G)`` of :attr:`reduce_factors` (computed once; KFAC's when T = 1)."""
        if self.factored and self.T == 1:
            return self.kfac_eigh
        return factor_eigh(*self.reduce_factors)

    # ---- the protocol (each kind implements it) ----------------------------------------------
    def rmatmat(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``U_iᵀ x``: ``x [p_i, c] -> [N, c]`` (A4)–(A9)."""
        raise NotImplementedError

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """``U_i y``: ``y [N, c] -> [p_i, c]`` (A10)–(A14), written into ``out [p_i, c]`` when given."""
        raise NotImplementedError

    def gram(self) -> Tensor:
        """``K_i = U_iᵀ U_i`` ``[N, N]`` (MATH.md §3): computed once (:meth:`_compute_gram`) or
        seeded (:meth:`seed_gram`, the setup cache :mod:`fisherlab.cache`)."""
        return self._memo("_gram_value", self._compute_gram)

    def _memo(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """The setup value kept under ``key`` (computed once, or seeded by :meth:`_seed`)."""
        value = self.__dict__.get(key)
        if value is None:
            value = self.__dict__[key] = compute()
        return value

    def _seed(self, key: str, value: Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(value.shape) != shape:
            raise FisherlabError(f"layer '{self.spec.name}': a seeded {what} must be {list(shape)}, got {list(value.shape)}")
        self.__dict__[key] = value.to(device=self.device, dtype=self.result_dtype)

    def seed_gram(self, K: Tensor) -> None:
        """Use ``K [N, N]`` (computed earlier, e.g. read from the setup cache) as this layer's Gram."""
        self._seed("_gram_value", K, (self.N, self.N), "Gram")

    def seed_kfac_eigh(self, eigh: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        """Use ``(s_A, Q_A, s_G, Q_G)`` (computed earlier) as :attr:`kfac_eigh`."""
        d_in, d_out = self.spec.d_in_bar, self.spec.d_out
        want = [(d_in,), (d_in, d_in), (d_out,), (d_out, d_out)]
        if [tuple(t.shape) for t in eigh] != want:
            raise FisherlabError(f"layer '{self.spec.name}': seeded KFAC eigenpairs must have shapes {want}")
        self.__dict__["kfac_eigh"] = tuple(t.to(device=self.device, dtype=self.result_dtype) for t in eigh)

    def diagonal(self) -> Tensor:
        """``diag(U_iU_iᵀ) = (1/B) Σ_n j_n ∘ j_n`` ``[p_i]``: computed once (:meth:`_compute_diagonal`)
        or seeded (:meth:`seed_diagonal`, the setup cache). λ-independent, so a damping sweep
        pays for it once."""
        return self._memo("_diagonal_value", self._compute_diagonal)

    def seed_diagonal(self, d: Tensor) -> None:
        """Use ``d [p_i]`` (computed earlier) as :meth:`diagonal`."""
        self._seed("_diagonal_value", d, (self.p,), "diagonal")

    def ekfac_second_moments(self) -> Tensor:
        """EKFAC's re-fitted eigenvalues in KFAC's eigenbasis :attr:`kfac_eigh`, ``s [d_out, d_in']``
        (:meth:`eigenbasis_second_moments` on the columns of Q_A outside A's null space,
        :func:`range_second_moments`): computed once or seeded (:meth:`seed_ekfac_second_moments`).
        λ-independent, like the eigenbasis it belongs to."""
        def compute() -> Tensor:
            sA, QA, _, QG = self.kfac_eigh
            return range_second_moments(self, sA, QA, QG)

        return self._memo("_ekfac_value", compute)

    def seed_ekfac_second_moments(self, s: Tensor) -> None:
        """Use ``s [d_out, d_in']`` (computed earlier in the basis of :attr:`kfac_eigh`, which must be
        the one seeded with it) as :meth:`ekfac_second_moments`."""
        self._seed("_ekfac_value", s, (self.spec.d_out, self.spec.d_in_bar), "EKFAC second moments")

    def computed_setup(self) -> dict[str, object]:
        """What this layer has computed (or was seeded with) so far: ``gram``, ``kfac_eigh``,
        ``diagonal``, ``ekfac_moments``."""
        return {k: self.__dict__[src] for k, src in (("gram", "_gram_value"), ("kfac_eigh", "kfac_eigh"),
                                                     ("diagonal", "_diagonal_value"), ("ekfac_moments", "_ekfac_value"))
                if src in self.__dict__}

    def _compute_gram(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute_diagonal(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def eigenbasis_second_moments(self, QA: Tensor, QG: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``S [d_out, d_in']``, ``S[r, c] = (1/B) Σ_n (Q_Gᵀ MAT(j_n) Q_A)[r, c]²`` (EKFAC)."""
        raise NotImplementedError

    def dense_rows(self) -> Tensor:  # pragma: no cover - abstract
        """``J_i [N, p_i]`` (not scaled). For references and small layers."""
        raise NotImplementedError

    def rotated(self, QA: Tensor, QG: Tensor, null: int = 0) -> "LayerJacobian":  # pragma: no cover - abstract
        """``(Q_A ⊗ Q_G)ᵀ U_i``: the same layer in a Kronecker eigenbasis (KFAC's for the
        preconditioned operator), of the same kind. ``null``: the first ``null`` columns of Q_A
        span A's null space (exact zero eigenvalues, :func:`psd_eigh_from_rows`), where every ā
        has no component: the rotated layer leaves them out (:class:`NullPrefixLayerJacobian`)."""
        raise NotImplementedError

    def _check_out(self, y: Tensor, out: Tensor | None) -> None:
        if out is not None and (out.shape != (self.p, y.shape[1]) or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous [{self.p}, {y.shape[1]}] tensor, got {tuple(out.shape)}")


def range_second_moments(lj: LayerJacobian, sA: Tensor, QA: Tensor, QG: Tensor) -> Tensor:
    """``s [d_out, d_in']`` of one layer (:meth:`LayerJacobian.eigenbasis_second_moments`),
    computed only on the columns of Q_A with ``s_A ≠ 0``; the others are 0.

    ``Q_Aᵀ A Q_A = diag(s_A)`` with ``A = (1/B) Σ_{b,t} ā_{b,t} ā_{b,t}ᵀ`` gives
    ``Σ_{b,t} (ā_{b,t}·Q_A[:, c])² = B·s_A[c]``: an eigenvalue that is exactly 0 (the null-space
    completion of :func:`psd_eigh_from_rows`, a wide conv layer at a small
    batch, A of rank ≤ B·T) has ``ā·Q_A[:, c] = 0``, so ``MAT(j_n) Q_A[:, c] = 0`` and
    ``s[:, c] = 0``. On ResNet-18's layer4 at B = 128 this skips 2560 of 4608 columns of the
    rotation ``ā Q_A``, its most expensive GEMM.
    """
    zero = sA == 0
    nz = int(zero.sum())
    if nz == 0:
        return lj.eigenbasis_second_moments(QA, QG)
    out = QA.new_zeros(QG.shape[1], QA.shape[1])
    if nz < QA.shape[1]:
        if bool(zero[:nz].all()):  # psd_eigh_from_rows: the zeros come first (ascending)
            out[:, nz:] = lj.eigenbasis_second_moments(QA[:, nz:], QG)
        else:
            keep = (~zero).nonzero().squeeze(1)
            out[:, keep] = lj.eigenbasis_second_moments(QA[:, keep], QG)
    return out


@dataclass(eq=False)
class FactoredLayerJacobian(LayerJacobian):
    """The layer held as factors ā ``a [B, T, d_in']`` and g ``g [B, K, T, d_out]``: products,
    Grams and diagonals are written once for ``[batch, positions, features]``."""

    factored = True

    @property
    def _array(self) -> Tensor:
        return self.a  # type: ignore[return-value]

    @property
    def T(self) -> int:
        return self.a.shape[1]  # type: ignore[union-attr]

    # ---- dense rows held beside the factors (products only) --------------------------------
    def hold_rows(self) -> None:
        """Form ``J_i [N, p_i]`` (:attr:`rows_bytes`) once and use it for :meth:`rmatmat` and
        :meth:`matmat` (one GEMV-like pass over N·p_i numbers instead of 2·B·T·d_in'·d_out flops)
        until :meth:`release_rows`; the factors stay for everything else (Grams, KFAC factors,
        EKFAC). Worth it for many positions per vector (T/K ≥ :data:`ROWS_MIN_POSITIONS`,
        :meth:`Jacobian.hold_rows`)."""
        if self._rows is None:
            # in the factors' dtype (a mixed layer's float32, as its products): not dense_rows(), which
            # a mixed layer returns in float64
            rows = dense_from_factors(self.a, self.g).contiguous()  # type: ignore[arg-type]
            self.__dict__["_rows"] = DenseLayerJacobian(self.spec, self.B, self.K, dense=rows)

    def release_rows(self) -> None:
        self.__dict__.pop("_rows", None)

    @property
    def _rows(self) -> "DenseLayerJacobian | None":
        return self.__dict__.get("_rows")

    @property
    def rows_held(self) -> bool:
        return self._rows is not None

    @property
    def rows_bytes(self) -> int:
        """The bytes :meth:`hold_rows` takes: N·p_i numbers in the factors' dtype."""
        return self.N * self.p * self.a.element_size()  # type: ignore[union-attr]

    def rmatmat(self, x: Tensor) -> Tensor:
        """``U_iᵀ x``: ``(Uᵀx)_{b,k} = Σ_t g_{b,k,t}ᵀ X ā_{b,t} / √B``, X = MAT(x) (A4)–(A9)."""
        if self._rows is not None:
            return self._rows.rmatmat(x)
        a, g = self.a, self.g
        assert a is not None and g is not None
        B, K, T, d_out = g.shape
        d_in = a.shape[-1]
        out = []
        for xc in self._column_chunks(x, B * T * d_out):
            c = xc.shape[1]
            Xt = xc.reshape(d_in, d_out * c)  # MAT(x)ᵀ, columns stacked: index = col·d_out + row
            Z = (a.reshape(B * T, d_in) @ Xt).reshape(B, T * d_out, c)  # X ā_{b,t}
            if K == 1:  # a row-wise dot product: avoids bmm's per-example GEMM calls
                out.append(torch.einsum("bd,bdc->bc", g.reshape(B, T * d_out), Z))
            else:
                out.append(torch.bmm(g.reshape(B, K, T * d_out), Z).reshape(B * K, c))
        return torch.cat(out, dim=1) * self.scale

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        """``U_i y = vec(Σ_{b,k,t} y_{b,k} g_{b,k,t} ā_{b,t}ᵀ) / √B`` (A10)–(A14)."""
        if self._rows is not None:
            return self._rows.matmat(y, out=out)
        self._check_out(y, out)
        a, g = self.a, self.g
        assert a is not None and g is not None
        B, K, T, d_out = g.shape
        d_in = a.shape[-1]
        chunks = self._column_chunks(y * self.scale, B * T * d_out)  # scale the small side
        if out is not None and len(chunks) == 1:  # the usual case: the last GEMM writes into out
            c = y.shape[1]
            W = self._matmat_inner(g, chunks[0])
            torch.mm(a.reshape(B * T, d_in).T, W.reshape(B * T, d_out * c), out=out.view(d_in, d_out * c))
            return out
        parts = []
        for yc in chunks:
            c = yc.shape[1]
            W = self._matmat_inner(g, yc)
            Xt = a.reshape(B * T, d_in).T @ W.reshape(B * T, d_out * c)  # [d_in', d_out·c]
            parts.append(Xt.reshape(d_in * d_out, c))
        res = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out.copy_(res) if out is not None else res

    @staticmethod
    def _matmat_inner(g: Tensor, yc: Tensor) -> Tensor:
        """``W[b, (t, d), c] = Σ_k g_{b,k,t,d} y_{(b,k), c}``: ``[B, T·d_out, c]``."""
        B, K, T, d_out = g.shape
        c = yc.shape[1]
        if K == 1:  # an outer product per example: avoids bmm's per-example GEMM calls
            return g.reshape(B, T * d_out, 1) * yc.reshape(B, 1, c)
        return torch.bmm(g.reshape(B, K, T * d_out).mT, yc.reshape(B, K, c))

    def _compute_gram(self) -> Tensor:
        """``K_i``. Linear (T = 1): ``(ā_b·ā_c)(g_{b,k}·g_{c,l})/B``, the B × B Gram of ā broadcast
        over the K × K sub-blocks of the N × N Gram of g (no repeated copies). Conv (T > 1): the
        ``"pairs"`` or ``"dense"`` path chosen by :func:`conv_gram_path`.
        """
        a, g = self.a, self.g
        assert a is not None and g is not None
        B, K, T, d_out = g.shape
        d_in = a.shape[-1]
        N = B * K
        if T == 1:
            a0 = a.reshape(B, d_in).contiguous()
            gf = g.reshape(N, d_out).contiguous()
            Gg = torch.mm(gf, gf.T)  # [N, N]
            Ga = torch.mm(a0, a0.T).div_(B)  # [B, B]
            if K == 1:
                return Gg.mul_(Ga)
            return Gg.view(B, K, B, K).mul_(Ga[:, None, :, None]).view(N, N)
        if conv_gram_path(B, K, T, d_in, d_out) == "dense":  # Σ over slices of output channels:
            step = max(1, _MAX_TEMP_NUMEL // max(N * d_in, 1))  # the rows J [N, p_i] never at once
            out = None
            for s in range(0, d_out, step):
                J = dense_from_factors(a, g[..., s : s + step])  # a column subset of J_i
                out = torch.mm(J, J.T) if out is None else out.addmm_(J, J.T)
            return out.div_(B)  # type: ignore[union-attr]
        af = a.reshape(B * T, d_in)
        gf = g.reshape(N * T, d_out)
        AA = torch.mm(af, af.T).view(B, 1, T, B, 1, T)  # [(b,t), (c,s)]
        GG = torch.mm(gf, gf.T).view(B, K, T, B, K, T)  # [(b,k,t), (c,l,s)]
        return GG.mul_(AA).sum(dim=(2, 5)).reshape(N, N).div_(B)

    def _compute_diagonal(self) -> Tensor:
        """Linear (T = 1), from the factors: ``j_n ∘ j_n = (ā_b ∘ ā_b) ⊗ (g_{b,k} ∘ g_{b,k})``, so
        ``MAT(diag) = (1/B) Σ_b (Σ_k g_{b,k}²) (ā_b²)ᵀ`` — one ``[d_out, B] × [B, d_in']`` GEMM.
        T > 1: ``(1/B) Σ_n MAT(j_n)∘²`` with ``MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ`` formed by
        per-example GEMMs in bounded chunks (:func:`_square_sums`)."""
        return self.eigenbasis_second_moments(None, None).mT.reshape(-1)

    def eigenbasis_second_moments(self, QA: Tensor | None, QG: Tensor | None) -> Tensor:
        """``MAT(j_n) = Σ_t g_{n,t} ā_{b,t}ᵀ``, so its rotation is ``Σ_t (Q_Gᵀg_{n,t})(Q_Aᵀā_{b,t})ᵀ``:
        the factors are rotated first (``None``: no rotation, the diagonal); T = 1: one GEMM of the
        squares; T > 1: per-example GEMMs ``[K·d_out, T] × [T, columns]`` into one reused buffer,
        squared in place and summed (:func:`_square_sums`; ā is rotated a block of columns at a
        time). Any ``k`` columns of Q_A may be given (e.g. only those outside A's null space,
        :meth:`fisherlab.operators.ekfac.EKFAC.from_capture`): ``S [d_out, k]``.

        Measured (ResNet-18 width 1, B = 128, 2 threads; ``analysis/bench/second_moments_bench.py``):
        see that script's docstring for the per-layer figures against the per-example ``einsum``
        loop this replaces (:meth:`_second_moments_reference`)."""
        a, g = self.a, self.g
        assert a is not None and g is not None
        B, K, T, d_out = g.shape
        if QG is not None:
            g = (g.reshape(B * K * T, d_out) @ QG).view(B, K, T, QG.shape[1])
        if T == 1:
            a1 = a[:, 0] if QA is None else a[:, 0] @ QA
            return g[:, :, 0].pow(2).sum(1).T @ a1.pow(2) / self.B
        return _square_sums(g, a, QA).div_(self.B)

    def _second_moments_reference(self, QA: Tensor | None, QG: Tensor | None) -> Tensor:
        """The loop :meth:`eigenbasis_second_moments` replaced (issue 14): the rotated factors in
        full, then per chunk of examples an ``einsum`` and a ``pow(2)`` temporary. Kept as the
        reference of ``tests/test_second_moments.py`` and the "old" column of
        ``analysis/bench/second_moments_bench.py``."""
        d_out, d_in = (self.spec.d_out if QG is None else QG.shape[1]), (self.spec.d_in_bar if QA is None else QA.shape[1])
        a = self.a if QA is None else self.a @ QA  # type: ignore[operator]
        g = self.g if QG is None else self.g @ QG  # type: ignore[operator]
        assert a is not None and g is not None
        B, K, T, _ = g.shape
        if T == 1:
            return g[:, :, 0].pow(2).sum(1).T @ a[:, 0].pow(2) / self.B
        out = a.new_zeros(d_out, d_in)
        step = max(1, _MAX_TEMP_NUMEL // max(K * d_out * d_in, 1))
        for s in range(0, B, step):
            Gb = torch.einsum("bktd,bte->bkde", g[s : s + step], a[s : s + step])  # [b, K, d_out, d_in']
            out += Gb.pow(2).sum((0, 1))
        return out / self.B

    @cached_property
    def reduce_factors(self) -> tuple[Tensor, Tensor]:
        """KFAC-reduce factors (Eschenhagen et al. 2023) ``(A_red [d_in', d_in'], G_red [d_out, d_out])``.

        ``A_red = (1/B) Σ_b ā̄_b ā̄_bᵀ`` with the position mean ``ā̄_b = (1/T) Σ_t ā_{b,t}``;
        ``G_red = (1/B) Σ_{b,k} ḡ_{b,k} ḡ_{b,k}ᵀ`` with the position sum ``ḡ_{b,k} = Σ_t g_{b,k,t}``.
        For T = 1 these are the KFAC (expand) factors (2.25).
        """
        if self.T == 1:  # one position: reduce and expand are the same factors
            return self.kfac_factors
        a_mean = self.a.mean(1)  # type: ignore[union-attr]  # [B, d_in']
        g_sum = self.g.sum(2).reshape(-1, self.spec.d_out)  # type: ignore[union-attr]  # [N, d_out]
        return a_mean.T @ a_mean / self.B, g_sum.T @ g_sum / self.B

    @cached_property
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """``(A_i [d_in', d_in'], G_i [d_out, d_out])`` of (2.25)–(2.27)."""
        return kfac_factors_from(self.a, self.g)  # type: ignore[arg-type]

    @cached_property
    def kfac_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s_A, Q_A, s_G, Q_G)``: eigenpairs of the undamped KFAC factors, computed once and
        shared by every KFAC operator (both damping modes), spectra and spectral coarse spaces.

        A factor of dimension n built from fewer rows than n/2 (a wide conv at a small batch:
        A has rank ≤ B·T) is decomposed from its rows, :func:`psd_eigh_from_rows`."""
        B, K, T, d_out = self.g.shape  # type: ignore[union-attr]
        d_in = self.a.shape[-1]  # type: ignore[union-attr]
        low_a, low_g = lowrank_eigh_applies(B * T, d_in), lowrank_eigh_applies(B * K * T, d_out)
        if "kfac_factors" in self.__dict__ or not (low_a or low_g):
            A, G = self.kfac_factors
        else:  # a factor decomposed from its rows is never formed (B·T·d_in'² flops saved)
            af, gf = self.a.reshape(-1, d_in), self.g.reshape(-1, d_out)  # type: ignore[union-attr]
            dt = self.result_dtype  # as kfac_factors computes them (a mixed layer: low products, float64 factors)
            A = None if low_a else (af.T @ af / B).to(dt)
            G = None if low_g else (gf.T @ gf / (B * T)).to(dt)
        dt = self.result_dtype
        if low_a:
            sA, QA = psd_eigh_from_rows(self.a.reshape(B * T, d_in).to(dt), 1.0 / B)  # type: ignore[union-attr]
        else:
            sA, QA = torch.linalg.eigh(A)
        if low_g:
            sG, QG = psd_eigh_from_rows(self.g.reshape(B * K * T, d_out).to(dt), 1.0 / (B * T))  # type: ignore[union-attr]
        else:
            sG, QG = torch.linalg.eigh(G)
        return sA, QA, sG, QG

    def dense_rows(self) -> Tensor:
        if self._rows is not None:
            return self._rows.dense  # type: ignore[return-value]
        return dense_from_factors(self.a, self.g)  # type: ignore[arg-type]

    def rotated(self, QA: Tensor, QG: Tensor, null: int = 0) -> "LayerJacobian":
        """Factors ``ā Q_A``, ``g Q_G`` (row vectors); with ``null``, ``ā Q_A[:, null:]`` only."""
        if null:
            inner = FactoredLayerJacobian(_range_spec(self.spec, null), self.B, self.K, a=self.a @ QA[:, null:], g=self.g @ QG)  # type: ignore[operator]
            return NullPrefixLayerJacobian(self.spec, self.B, self.K, inner=inner, prefix=null * self.spec.d_out)
        return FactoredLayerJacobian(self.spec, self.B, self.K, a=self.a @ QA, g=self.g @ QG)  # type: ignore[operator]


@dataclass(eq=False)
class DenseLayerJacobian(LayerJacobian):
    """The layer held as dense per-example rows ``J [N, p_i]`` (conv layers with many positions
    whose rows take fewer numbers than the factors) and its stored KFAC factors ``A``, ``G``."""

    factored = False

    @property
    def _array(self) -> Tensor:
        return self.dense  # type: ignore[return-value]

    def rmatmat(self, x: Tensor) -> Tensor:
        return (self.dense @ x) * self.scale  # type: ignore[operator]

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        self._check_out(y, out)
        J = self.dense
        assert J is not None
        return torch.mm(J.T, y * self.scale, out=out) if out is not None else (J.T @ y) * self.scale

    def _compute_gram(self) -> Tensor:
        return torch.mm(self.dense, self.dense.T).div_(self.B)  # type: ignore[arg-type]

    def _compute_diagonal(self) -> Tensor:
        """Column sums of ``J_i²`` over B (in chunks of rows: temporaries bounded)."""
        J = self.dense
        assert J is not None
        out = J.new_zeros(J.shape[1])
        step = max(1, _MAX_TEMP_NUMEL // max(J.shape[1], 1))
        for s in range(0, J.shape[0], step):
            out.add_(J[s : s + step].square().sum(0))
        return out.div_(self.B)

    def eigenbasis_second_moments(self, QA: Tensor, QG: Tensor) -> Tensor:
        """Each row rotated as ``Q_Gᵀ MAT(j_n) Q_A``, in chunks of rows: ``Q_Gᵀ MAT(j_n)`` by one
        batched GEMM into ``[n, m, d_in']`` (contiguous), then the side with d_in'² as one GEMM
        ``[n·m, d_in'] × [d_in', k]``; the squares are taken in place. Any ``k`` columns of Q_A
        (``m`` of Q_G) may be given: ``S [m, k]``. (Measured, ``layer2.1.conv2`` of ResNet-18 at
        B = 128: 1.8–1.9 CPU s against 2.0 for the loop it replaced and 2.1–3.7 for the other
        orders; the flops, 48 GFLOP, bound it.)"""
        d_out, d_in = self.spec.d_out, self.spec.d_in_bar
        J = self.dense
        assert J is not None
        k, m = QA.shape[1], QG.shape[1]
        out = J.new_zeros(m, k)
        step = max(1, _MAX_TEMP_NUMEL // max(d_in * max(d_out, m), k * m, 1))
        for s in range(0, J.shape[0], step):
            rows = J[s : s + step]
            n = rows.shape[0]
            X = torch.matmul(QG.T, rows.reshape(n, d_in, d_out).mT)  # [n, m, d_in'] = Q_Gᵀ MAT(j)
            Y = (X.view(n * m, d_in) @ QA).view(n, m, k)  # Q_Gᵀ MAT(j) Q_A
            out.add_(Y.mul_(Y).sum(0))
        return out.div_(self.B)

    def _second_moments_reference(self, QA: Tensor, QG: Tensor) -> Tensor:
        """The loop :meth:`eigenbasis_second_moments` replaced (issue 14), kept as the reference of
        ``tests/test_second_moments.py`` and ``analysis/bench/second_moments_bench.py``."""
        d_out, d_in = self.spec.d_out, self.spec.d_in_bar
        M = self.dense.reshape(-1, d_in, d_out).mT  # type: ignore[union-attr]  # MAT of each row: [N, d_out, d_in']
        out = M.new_zeros(QG.shape[1], QA.shape[1])
        step = max(1, _MAX_TEMP_NUMEL // max(d_out * d_in, 1))
        for s in range(0, M.shape[0], step):
            out += (QG.T @ M[s : s + step] @ QA).pow(2).sum(0)
        return out / self.B

    @property
    def reduce_factors(self) -> tuple[Tensor, Tensor]:
        raise FisherlabError(
            f"layer '{self.spec.name}' is stored dense: KFAC-reduce needs its per-position factors ā and g "
            f"(capture with storage='factored')"
        )

    @cached_property
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """The KFAC factors stored with the rows (J no longer determines them)."""
        if self.A_stored is None or self.G_stored is None:
            raise FisherlabError(f"layer '{self.spec.name}': dense storage without KFAC factors")
        return self.A_stored, self.G_stored

    @cached_property
    def kfac_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return factor_eigh(*self.kfac_factors)

    def dense_rows(self) -> Tensor:
        return self.dense  # type: ignore[return-value]

    def rotated(self, QA: Tensor, QG: Tensor, null: int = 0) -> "LayerJacobian":
        """Rows ``vec(Q_Gᵀ MAT(j) Q_A)`` (with ``null``: ``Q_A[:, null:]`` only)."""
        d_out, d_in = self.spec.d_out, self.spec.d_in_bar
        J = self.dense
        Y = QG.T @ J.reshape(-1, d_in, d_out).mT @ QA[:, null:]  # type: ignore[union-attr]  # [N, d_out, d_in' − null]
        rows = Y.mT.reshape(J.shape[0], -1)  # type: ignore[union-attr]
        if null:
            inner = DenseLayerJacobian(_range_spec(self.spec, null), self.B, self.K, dense=rows)
            return NullPrefixLayerJacobian(self.spec, self.B, self.K, inner=inner, prefix=null * d_out)
        return DenseLayerJacobian(self.spec, self.B, self.K, dense=rows)


def _range_spec(spec: LayerSpec, null: int) -> LayerSpec:
    """The layer's spec with ``d_in' − null`` input columns (the rotated layer without A's null space)."""
    return dataclasses.replace(spec, d_in=spec.d_in_bar - null, bias=False)


@dataclass(eq=False)
class NullPrefixLayerJacobian(LayerJacobian):
    """A rotated layer whose first ``prefix`` coordinates (``null`` columns of Q_A times d_out,
    contiguous in vec order) lie in A's null space: ``U_iᵀx`` ignores them, ``U_i y`` is 0 there,
    the rest is ``inner`` (:meth:`LayerJacobian.rotated` with ``null``). At ResNet-18's layer4
    (B = 128: 2560 of 4608 columns) the preconditioned operator's products cost 44 % of the full
    rotation's. Products and Grams only."""

    inner: LayerJacobian | None = None
    prefix: int = 0

    @property
    def _array(self) -> Tensor:
        return self.inner._array  # type: ignore[union-attr]

    @property
    def factored(self) -> bool:  # type: ignore[override]
        return self.inner.factored  # type: ignore[union-attr]

    @property
    def T(self) -> int:
        return self.inner.T  # type: ignore[union-attr]

    def rmatmat(self, x: Tensor) -> Tensor:
        return self.inner.rmatmat(x[self.prefix :])  # type: ignore[union-attr]

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        self._check_out(y, out)
        if out is None:
            out = y.new_empty(self.p, y.shape[1])
        out[: self.prefix].zero_()
        self.inner.matmat(y, out=out[self.prefix :])  # type: ignore[union-attr]
        return out

    def _compute_gram(self) -> Tensor:
        return self.inner.gram()  # type: ignore[union-attr]


_SQUARE_SUM_CHUNK_NUMEL = 2**24
"""Numbers in one chunk of per-example products ``[examples·K, d_out, columns]`` of
:func:`_square_sums` (128 MiB in float64): one buffer, reused. Several examples per ``bmm``: with
T = 16 positions a single example's GEMM (inner dimension 16) runs at about half the speed of a
batch of 8 (2 threads); cache-sized column tiles measured no faster."""


def _square_sums(g: Tensor, a: Tensor, QA: Tensor | None) -> Tensor:
    """``S [d_out, k] = Σ_{b,k} (Σ_t g_{b,k,t} (Q_Aᵀ ā_{b,t})ᵀ)∘²`` (not scaled) for
    ``g [B, K, T, d_out]``, ``a [B, T, d_in']``, ``QA [d_in', k]`` (``None``: k = d_in', no rotation).

    ā is rotated a block of columns at a time (one GEMM ``[B·T, d_in'] × [d_in', columns]``,
    at most ``_MAX_TEMP_NUMEL`` numbers); per chunk of examples one ``bmm``
    ``[K·d_out, T] × [T, columns]`` writes into a reused buffer, which is squared in place and
    summed over the examples into ``S`` (no ``einsum`` permute copies, no ``pow`` temporaries).
    """
    B, K, T, d_out = g.shape
    d_in = a.shape[-1]
    k = d_in if QA is None else QA.shape[1]
    gt = g.permute(0, 1, 3, 2).reshape(B, K * d_out, T)  # per example: the rows g_{b,k,·,r}
    out = a.new_zeros(d_out, k)
    width = k if QA is None else min(k, max(1, _MAX_TEMP_NUMEL // max(B * T, 1)))  # rotated at once
    cols = min(k, max(1, _SQUARE_SUM_CHUNK_NUMEL // max(K * d_out, 1)))  # columns per product
    rows = max(1, _SQUARE_SUM_CHUNK_NUMEL // max(K * d_out * cols, 1))  # examples per product
    buf = a.new_empty(rows * K * d_out * cols)
    acc = a.new_empty(d_out * cols)
    for c0 in range(0, k, width):
        blk = a[:, :, c0 : c0 + width] if QA is None else (a.reshape(B * T, d_in) @ QA[:, c0 : c0 + width]).view(B, T, -1)
        for j0 in range(0, blk.shape[-1], cols):
            w = min(cols, blk.shape[-1] - j0)
            dst = out[:, c0 + j0 : c0 + j0 + w]
            for s0 in range(0, B, rows):
                e = min(rows, B - s0)
                M = torch.bmm(gt[s0 : s0 + e], blk[s0 : s0 + e, :, j0 : j0 + w], out=buf[: e * K * d_out * w].view(e, K * d_out, w))
                M.mul_(M)
                dst.add_(torch.sum(M.view(e * K, d_out, w), 0, out=acc[: d_out * w].view(d_out, w)))
    return out


PRECISIONS = ("float64", "mixed")

ROWS_MIN_POSITIONS = 32
"""A factored layer seen at ``T ≥ ROWS_MIN_POSITIONS·K`` positions is held as dense rows for the
products of an analysis (:meth:`Jacobian.holding_rows`): a product through the factors costs
2·B·T·d_in'·d_out flops, through the rows one pass over N·p_i = B·K·d_in'·d_out numbers, a gain
of ~T/K bounded by memory bandwidth. Measured (ResNet-18's layer3 conv, T = 64, d_in' = 2305,
d_out = 256, B = 128, float64, 2 threads): Uᵀx 0.28 → 0.077 s, Ux 0.38 → 0.063 s, for 604 MB of
rows formed in 0.73 s; at T = 16 (layer4) the rows (2.4 GB) would be read more slowly than the
factors' GEMM runs."""

ROWS_MEMORY_SHARE = 0.5
"""The share of the memory left free (the budget minus the plan's peak, or what the system has
available) that dense rows may take."""


def _same_device(a: torch.device | str, b: torch.device) -> bool:
    a = torch.device(a)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@dataclass(eq=False)
class MixedLayerJacobian(LayerJacobian):
    """``precision="mixed"``: factors held in float32, products and Grams computed in float32 and
    returned in float64; KFAC factors returned in float64, so that every factorization
    (eigendecompositions, Cholesky factors) and solve runs in float64.

    torch's float32 GEMMs accumulate in float32 (on CUDA too: TF32 stays off unless the user
    enables it); the accumulation over layers (K = Σ K_i, Uᵀx = Σ_i U_iᵀx_i) and everything after
    is float64. For GPUs whose float64 is slow; off by default.

    Measured error (``analysis/bench/cuda_bench.py --device cpu --quick --cases autoencoder``: the
    mc MNIST autoencoder at width 0.05, B = 16, λ = 1e-3·λ_max; methods exact, block-diagonal,
    kfac, kfac-tikhonov, ekfac): the largest relative difference of 𝔈/‖ζ‖² and of the cosine to
    the float64 table is 1.35e-6. At full width on the CPU (``cuda_bench.py --device cpu --cases
    autoencoder``: p = 2,837,314, B = 256, the same methods and λ; 2026-12-02, idle, 2 threads) it
    is 1.56e-6, for 3.48 s against 3.86 s in float64. ``tests/test_device.py::test_mixed_precision_error_is_small``
    bounds it by 1e-4 on the tiny CNN. A GPU's figure (TF32 off) is for the CUDA run of that script.
    """

    out_dtype: torch.dtype = torch.float64

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype

    def to(self, device=None, dtype=None) -> "LayerJacobian":
        lj = super().to(device, None)
        return MixedLayerJacobian(lj.spec, lj.B, lj.K, lj.a, lj.g, lj.dense, lj.A_stored, lj.G_stored,
                                  out_dtype=dtype or self.out_dtype)

    def _lo(self) -> torch.dtype:
        return (self.dense if self.dense is not None else self.a).dtype  # type: ignore[union-attr]

    def rmatmat(self, x: Tensor) -> Tensor:
        return super().rmatmat(x.to(self._lo())).to(self.out_dtype)

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        res = super().matmat(y.to(self._lo())).to(self.out_dtype)
        return out.copy_(res) if out is not None else res

    def _compute_gram(self) -> Tensor:
        return super()._compute_gram().to(self.out_dtype)

    def _compute_diagonal(self) -> Tensor:
        return super()._compute_diagonal().to(self.out_dtype)

    def eigenbasis_second_moments(self, QA: Tensor | None, QG: Tensor | None) -> Tensor:
        cv = lambda Q: None if Q is None else Q.to(self._lo())  # noqa: E731
        return super().eigenbasis_second_moments(cv(QA), cv(QG)).to(self.out_dtype)

    def dense_rows(self) -> Tensor:
        return super().dense_rows().to(self.out_dtype)

    @cached_property
    def reduce_factors(self) -> tuple[Tensor, Tensor]:
        return tuple(t.to(self.out_dtype) for t in _base_value(self, "reduce_factors"))  # type: ignore[return-value]

    @cached_property
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        return tuple(t.to(self.out_dtype) for t in _base_value(self, "kfac_factors"))  # type: ignore[return-value]


def _base_value(lj: LayerJacobian, name: str):
    """The storage kind's own (non-mixed) value of a cached property or property ``name``."""
    kind = FactoredLayerJacobian if lj.factored else DenseLayerJacobian
    attr = kind.__dict__[name]
    return attr.func(lj) if isinstance(attr, cached_property) else attr.fget(lj)


@dataclass(eq=False)
class _MixedFactored(MixedLayerJacobian, FactoredLayerJacobian):
    """:class:`MixedLayerJacobian` of a factored layer."""


@dataclass(eq=False)
class _MixedDense(MixedLayerJacobian, DenseLayerJacobian):
    """:class:`MixedLayerJacobian` of a dense layer."""


_KINDS = {LayerJacobian: (FactoredLayerJacobian, DenseLayerJacobian), MixedLayerJacobian: (_MixedFactored, _MixedDense)}
"""The protocol classes → their (factored, dense) implementations, for ``LayerJacobian(...)``."""


class Jacobian:
    """``U = J/√B`` of all layers: ``U [p, N]`` with ``F = U Uᵀ``.

    Args:
        layout: the layers.
        layers: one :class:`LayerJacobian` per layer.
        B, K: batch size and vectors per example.
        loss: the loss name of the capture (for dampings stated in mean-loss units), or ``None``.
        output_terms: d_y, the loss terms per example that a mean reduction would average
            (``None`` for class labels), for the same purpose.
    """

    def __init__(self, layout: Layout, layers: list[LayerJacobian], B: int, K: int, *,
                 loss: str | None = None, output_terms: int | None = None) -> None:
        self.layout = layout
        self.layers = layers
        self.B = B
        self.K = K
        self.loss = loss
        self.output_terms = output_terms

    @classmethod
    def coerce(cls, source: "Capture | Jacobian", dtype: torch.dtype = torch.float64, *,
               device: torch.device | str | None = None, precision: str = "float64") -> "Jacobian":
        """The given Jacobian (moved once to ``device`` when it lives elsewhere), or one built from
        a capture (its factors converted to ``dtype`` and moved to ``device``; ``None``: the
        capture's own device). ``precision="mixed"``: :class:`MixedLayerJacobian` layers."""
        if precision not in PRECISIONS:
            raise FisherlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        available_device(device)
        if isinstance(source, Jacobian):
            if device is None or _same_device(device, source.device):
                return source
            return source.to(device)
        if isinstance(source, Capture):
            return cls.from_capture(source, dtype, device=device, precision=precision)
        raise TypeError(f"expected a Capture or a Jacobian, got {type(source).__name__}")

    @classmethod
    def from_capture(cls, cap: Capture, dtype: torch.dtype = torch.float64, *,
                     device: torch.device | str | None = None, precision: str = "float64") -> "Jacobian":
        if cap.N == 0 or not cap.layers:
            raise FisherlabError("empty capture: no examples or no layers")
        if precision == "mixed":
            layers = [MixedLayerJacobian(lc.spec, cap.B, cap.K, *(None if t is None else t.to(device=device, dtype=torch.float32)
                                                                   for t in (lc.a, lc.g, lc.dense, lc.A, lc.G)), out_dtype=dtype)
                      for lc in cap.layers]
        else:
            layers = [LayerJacobian.from_layer_capture(lc, cap.B, cap.K, dtype, device) for lc in cap.layers]
        terms = int(cap.targets[0].numel()) if cap.targets.dim() > 1 else None
        return cls(cap.layout, layers, cap.B, cap.K, loss=cap.loss, output_terms=terms)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Jacobian":
        """A Jacobian with every layer's factors moved once to ``device`` (and ``dtype``)."""
        return Jacobian(self.layout, [lj.to(device, dtype) for lj in self.layers], self.B, self.K,
                        loss=self.loss, output_terms=self.output_terms)

    @property
    def device(self) -> torch.device:
        """Where the factors live (every product runs there)."""
        return self.layers[0].device

    @property
    def N(self) -> int:
        return self.B * self.K

    @property
    def p(self) -> int:
        return self.layout.p

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the products (float64 also under ``precision="mixed"``)."""
        return self.layers[0].result_dtype

    def rmatmat(self, x: Tensor) -> Tensor:
        """``Uᵀ x``: ``[p, c] -> [N, c]``."""
        out = None
        for lj, xi in zip(self.layers, self.layout.split(x)):
            y = lj.rmatmat(xi)
            out = y if out is None else out + y
        assert out is not None
        return out

    def matmat(self, y: Tensor) -> Tensor:
        """``U y``: ``[N, c] -> [p, c]`` (each layer's block written into one output: no concatenated copy)."""
        out = y.new_empty(self.p, y.shape[1])
        for lj, block in zip(self.layers, self.layout.split(out)):
            lj.matmat(y, out=block)
        return out

    @cached_property
    def grams(self) -> list[Tensor]:
        """Per-layer Grams ``K_i [N, N]`` (computed once)."""
        return [lj.gram() for lj in self.layers]

    @cached_property
    def gram(self) -> Tensor:
        """``K = Σ_i K_i = UᵀU`` ``[N, N]``: the nonzero spectrum of F."""
        return torch.stack(self.grams).sum(0) if len(self.grams) > 1 else self.grams[0]

    @cached_property
    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        """``(μ [N], W [N, N])``: ascending eigenpairs of K = UᵀU (computed once; the nonzero μ are
        F's eigenvalues, with eigenvectors ``U w/√μ``)."""
        return torch.linalg.eigh(self.gram)

    # ---- the setup shared through the cache (fisherlab.cache) --------------------------------
    def hold_rows(self, free: int | None) -> list[str]:
        """Hold as dense rows, for products (:meth:`FactoredLayerJacobian.hold_rows`), the factored
        layers with ``T ≥ K·``:data:`ROWS_MIN_POSITIONS`, most positions per vector first, as many
        as :data:`ROWS_MEMORY_SHARE` of ``free`` bytes allow (``None``: none). Returns the names of
        the layers it made hold rows (:meth:`release_rows` takes them). Every result is the same to
        round-off."""
        cand = [lj for lj in self.layers if isinstance(lj, FactoredLayerJacobian) and not lj.rows_held
                and lj.T >= ROWS_MIN_POSITIONS * lj.K]
        cand.sort(key=lambda lj: -lj.T / lj.K)
        held: list[str] = []
        left = ROWS_MEMORY_SHARE * max(free or 0, 0)
        for lj in cand:
            if lj.rows_bytes <= left:
                lj.hold_rows()
                held.append(lj.spec.name)
                left -= lj.rows_bytes
        return held

    def release_rows(self, names: Sequence[str] | None = None) -> None:
        """Drop the dense rows of the layers ``names`` (default: of every layer)."""
        for lj in self.layers:
            if isinstance(lj, FactoredLayerJacobian) and (names is None or lj.spec.name in names):
                lj.release_rows()

    @contextmanager
    def holding_rows(self, free: int | None) -> Iterator[list[str]]:
        """:meth:`hold_rows` for the block, released on exit; yields the layers held."""
        held = self.hold_rows(free)
        try:
            yield held
        finally:
            self.release_rows(held)

    def seed_setup(self, *, grams: list[Tensor | None] | None = None, gram_eigh: tuple[Tensor, Tensor] | None = None,
                   kfac_eigh: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] | None = None,
                   diagonals: list[Tensor | None] | None = None,
                   ekfac_moments: list[Tensor | None] | None = None) -> None:
        """Use setup computed earlier (the setup cache :mod:`fisherlab.cache`): per-layer Grams
        ``K_i [N, N]``, ``(μ, W)`` of K, per-layer KFAC eigenpairs, diagonals ``[p_i]`` and EKFAC
        second moments ``[d_out, d_in']`` (in the basis of the KFAC eigenpairs seeded with them);
        ``None`` entries are computed when first needed, as without a seed."""
        for values, seed in ((grams, "seed_gram"), (kfac_eigh, "seed_kfac_eigh"),
                             (diagonals, "seed_diagonal"), (ekfac_moments, "seed_ekfac_second_moments")):
            for lj, v in zip(self.layers, values or []):
                if v is not None:
                    getattr(lj, seed)(v)
        if gram_eigh is not None:
            mu, W = gram_eigh
            if tuple(mu.shape) != (self.N,) or tuple(W.shape) != (self.N, self.N):
                raise FisherlabError(f"a seeded eigendecomposition of K must be [{self.N}] and [{self.N}, {self.N}]")
            self.__dict__["gram_eigh"] = (mu.to(device=self.device, dtype=self.dtype), W.to(device=self.device, dtype=self.dtype))

    def computed_setup(self) -> dict[str, object]:
        """What has been computed (or seeded) so far: ``grams``, ``kfac_eigh``, ``diagonals`` and
        ``ekfac_moments`` (lists with ``None`` for a layer without), ``gram_eigh`` when present."""
        per = [lj.computed_setup() for lj in self.layers]
        out: dict[str, object] = {"grams": [d.get("gram") for d in per], "kfac_eigh": [d.get("kfac_eigh") for d in per],
                                  "diagonals": [d.get("diagonal") for d in per],
                                  "ekfac_moments": [d.get("ekfac_moments") for d in per]}
        if "gram_eigh" in self.__dict__:
            out["gram_eigh"] = self.__dict__["gram_eigh"]
        return out


class _Slot:
    """The one streamed layer held at a time (shared by the layers of a streamed Jacobian)."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: LayerJacobian | None = None
        self.loads = 0

    def get(self, key: object, load: Callable[[], LayerJacobian]) -> LayerJacobian:
        if self.key is not key or self.value is None:
            self.value = None  # release the previous layer before reading the next
            self.value = load()
            self.key = key
            self.loads += 1
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None

    def derived(self, *key: object) -> "_Slot":
        """The one slot shared by the layers moved together (``Jacobian.to``) to ``key``."""
        kids = self.__dict__.setdefault("_kids", {})
        return kids.setdefault(key, _Slot())


class StreamedLayerJacobian(LayerJacobian):
    """A layer read from its source each time it is used (bounded memory, issue 14 item 3): the
    arrays of at most one layer of the Jacobian are held (a shared :class:`_Slot`); what the
    layer computes from them once — its Gram, KFAC factors and eigenpairs — is kept, as for any
    layer. ``load()`` returns the in-memory layer (e.g. read from the file and converted to
    float64), so every number equals the in-memory path's.

    Args:
        spec, B, K: the layer, batch size, vectors per example.
        load: builds the in-memory :class:`LayerJacobian` (called again after another layer ran).
        T: positions; factored: the storage kind; device, dtype: of the loaded layer.
        slot: the shared slot (default: one of its own).
    """

    def __init__(self, spec: LayerSpec, B: int, K: int, load: Callable[[], LayerJacobian], *, T: int, factored: bool,
                 device: torch.device | str, dtype: torch.dtype, slot: _Slot | None = None) -> None:
        self.spec, self.B, self.K = spec, B, K
        self._load, self._T, self.factored = load, T, factored  # type: ignore[misc]
        self._device, self._dtype = torch.device(device), dtype
        self.slot = slot if slot is not None else _Slot()

    def held(self) -> LayerJacobian:
        """The in-memory layer (read now unless it is the one held)."""
        return self.slot.get(self, self._load)

    def to(self, device=None, dtype=None) -> "LayerJacobian":
        return StreamedLayerJacobian(self.spec, self.B, self.K, lambda: self._load().to(device, dtype), T=self._T,
                                     factored=self.factored, device=device or self._device, dtype=dtype or self._dtype,
                                     slot=self.slot.derived(str(device), dtype))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def result_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def T(self) -> int:
        return self._T

    a = property(lambda self: self.held().a)  # type: ignore[assignment]
    g = property(lambda self: self.held().g)  # type: ignore[assignment]
    dense = property(lambda self: self.held().dense)  # type: ignore[assignment]
    A_stored = property(lambda self: self.held().A_stored)  # type: ignore[assignment]
    G_stored = property(lambda self: self.held().G_stored)  # type: ignore[assignment]

    def rmatmat(self, x: Tensor) -> Tensor:
        return self.held().rmatmat(x)

    def matmat(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        return self.held().matmat(y, out=out)

    def _compute_gram(self) -> Tensor:
        return self.held().gram()

    def _compute_diagonal(self) -> Tensor:
        return self.held().diagonal()

    def eigenbasis_second_moments(self, QA: Tensor, QG: Tensor) -> Tensor:
        return self.held().eigenbasis_second_moments(QA, QG)

    def dense_rows(self) -> Tensor:
        return self.held().dense_rows()

    def rotated(self, QA: Tensor, QG: Tensor, null: int = 0) -> "LayerJacobian":
        """Streamed too: the rotation is applied to each read."""
        return StreamedLayerJacobian(self.spec, self.B, self.K, lambda: self._load().rotated(QA, QG, null), T=self._T,
                                     factored=self.factored, device=self._device, dtype=self._dtype, slot=self.slot)

    @cached_property
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        return self.held().kfac_factors

    @cached_property
    def kfac_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.held().kfac_eigh

    @cached_property
    def reduce_factors(self) -> tuple[Tensor, Tensor]:
        return self.held().reduce_factors

    @cached_property
    def reduce_eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.held().reduce_eigh
