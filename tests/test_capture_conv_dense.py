"""A Conv2d layer stored dense is captured without its unfolded ā (``fisherlab.capturing.layers``):
its rows by per-example weight backwards, its KFAC factor A by shifted products of the input, its
∇h block by one weight backward. Each piece against the unfolded float64 reference, over kernel
shapes, paddings, dilations, strides and bias; and the probe forward skipped only for models that
are per-example by construction.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fisherlab
from fisherlab.capturing import run as capture_run
from fisherlab.capturing.layers import (
    conv_gradient_block,
    conv_input_moment,
    conv_rows,
    layer_inputs,
    layer_output_grads,
)
from fisherlab.kernels import dense_from_factors
from fisherlab.layout import Layout

RTOL = 1e-12
"""float64: the same sums in another order (observed ≤ 1e-15)."""
FLOAT32_RTOL = 1e-5
"""float32 against the float64 reference, relative to the largest entry (observed ≈ 2e-7)."""

GEOMETRIES = [  # kernel, padding, dilation, stride, bias
    ((3, 3), 1, 1, 1, True),
    ((5, 5), 2, 1, 1, True),
    ((3, 2), (0, 1), (2, 1), 1, False),
    ((1, 1), 0, 1, 1, True),
    ((2, 3), (1, 0), (1, 2), 1, True),
    ((3, 3), 1, 1, 2, True),  # stride 2: A by the unfolded product
    ((2, 3), (1, 0), (1, 2), (2, 1), False),
]
"""The last two: A by the unfolded product (stride ≠ 1), as for a single input channel (c_in = 1 below)."""


def _layer(kernel, padding, dilation, stride, bias, c_in=3, c_out=4):
    conv = nn.Conv2d(c_in, c_out, kernel, padding=padding, dilation=dilation, stride=stride, bias=bias).double()
    return conv, Layout.from_model(nn.Sequential(conv)).layers[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("c_in", [1, 3])
def test_dense_conv_pieces_equal_the_unfolded_reference(geometry, K, c_in):
    torch.manual_seed(0)
    conv, spec = _layer(*geometry, c_in=c_in)
    x = torch.randn(5, c_in, 9, 8, dtype=torch.float64)
    go = torch.randn(5, K, *conv(x).shape[1:], dtype=torch.float64)
    a = layer_inputs(spec, x).flatten(0, 1)  # [B·T, d_in']
    g = layer_output_grads(spec, go, lead=2)  # [B, K, T, d_out]
    assert _rel(conv_input_moment(spec, x), a.T @ a) <= RTOL
    assert _rel(conv_rows(spec, x, go), dense_from_factors(layer_inputs(spec, x), g)) <= RTOL
    assert _rel(conv_gradient_block(spec, x, go[:, 0]), a.T @ g[:, 0].flatten(0, 1)) <= RTOL


@settings(max_examples=20)
@given(
    kh=st.integers(1, 4), kw=st.integers(1, 4), ph=st.integers(0, 2), pw=st.integers(0, 2),
    dh=st.integers(1, 2), dw=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_input_moment_is_the_gram_of_the_unfolded_input(kh, kw, ph, pw, dh, dw, bias, seed):
    """Any stride-1 geometry whose output is not empty: Σ ā āᵀ, symmetric, by shifted products."""
    H, W = 7, 6
    if H + 2 * ph - dh * (kh - 1) < 1 or W + 2 * pw - dw * (kw - 1) < 1:
        return
    _, spec = _layer((kh, kw), (ph, pw), (dh, dw), 1, bias, c_in=2)
    x = torch.randn(3, 2, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    a = layer_inputs(spec, x).flatten(0, 1)
    M = conv_input_moment(spec, x)
    assert _rel(M, a.T @ a) <= RTOL
    assert torch.equal(M, M.T)


def test_input_moment_in_float32_is_as_accurate_as_the_gemm():
    torch.manual_seed(1)
    _, spec = _layer((5, 5), 2, 1, 1, True, c_in=8, c_out=4)
    x = torch.randn(16, 8, 12, 12, dtype=torch.float64)
    a = layer_inputs(spec, x).flatten(0, 1)
    assert _rel(conv_input_moment(spec, x.float()).double(), a.T @ a) <= FLOAT32_RTOL


@pytest.mark.parametrize("transpose", ["gather", "two-step"])
@pytest.mark.parametrize("chunk", [1, 3 * 9 * 4 * 5 * 4, 10**9], ids=["row-by-row", "bands", "whole"])
def test_input_moment_in_bands_of_rows_is_the_same(chunk, transpose, monkeypatch):
    """Large images go through in bands of rows (``_CHUNK_NUMBERS`` numbers of pixel products at
    most, the last band shorter; the products share one buffer), and large inputs move their batch
    axis last in two steps (``_TWO_STEP_TRANSPOSE``): the same A."""
    from fisherlab.capturing import layers

    _, spec = _layer((3, 4), (1, 2), 1, 1, True, c_in=4)
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = layer_inputs(spec, x).flatten(0, 1)
    monkeypatch.setattr(layers, "_CHUNK_NUMBERS", chunk)
    monkeypatch.setattr(layers, "_TWO_STEP_TRANSPOSE", 0 if transpose == "two-step" else 10**12)
    assert _rel(conv_input_moment(spec, x), a.T @ a) <= RTOL


@pytest.fixture(params=["weight-backwards", "unfolded"])
def dense_conv_path(request, monkeypatch):
    """Both ways a dense conv layer is captured: without ā (weight backwards and shifted products)
    and, for narrow patches (:data:`fisherlab.capturing.run.NARROW_PATCHES`), from the unfolded ā;
    the tiny layers here are narrow, so the threshold is moved to take each path."""
    monkeypatch.setattr(capture_run, "NARROW_PATCHES", 0 if request.param == "weight-backwards" else 10**9)
    return request.param


@pytest.mark.parametrize("fisher", ["mc", "exact", "empirical"])
def test_dense_conv_capture_equals_the_factored_one(fisher, dense_conv_path):
    """Through fisherlab.capture: a dense conv layer's rows, A, G and ∇h block equal those the
    factored capture of the same batch gives, by either path."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, (3, 2), dilation=(1, 2)), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 6 * 5, 3),
    ).double()
    x, y = torch.randn(4, 2, 8, 7, dtype=torch.float64), torch.tensor([0, 2, 1, 1])

    def cap(storage):
        return fisherlab.capture(model, x, y, loss="cross_entropy", fisher=fisher, n_samples=2, device="cpu",
                                 dtype=torch.float64, storage=storage, generator=torch.Generator().manual_seed(3))

    dense, fact = cap("dense"), cap("factored")
    assert _rel(dense.grad, fact.grad) <= RTOL
    for d, f in zip(dense.layers[:2], fact.layers[:2]):
        a, g = f.a, f.g
        assert _rel(d.dense, dense_from_factors(a, g)) <= RTOL
        af = a.flatten(0, 1)
        assert _rel(d.A, af.T @ af / dense.B) <= RTOL
        gf = g.reshape(-1, g.shape[-1])
        assert _rel(d.G, gf.T @ gf / (dense.B * f.positions)) <= RTOL


