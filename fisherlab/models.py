"""The paper's networks by name, described by small JSON-able dicts and rebuilt from them.

A *description* is a complete, JSON-able dict ``{"name": ..., "width": ..., <options>, <derived>}``
that the store records with every capture; :func:`build` rebuilds the same network from it
(with the same ``seed``, bit-identical weights). Derived entries (``input_shape``,
``n_outputs``, ``loss``, ``n_params``) are informative and ignored by :func:`build`.

| name            | architecture (width 1)                                                 | loss          |
|-----------------|------------------------------------------------------------------------|---------------|
| ``curves-ae``   | 784-400-200-100-50-25-6, mirrored decoder back to 784                   | ``bce_logits``|
| ``mnist-ae``    | 784-1000-500-250-30, mirrored                                          | ``bce_logits``|
| ``faces-ae``    | 625-2000-1000-500-30, mirrored                                         | ``bce_logits``|
| ``cuda-convnet``| 3 conv (32, 32, 64 channels) + 1 linear on 3×32×32, BatchNorm           | cross_entropy |
| ``resnet18``    | CIFAR-style ResNet, BasicBlock [2, 2, 2, 2], base 64 channels, BN       | cross_entropy |
| ``resnet34``    | CIFAR-style ResNet, BasicBlock [3, 4, 6, 3], base 64 channels, BN       | cross_entropy |
| ``deep-linear-64`` | 64 Linear layers of width 10, BatchNorm after all but the last       | cross_entropy (input 784) / mse (input 10) |
| ``deep-linear-14`` | 784-1000-900-…-50-20-10, BatchNorm after all but the last            | cross_entropy |
| ``tiny-gpt``    | character transformer: embeddings, 2 pre-norm blocks (attention + MLP), d = 48, context 32 | cross_entropy per position |

Choices (documented, following the authors' public code, ``Abdoulaye-Koroko/natural-gradients``,
``apps/mlp_cnn/models.py``, unless stated):

* **Autoencoders**: ReLU hidden units (the authors' code; ``activation="sigmoid"`` gives Hinton &
  Salakhutdinov's / Martens' logistic units, ``"tanh"`` is also offered). The code layer is
  *linear* (as in Hinton & Salakhutdinov 2006 and Martens 2010) rather than ReLU as in the
  authors' code, because a 6-unit ReLU code easily dies. The output is logits (no final sigmoid):
  use ``bce_logits`` against inputs in [0, 1]. Torch's default initialization (not Martens'
  sparse init).
* **cuda-convnet**: Conv(3→32, k3)-ReLU-MaxPool(3)-BN-Conv(32→32, k3)-ReLU-MaxPool(3)-BN-
  Conv(32→64, k2)-ReLU-Flatten-Linear(64→10), exactly the authors' layer sequence
  (``batchnorm=False`` drops the BN layers).
* **ResNets**: the usual CIFAR variant (3×3 stem, no max-pool, bias-free convs, 1×1 conv + BN
  shortcuts, global average pool, linear head); ``n_classes`` is 10 by default (the paper used
  CIFAR-100 for resnet18 and SVHN for resnet34).
* **Deep linear networks**: no activation at all, bias on every Linear, BatchNorm1d after every
  Linear but the last, as in the authors' code and Tselepidis et al.
* BatchNorm parameters are not part of the Fisher by default: :meth:`fisherlab.Layout.from_model`
  lists them in a warning, which is expected for the ResNets, cuda-convnet and the deep linear
  networks; ``capture(..., batchnorm="fisher")`` makes them layers of the Fisher (docs/MATH.md §1).
* **tiny-gpt** (a test bed for layers shared over positions, not a usable language model): token
  and position embeddings (``nn.Embedding``), ``n_blocks`` pre-norm blocks
  ``x + attn(LN(x))``, ``x + mlp(LN(x))`` — causal multi-head self-attention with ``nn.Linear``
  projections ``q``, ``k``, ``v``, ``out`` and an MLP ``fc1``-GELU-``fc2`` (4·d), every one applied
  over the sequence axis (T positions per example) — a final LayerNorm and a ``nn.Linear`` head to
  the vocabulary; inputs int64 tokens ``[B, T]``, outputs logits ``[B, T, V]``, trained with
  ``cross_entropy`` on next-token targets ``[B, T]`` (summed over positions,
  :mod:`fisherlab.capturing.losses`). The embeddings and the LayerNorms are **outside the Fisher**
  (listed in ``Layout.excluded``); the Fisher is that of the 6·n_blocks + 1 Linear layers. Its
  description records its data set under ``"dataset"`` (``tiny-text``) and V under ``"vocab_size"``
  (its 68 characters);
  ``width`` scales d = 48 (kept a multiple of ``n_heads``).
* Every activation is out of place (in-place ones after a captured layer are handled too).

**Your own models.** :func:`register` adds a factory under a name (``available()`` lists it);
any callable returning an ``nn.Module`` can also be named by import path, without registering:
``"mymodels:factory"``, ``"mymodels.SmallCNN"`` or ``"path/to/mymodels.py:Factory"``
(:func:`resolve`). Its keyword options (defaults from its signature, values JSON-able) become
the description's options, and the description records how to rebuild it:
``"factory": {"module": "mymodels", "attr": "factory"}`` or ``{"file": "/abs/path/mymodels.py",
"attr": "Factory"}`` (an import path, never a pickle). For such a model ``input_shape``,
``n_outputs`` and ``loss`` are ``None`` unless :func:`register` was told them (pass the loss
and the data to the CLI).

``width`` multiplies every hidden width (``max(1, round(h·width))``); input and output sizes
are fixed. :func:`describe` lists the parameter count, useful to choose a CPU-sized width.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validate import bounded, parse_enum, positive_int
from .errors import ConfigError

__all__ = [
    "available",
    "register",
    "resolve",
    "unregister",
    "build",
    "default_data",
    "default_loss",
    "describe",
    "input_shape",
    "n_params",
]

# description keys computed by describe(); build() ignores them
_DERIVED = ("input_shape", "n_outputs", "loss", "n_params", "factory")


def _scale(h: int, width: float) -> int:
    """Hidden width ``h`` scaled by ``width``: ``max(1, round(h·width))``."""
    return max(1, int(round(h * width)))


# --------------------------------------------------------------------------------------------
# autoencoders
# --------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,  # inplace=False by default
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation '{name}' (choose one of {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]()


class Autoencoder(nn.Module):
    """Deep autoencoder ``d-h_1-…-h_k-code-h_k-…-h_1-d`` with a linear code layer and logit outputs.

    Args:
        sizes: ``[d, h_1, …, h_k, code]`` (encoder sizes); the decoder mirrors them.
        activation: hidden activation (``relu``, ``sigmoid`` or ``tanh``).
    """

    def __init__(self, sizes: list[int], activation: str = "relu") -> None:
        super().__init__()
        enc: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            enc.append(nn.Linear(a, b))
            if i < len(sizes) - 2:  # the code layer is linear
                enc.append(_activation(activation))
        rev = sizes[::-1]
        dec: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(rev) - 2:  # the output is logits
                dec.append(_activation(activation))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, d]`` (or ``[B, 1, H, W]``, flattened) → logits ``[B, d]``."""
        return self.decoder(self.encoder(x.flatten(1)))


