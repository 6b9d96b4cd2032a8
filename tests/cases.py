"""The one registry of tiny test problems: models × losses × Fisher modes (STYLE.md habit 6).

Every model is float64, seeded, small enough for dense p × p references. Tests take cases
through the fixtures of ``conftest.py``; no test loops over cases itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LOSSES = ["cross_entropy", "mse", "bce_logits"]
MODES = ["mc", "exact", "empirical"]
D_Y = 4  # outputs of every tiny model


@dataclass(frozen=True)
class ModelCase:
    """A tiny network and the shape of one input example."""

    id: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    conv: bool


def _mlp(bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias), nn.Sigmoid(), nn.Linear(3, D_Y))


def _cnn(bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias),  # 6×6 -> 3×3
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=bias),  # 3×3 -> 2×2, no padding
        nn.Flatten(),
        nn.Linear(8, D_Y),
    )


MODELS = {
    "mlp": ModelCase("mlp", _mlp, (5,), False),
    "mlp-nobias": ModelCase("mlp-nobias", lambda: _mlp(False), (5,), False),
    "cnn": ModelCase("cnn", _cnn, (2, 6, 6), True),
    "cnn-nobias": ModelCase("cnn-nobias", lambda: _cnn(False), (2, 6, 6), True),
}


def build_model(case: ModelCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build().double()


def make_batch(case: ModelCase, loss: str, B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[B, *input_shape]`` and targets for ``loss`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, *case.input_shape), generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, D_Y, (B,), generator=g)
    elif loss == "bce_logits":
        y = torch.rand((B, D_Y), generator=g, dtype=torch.float64)
    else:
        y = torch.randn((B, D_Y), generator=g, dtype=torch.float64)
    return x, y


def make_capture(case: ModelCase, loss: str, mode: str, B: int = 3, n_samples: int = 2, seed: int = 0, **kw):
    """A float64 capture of a tiny problem, plus the model and batch it came from."""
    import fisherlab

    model = build_model(case, seed)
    x, y = make_batch(case, loss, B, seed + 1)
    cap = fisherlab.capture(
        model, x, y, loss=loss, fisher=mode, n_samples=n_samples,
        generator=torch.Generator().manual_seed(seed + 2), device="cpu", dtype=torch.float64, **kw,
    )
    return cap, model, x, y


# Further layer configurations for the capture tests only (not expanded by the ``model_case``
# fixture, so other test files do not pay for them): dilation, rectangular kernel and stride,
# a Linear layer applied at several positions ([B, T, d] inputs).
def _cnn_dilated() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 1), dilation=2),  # 7×6 -> 4×6
        nn.Sigmoid(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),  # 4×6 -> 2×3
        nn.Flatten(),
        nn.Linear(12, D_Y),
    )


def _positions_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, D_Y))  # input [3, 5]


EXTRA_MODELS = {
    "cnn-dilated": ModelCase("cnn-dilated", _cnn_dilated, (2, 7, 6), True),
    "linear-positions": ModelCase("linear-positions", _positions_mlp, (3, 5), False),
}
