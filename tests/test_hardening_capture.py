"""Capture refuses what it would get wrong, restores what it changes, and plans its memory
(issue 9, items 3, 6, 7, 8, 11, 12)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlab
from fisherlab.errors import ConfigError, MemoryBudgetError, UnsupportedLayerError


def run(model, x, y, **kw):
    kw = {"loss": "mse", "fisher": "empirical", "device": "cpu", "dtype": torch.float64, **kw}
    return fisherlab.capture(model, x, y, **kw)


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---- item 3: parameters used outside their module's call ------------------------------------


class TiedAE(nn.Module):
    """Decoder reuses the encoder's weight: F.linear(h, enc.weight.t(), b)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec_bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


class FunctionalReuse(nn.Module):
    """fc is called, and its weight is used once more functionally."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + F.linear(x, self.fc.weight))


class CalledButBypassed(nn.Module):
    """fc is called (the hook fires) but its output is dropped; its weight is used instead."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.fc(x)
        return F.linear(x, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize(
    "build,d_in,d_out,pattern",
    [
        (TiedAE, 6, 6, r"parameter 'enc\.weight' is used outside its module's call .*2 use\(s\)"),
        (FunctionalReuse, 4, 2, r"parameter 'fc\.weight' is used outside its module's call"),
        (CalledButBypassed, 4, 2, r"parameter 'fc\.weight' is used outside its module's call"),
    ],
    ids=["tied-autoencoder", "functional-reuse", "called-but-bypassed"],
)
def test_parameter_used_outside_its_module_call_is_refused(build, d_in, d_out, pattern):
    torch.manual_seed(0)
    model = build().double()
    x, y = torch.randn(5, d_in, dtype=torch.float64), torch.randn(5, d_out, dtype=torch.float64)
    for fisher in ("empirical", "mc"):
        with pytest.raises(UnsupportedLayerError, match=pattern) as info:
            run(model, x, y, fisher=fisher)
        one_line(info)


# ---- item 6: batch statistics, batch coupling, random forwards ------------------------------------


class Centering(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)  # couples the examples without any BatchNorm


class HardDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5, training=True)  # random even in eval mode


@pytest.mark.parametrize(
    "middle,pattern",
    [
        (lambda: nn.BatchNorm1d(4, track_running_stats=False), r"module '1' \(BatchNorm1d, track_running_stats=False\) normalizes by the batch"),
        (Centering, r"outputs for the first 2 example\(s\) change when its other 3 examples are left out"),
        (HardDropout, r"couples examples \(batch statistics\) or is random \(dropout hard-coded"),
    ],
    ids=["batchnorm-batch-stats", "functional-centering", "hard-coded-dropout"],
)
def test_batch_coupled_or_random_forward_is_refused(middle, pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), middle(), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=pattern) as info:
        run(model, x, y)
    one_line(info)


def test_batchnorm_with_running_statistics_is_still_captured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not part of the Fisher"):
        cap = run(model, x, y)
    assert cap.layout.names == ["0", "3"]


# ---- item 8: every submodule's train/eval flag restored ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["same-dtype", "copied"])
def test_every_submodule_mode_is_restored_exactly(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.1), nn.Linear(4, 2)).double()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model being trained
    model[4].eval()
    before = [m.training for m in model.modules()]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not part of the Fisher"):
        run(model, x, y, dtype=dtype)
    assert [m.training for m in model.modules()] == before
    with pytest.raises(ValueError, match="mse targets must have the output shape"):  # after a failure inside
        run(model, x, y[:, :1], dtype=dtype)
    assert [m.training for m in model.modules()] == before


# ---- item 12 and 11: inputs and devices -----------------------------------------------------------


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x), x


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


X = torch.randn(4, 3, dtype=torch.float64)
LABELS = torch.tensor([0, 2, 1, 2])

BAD = {
    "n-samples-bool": (_mlp, LABELS, {"loss": "cross_entropy", "fisher": "mc", "n_samples": True}, ValueError, r"n_samples must be a positive integer, got True"),
    "bool-labels": (_mlp, LABELS.bool(), {"loss": "cross_entropy"}, ValueError, r"targets are booleans"),
    "bce-targets-above-one": (_mlp, torch.full((4, 3), 2.0, dtype=torch.float64), {"loss": "bce_logits"}, ValueError, r"bce_logits targets must lie in \[0, 1\], got \[2, 2\]"),
    "bce-targets-negative": (_mlp, -torch.ones(4, 3, dtype=torch.float64), {"loss": "bce_logits"}, ValueError, r"must lie in \[0, 1\]"),
    "list-targets": (_mlp, [0, 1, 2, 0], {"loss": "cross_entropy"}, ValueError, r"targets must be a torch\.Tensor, got list"),
    "numpy-targets": (_mlp, LABELS.numpy(), {"loss": "cross_entropy"}, ValueError, r"targets must be a torch\.Tensor, got ndarray"),
    "tuple-output": (TupleOut, torch.zeros(4, 2, dtype=torch.float64), {}, ValueError, r"the model returned a tuple"),
    "unknown-storage-key": (_mlp, torch.zeros(4, 3, dtype=torch.float64), {"storage": {"fc9": "dense"}}, ConfigError, r"storage: no captured layer named 'fc9' \(layers: 0, 2\)"),
    "unknown-storage-value": (_mlp, torch.zeros(4, 3, dtype=torch.float64), {"storage": "sparse"}, ConfigError, r"unknown storage 'sparse'"),
    "bad-device": (_mlp, torch.zeros(4, 3, dtype=torch.float64), {"device": "gpu0"}, ConfigError, r"unknown device 'gpu0'"),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=list(BAD))
def test_input_gaps_give_one_line(bad):
    build, y, kw, err, pattern = bad
    with pytest.raises(err, match=pattern) as info:
        run(build(), X if build is not TupleOut else X, y, **kw)
    one_line(info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line():
    with pytest.raises(ConfigError, match=r"device 'cuda' requested but CUDA is not available here") as info:
        run(_mlp(), X, torch.zeros(4, 3, dtype=torch.float64), device="cuda")
    one_line(info)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16], ids=str)
def test_integer_labels_of_any_width_are_class_indices(dtype):
    ref = run(_mlp(), X, LABELS, loss="cross_entropy")
    other = run(_mlp(), X, LABELS.to(dtype), loss="cross_entropy")
    assert torch.equal(ref.grad, other.grad) and torch.equal(ref.per_example_gradients(), other.per_example_gradients())


# ---- item 7: planned refusals instead of allocator crashes ------------------------------------------


def test_oversized_capture_is_refused_before_allocating():
    """exact-mode dense capture of a 784-1000-784 net at B = 64 (≈ 2 × 147 GiB of dense rows):
    refused in the time of a forward pass, naming the size, the layer and the options."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1000), nn.Tanh(), nn.Linear(1000, 784))
    x, y = torch.rand(64, 784), torch.rand(64, 784)
    t0 = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"capture would need about \d+.* GiB \(layer '0': dense J \[50176, 785000\]") as info:
        fisherlab.capture(model, x, y, loss="mse", fisher="exact", storage="dense", device="cpu")
    msg = one_line(info)
    assert "storage='factored'" in msg and "smaller batch" in msg and "memory=" in msg
    assert time.perf_counter() - t0 < 10


def test_memory_budget_option():
    model, y = _mlp(), torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(MemoryBudgetError, match=r"more than the .* GiB allowed"):
        run(model, X, y, memory=100)
    run(model, X, y, memory=1 << 20)
    with pytest.raises(ConfigError, match=r"memory must be a positive number of bytes"):
        run(model, X, y, memory=-1)
