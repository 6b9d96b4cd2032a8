"""Layers, parameter offsets and the ``vec`` convention (MATH.md §1).

This module owns the parameter order. Nobody else reshapes parameters by hand.

* A *layer* is an ``nn.Linear`` or an ``nn.Conv2d`` (``groups == 1``, zero padding). Layer i
  has the matrix ``W_i = [weight | bias]`` of shape ``[d_out, d_in']`` with
  ``d_in' = d_in + 1`` when the layer has a bias. For Conv2d ``d_in = c_in·kh·kw`` in the order
  of ``torch.nn.functional.unfold`` (which is ``weight.reshape(c_out, -1)``).
* ``vec`` stacks **columns**: ``vec(M) = M.mT.reshape(-1)``, so ``vec(g āᵀ) = ā ⊗ g`` and
  ``(A ⊗ G) vec(X) = vec(G X Aᵀ)``.
* θ = [vec(W_1); …; vec(W_ℓ)] ∈ Rᵖ is *fisherlab order*. *Torch order* is
  ``torch.nn.utils.parameters_to_vector(model.parameters())`` of the whole model; entries of
  modules outside the Fisher (BatchNorm by default, …) are zero in :meth:`Layout.to_torch_order`
  and dropped by :meth:`Layout.from_torch_order`.
* **BatchNorm in the Fisher** (``Layout.from_model(model, batchnorm="fisher")``): an affine
  ``BatchNorm1d/2d/3d`` with C channels is a layer of kind ``batchnorm`` seen as a Linear layer
  with the constant input ā = [1] (``d_in = 1``, no bias column, T = 1) and ``d_out = 2C``:
  ``W = [γ; β]`` is a ``[2C, 1]`` column, so its block of θ is ``[γ_1 … γ_C, β_1 … β_C]`` (torch's
  own order: weight, then bias). Its per-example "output gradient" g is the per-example
  gradient row ``[Σ_t g_{c,t} x̂_{c,t}, Σ_t g_{c,t}]_c`` (g w.r.t. the BatchNorm output, x̂ its
  normalised input, t over the positions), so the row ``vec(g āᵀ) = g`` is exact and every
  Kronecker method sees ``A_i = 1``, ``G_i`` = the exact block of the layer.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError, UnsupportedLayerError

__all__ = [
    "BATCHNORM_CHOICES",
    "LayerKind",
    "LayerSpec",
    "Layout",
    "UnsupportedLayerError",
    "register_layer",
    "vec",
    "unvec",
]


class LayerKind(str, Enum):
    """The layer types fisherlab knows."""

    LINEAR = "linear"
    """``nn.Linear``: ``T`` = number of positions (1 for a ``[B, d_in]`` input)."""
    CONV2D = "conv2d"
    """``nn.Conv2d``: ``T`` = output height × width, inputs unfolded by ``F.unfold``."""
    BATCHNORM = "batchnorm"
    """affine ``nn.BatchNorm1d/2d/3d`` (only with ``batchnorm="fisher"``): ā = [1], T = 1,
    ``d_out = 2C``, parameters ``[γ; β]`` (module docstring)."""


def vec(M: Tensor) -> Tensor:
    """Column-stacking ``vec``: ``[..., r, c] -> [..., r·c]`` with ``vec(M)[j·r + i] = M[i, j]``."""
    return M.mT.reshape(*M.shape[:-2], -1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec` (``MAT``): ``[..., rows·cols] -> [..., rows, cols]``."""
    return v.reshape(*v.shape[:-1], cols, rows).mT


