"""Embedded data: documented shapes and ranges, reproducible seeds, clear failures."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fisherlab import datasets
from fisherlab.datasets import DatasetUnavailableError

N = 64  # examples per generated load: fast, enough for shape and range checks



# name: (x shape of one example, default task, y shape of one example, y dtype)
DOCUMENTED = {
    "mnist": ((784,), "autoencoder", (784,), torch.float32),
    "curves": ((784,), "autoencoder", (784,), torch.float32),
    "random-vectors": ((10,), "regression", (10,), torch.float32),
    "cifar-standin": ((3, 32, 32), "classification", (), torch.int64),
}


@pytest.fixture(params=list(DOCUMENTED))
def name(request):
    return request.param


def test_documented_shapes(name):
    x_shape, task, y_shape, y_dtype = DOCUMENTED[name]
    ds = datasets.load(name, n=N, seed=0)
    assert len(ds) == N and ds.name == name and ds.task == task
    assert ds.x.shape == (N, *x_shape) and ds.x.dtype == torch.float32
    assert ds.y.shape == (N, *y_shape) and ds.y.dtype == y_dtype
    assert ds.source and ds.licence
    assert torch.isfinite(ds.x).all()
    xb, yb = ds.batch([0, 5, 7])
    assert torch.equal(xb, ds.x[[0, 5, 7]]) and torch.equal(yb, ds.y[[0, 5, 7]])


def test_seeds_reproducible(name):
    a, b = datasets.load(name, n=N, seed=1), datasets.load(name, n=N, seed=1)
    c = datasets.load(name, n=N, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("name", ["mnist", "curves"])
def test_images_in_unit_interval_and_autoencoder_target(name):
    ds = datasets.load(name, n=N)
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    assert float(ds.x.max()) > 0.9  # strokes reach full intensity
    assert torch.equal(ds.y, ds.x.reshape(N, -1))


def test_mnist_is_the_real_5k_subset():
    datasets._mnist_raw.cache_clear()
    ds = datasets.load("mnist")
    assert len(ds) == 5000 and ds.x.shape == (5000, 784)
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    cls = datasets.load("mnist", n=10, task="classification")
    assert cls.y.dtype == torch.int64 and cls.y.shape == (10,)
    assert "LeCun" in ds.source and "CC BY-SA 3.0" in ds.licence


def test_random_vectors_follow_a_linear_teacher():
    ds = datasets.load("random-vectors", n=200, seed=3)
    W = torch.linalg.lstsq(ds.x, ds.y).solution
    assert torch.allclose(ds.x @ W, ds.y, atol=1e-4)  # noise-free planted linear map
    cls = datasets.load("random-vectors", n=200, seed=3, task="classification")
    assert torch.equal(cls.y, ds.y.argmax(1))


def test_cifar_standin_classes_are_learnable_and_labelled():
    ds = datasets.load("cifar-standin", n=500, seed=0)
    assert "NOT CIFAR" in ds.source and set(ds.y.tolist()) == set(range(10))
    # nearest class mean separates the classes much better than chance (10 %)
    means = torch.stack([ds.x[ds.y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(ds.x.flatten(1), means).argmin(1)
    assert (pred == ds.y).float().mean() > 0.5


def test_fashion_mnist_missing_names_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", [str(tmp_path / "nowhere")])
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist") as err:
        datasets.load("fashion-mnist")
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "nowhere" in msg
    assert isinstance(err.value, FileNotFoundError)


def _write_idx(path, arr: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    for split, prefix, m in [("train", "train", 12), ("test", "t10k", 5)]:
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (m, 28, 28)), 2051)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(m) % 10, 2049)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    ds = datasets.load("fashion-mnist")
    assert ds.x.shape == (12, 784) and ds.y.dtype == torch.int64 and ds.task == "classification"
    assert float(ds.x.max()) <= 1.0 and ds.licence == "MIT"
    assert torch.equal(ds.y, torch.arange(12) % 10)
    assert len(datasets.load("fashion-mnist", split="test")) == 5
    assert datasets.load("fashion-mnist", task="autoencoder").y.shape == (12, 784)


def test_real_fashion_mnist_when_installed():
    try:
        ds = datasets.load("fashion-mnist", n=100)
    except DatasetUnavailableError:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    assert ds.x.shape == (100, 784) and int(ds.y.max()) <= 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "cifar10"}, r"unknown dataset 'cifar10' \(valid names: mnist, fashion-mnist"),
        ({"name": "curves", "task": "classification"}, r"supports task 'autoencoder'"),
        ({"name": "mnist", "n": 0}, r"positive integer"),
        ({"name": "mnist", "n": 6000}, r"exceeds the 5000"),
        ({"name": "mnist", "split": "test"}, r"only split='train'"),
    ],
)
def test_bad_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        datasets.load(kwargs.pop("name"), **kwargs)
    assert "\n" not in str(err.value)
