"""Training: checkpoints loadable with weights_only, metrics CSV, plots, the optimizer hooks, the CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fisherlab import models
from fisherlab.train import OPTIMIZERS, TrainConfig, load_checkpoint, train

TINY_AE = {"name": "curves-ae", "width": 0.02}  # 784-8-4-2-1-1-1-…-784: ~15k parameters




def tiny_config(**kw) -> TrainConfig:
    base = dict(model=TINY_AE, data="curves", n=64, batch_size=16, steps=8, optimizer="adam", lr=1e-2,
                checkpoint_every=4, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(), out), out


def test_writes_checkpoints_csv_and_plots(run):
    result, out = run
    names = sorted(p.name for p in (out / "checkpoints").glob("*.pt"))
    assert names == ["step_000000.pt", "step_000004.pt", "step_000008.pt"]
    assert [p.name for p in result.checkpoints] == names
    for f in ("metrics.csv", "loss.png", "loss.pdf", "run.json"):
        assert (out / f).stat().st_size > 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"step", "epoch", "loss", "wall_time", "lr"} <= set(rows[0])
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["model"] == models.describe(**TINY_AE) and run_json["config"]["optimizer"] == "adam"
    assert [c["step"] for c in run_json["checkpoints"]] == [0, 4, 8]


def test_checkpoints_load_with_weights_only(run):
    result, out = run
    state = torch.load(out / "checkpoints" / "step_000008.pt", weights_only=True)
    side = json.loads((out / "checkpoints" / "step_000008.json").read_text())
    assert side["step"] == 8 and side["model"]["name"] == "curves-ae"
    model = models.build(side["model"])
    model.load_state_dict(state)
    final = {k: v.cpu() for k, v in result.model.state_dict().items()}
    assert all(torch.equal(state[k], final[k]) for k in final)
    m0, info0 = load_checkpoint(out / "checkpoints" / "step_000000.pt")
    init = models.build(TINY_AE, seed=0).state_dict()  # step 0 is the seeded initialization
    assert info0["step"] == 0 and all(torch.equal(m0.state_dict()[k], init[k]) for k in init)


def test_same_seed_same_run(run, tmp_path):
    again = train(tiny_config(checkpoint_every=None, checkpoint_final=False, plot=False), None)
    assert again.losses == run[0].losses


@pytest.mark.parametrize("optimizer, lr, momentum", [("sgd", 0.05, 0.9), ("adam", 0.01, 0.0)])
def test_loss_decreases_on_a_tiny_problem(optimizer, lr, momentum):
    # Tselepidis et al.'s problem: 64-layer deep linear net with BatchNorm on 10-dim random vectors
    cfg = TrainConfig(model={"name": "deep-linear-64", "input_dim": 10}, data="random-vectors",
                      n=128, batch_size=32, steps=40, optimizer=optimizer, lr=lr, momentum=momentum,
                      progress=False, plot=False, device="cpu")
    result = train(cfg)
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert result.config.loss == "mse" and result.config.data == "random-vectors"
    assert last < 0.6 * first, (first, last)  # measured: 0.39 (sgd), 0.21 (adam)


def test_optimizer_registry_factory_and_callback_hooks():
    seen = {}

    class Recording(torch.optim.SGD):
        wants_closure = True

        def step(self, closure=None):
            loss = closure()
            super().step()
            self.last_metrics = {"gap": -1.0}
            return loss

    def factory(params, config, *, model):
        seen["model"] = model
        seen["options"] = config.optimizer_options
        return Recording(params, lr=config.lr)

    OPTIMIZERS["recording"] = factory
    try:
        calls = []

        def cb(step, model, batch, loss):
            calls.append((step, batch[0].shape[0], loss))
            return {"seen": step}

        result = train(tiny_config(optimizer="recording", optimizer_options={"damping": 1e-3}, steps=3,
                                   checkpoint_every=None, checkpoint_final=False, plot=False), callbacks=[cb])
    finally:
        del OPTIMIZERS["recording"]
    assert isinstance(seen["model"], torch.nn.Module) and seen["options"] == {"damping": 1e-3}
    assert [c[:2] for c in calls] == [(1, 16), (2, 16), (3, 16)]
    assert [r["gap"] for r in result.metrics] == [-1.0] * 3 and result.metrics[2]["seen"] == 3


def test_optimizer_factory_argument_overrides_registry():
    made = []

    def factory(params, config, *, model):
        made.append(config.optimizer)
        return torch.optim.SGD(params, lr=config.lr)

    train(tiny_config(optimizer="not-registered", steps=1, checkpoint_every=None, checkpoint_final=False,
                      plot=False), optimizer_factory=factory)
    assert made == ["not-registered"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"optimizer": "lbfgs"}, r"unknown optimizer 'lbfgs' \(registered: sgd, adam"),
        ({"batch_size": 100}, r"batch_size=100 exceeds the n=64"),
        ({"lr": -1.0}, r"'lr' must be"),
        ({"model": {"name": "cuda-convnet", "width": 0.1}, "data": "mnist"}, r"expects \[3, 32, 32\]"),
        ({"model": "faces-ae", "data": None}, r"no embedded data"),
    ],
)
def test_bad_configs_raise_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        train(tiny_config(**kw))
    assert "\n" not in str(err.value)


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(path).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1})


@pytest.fixture
def cli():
    import fisherlab.cli as cli_mod

    return cli_mod


def test_cli_train_with_config_file_and_flags(cli, tmp_path, capsys):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"model": TINY_AE, "data": "curves", "n": 32, "batch_size": 16,
                               "optimizer": "sgd", "lr": 0.1}))
    out = tmp_path / "out"
    rc = cli.main(["train", str(cfg), "--out", str(out), "--steps", "4", "--checkpoint-steps", "0,2",
                   "--width", "0.03", "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "step_000000.pt", "step_000002.pt", "step_000004.pt"]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["model"]["width"] == 0.03 and run_json["config"]["lr"] == 0.1 and run_json["steps"] == 4
    assert "trained curves-ae" in capsys.readouterr().out


def test_cli_train_flags_only_and_error(cli, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["train", "--out", str(out), "--model", "deep-linear-64", "--model-arg", "input_dim=10",
                   "--width", "0.3", "--n", "32", "--batch-size", "8", "--steps", "2", "--quiet", "--no-plot",
                   "--optimizer", "sgd", "--optimizer-option", "nesterov=true", "--momentum", "0.9",
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["data"] == "random-vectors" and config["optimizer_options"] == {"nesterov": True}
    assert not (out / "loss.png").exists()
    rc = cli.main(["train", "--out", str(out), "--model", "nope", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fisherlab: error: unknown model 'nope'") and err.count("\n") == 1


def test_fisherlab_optimizers_are_registered():
    from fisherlab.optim import OPTIMIZERS as CURVATURE

    assert set(CURVATURE) <= set(OPTIMIZERS)  # registered on import, no probing
    assert tiny_config(optimizer="kfac").resolved().optimizer == "kfac"


@pytest.mark.parametrize(
    "check, match",
    [
        (lambda v: v.parse_enum("cgg", ["auto", "woodbury", "cg"], "solver"), r"^solver must be one of auto, woodbury, cg; got 'cgg'$"),
        (lambda v: v.positive_int(0, "k"), r"^k must be a positive integer, got 0$"),
        (lambda v: v.positive_int(True, "k"), r"got True"),
        (lambda v: v.positive_int(9, "k", max=8), r"<= 8, got 9"),
        (lambda v: v.bounded(1.0, "decay", 0.0, 1.0, hi_open=True), r"^decay must be a finite number in \[0, 1\), got 1.0$"),
        (lambda v: v.bounded(float("inf"), "lr", 0.0, lo_open=True), r"^lr must be a finite number > 0, got inf$"),
        (lambda v: v.damping(-1), r"damping λ must be finite and > 0"),
        (lambda v: v.same_damping(0.1, 0.2, "the exact operator"), r"^the exact operator has damping 0.2, expected 0.1$"),
    ],
)
def test_validators_raise_one_line_fisherlab_value_errors(check, match):
    from fisherlab import _validate
    from fisherlab.errors import FisherlabError

    with pytest.raises(FisherlabError, match=match) as err:
        check(_validate)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_validators_return_parsed_values():
    from fisherlab import _validate as v
    from fisherlab.capturing import FisherMode

    assert v.parse_enum("mc", FisherMode, "--fisher") is FisherMode.MC
    assert v.positive_int(3, "k", max=3) == 3 and v.nonnegative_int(0, "steps") == 0
    assert v.bounded(0, "x", 0.0) == 0.0 and v.damping("1e-3") == 1e-3
    assert v.same_damping(0.1, 0.1 * (1 + 1e-16), "kfac") == 0.1