@dataclass(frozen=True)
class LayerSpec:
    """One layer of the Fisher: its shapes, its offsets, and how it sees its input.

    Attributes:
        name: qualified module name (``model.named_modules()``).
        kind: :class:`LayerKind`.
        d_in: input features without the bias column (``c_in·kh·kw`` for Conv2d).
        d_out: output features (``c_out`` for Conv2d).
        bias: whether the layer has a bias (then ``d_in' = d_in + 1``).
        offset: start of ``vec(W_i)`` in fisherlab order.
        torch_weight_offset: start of ``weight`` in torch order.
        torch_bias_offset: start of ``bias`` in torch order, ``-1`` without a bias (BatchNorm:
            start of β, although its ā has no bias column: ``bias`` is ``False``).
        weight_shape: ``tuple(module.weight.shape)``.
        conv: Conv2d hyper-parameters (``kernel_size``, ``stride``, ``padding``, ``dilation``)
            as lists of two ints; empty for Linear.
    """

    name: str
    kind: LayerKind
    d_in: int
    d_out: int
    bias: bool
    offset: int
    torch_weight_offset: int
    torch_bias_offset: int
    weight_shape: tuple[int, ...]
    conv: dict = field(default_factory=dict)

    @property
    def d_in_bar(self) -> int:
        """``d_in' = d_in + 1`` with a bias, ``d_in`` without."""
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        """``p_i = d_out · d_in'``."""
        return self.d_out * self.d_in_bar

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    def to_json(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["weight_shape"] = list(self.weight_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LayerSpec":
        d = dict(d)
        d["kind"] = LayerKind(d["kind"])
        d["weight_shape"] = tuple(d["weight_shape"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# registry: module class -> function describing it (and refusing what it cannot describe)
# --------------------------------------------------------------------------------------------

_Describer = Callable[[str, nn.Module], tuple[LayerKind, int, int, dict]]
_REGISTRY: dict[type, _Describer] = {}


def register_layer(cls: type) -> Callable[[_Describer], _Describer]:
    """Register a describer ``(name, module) -> (kind, d_in, d_out, conv)`` for a module class."""

    def deco(fn: _Describer) -> _Describer:
        _REGISTRY[cls] = fn
        return fn

    return deco


@register_layer(nn.Linear)
def _describe_linear(name: str, m: nn.Linear) -> tuple[LayerKind, int, int, dict]:
    return LayerKind.LINEAR, m.in_features, m.out_features, {}


def _pair(x) -> list[int]:
    return [int(x), int(x)] if isinstance(x, int) else [int(v) for v in x]


@register_layer(nn.Conv2d)
def _describe_conv2d(name: str, m: nn.Conv2d) -> tuple[LayerKind, int, int, dict]:
    if m.groups != 1:
        raise UnsupportedLayerError(
            f"layer '{name}': Conv2d with groups={m.groups} is not supported (groups must be 1)"
        )
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"layer '{name}': Conv2d with padding_mode='{m.padding_mode}' is not supported "
            "(only 'zeros')"
        )
    kh, kw = _pair(m.kernel_size)
    dilation = _pair(m.dilation)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            padding = [0, 0]
        else:  # 'same' (stride 1): symmetric only
            total = [dilation[0] * (kh - 1), dilation[1] * (kw - 1)]
            if any(t % 2 for t in total):
                raise UnsupportedLayerError(
                    f"layer '{name}': Conv2d padding='same' with an even kernel pads "
                    "asymmetrically, which is not supported; pad explicitly"
                )
            padding = [t // 2 for t in total]
    else:
        padding = _pair(m.padding)
    conv = {
        "kernel_size": [kh, kw],
        "stride": _pair(m.stride),
        "padding": padding,
        "dilation": dilation,
    }
    return LayerKind.CONV2D, m.in_channels * kh * kw, m.out_channels, conv


def supported(module: nn.Module) -> bool:
    """Whether ``module``'s class (exactly, not a subclass) has a registered describer."""
    return type(module) in _REGISTRY


BATCHNORM_CHOICES = ("outside", "fisher")
"""Where BatchNorm's affine parameters go: ``"outside"`` the Fisher (listed, not captured; the
default) or into it as layers of kind ``batchnorm`` (module docstring)."""

_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_batchnorm(batchnorm: object) -> str:
    """``batchnorm`` if it is one of :data:`BATCHNORM_CHOICES`, else a one-line ``ConfigError``."""
    if not isinstance(batchnorm, str) or batchnorm not in BATCHNORM_CHOICES:
        raise ConfigError(f"batchnorm must be one of {', '.join(map(repr, BATCHNORM_CHOICES))}, got {batchnorm!r}")
    return batchnorm


def _describe_batchnorm(name: str, m: nn.Module) -> tuple[LayerKind, int, int, dict]:
    return LayerKind.BATCHNORM, 1, 2 * int(m.num_features), {}


# --------------------------------------------------------------------------------------------
# the layout of a model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=True)
class Layout:
    """The layers of a model that enter the Fisher, with fisherlab and torch offsets.

    Attributes:
        layers: the :class:`LayerSpec` of each layer, in ``named_modules`` order.
        torch_numel: length of ``parameters_to_vector(model.parameters())``.
        excluded: ``"name (Class)"`` of modules with parameters that are not in the Fisher.
    """

    layers: tuple[LayerSpec, ...]
    torch_numel: int
    excluded: tuple[str, ...] = ()

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, *, warn: bool = True, batchnorm: str = "outside") -> "Layout":
        """Describe ``model``; modules with parameters that are not supported are excluded.

        ``batchnorm="fisher"`` makes every affine ``BatchNorm1d/2d/3d`` (exact classes) a layer of
        kind ``batchnorm`` (module docstring); ``"outside"`` (default) lists them as excluded.

        Raises:
            UnsupportedLayerError: a supported class configured in an unsupported way
                (``Conv2d`` with ``groups > 1``, …), a parameter shared between modules, or a
                model without any supported layer.
        """
        torch_pos: dict[int, int] = {}
        pos = 0
        for p in model.parameters():
            torch_pos[id(p)] = pos
            pos += p.numel()
        seen_params: set[int] = set()
        layers: list[LayerSpec] = []
        excluded: list[str] = []
        offset = 0
        bn_in = check_batchnorm(batchnorm) == "fisher"
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False)]
            if not own:
                continue
            is_bn = bn_in and type(m) in _BATCHNORM_TYPES and m.weight is not None and m.bias is not None
            if not supported(m) and not is_bn:
                excluded.append(f"{name} ({type(m).__name__})")
                continue
            kind, d_in, d_out, conv = (_describe_batchnorm if is_bn else _REGISTRY[type(m)])(name, m)
            for p in own:
                if id(p) in seen_params:
                    raise UnsupportedLayerError(f"layer '{name}': parameters shared with another module")
                seen_params.add(id(p))
            has_bias = getattr(m, "bias", None) is not None
            spec = LayerSpec(
                name=name,
                kind=kind,
                d_in=d_in,
                d_out=d_out,
                bias=has_bias and not is_bn,  # BatchNorm: β is a row of W = [γ; β], not a column of ā
                offset=offset,
                torch_weight_offset=torch_pos[id(m.weight)],
                torch_bias_offset=torch_pos[id(m.bias)] if has_bias else -1,
                weight_shape=tuple(m.weight.shape),
                conv=conv,
            )
            layers.append(spec)
            offset += spec.numel
        if not layers:
            raise UnsupportedLayerError(
                f"model {type(model).__name__} has no supported layer (nn.Linear, nn.Conv2d"
                + (", affine BatchNorm" if bn_in else "") + ")"
            )
        if excluded and warn:
            warnings.warn(
                "fisherlab: these modules have parameters but are not part of the Fisher: "
                + ", ".join(excluded),
                UserWarning,
                stacklevel=2,
            )
        return cls(tuple(layers), pos, tuple(excluded))

    # ---- sizes -------------------------------------------------------------------------
    @property
    def p(self) -> int:
        """Number of parameters in the Fisher, ``p = Σ_i p_i``."""
        return self.layers[-1].stop if self.layers else 0

    @property
    def sizes(self) -> list[int]:
        return [s.numel for s in self.layers]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def index(self, layer: int | str) -> int:
        """Position of a layer given by position or by name."""
        if isinstance(layer, str):
            for i, s in enumerate(self.layers):
                if s.name == layer:
                    return i
            raise KeyError(f"no layer named '{layer}' (layers: {', '.join(self.names)})")
        if not -len(self.layers) <= layer < len(self.layers):
            raise IndexError(f"layer index {layer} out of range for {len(self.layers)} layers")
        return layer % len(self.layers)

    # ---- splitting vectors -------------------------------------------------------------
    def split(self, v: Tensor) -> list[Tensor]:
        """``[p, *c] -> [[p_i, *c]]`` (views)."""
        self._check_len(v, self.p, 0)
        return list(torch.split(v, self.sizes, dim=0))

    def cat(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        return torch.cat(list(parts), dim=0)

    def block(self, v: Tensor, layer: int | str) -> Tensor:
        """The rows of layer ``layer`` of ``v [p, *c]``."""
        s = self.layers[self.index(layer)]
        return v[s.offset : s.stop]

    # ---- parameters ------------------------------------------------------------------
    def parameters_vector(self, model: nn.Module) -> Tensor:
        """θ in fisherlab order, read from ``model``."""
        return self.from_torch_order(
            torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        )

    def layer_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[weight | bias]`` as ``[d_out, d_in']`` (a BatchNorm layer's ``[γ; β]`` ``[2C, 1]`` is
        ``torch.cat([γ, β]).reshape(-1, 1)``)."""
        W = weight.reshape(weight.shape[0], -1)
        return W if bias is None else torch.cat([W, bias.reshape(-1, 1)], dim=1)

    # ---- order converters --------------------------------------------------------------
    @cached_property
    def torch_index(self) -> Tensor:
        """``idx [p]`` with ``torch_vector[idx] == fisherlab_vector``."""
        parts = []
        for s in self.layers:
            if s.kind is LayerKind.BATCHNORM:  # W = [γ; β], one column: γ's entries, then β's
                C = s.d_out // 2
                parts.append(torch.cat([s.torch_weight_offset + torch.arange(C), s.torch_bias_offset + torch.arange(C)]))
                continue
            # position in torch order of entry (r, c) of [W | b]; vec stacks columns.
            w = s.torch_weight_offset + torch.arange(s.d_out * s.d_in).reshape(s.d_out, s.d_in)
            if s.bias:
                b = s.torch_bias_offset + torch.arange(s.d_out).reshape(s.d_out, 1)
                w = torch.cat([w, b], dim=1)
            parts.append(vec(w))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def to_torch_order(self, v: Tensor) -> Tensor:
        """fisherlab order ``[p, *c]`` → torch order ``[torch_numel, *c]`` (zeros outside the Fisher)."""
        self._check_len(v, self.p, 0)
        out = v.new_zeros((self.torch_numel, *v.shape[1:]))
        out[self.torch_index.to(v.device)] = v
        return out

    def from_torch_order(self, v: Tensor) -> Tensor:
        """torch order ``[torch_numel, *c]`` → fisherlab order ``[p, *c]``."""
        self._check_len(v, self.torch_numel, 0)
        return v[self.torch_index.to(v.device)]

    @staticmethod
    def _check_len(v: Tensor, n: int, dim: int) -> None:
        if v.dim() == 0 or v.shape[dim] != n:
            raise ValueError(f"expected a vector with {n} rows, got shape {tuple(v.shape)}")

    # ---- serialization -----------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "layers": [s.to_json() for s in self.layers],
            "torch_numel": self.torch_numel,
            "excluded": list(self.excluded),
        }

    @classmethod
    def from_json(cls, d: dict | str) -> "Layout":
        if isinstance(d, str):
            d = json.loads(d)
        return cls(
            tuple(LayerSpec.from_json(s) for s in d["layers"]),
            int(d["torch_numel"]),
            tuple(d.get("excluded", ())),
        )


def layer_modules(model: nn.Module, layout: Layout) -> list[nn.Module]:
    """The modules of ``model`` named by ``layout``, in layout order."""
    named = dict(model.named_modules())
    return [named[s.name] for s in layout.layers]


def iter_layer_params(model: nn.Module, layout: Layout) -> Iterable[tuple[LayerSpec, nn.Module]]:
    yield from zip(layout.layers, layer_modules(model, layout))
