"""Issue 12 item 5: one consistent command line — every default shown in ``--help``, the same
flag spelled and shown the same way in every subcommand, the same damping default wherever a
damping has one, ``--out`` defaults named after the input, no carriage returns in logs."""

from __future__ import annotations

import json
import argparse

import pytest
import torch

from fisherlab import models
from fisherlab.cli import main
from fisherlab.cli.main import build_parser


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """``"capture"``, ``"analyze errors"``, … → its parser."""
    found = {}

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        if not subs:
            found[prefix] = parser
        for a in subs:
            for name, p in a.choices.items():
                walk(p, f"{prefix} {name}".strip())

    walk(build_parser(), "")
    return found


PARSERS = _parsers()
SHOWN = ("default", "(default")


def _options(parser):
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_default_is_shown(command):
    parser = PARSERS[command]
    text = " ".join(parser.format_help().split())
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction,
                                                          argparse._StoreFalseAction, argparse._VersionAction)):
            continue
        if a.default not in (None, [], False):
            assert "default" in " ".join(a.help.split()) or f"(default: " in text, (command, a.dest)
        if a.option_strings and a.default is None and a.required is False:
            # no default to show: the help says what happens without it
            assert a.help and ("default" in a.help or a.dest in ("indices", "checkpoint_steps", "steps", "loss", "task")
                               or "(" in a.help or "repeatable" in a.help), (command, a.dest, a.help)


def test_same_flags_the_same_everywhere():
    metavars: dict[str, set] = {}
    for command, parser in PARSERS.items():
        opts = _options(parser)
        if "--out" in opts:
            assert "-o" in opts["--out"].option_strings, command
            assert opts["--out"].default is not None or "default" in opts["--out"].help, command
        for flag in ("--batch-size", "--device", "--n", "--data-seed", "--width", "--memory"):
            if flag in opts:
                metavars.setdefault(flag, set()).add(opts[flag].metavar or opts[flag].dest.upper())
        if "--batch-size" in opts:
            assert "-B" in opts["--batch-size"].option_strings, command
    assert all(len(v) == 1 for v in metavars.values()), metavars
    # one damping default wherever a damping has a default: 1e-3 · λ_max
    with_default = {c: _options(p)["--damping"] for c, p in PARSERS.items() if "--damping" in _options(p)}
    assert {"analyze errors", "analyze spectra", "demo", "train"} <= set(with_default)
    for c, a in with_default.items():
        if c != "train":  # train's flags default to None so a config file's damping is kept
            scale = _options(PARSERS[c])["--damping-scale"]
            assert (a.default, scale.default) == (1e-3, "max"), c
    assert "default 1e-3" in with_default["train"].help


def test_train_defaults_the_damping_like_analyze(tmp_path):
    """train: a curvature optimizer without a damping gets 1e-3·λ_max (resolved per batch); a
    config's damping is kept; first-order optimizers get none; the JSON form builds a Damping."""
    import fisherlab
    from fisherlab.cli.train_cmd import config_from_args
    from fisherlab.optim import training_factory
    from fisherlab.train import TrainConfig

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    assert cfg("--optimizer", "kfac").optimizer_options["damping"] == {"value": 1e-3, "scale": "max"}
    assert cfg("--optimizer", "kfac", "--damping", "0.5", "--damping-scale", "absolute").optimizer_options["damping"] == 0.5
    assert cfg("--optimizer", "kfac", "--damping", "1e-2").optimizer_options["damping"] == {"value": 1e-2, "scale": "max"}
    assert "damping" not in cfg("--optimizer", "sgd").optimizer_options
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps(TrainConfig(optimizer="kfac", optimizer_options={"damping": 0.25}).to_dict()))
    assert cfg(str(conf)).optimizer_options["damping"] == 0.25
    model = fisherlab.models.build(fisherlab.models.describe("mnist-ae", width=0.02))
    opt = training_factory("kfac")(list(model.parameters()), cfg("--optimizer", "kfac", "--loss", "bce_logits"), model=model)
    assert opt.param_groups[0]["damping"] == fisherlab.Damping(1e-3, "max")


def test_out_defaults_are_named_after_the_input(tmp_path):
    from fisherlab.cli import analyze_cmd, capture_cmd, train_cmd

    assert str(analyze_cmd.default_out(tmp_path / "ae.h5")) == str(tmp_path / "ae.analysis")
    ck = tmp_path / "run" / "checkpoints"
    assert capture_cmd.default_out([ck / "step-0.pt"]) == (tmp_path / "run" / "capture.h5").resolve()
    args = build_parser().parse_args(["train", str(tmp_path / "ae.json")])
    assert train_cmd.default_out(args, "mnist-ae") == tmp_path / "ae"
    args = build_parser().parse_args(["train"])
    assert str(train_cmd.default_out(args, "mnist-ae")) == "runs/mnist-ae"
    assert str(train_cmd.default_out(args, "my/models.py:SmallCNN")) == "runs/models-SmallCNN"


def test_no_carriage_returns_in_a_log(capsys, tmp_path):
    """stderr is not a terminal (a log): no progress bar, no '\\r', without any flag."""
    p = tmp_path / "step-0.pt"
    torch.save(models.build(models.describe("mnist-ae", width=0.02), seed=0).state_dict(), p)
    rc = main(["capture", "--model", "mnist-ae", "--width", "0.02", "--checkpoints", str(p), "-B", "4",
               "--device", "cpu", "--out", str(tmp_path / "run.h5")])
    out, err = capsys.readouterr()
    assert rc == 0 and "\r" not in out + err and "1 checkpoint(s) written" in out