def _autoencoder(dims: list[int]) -> Callable[..., nn.Module]:
    def make(width: float = 1.0, activation: str = "relu") -> nn.Module:
        sizes = [dims[0]] + [_scale(h, width) for h in dims[1:]]
        return Autoencoder(sizes, activation)

    return make


# --------------------------------------------------------------------------------------------
# cuda-convnet
# --------------------------------------------------------------------------------------------


def _cuda_convnet(width: float = 1.0, n_classes: int = 10, batchnorm: bool = True) -> nn.Module:
    """Three convolutions and one linear layer on ``[B, 3, 32, 32]`` (the authors' sequence).

    Spatial sizes: 32 →conv3→ 30 →pool3→ 10 →conv3→ 8 →pool3→ 2 →conv2→ 1.
    """
    c1, c2, c3 = _scale(32, width), _scale(32, width), _scale(64, width)
    bn = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3),
        bn(c1),
        nn.Conv2d(c1, c2, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3),
        bn(c2),
        nn.Conv2d(c2, c3, kernel_size=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3, n_classes),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-style ResNets
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, 3×3 convolutions, all out of place."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): 3×3 stem, four stages of :class:`BasicBlock`, avg-pool, linear.

    Args:
        blocks: blocks per stage (``[2, 2, 2, 2]`` for ResNet-18, ``[3, 4, 6, 3]`` for ResNet-34).
        base: channels of the first stage (64 at width 1); stages have base·(1, 2, 4, 8).
        n_classes: outputs of the linear head.
    """

    def __init__(self, blocks: list[int], base: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        stages = []
        c_in = base
        for i, n in enumerate(blocks):
            c_out = base * 2**i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(c_in, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → logits ``[B, n_classes]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _resnet(blocks: list[int]) -> Callable[..., nn.Module]:
    def make(width: float = 1.0, n_classes: int = 10) -> nn.Module:
        return ResNet(blocks, base=_scale(64, width), n_classes=n_classes)

    return make


# --------------------------------------------------------------------------------------------
# deep linear networks
# --------------------------------------------------------------------------------------------


def _deep_linear(sizes: list[int]) -> nn.Module:
    """``Linear`` layers ``sizes[0]→…→sizes[-1]`` with ``BatchNorm1d`` after all but the last."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.BatchNorm1d(b))
    return nn.Sequential(nn.Flatten(), *mods)


