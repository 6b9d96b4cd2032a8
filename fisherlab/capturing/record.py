"""The capture record: per-layer factors (or dense per-example gradients) of one mini-batch.

A :class:`Capture` is everything the offline analysis needs; it never holds the model.
Per layer i it stores either

* the **factors** ā ``a [B, T, d_in']`` and g ``g [B, K, T, d_out]`` (MATH.md §2), or
* the **dense** per-example gradients ``J_i [N, p_i]``, row ``n = b·K + k`` being
  ``j_{b,k} = vec(Σ_t g_{b,k,t} ā_{b,t}ᵀ)`` — chosen when that is smaller (conv layers with many
  positions).

Rows are *per example, not divided by B*: ``F = (1/B) Jᵀ J`` with ``J [N, p]``, ``N = B·K``.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

import torch
from torch import Tensor

from ..layout import LayerSpec, Layout
from ..kernels import dense_from_factors, kfac_factors_from

__all__ = ["FisherMode", "Storage", "LayerCapture", "Capture", "dataset_shapes"]


def dataset_shapes(spec: LayerSpec, storage: "Storage | str", B: int, K: int, T: int, kfac: bool = False) -> dict[str, list[int]]:
    """THE table of a layer's arrays per storage kind, with their shapes (N = B·K) — what
    :meth:`LayerCapture.arrays` holds and what the store writes and checks files against:

    | kind | arrays |
    |---|---|
    | ``factored`` | ``a [B, T, d_in']``, ``g [B, K, T, d_out]`` |
    | ``dense`` | ``J [N, p_i]``; with ``kfac``: ``A [d_in', d_in']``, ``G [d_out, d_out]`` |
    """
    storage = Storage(storage)
    if storage is Storage.DENSE:
        out = {"J": [B * K, spec.numel]}
        if kfac:
            out.update(A=[spec.d_in_bar, spec.d_in_bar], G=[spec.d_out, spec.d_out])
        return out
    if storage is not Storage.FACTORED:
        raise ValueError(f"a layer is stored factored or dense, not {storage.value!r}")
    return {"a": [B, T, spec.d_in_bar], "g": [B, K, T, spec.d_out]}


class FisherMode(str, Enum):
    """Which Fisher the backpropagated vectors estimate (MATH.md §2)."""

    MC = "mc"
    """Monte-Carlo Fisher (2.15): K = n_samples draws ŷ ~ p(y|z), vectors ∂_z L(ŷ, z)/√K."""
    EXACT = "exact"
    """True Fisher (= GGN for these losses): K = d_y columns of S, S Sᵀ = ∂²_z L."""
    EMPIRICAL = "empirical"
    """Empirical Fisher: K = 1, vector ∂_z L(y, z) with the true label."""


class Storage(str, Enum):
    """How a layer's per-example Jacobian is kept."""

    AUTO = "auto"
    """Factored or dense, whichever takes fewer numbers."""
    FACTORED = "factored"
    """ā ``[B, T, d_in']`` and g ``[B, K, T, d_out]``."""
    DENSE = "dense"
    """``J_i [N, p_i]``."""


@dataclass(repr=False)
class LayerCapture:
    """One layer's share of a capture: factors or dense per-example gradients.

    Attributes:
        spec: the layer (shapes, offsets).
        positions: T, spatial positions the layer sees (1 for a plain Linear).
        a: ā ``[B, T, d_in']`` or ``None`` (dense storage).
        g: g ``[B, K, T, d_out]`` or ``None`` (dense storage).
        dense: ``J_i [N, p_i]`` or ``None`` (factored storage).
        A: with dense storage, the KFAC factor ``A_i = (1/B) Σ_{b,t} ā ā ᵀ`` ``[d_in', d_in']``
            (2.27), which ``J_i`` no longer determines; ``None`` when factored.
        G: with dense storage, ``G_i = (1/(B·T)) Σ_{b,k,t} g gᵀ`` ``[d_out, d_out]``; else ``None``.
    """

    spec: LayerSpec
    positions: int
    a: Tensor | None = None
    g: Tensor | None = None
    dense: Tensor | None = None
    A: Tensor | None = None
    G: Tensor | None = None

    def __repr__(self) -> str:
        shapes = " ".join(f"{k} {list(t.shape)}" for k, t in self.arrays().items() if k in ("a", "g", "J"))
        return f"<LayerCapture '{self.spec.name}' {self.spec.kind.value} {self.storage.value}: {shapes}>"

    def arrays(self) -> dict[str, Tensor]:
        """The arrays of this layer's storage kind under their dataset names (:func:`dataset_shapes`):
        factored ``{"a", "g"}``, dense ``{"J"}`` plus ``{"A", "G"}`` when the KFAC factors are kept."""
        if self.dense is not None:
            out = {"J": self.dense}
            if self.A is not None and self.G is not None:
                out.update(A=self.A, G=self.G)
            return out
        return {"a": self.a, "g": self.g}  # type: ignore[dict-item]

    @property
    def storage(self) -> Storage:
        return Storage.DENSE if self.dense is not None else Storage.FACTORED

    @property
    def numel(self) -> int:
        """Numbers stored for this layer."""
        return sum(t.numel() for t in (self.a, self.g, self.dense, self.A, self.G) if t is not None)

    def jacobian(self) -> Tensor:
        """``J_i [N, p_i]`` (built from the factors when stored factored)."""
        if self.dense is not None:
            return self.dense
        assert self.a is not None and self.g is not None
        return dense_from_factors(self.a, self.g)

    def equals(self, other: "LayerCapture") -> bool:
        same = lambda x, y: (x is None and y is None) or (  # noqa: E731
            x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y)
        )
        return (
            self.spec == other.spec
            and self.positions == other.positions
            and same(self.a, other.a)
            and same(self.g, other.g)
            and same(self.dense, other.dense)
            and same(self.A, other.A)
            and same(self.G, other.G)
        )