# ---- the probe forward ----------------------------------------------------------------------------


class _Custom(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


@pytest.mark.parametrize(
    "build,probed",
    [
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2)), False),
        (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2)), False),
        (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.GELU()), nn.Linear(4, 2)), False),
        (lambda: nn.Sequential(nn.Linear(3, 4), _Custom(), nn.Linear(4, 2)), True),  # unknown forward
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Flatten(0), nn.Linear(4, 2)), True),  # flattens the batch
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softmax(0), nn.Linear(4, 2)), True),  # couples: not listed
    ],
    ids=["mlp-dropout", "cnn-batchnorm", "nested", "custom-module", "flatten-batch", "softmax"],
)
def test_the_probe_runs_unless_the_model_is_per_example_by_construction(build, probed):
    model = build()
    assert capture_run._per_example_by_construction(model) is (not probed)


def test_a_hook_or_a_patched_forward_brings_the_probe_back():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert capture_run._per_example_by_construction(model)
    handle = model[1].register_forward_hook(lambda m, i, o: o - o.mean(0))  # couples the examples
    assert not capture_run._per_example_by_construction(model)
    handle.remove()
    model[1].forward = lambda x: x - x.mean(0)
    assert not capture_run._per_example_by_construction(model)


def test_a_sequential_model_skips_the_probe_forward(monkeypatch):
    """Skipped means not called: the capture of an MLP never runs the probe."""
    def refuse(*args):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(capture_run, "_probe", refuse)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    fisherlab.capture(model, x, y, loss="cross_entropy", fisher="mc", device="cpu", dtype=torch.float64)
    with pytest.raises(AssertionError, match="the probe ran"):
        fisherlab.capture(nn.Sequential(model, _Custom()), x, y, loss="cross_entropy", fisher="mc", device="cpu",
                          dtype=torch.float64)


class _Discarded(nn.Module):
    """A conv layer whose output never reaches the network output (its backward gives None)."""

    def __init__(self):
        super().__init__()
        self.side = nn.Conv2d(2, 3, 3, padding=1)
        self.main = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        self.side(x)
        return self.main(x).flatten(1)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_a_dense_conv_layer_that_does_not_reach_the_output_is_zero(fisher, dense_conv_path):
    torch.manual_seed(4)
    model = _Discarded().double()
    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randn(3, 75, dtype=torch.float64)
    cap = fisherlab.capture(model, x, y, loss="mse", fisher=fisher, device="cpu", dtype=torch.float64,
                            storage="dense", generator=torch.Generator().manual_seed(0))
    side = cap.layer("side")
    assert side.storage.value == "dense" and side.dense.abs().max() == 0 and side.G.abs().max() == 0
    assert cap.grad[side.spec.offset : side.spec.stop].abs().max() == 0
    a = layer_inputs(side.spec, x).flatten(0, 1)
    assert _rel(side.A, a.T @ a / 3) <= RTOL  # A depends on the input only