def _deep_linear_64(width: float = 1.0, input_dim: int = 784, n_outputs: int = 10) -> nn.Module:
    """64 Linear layers of width 10 (Tselepidis et al.; the paper's Fig. 4(a))."""
    h = _scale(10, width)
    return _deep_linear([input_dim] + [h] * 63 + [n_outputs])


_DL14 = [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20]


def _deep_linear_14(width: float = 1.0, input_dim: int = 784, n_outputs: int = 10) -> nn.Module:
    """784-1000-900-800-700-600-500-400-300-200-100-50-20-10 (the paper's Fig. 4(b))."""
    return _deep_linear([input_dim] + [_scale(h, width) for h in _DL14] + [n_outputs])


# --------------------------------------------------------------------------------------------
# tiny-gpt
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.Linear`` projections ``q``, ``k``, ``v``, ``out``
    applied over the positions: ``[B, T, d] -> [B, T, d]``."""

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        h = self.n_heads
        q, k, v = (m(x).reshape(B, T, h, d // h).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, h, T, d/h]
        att = (q @ k.transpose(-2, -1)) / float(d // h) ** 0.5
        att = torch.softmax(att.masked_fill(~self.mask[:T, :T], float("-inf")), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, T, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A character-level transformer (see the module docstring): tokens ``[B, T]`` (int64, T ≤
    ``context``) → logits ``[B, T, vocab]``.

    Args:
        vocab: vocabulary size V; context: the longest sequence (position embeddings);
        d_model: width d (a multiple of ``n_heads``); n_heads; n_blocks.
    """

    def __init__(self, vocab: int, context: int = 32, d_model: int = 48, n_heads: int = 4, n_blocks: int = 2) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"tiny-gpt: d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[TransformerBlock(d_model, n_heads, context) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"tiny-gpt: sequences of {T} tokens exceed the context of {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))


TINY_TEXT_VOCAB = 68
"""V of ``tiny-gpt``: the characters of its data set ``tiny-text`` (``len(fisherlab.datasets.vocabulary("tiny-text"))``,
checked by the tests; models does not import datasets, which imports models)."""


def _tiny_gpt(width: float = 1.0, context: int = 32, n_heads: int = 4, n_blocks: int = 2,
              vocab_size: int = TINY_TEXT_VOCAB, dataset: str = "tiny-text") -> nn.Module:
    """:class:`TinyGPT` with V = ``vocab_size`` (the characters of ``dataset``), d = 48·width."""
    d_model = n_heads * max(1, int(round(48 * width / n_heads)))
    return TinyGPT(vocab_size, context, d_model, n_heads, n_blocks)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    make: Callable[..., nn.Module]
    input_shape: Callable[[dict], tuple[int, ...]]
    n_outputs: Callable[[dict], int]
    loss: Callable[[dict], str]
    data: str | None
    """The default data set (:mod:`fisherlab.datasets` name), ``None`` when none is embedded."""


