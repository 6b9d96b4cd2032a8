"""The paper's models: build at small width, forward shapes, rebuild from the description."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fisherlab
from fisherlab import models

SMALL = 0.05  # width multiplier: every model builds and runs in milliseconds
WITH_BATCHNORM = {"cuda-convnet", "resnet18", "resnet34", "deep-linear-64", "deep-linear-14"}




@pytest.fixture(params=models.available())
def name(request):
    return request.param


def test_available_lists_the_papers_models():
    assert set(models.available()) == {
        "curves-ae", "mnist-ae", "faces-ae", "cuda-convnet", "resnet18", "resnet34",
        "deep-linear-64", "deep-linear-14", "tiny-gpt",
    }


def test_forward_shape(name):
    d = models.describe(name, width=SMALL)
    model = models.build(d, seed=0)
    if name == "tiny-gpt":  # int64 tokens in, logits [B, T, V] out
        x = torch.randint(0, d["n_outputs"] // d["context"], (3, *models.input_shape(d)))
    else:
        x = torch.randn(3, *models.input_shape(d))
    out = model(x).reshape(3, -1)
    assert out.shape == (3, d["n_outputs"])
    assert torch.isfinite(out).all()


def test_rebuild_from_description_is_identical(name):
    d = models.describe(name, width=SMALL)
    d2 = json.loads(json.dumps(d))  # JSON round trip
    assert d2 == d
    a, b = models.build(d, seed=3), models.build(d2, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = models.build(d, seed=4)
    assert any(not torch.equal(sa[k], c.state_dict()[k]) for k in sa if sa[k].is_floating_point())


def test_build_with_seed_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    models.build("curves-ae", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_description_is_complete(name):
    d = models.describe(name, width=SMALL)
    assert d["name"] == name and d["width"] == SMALL
    assert d["loss"] == models.default_loss(name if name != "deep-linear-64" else d)
    assert d["n_params"] == sum(p.numel() for p in models.build(d).parameters())
    assert models.build(name).__class__ is models.build(models.describe(name)).__class__


def test_layout_accepts_models(name):
    model = models.build(models.describe(name, width=SMALL), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = fisherlab.Layout.from_model(model)
    bn_warnings = [w for w in caught if "BatchNorm" in str(w.message)]
    assert bool(bn_warnings) == (name in WITH_BATCHNORM)
    assert layout.p > 0


@pytest.mark.parametrize(
    "name, width, expected",
    [
        ("curves-ae", 1.0, [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]),
        ("mnist-ae", 1.0, [784, 1000, 500, 250, 30, 250, 500, 1000, 784]),
        ("faces-ae", 1.0, [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]),
        ("mnist-ae", 0.1, [784, 100, 50, 25, 3, 25, 50, 100, 784]),
        ("curves-ae", 0.01, [784, 4, 2, 1, 1, 1, 1, 1, 1, 1, 2, 4, 784]),  # ≥ 1, ends fixed
        ("deep-linear-14", 1.0, [784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10]),
        ("deep-linear-64", 1.0, [784] + [10] * 63 + [10]),
    ],
)
def test_linear_sizes(name, width, expected):
    model = models.build(models.describe(name, width=width))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [linears[0].in_features] + [m.out_features for m in linears] == expected


def test_paper_parameter_counts():
    # CIFAR ResNets with a 10-class head have the well-known 11.17M / 21.28M parameters
    assert models.describe("resnet18")["n_params"] == 11_173_962
    assert models.describe("resnet34")["n_params"] == 21_282_122
    conv = [m for m in models.build("cuda-convnet").modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [type(m).__name__ for m in conv] == ["Conv2d", "Conv2d", "Conv2d", "Linear"]


def test_deep_linear_64_input_option_and_loss():
    d = models.describe("deep-linear-64", input_dim=10)
    assert models.input_shape(d) == (10,) and d["loss"] == "mse"
    assert models.default_data(d) == "random-vectors"
    assert models.default_loss("deep-linear-64") == "cross_entropy"


def test_autoencoder_activation_option():
    model = models.build(models.describe("mnist-ae", width=SMALL, activation="sigmoid"))
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_models_capture_on_resnet():
    model = models.build(models.describe("resnet18", width=0.03), seed=0)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="BatchNorm"):
        cap = fisherlab.capture(model, x, torch.tensor([1, 2]), loss="cross_entropy", fisher="empirical", device="cpu")
    assert cap.grad.shape[0] == fisherlab.Layout.from_model(model, warn=False).p


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: models.describe("mnist_ae"), r"unknown model 'mnist_ae' \(valid names: curves-ae, mnist-ae"),
        (lambda: models.build({"name": "nope"}), r"valid names"),
        (lambda: models.describe("mnist-ae", widht=2), r"no option 'widht' \(valid options: width, activation\)"),
        (lambda: models.describe("mnist-ae", width=0), r"'width' must be a finite number > 0"),
        (lambda: models.describe("mnist-ae", activation="gelu"), r"activation"),
        (lambda: models.describe("resnet18", n_classes=0), r"positive integer"),
        (lambda: models.build(42), r"description"),
    ],
)
def test_bad_names_and_options_raise_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