def choose_storage(B: int, K: int, T: int, d_in_bar: int, d_out: int, storage: Storage | str) -> Storage:
    """Factored unless dense ``[N, p_i]`` takes fewer numbers than ``a`` and ``g`` together.

    Layers seen at one position (plain Linear, T = 1) always stay factored under ``auto``: dense
    rows can only be smaller for layers of a few parameters, and the factors are what KFAC, the
    Kronecker TKO coarse operator (3.18) and the Hadamard Grams use.
    """
    storage = Storage(storage)
    if storage is not Storage.AUTO:
        return storage
    if T == 1:
        return Storage.FACTORED
    factored = B * T * d_in_bar + B * K * T * d_out
    dense = B * K * d_in_bar * d_out
    return Storage.DENSE if dense < factored else Storage.FACTORED


@dataclass
class Capture:
    """Per-example layer Jacobians of one mini-batch, and its gradient.

    Attributes:
        layout: the layers in the Fisher.
        layers: one :class:`LayerCapture` per layer of ``layout``.
        grad: ∇h ``[p]`` (2.10), the mini-batch gradient with the true labels, fisherlab order.
        loss_value: h, the mean loss of the batch.
        loss: loss name (:class:`fisherlab.capturing.losses.Loss` value).
        fisher: :class:`FisherMode`.
        batch_size: B.
        n_vectors: K, backpropagated vectors per example (N = B·K).
        targets: the true targets ``[B]`` or ``[B, d_y]``.
        sampled: for ``mc``, the drawn targets ``[K, B]`` or ``[K, B, d_y]``; else ``None``.
        seed: seed of the sampling generator (``mc``), else ``None``.
        model: a JSON-able description of the model (free form; may be empty).
        meta: further JSON-able metadata (checkpoint name, step, batch indices, …).
    """

    layout: Layout
    layers: list[LayerCapture]
    grad: Tensor
    loss_value: float
    loss: str
    fisher: FisherMode
    batch_size: int
    n_vectors: int
    targets: Tensor
    sampled: Tensor | None = None
    seed: int | None = None
    model: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.batch_size

    @property
    def K(self) -> int:
        return self.n_vectors

    @property
    def N(self) -> int:
        """Columns of J: ``N = B·K``."""
        return self.batch_size * self.n_vectors

    @property
    def p(self) -> int:
        return self.layout.p

    @property
    def dtype(self) -> torch.dtype:
        return self.grad.dtype

    def __iter__(self) -> Iterator[LayerCapture]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, layer: int | str) -> LayerCapture:
        return self.layers[self.layout.index(layer)]

    # ---- per-example Jacobian ------------------------------------------------------------
    def per_example_gradients(self, layer: int | str | None = None) -> Tensor:
        """Rows ``j_{b,k}``: ``[N, p]`` (all layers) or ``[N, p_i]`` (one layer), F = JᵀJ/B.

        Dense; meant for small models, tests and references. The operators never call it.
        """
        if layer is not None:
            return self.layer(layer).jacobian()
        return torch.cat([lc.jacobian() for lc in self.layers], dim=1)

    # ---- orders --------------------------------------------------------------------------
    def to_torch_order(self, v: Tensor) -> Tensor:
        """fisherlab order ``[p, *c]`` → ``parameters_to_vector`` order (zeros outside the Fisher)."""
        return self.layout.to_torch_order(v)

    def from_torch_order(self, v: Tensor) -> Tensor:
        """``parameters_to_vector`` order → fisherlab order ``[p, *c]``."""
        return self.layout.from_torch_order(v)

    # ---- misc ------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Capture":
        """Move floating arrays to ``device``/``dtype``; integer targets only change device."""
        def conv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        layers = [
            LayerCapture(lc.spec, lc.positions, conv(lc.a), conv(lc.g), conv(lc.dense), conv(lc.A), conv(lc.G))
            for lc in self.layers
        ]
        return Capture(
            self.layout, layers, conv(self.grad), self.loss_value, self.loss, self.fisher,  # type: ignore[arg-type]
            self.batch_size, self.n_vectors, conv(self.targets), conv(self.sampled),  # type: ignore[arg-type]
            self.seed, dict(self.model), dict(self.meta),
        )

    def scaled(self, c: float) -> "Capture":
        """The capture of the loss c·L (c > 0): per-example output gradients g, dense rows and ∇h
        times c, G times c², the loss value times c; ā and A unchanged, so F becomes c²F.
        ``c = 1/d_y`` gives the loss averaged over its d_y output terms (torch's mean reduction, the
        paper's code). ``c = 1`` returns the capture itself."""
        c = float(c)
        if c == 1.0:
            return self
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"Capture.scaled: the loss scale must be finite and > 0, got {c}")
        layers = [
            dataclasses.replace(
                lc,
                g=None if lc.g is None else lc.g * c,
                dense=None if lc.dense is None else lc.dense * c,
                G=None if lc.G is None else lc.G * c**2,
            )
            for lc in self.layers
        ]
        return dataclasses.replace(self, layers=layers, grad=self.grad * c, loss_value=self.loss_value * c)

    def equals(self, other: "Capture") -> bool:
        """Exact equality of every array and every metadata field."""
        same_opt = lambda x, y: (x is None and y is None) or (  # noqa: E731
            x is not None and y is not None and x.dtype == y.dtype and torch.equal(x, y)
        )
        return (
            self.layout == other.layout
            and len(self.layers) == len(other.layers)
            and all(a.equals(b) for a, b in zip(self.layers, other.layers))
            and self.grad.dtype == other.grad.dtype
            and torch.equal(self.grad, other.grad)
            and (self.loss_value == other.loss_value or (math.isnan(self.loss_value) and math.isnan(other.loss_value)))
            and self.loss == other.loss
            and FisherMode(self.fisher) == FisherMode(other.fisher)
            and self.batch_size == other.batch_size
            and self.n_vectors == other.n_vectors
            and same_opt(self.targets, other.targets)
            and same_opt(self.sampled, other.sampled)
            and self.seed == other.seed
            and self.model == other.model
            and self.meta == other.meta
        )

    def nbytes(self) -> int:
        return sum(lc.numel for lc in self.layers) * self.grad.element_size()

    def __repr__(self) -> str:
        """One line of shapes and modes, never the tensors (:meth:`summary` lists every layer)."""
        ck = self.meta.get("checkpoint")
        return (
            f"<Capture{' ' + repr(ck) if ck is not None else ''}: {FisherMode(self.fisher).value} Fisher, loss={self.loss}, "
            f"B={self.B} K={self.K} N={self.N}, p={self.p:,} in {len(self.layers)} layers, "
            f"{str(self.dtype).replace('torch.', '')}, {self.nbytes() / 2**20:.1f} MiB>"
        )

    def _repr_html_(self) -> str:
        """Jupyter: the one-line repr as a caption over a table of the layers (shapes, storage, sizes)."""
        from html import escape

        head = "".join(f"<th>{h}</th>" for h in ("layer", "kind", "storage", "p_i", "T", "arrays", "MiB"))
        rows = "".join(
            "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in (
                lc.spec.name, lc.spec.kind.value, lc.storage.value, f"{lc.spec.numel:,}", lc.positions,
                " ".join(f"{k} {list(t.shape)}" for k, t in lc.arrays().items()),
                f"{sum(t.numel() * t.element_size() for t in lc.arrays().values()) / 2**20:.2f}",
            )) + "</tr>"
            for lc in self.layers
        )
        return f"<table><caption>{escape(repr(self))}</caption><tr>{head}</tr>{rows}</table>"

    def summary(self) -> str:
        """A few readable lines: mode, sizes, and one line per layer."""
        lines = [
            f"Capture: loss={self.loss} fisher={FisherMode(self.fisher).value} B={self.B} K={self.K} "
            f"N={self.N} p={self.p:,} dtype={str(self.dtype).replace('torch.', '')} "
            f"h={self.loss_value:.6g} |grad|={float(self.grad.double().norm()):.4g} "
            f"size={self.nbytes() / 2**20:.1f} MiB",
        ]
        for lc in self.layers:
            s = lc.spec
            shapes = (
                f"J {list(lc.dense.shape)}" if lc.dense is not None
                else f"a {list(lc.a.shape)} g {list(lc.g.shape)}"  # type: ignore[union-attr]
            )
            lines.append(
                f"  {s.name:<24} {s.kind.value:<9} d_out={s.d_out:<5} d_in'={s.d_in_bar:<6} T={lc.positions:<5} "
                f"p_i={s.numel:<10,} {lc.storage.value:<8} {shapes}"
            )
        if self.layout.excluded:
            lines.append("  not in the Fisher: " + ", ".join(self.layout.excluded))
        return "\n".join(lines)