def _const(v: Any) -> Callable[[dict], Any]:
    return lambda d: v


_MODELS: dict[str, _Entry] = {
    "curves-ae": _Entry(
        _autoencoder([784, 400, 200, 100, 50, 25, 6]), _const((784,)), _const(784), _const("bce_logits"), "curves"
    ),
    "mnist-ae": _Entry(
        _autoencoder([784, 1000, 500, 250, 30]), _const((784,)), _const(784), _const("bce_logits"), "mnist"
    ),
    "faces-ae": _Entry(
        _autoencoder([625, 2000, 1000, 500, 30]), _const((625,)), _const(625), _const("bce_logits"), None
    ),
    "cuda-convnet": _Entry(
        _cuda_convnet, _const((3, 32, 32)), lambda d: d["n_classes"], _const("cross_entropy"), "cifar-standin"
    ),
    "resnet18": _Entry(
        _resnet([2, 2, 2, 2]), _const((3, 32, 32)), lambda d: d["n_classes"], _const("cross_entropy"), "cifar-standin"
    ),
    "resnet34": _Entry(
        _resnet([3, 4, 6, 3]), _const((3, 32, 32)), lambda d: d["n_classes"], _const("cross_entropy"), "cifar-standin"
    ),
    "deep-linear-64": _Entry(
        _deep_linear_64,
        lambda d: (d["input_dim"],),
        lambda d: d["n_outputs"],
        lambda d: "cross_entropy" if d["input_dim"] != 10 else "mse",
        "fashion-mnist",
    ),
    "deep-linear-14": _Entry(
        _deep_linear_14, lambda d: (d["input_dim"],), lambda d: d["n_outputs"], _const("cross_entropy"), "mnist"
    ),
    "tiny-gpt": _Entry(  # n_outputs: T·V logits per example (cross_entropy per position)
        _tiny_gpt, lambda d: (d["context"],), lambda d: d["context"] * d["vocab_size"],
        _const("cross_entropy"), "tiny-text",
    ),
}


_BUILTIN = frozenset(_MODELS)


def available() -> list[str]:
    """The model names: the table above, then every one added by :func:`register`."""
    return list(_MODELS)


def _fixed(v: Any) -> Callable[[dict], Any]:
    return v if callable(v) and not isinstance(v, (tuple, list)) else _const(None if v is None else (tuple(v) if isinstance(v, (tuple, list)) else v))


