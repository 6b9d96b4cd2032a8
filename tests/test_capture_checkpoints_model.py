"""Issue 12 item 1: ``capture_checkpoints(model=<nn.Module | factory | name>, ...)`` with tensors or
a ``DataLoader``; the file records how to rebuild the model (import path + JSON options), or says
it cannot, never a pickle."""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fisherlab
from fisherlab import models, store
from fisherlab.errors import ConfigError
from fisherlab.workflows.checkpoints import CURRENT, capture_checkpoints, describe_module


class Net(nn.Module):
    """Importable (module level): rebuildable from its class path and options."""

    def __init__(self, hidden: int = 5, n_in: int = 6):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def make_net(hidden: int = 4) -> nn.Module:
    return Net(hidden=hidden)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _model_attr(path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["model"])


def test_instance_with_default_options_is_rebuildable(tmp_path, data):
    torch.manual_seed(1)
    net = Net()
    net.train()
    net.act.eval()  # a submodule's own flag, which must survive
    x, y = data
    out = tmp_path / "run.h5"
    assert capture_checkpoints(model=net, inputs=x, targets=y, out=out, loss="cross_entropy",
                               fisher="empirical", device="cpu", progress=False) == [CURRENT]
    assert net.training and not net.act.training and net.fc1.training
    d = _model_attr(out)
    assert d["factory"] == {"module": __name__, "attr": "Net"} and d["hidden"] == 5 and "rebuildable" not in d
    twin = models.build(d)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    ref = fisherlab.capture(net, x, y, loss="cross_entropy", fisher="empirical", device="cpu")
    assert fisherlab.load(out, CURRENT).grad.equal(ref.grad)


def test_instance_options_state_dicts_and_unrebuildable(tmp_path, data):
    x, y = data
    net = Net(hidden=7)
    d, ok = describe_module(net)  # the constructor's defaults (hidden=5) do not build these shapes
    assert not ok and d["rebuildable"] is False and d["name"] == f"{__name__}:Net" and d["n_params"] == 6 * 7 + 7 + 7 * 3 + 3
    with pytest.warns(UserWarning, match=r"records the model's class .*:Net but cannot rebuild it"):
        capture_checkpoints(model=net, inputs=x, targets=y, out=tmp_path / "a.h5", loss="cross_entropy",
                            fisher="empirical", device="cpu", progress=False)
    assert _model_attr(tmp_path / "a.h5")["rebuildable"] is False
    d, ok = describe_module(net, {"hidden": 7})
    assert ok and d["hidden"] == 7
    ckpts = []
    for step in (0, 10):
        torch.manual_seed(step)
        p = tmp_path / f"step-{step}.pt"
        torch.save(Net(hidden=7).state_dict(), p)
        ckpts.append(p)
    out = tmp_path / "run.h5"
    written = capture_checkpoints(net, ckpts, x, y, out, model_options={"hidden": 7}, loss="cross_entropy",
                                  fisher="empirical", device="cpu", progress=False)
    assert written == ["step-0", "step-10"] and _model_attr(out)["hidden"] == 7

    def local_factory():  # not importable: recorded by class path, with one warning
        return Net(hidden=3)

    with pytest.warns(UserWarning, match="cannot rebuild it"):
        assert capture_checkpoints(model=local_factory, inputs=x, targets=y, out=tmp_path / "b.h5",
                                   loss="cross_entropy", fisher="empirical", device="cpu", progress=False) == [CURRENT]
    with pytest.raises(ConfigError, match=r"checkpoints \(state_dict files\) are required unless the model is an nn.Module"):
        capture_checkpoints(model=make_net, inputs=x, targets=y, out=tmp_path / "c.h5", loss="cross_entropy")
    with pytest.raises(ConfigError, match="not JSON-able"):
        describe_module(net, {"hidden": object()})


def test_factory_by_callable_and_a_data_loader(tmp_path, data):
    x, y = data
    torch.manual_seed(0)
    p = tmp_path / "step-3.pt"
    torch.save(make_net(hidden=2).state_dict(), p)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    out = tmp_path / "run.h5"
    written = capture_checkpoints(model=make_net, model_options={"hidden": 2}, checkpoints=[p], inputs=loader, out=out,
                                  loss="cross_entropy", fisher="empirical", batches=2, device="cpu", progress=False)
    assert written == ["step-3.b0d0", "step-3.b1d0"]
    assert _model_attr(out)["factory"] == {"module": __name__, "attr": "make_net"}
    same = tmp_path / "tensors.h5"
    capture_checkpoints(f"{__name__}:make_net", [p], x, y, same, model_options={"hidden": 2}, loss="cross_entropy",
                        fisher="empirical", batches=2, device="cpu", progress=False)
    for name in written:
        assert fisherlab.load(out, name).grad.equal(fisherlab.load(same, name).grad)
    assert [c.name for c in store.list_checkpoints(out)] == written
    with pytest.raises(ConfigError, match=r"data loader: 2 batch\(es\), 3 needed"):
        capture_checkpoints(model=make_net, checkpoints=[p], inputs=loader, out=tmp_path / "x.h5",
                            loss="cross_entropy", batches=3, model_options={"hidden": 2})
    short = DataLoader(TensorDataset(x[:7], y[:7]), batch_size=4)
    with pytest.raises(ConfigError, match=r"batch 1 has 3 examples, batch 0 has 4 .*drop_last=True"):
        capture_checkpoints(model=make_net, checkpoints=[p], inputs=short, out=tmp_path / "y.h5",
                            loss="cross_entropy", batches=2, model_options={"hidden": 2})
