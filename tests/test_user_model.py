"""Your own model and data: models by import path and by register(), data by module:function /
.npz / .pt, capture_checkpoints and the CLI on them; in-place activations captured correctly."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import fisherlab
from fisherlab import datasets, models, store
from fisherlab.cli import main
from fisherlab.errors import ConfigError
from fisherlab.testing import mean_loss_gradient, per_example_loss_gradients
from fisherlab.workflows.checkpoints import capture_checkpoints

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self, channels=2, n_classes=3):
            super().__init__()
            self.conv = nn.Conv2d(1, channels, 3, padding=1)
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(channels * 16, n_classes)

        def forward(self, x):
            return self.fc(self.act(self.conv(x.reshape(-1, 1, 4, 4))).flatten(1))

    def factory(hidden=5):
        return nn.Sequential(nn.Linear(16, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(24, 16, generator=g), torch.randint(0, 3, (24,), generator=g)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``usermods.py`` in a fresh folder that is the working directory (as for the CLI)."""
    name = "usermods_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_models_by_import_path_record_how_to_rebuild(user_module, tmp_path):
    d = models.describe(f"{user_module}:factory", hidden=4)
    assert d["factory"] == {"module": user_module, "attr": "factory"} and d["hidden"] == 4 and d["n_params"] == 16 * 4 + 4 + 4 * 3 + 3
    d2 = models.describe(f"{user_module}.SmallCNN")
    assert d2["factory"]["attr"] == "SmallCNN" and d2["channels"] == 2
    d3 = models.describe(f"{tmp_path / user_module}.py:SmallCNN", channels=3)
    assert d3["factory"] == {"file": str((tmp_path / f"{user_module}.py").resolve()), "attr": "SmallCNN"}
    json.dumps(d3)  # JSON-able, no pickle
    a, b = models.build(d3, seed=0), models.build(json.loads(json.dumps(d3)), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        models.describe(f"{user_module}:nope")
    with pytest.raises(ConfigError, match="has no option 'depth'"):
        models.describe(f"{user_module}:factory", depth=2)
    with pytest.raises(ConfigError, match=r"unknown model 'nosuch'.*module:factory"):
        models.describe("nosuch")


def test_register_is_public_and_listed(user_module):
    mod = __import__(user_module)
    models.register("my-tiny", mod.factory, input_shape=(16,), n_outputs=3, loss="cross_entropy")
    try:
        assert "my-tiny" in models.available()
        d = models.describe("my-tiny", hidden=3)
        assert d["loss"] == "cross_entropy" and d["input_shape"] == [16] and d["factory"]["attr"] == "factory"
        assert isinstance(models.build(d), nn.Sequential)
        with pytest.raises(ConfigError, match="registered already"):
            models.register("my-tiny", mod.factory)
        with pytest.raises(ConfigError, match="built-in"):
            models.register("mnist-ae", mod.factory)
    finally:
        models.unregister("my-tiny")
    assert "my-tiny" not in models.available()


def test_user_data(user_module, tmp_path):
    ds = datasets.load(f"{user_module}:data", n=10, seed=1)
    assert len(ds) == 10 and ds.task == "classification" and ds.input_shape == (16,)
    assert "tensor(" not in repr(ds) and "n=10" in repr(ds)
    np.savez(tmp_path / "d.npz", x=np.ones((5, 3), "f4"), y=np.zeros((5, 2), "f4"))
    assert datasets.load(str(tmp_path / "d.npz")).task == "regression"
    torch.save({"x": torch.rand(4, 3), "y": torch.tensor([0, 1, 1, 0])}, tmp_path / "d.pt")
    assert datasets.load(str(tmp_path / "d.pt")).n_classes == 2
    torch.save({"x": torch.rand(4, 3), "y": object()}, tmp_path / "bad.pt")  # would need unpickling
    with pytest.raises(ConfigError, match="weights_only"):
        datasets.load(str(tmp_path / "bad.pt"))


def test_capture_checkpoints_and_cli_on_a_user_model(user_module, tmp_path, capsys):
    desc = models.describe(f"{user_module}.SmallCNN")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000003.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(models.build(desc, seed=0).state_dict(), ckpt)
    x, y = datasets.load(f"{user_module}:data").batch(range(6))
    out = tmp_path / "api.h5"
    assert capture_checkpoints(desc, [ckpt], x, y, out, loss="cross_entropy", fisher="empirical", progress=False) == ["step_000003"]
    assert store.file_info(out)["model"]["factory"] == desc["factory"]  # the file says how to rebuild the model
    rc = main(["capture", "--model", f"{user_module}.SmallCNN", "--checkpoints", str(ckpt), "--data", f"{user_module}:data",
               "--n", "12", "-B", "4", "--loss", "cross_entropy", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    h5 = tmp_path / "run" / "capture.h5"  # --out defaults to the training run's folder
    cap = fisherlab.load(h5)
    assert cap.meta["model"]["name"] == f"{user_module}.SmallCNN" if "model" in cap.meta else True
    assert store.file_info(h5)["model"]["factory"] == {"module": user_module, "attr": "SmallCNN"}
    rc = main(["capture", "--model", f"{user_module}:factory", "--checkpoints", str(ckpt), "-B", "4", "--device", "cpu", "-q",
               "--data", f"{user_module}:data", "--out", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not say its loss; pass --loss" in err


class _Block(nn.Module):
    """A torchvision-style residual block without BatchNorm, so that every in-place operation
    lands on a captured layer's output: conv → ReLU(inplace) → conv, ``out += shortcut(x)``,
    ReLU(inplace), then a linear head after an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.shortcut = nn.Conv2d(2, 3, 1)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += identity
        out = self.relu(out)
        return self.fc(out.flatten(1)).relu_()


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_inplace_activations_match_torch_func(fisher):
    torch.manual_seed(0)
    model = _Block().double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    modes = [m.training for m in model.modules()]
    cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher=fisher, device="cpu", dtype=torch.float64)
    assert [m.training for m in model.modules()] == modes  # every submodule's mode restored
    ref = mean_loss_gradient(model, x, y, "cross_entropy")
    torch.testing.assert_close(cap.to_torch_order(cap.grad), ref, rtol=1e-10, atol=1e-12)
    if fisher == "empirical":  # the rows are the per-example gradients themselves
        G = per_example_loss_gradients(model, x, y, "cross_entropy")
        J = cap.per_example_gradients().double()
        torch.testing.assert_close(torch.stack([cap.to_torch_order(r) for r in J]), G, rtol=1e-10, atol=1e-12)


def _full_forwards_of_a_checked_capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Captures the empirical Fisher of ``(x, y)``, checks that its rows are the per-example
    gradients, and returns how many forward calls of the model saw the whole batch."""
    B, calls = x.shape[0], [0]

    def count(module, args):
        calls[0] += args[0].shape[0] == B

    handle = model.register_forward_pre_hook(count)
    cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="empirical", device="cpu", dtype=torch.float64)
    handle.remove()
    G = per_example_loss_gradients(model, x, y, "cross_entropy")
    J = cap.per_example_gradients().double()
    torch.testing.assert_close(torch.stack([cap.to_torch_order(r) for r in J]), G, rtol=1e-10, atol=1e-12)
    return calls[0]


class _InPlaceAtFullBatch(nn.Module):
    """An in-place operation on a captured layer's output, after its use, that only the whole
    batch triggers: the small probe forward cannot see it (and the outputs do not change)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        out = self.fc(torch.tanh(h))
        if x.shape[0] > 2:
            h.mul_(2.0)
        return out


@pytest.mark.parametrize(
    "build",
    [_Block, lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2), nn.ReLU(inplace=True))],
    ids=["residual-block", "sequential-inplace-relu"],
)
def test_inplace_operations_cost_one_full_forward(build):
    """The probe forward of the first examples shows which tensors in-place operations modify:
    the whole batch goes through the model once, with those copies (not twice), and the rows are
    the per-example gradients."""
    torch.manual_seed(1)
    model = build().double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64) if isinstance(model, _Block) else torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    assert _full_forwards_of_a_checked_capture(model, x, y) == 1


def test_an_inplace_operation_the_probe_misses_repeats_the_forward_with_copies():
    torch.manual_seed(2)
    model = _InPlaceAtFullBatch().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert _full_forwards_of_a_checked_capture(model, x, y) == 2