def register(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    input_shape: Sequence[int] | Callable[[dict], tuple[int, ...]] | None = None,
    n_outputs: int | Callable[[dict], int] | None = None,
    loss: str | Callable[[dict], str] | None = None,
    data: str | None = None,
    overwrite: bool = False,
) -> None:
    """Make ``factory`` available by ``name`` to :func:`describe`, :func:`build`, training and the CLI.

    Args:
        name: the model's name (must not contain ``:``; a built-in name cannot be replaced).
        factory: a callable (function or ``nn.Module`` class) returning the model; its keyword
            parameters with defaults are the model's options.
        input_shape: shape of one input example, e.g. ``(3, 32, 32)`` (or a function of the
            description); ``None``: unknown.
        n_outputs: outputs per example (or a function of the description).
        loss: ``cross_entropy``, ``mse`` or ``bce_logits`` (or a function of the description).
        data: the :mod:`fisherlab.datasets` name it trains on by default.
        overwrite: replace an earlier registration of ``name``.

    Raises:
        ConfigError: a bad name, a built-in or already registered name, a factory that is not callable.

    When ``factory`` is importable (a module-level function or class) the description records
    ``"factory": {"module", "attr"}``, so a later process can rebuild the model without
    registering it again.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(f"models.register: a model name is a non-empty string without ':', got {name!r}")
    if not callable(factory):
        raise ConfigError(f"models.register('{name}'): the factory must be callable, got {type(factory).__name__}")
    if name in _BUILTIN:
        raise ConfigError(f"models.register: '{name}' is a built-in model and cannot be replaced")
    if name in _MODELS and not overwrite:
        raise ConfigError(f"models.register: '{name}' is registered already (pass overwrite=True to replace it)")
    _MODELS[name] = _Entry(factory, _fixed(input_shape), _fixed(n_outputs), _fixed(loss), data)


def unregister(name: str) -> None:
    """Remove a model added by :func:`register` (built-in models stay)."""
    if name in _BUILTIN:
        raise ConfigError(f"models.unregister: '{name}' is a built-in model")
    _MODELS.pop(name, None)


# ---- models named by import path ----------------------------------------------------------------


def _is_path_spec(name: str) -> bool:
    return isinstance(name, str) and name not in _MODELS and (":" in name or "." in name)


def _source_of(spec: str) -> dict:
    """``"pkg.mod:attr"`` / ``"pkg.mod.Attr"`` / ``"dir/file.py:attr"`` → ``{"module"|"file", "attr"}``."""
    if ":" in spec:
        where, attr = spec.rsplit(":", 1)
    elif spec.endswith(".py"):
        raise ConfigError(f"model {spec!r}: name the factory inside the file, e.g. {spec}:MyNet")
    else:
        where, _, attr = spec.rpartition(".")
    if not where or not attr or not attr.replace(".", "_").isidentifier():
        raise ConfigError(f"model {spec!r}: expected 'module:factory', 'module.Factory' or 'path/to/file.py:factory'")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"model {spec!r}: no such file {where}")
        return {"file": str(path.resolve()), "attr": attr}
    return {"module": where, "attr": attr}


def _import_source(source: dict, spec: str) -> Callable[..., nn.Module]:
    try:
        if "file" in source:
            path = Path(source["file"])
            if not path.is_file():
                raise ConfigError(f"model {spec!r}: its file {path} does not exist (the description records it)")
            key = "fisherlab_user_" + path.stem + "_" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
            module = sys.modules.get(key)
            if module is None:
                spec_ = importlib.util.spec_from_file_location(key, path)
                if spec_ is None or spec_.loader is None:
                    raise ConfigError(f"model {spec!r}: cannot import {path}")
                module = importlib.util.module_from_spec(spec_)
                sys.modules[key] = module
                try:
                    spec_.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path and "" not in sys.path
            if added:  # `fisherlab --model mymodels:f` finds mymodels.py in the current folder, like python -m
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(source["module"])
            finally:
                if added:
                    sys.path.remove(cwd)
    except ModuleNotFoundError as err:
        raise ConfigError(f"model {spec!r}: cannot import {source.get('module', source.get('file'))!r} ({err})") from None
    obj: Any = module
    for part in str(source["attr"]).split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {spec!r}: {source.get('module', source.get('file'))} has no attribute {source['attr']!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {spec!r}: {source['attr']} is not callable")
    return obj


def resolve(spec: str, source: dict | None = None) -> Callable[..., nn.Module]:
    """The factory named by an import path (``"mymodels:factory"``, ``"mymodels.SmallCNN"``,
    ``"path/to/file.py:Factory"``), or by a recorded ``source`` (a description's ``"factory"``).

    Raises:
        ConfigError: the module or file cannot be imported, or has no such callable (one line).
    """
    return _import_source(source or _source_of(spec), spec)


def _importable(factory: Any) -> dict | None:
    mod, qual = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual or mod.startswith("fisherlab_user_"):
        return None
    return {"module": mod, "attr": qual}


def _entry(name: Any, source: dict | None = None) -> _Entry:
    if isinstance(name, str) and name in _MODELS:
        return _MODELS[name]
    if isinstance(name, str) and (source is not None or _is_path_spec(name)):
        return _Entry(resolve(name, source), _const(None), _const(None), _const(None), None)
    raise ConfigError(
        f"unknown model {name!r} (valid names: {', '.join(_MODELS)}; or your own as 'module:factory', "
        "'module.Class' or 'path/to/file.py:factory', or models.register(name, factory))"
    )


def _options(name: str, source: dict | None = None) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults (``width`` included for built-ins)."""
    try:
        sig = inspect.signature(_entry(name, source).make)
    except (TypeError, ValueError):
        return {}
    return {
        k: (None if p.default is inspect.Parameter.empty else p.default)
        for k, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _takes_kwargs(name: str, source: dict | None) -> bool:
    try:
        sig = inspect.signature(_entry(name, source).make)
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _check_option(name: str, key: str, value: Any, default: Any) -> Any:
    where = f"model '{name}' option '{key}'"
    if key == "width":
        return bounded(value, where, 0.0, lo_open=True)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        return positive_int(value, where)
    if key == "activation":
        return parse_enum(value, _ACTIVATIONS, where)
    return value


def describe(name: str, **kwargs: Any) -> dict:
    """The complete JSON-able description of model ``name`` with options ``kwargs``.

    Args:
        name: one of :func:`available`, or an import path of your own factory
            (``"mymodels:factory"``, ``"mymodels.SmallCNN"``, ``"path/to/file.py:Factory"``).
        **kwargs: ``width`` (hidden-width multiplier, default 1) and the model's options:
            autoencoders ``activation`` (``relu``/``sigmoid``/``tanh``); ``cuda-convnet``
            ``n_classes``, ``batchnorm``; ResNets ``n_classes``; deep linear networks
            ``input_dim``, ``n_outputs``; your own factory: its keyword parameters (JSON-able
            values). ``factory={"module"|"file": …, "attr": …}`` (as recorded) imports from there.

    Returns:
        ``{"name", "width", <every option with its value>, "input_shape", "n_outputs", "loss",
        "n_params"}``; the last four are derived (informative, ignored by :func:`build`). Your
        own models add ``"factory"``, how to import them again; their options are those given
        and the JSON-able defaults, and ``input_shape``, ``n_outputs``, ``loss`` may be ``None``.

    Raises:
        ConfigError: unknown name or option, or a bad option value (one line; a ValueError).
    """
    source = kwargs.get("factory") if isinstance(kwargs.get("factory"), dict) else None
    if source is None and isinstance(name, str) and name not in _MODELS and _is_path_spec(name):
        source = _source_of(name)
    if source is None and isinstance(name, str) and name in _MODELS and name not in _BUILTIN:
        source = _importable(_MODELS[name].make)
        user = True
    else:
        user = source is not None
    entry = _entry(name, source if name not in _MODELS else None)
    opts = _options(name, source if name not in _MODELS else None)
    given = {k: v for k, v in kwargs.items() if k not in _DERIVED and k != "name"}
    unknown = sorted(set(given) - set(opts))
    if unknown and not (user and _takes_kwargs(name, source if name not in _MODELS else None)):
        raise ConfigError(
            f"model '{name}' has no option {', '.join(map(repr, unknown))} "
            f"(valid options: {', '.join(opts) or 'none'})"
        )
    d: dict[str, Any] = {"name": name}
    if user:
        for key, value in {**opts, **given}.items():
            if key in given:
                if not _jsonable(value):
                    raise ConfigError(f"model '{name}' option '{key}': the value must be JSON-able, got {type(value).__name__}")
                d[key] = value
            elif value is not None and _jsonable(value):
                d[key] = value  # a default, recorded; non-JSON-able defaults stay the factory's
    else:
        for key, default in opts.items():
            d[key] = _check_option(name, key, kwargs.get(key, default), default)
    shape = entry.input_shape(d)
    d["input_shape"] = None if shape is None else list(shape)
    outputs = entry.n_outputs(d)
    d["n_outputs"] = None if outputs is None else int(outputs)
    d["loss"] = entry.loss(d)
    if user:
        d["factory"] = source
    d["n_params"] = n_params(d)
    return d


def _normalise(description: dict | str) -> dict:
    if isinstance(description, str):
        return describe(description)
    if not isinstance(description, dict) or "name" not in description:
        raise ConfigError(f"a model description must be a name or a dict with a 'name', got {description!r}")
    name = description["name"]
    kwargs = {k: v for k, v in description.items() if k != "name" and (k not in _DERIVED or k == "factory")}
    return describe(name, **kwargs)


def _make(d: dict) -> nn.Module:
    source = d.get("factory") if d["name"] not in _MODELS else None
    names = _options(d["name"], source)
    if source is None and d["name"] in _BUILTIN:
        opts = {k: d[k] for k in names}
    else:  # your own factory: the recorded options (the others keep the factory's defaults)
        opts = {k: v for k, v in d.items() if k != "name" and k not in _DERIVED}
    model = _entry(d["name"], source).make(**opts)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{d['name']}': the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def build(description: dict | str, *, seed: int | None = None) -> nn.Module:
    """Build the model of ``description`` (a dict from :func:`describe`, or a bare name).

    Args:
        description: the description (or a name / import path); derived keys are ignored.
        seed: seeds torch's default initialization; the global RNG state is left untouched.
            ``None`` draws from the global RNG.

    Returns:
        A float32 ``nn.Module`` on the CPU, in training mode.

    Raises:
        ConfigError: unknown name or option (one line listing the valid ones; a ValueError).
    """
    d = _normalise(description)
    _check_size(d)
    if seed is None:
        return _make(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _make(d)


def _check_size(d: dict) -> None:
    """Refuse, before allocating, a model whose float32 parameters exceed the memory available
    (a ``width`` of 300 asked for 180 GB): one line naming the size and the option to change."""
    from ._system import available_memory
    from .errors import MemoryBudgetError

    n = d.get("n_params")
    free = available_memory()
    if n is None or free is None or 4 * n <= free:
        return
    opts = ", ".join(f"{k}={d[k]}" for k in ("width",) if k in d)
    raise MemoryBudgetError(
        f"model '{d['name']}'{' (' + opts + ')' if opts else ''} has {n:,} parameters, about "
        f"{4 * n / 2**30:.3g} GiB in float32, more than the {free / 2**30:.3g} GiB available; "
        f"choose a smaller {'width (--width)' if 'width' in d else 'model'}"
    )


def n_params(description: dict | str) -> int | None:
    """Number of parameters of the model (all of them, BatchNorm included), counted on the meta
    device; ``None`` for a model of your own that cannot be built there."""
    d = description if isinstance(description, dict) and "input_shape" in description else _normalise(description)
    try:
        with torch.device("meta"):
            model = _make(d)
    except ConfigError:
        raise
    except Exception:  # a user factory that does real tensor work while building
        if d["name"] in _BUILTIN:
            raise
        return None
    return sum(p.numel() for p in model.parameters())


def input_shape(description: dict | str) -> tuple[int, ...]:
    """Shape of one input example (without the batch dimension), e.g. ``(784,)`` or ``(3, 32, 32)``."""
    d = _normalise(description)
    if d["input_shape"] is None:
        raise ConfigError(f"model '{d['name']}' does not say its input shape (models.register(..., input_shape=...))")
    return tuple(d["input_shape"])


def default_loss(name: str | dict) -> str:
    """The loss the model is trained with: ``bce_logits`` (autoencoders), ``cross_entropy``
    (classifiers), ``mse`` (``deep-linear-64`` on 10-dim random vectors, given a description)."""
    d = _normalise(name)
    return d["loss"]


def default_data(name: str | dict) -> str | None:
    """The :mod:`fisherlab.datasets` name the model is trained on by default.

    ``None`` for ``faces-ae`` (the FACES data are not embedded). ``deep-linear-64`` with
    ``input_dim=10`` gives ``random-vectors``.
    """
    d = _normalise(name)
    if d["name"] == "deep-linear-64" and d["input_dim"] == 10:
        return "random-vectors"
    if d["name"] == "tiny-gpt":
        return d["dataset"]
    return _MODELS[d["name"]].data if d["name"] in _MODELS else None


def to_json(description: dict) -> str:
    """The description as a compact JSON string (sorted keys)."""
    return json.dumps(description, sort_keys=True)
