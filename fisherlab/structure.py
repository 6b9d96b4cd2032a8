"""Block structure of the Fisher: layer interactions and the KFAC error of each block (MATH.md §7).

With ``U_i = J_i/√B`` (``[p_i, N]``) and the per-layer Grams ``K_i = U_iᵀU_i`` (``[N, N]``), the
blocks of ``F = UUᵀ`` are ``F_ij = U_iU_jᵀ`` (``[p_i, p_j]``) and

    ‖F_ij‖²_F = tr(U_jU_iᵀU_iU_jᵀ) = tr(K_i K_j) = ⟨K_i, K_j⟩_F         (i = j included),

an ℓ × ℓ Gram of the flattened ``K_i``: no block is ever formed. From it

* the **layer-interaction matrix** ``ρ_ij = ‖F_ij‖_F / √(‖F_ii‖_F ‖F_jj‖_F)`` (ρ_ii = 1);
* the **share of ‖F‖²_F off the block diagonal**, ``Σ_{i≠j} ‖F_ij‖² / Σ_ij ‖F_ij‖²`` — what
  every block-diagonal approximation (KFAC, (3.7)) discards.

The **KFAC error of a diagonal block** (undamped F, undamped factors A_i, G_i of (2.25)–(2.27)):

    ‖F_ii − A⊗G‖²_F = ‖F_ii‖²_F − 2⟨F_ii, A⊗G⟩ + ‖A‖²_F‖G‖²_F,
    ⟨F_ii, A⊗G⟩ = (1/B) Σ_n j_nᵀ(A⊗G)j_n = (1/B) Σ_n ⟨X_n, G X_n A⟩_F,   X_n = MAT(j_n),

computed without A⊗G: for factored layers ``X_n = Σ_t g_{n,t}ā_{b,t}ᵀ`` gives
``⟨X_n, G X_n A⟩ = Σ_{t,s} (g_{n,t}ᵀG g_{n,s})(ā_{b,t}ᵀA ā_{b,s})`` — for Linear layers (T = 1)
``(gᵀGg)(āᵀAā)``; dense-stored layers use ``X_n`` directly. The difference of three
nonnegative terms loses relative accuracy when KFAC is nearly exact (B = 1): values under
~1e-7 relative are round-off, clipped at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .capturing.record import Capture
from .io.tables import write_csv
from .jacobian import Jacobian, LayerJacobian

__all__ = [
    "LayerInteractions",
    "KFACBlockErrors",
    "layer_interactions",
    "kfac_block_errors",
    "off_diagonal_share",
    "kfac_block_inner",
]


@dataclass
class LayerInteractions:
    """Squared Frobenius norms of the Fisher's layer blocks and what follows from them.

    Attributes:
        names: layer names ``[ℓ]``.
        sizes: p_i ``[ℓ]``.
        norms2: ``‖F_ij‖²_F`` ``[ℓ, ℓ]`` (symmetric, undamped F).
        meta: context (checkpoint, step, N, …).
    """

    names: list[str]
    sizes: list[int]
    norms2: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def norms(self) -> np.ndarray:
        """``‖F_ij‖_F`` ``[ℓ, ℓ]``."""
        return np.sqrt(np.clip(self.norms2, 0.0, None))

    @property
    def rho(self) -> np.ndarray:
        """``ρ_ij = ‖F_ij‖_F / √(‖F_ii‖_F‖F_jj‖_F)`` ``[ℓ, ℓ]``; ρ_ii = 1 (0 for an all-zero layer)."""
        n = self.norms
        d = np.sqrt(np.diag(n))
        den = np.outer(d, d)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(den > 0, n / np.where(den > 0, den, 1.0), 0.0)
        return r

    @property
    def total_norm2(self) -> float:
        """``‖F‖²_F = Σ_ij ‖F_ij‖²_F = tr(K²)``."""
        return float(self.norms2.sum())

    @property
    def off_diagonal_share(self) -> float:
        """``Σ_{i≠j} ‖F_ij‖²_F / ‖F‖²_F`` ∈ [0, 1)."""
        tot = self.total_norm2
        return float((tot - np.trace(self.norms2)) / tot) if tot > 0 else 0.0

    def to_csv(self, path: str | Path) -> Path:
        """One row per pair (i, j): layer names, ``‖F_ij‖²_F``, ``‖F_ij‖_F``, ρ_ij, plus meta columns."""
        extra = [k for k, v in self.meta.items() if isinstance(v, (int, float, str)) or v is None]
        rho, n = self.rho, self.norms
        rows = [
            [*(self.meta[k] for k in extra), i, j, self.names[i], self.names[j], float(self.norms2[i, j]), float(n[i, j]), float(rho[i, j])]
            for i in range(len(self.names))
            for j in range(len(self.names))
        ]
        return write_csv(rows, path, extra + ["i", "j", "layer_i", "layer_j", "norm2", "norm", "rho"])

    def summary(self) -> dict:
        """One row: ℓ, ‖F‖²_F, the off-diagonal share, the largest off-diagonal ρ."""
        r = self.rho.copy()
        np.fill_diagonal(r, 0.0)
        return {
            **{k: v for k, v in self.meta.items() if isinstance(v, (int, float, str)) or v is None},
            "layers": len(self.names),
            "total_norm2": self.total_norm2,
            "off_diagonal_share": self.off_diagonal_share,
            "max_offdiag_rho": float(r.max()) if r.size else 0.0,
        }


@dataclass
class KFACBlockErrors:
    """``‖F_ii − A_i⊗G_i‖_F`` per layer, from three scalars each.

    Attributes:
        names: layer names ``[ℓ]``.
        block_norm2: ``‖F_ii‖²_F`` ``[ℓ]``.
        inner: ``⟨F_ii, A_i⊗G_i⟩_F`` ``[ℓ]``.
        kron_norm2: ``‖A_i‖²_F‖G_i‖²_F`` ``[ℓ]``.
        meta: context.
    """

    names: list[str]
    block_norm2: np.ndarray
    inner: np.ndarray
    kron_norm2: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def error2(self) -> np.ndarray:
        """``‖F_ii − A⊗G‖²_F`` (clipped at 0) ``[ℓ]``."""
        return np.clip(self.block_norm2 - 2 * self.inner + self.kron_norm2, 0.0, None)

    @property
    def error(self) -> np.ndarray:
        return np.sqrt(self.error2)

    @property
    def relative_error(self) -> np.ndarray:
        """``‖F_ii − A⊗G‖_F / ‖F_ii‖_F`` ``[ℓ]`` (NaN for an all-zero block)."""
        nb = np.sqrt(self.block_norm2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(nb > 0, self.error / np.where(nb > 0, nb, 1.0), np.nan)

    @property
    def cosine(self) -> np.ndarray:
        """``⟨F_ii, A⊗G⟩ / (‖F_ii‖‖A⊗G‖)`` ``[ℓ]``: 1 when A⊗G is a multiple of F_ii."""
        den = np.sqrt(self.block_norm2 * self.kron_norm2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, self.inner / np.where(den > 0, den, 1.0), np.nan)

    def rows(self) -> list[dict]:
        """One dict per layer."""
        ctx = {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str)) or v is None}
        return [
            {
                **ctx,
                "layer": i,
                "name": nm,
                "block_norm": math.sqrt(max(float(self.block_norm2[i]), 0.0)),
                "kron_norm": math.sqrt(max(float(self.kron_norm2[i]), 0.0)),
                "inner": float(self.inner[i]),
                "error": float(self.error[i]),
                "relative_error": float(self.relative_error[i]),
                "cosine": float(self.cosine[i]),
            }
            for i, nm in enumerate(self.names)
        ]

    def to_csv(self, path: str | Path) -> Path:
        rows = self.rows()
        return write_csv(rows, path, None if rows else ["layer", "name"])


def _source_meta(source: Capture | Jacobian) -> dict:
    meta = {}
    if isinstance(source, Capture):
        for k in ("checkpoint", "step"):
            if k in source.meta:
                meta[k] = source.meta[k]
    return meta


def layer_interactions(source: Capture | Jacobian) -> LayerInteractions:
    """``‖F_ij‖²_F = tr(K_iK_j)`` for all layer pairs, from the per-layer Grams.

    Args:
        source: a :class:`Capture` or :class:`Jacobian` (its cached Grams ``K_i [N, N]`` are
            reused; cost ℓ Grams plus one ``[ℓ, N²] × [N², ℓ]`` product).

    Returns:
        :class:`LayerInteractions` (``rho``, ``off_diagonal_share``, CSV export).
    """
    jac = Jacobian.coerce(source)
    G = torch.stack([k.reshape(-1) for k in jac.grams]).double()  # [ℓ, N²]
    norms2 = (G @ G.T).numpy()
    norms2 = (norms2 + norms2.T) / 2
    meta = dict(_source_meta(source), N=jac.N, p=jac.p)
    return LayerInteractions([lj.spec.name for lj in jac.layers], [lj.p for lj in jac.layers], norms2, meta)


def off_diagonal_share(source: Capture | Jacobian) -> float:
    """``Σ_{i≠j}‖F_ij‖²_F / ‖F‖²_F``: the share of the Fisher outside its layer-diagonal blocks."""
    return layer_interactions(source).off_diagonal_share


def kfac_block_inner(lj: LayerJacobian, A: Tensor, G: Tensor) -> float:
    """``⟨F_ii, A⊗G⟩_F = (1/B) Σ_n ⟨MAT(j_n), G MAT(j_n) A⟩_F`` for one layer, without A⊗G.

    Args:
        lj: the layer's Jacobian (factors ``a [B, T, d_in']``, ``g [B, K, T, d_out]``, or dense
            rows ``[N, p_i]``).
        A: ``[d_in', d_in']``; G: ``[d_out, d_out]`` (symmetric).
    """
    if lj.factored:
        a, g = lj.a, lj.g
        assert a is not None and g is not None
        B, K, T, d_out = g.shape
        Aa = torch.einsum("btd,de,bse->bts", a, A, a)  # [B, T, T]: ā_tᵀ A ā_s
        gG = g.reshape(B * K, T, d_out)
        Gg = torch.einsum("ntd,de,nse->nts", gG, G, gG).reshape(B, K, T, T)  # g_tᵀ G g_s
        return float((Gg * Aa[:, None]).sum()) / B
    J = lj.dense_rows()
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    total = 0.0
    step = max(1, 2**24 // max(lj.p, 1))
    for s in range(0, J.shape[0], step):  # bounded [n, d_out, d_in'] temporaries
        X = J[s : s + step].reshape(-1, d_in, d_out).mT  # MAT(j_n): [n, d_out, d_in']
        total += float((X * (G @ X @ A)).sum())
    return total / lj.B


def kfac_block_errors(source: Capture | Jacobian) -> KFACBlockErrors:
    """``‖F_ii − A_i⊗G_i‖_F / ‖F_ii‖_F`` per layer (undamped F and KFAC factors (2.25)–(2.27)).

    Args:
        source: a :class:`Capture` or :class:`Jacobian` (Grams reused for ``‖F_ii‖²_F = ‖K_i‖²_F``).

    Returns:
        :class:`KFACBlockErrors` (``relative_error``, ``cosine``, CSV export).
    """
    jac = Jacobian.coerce(source)
    bn, inner, kn = [], [], []
    for lj, K in zip(jac.layers, jac.grams):
        A, G = (t.to(K.dtype) for t in lj.kfac_factors)
        bn.append(float(K.pow(2).sum()))
        inner.append(kfac_block_inner(lj, A, G))
        kn.append(float(A.pow(2).sum()) * float(G.pow(2).sum()))
    meta = dict(_source_meta(source), N=jac.N, p=jac.p)
    return KFACBlockErrors([lj.spec.name for lj in jac.layers], np.array(bn), np.array(inner), np.array(kn), meta)
