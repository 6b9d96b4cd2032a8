"""``fisherlab train [CONFIG.json] [flags] [--out DIR]``: train a model by name and write
``state_dict`` checkpoints, ``metrics.csv``, ``loss.png``/``loss.pdf`` and ``run.json`` into DIR
(default: a folder named after the input, ``runs/ae.json`` → ``runs/ae/``, else ``runs/<model>/``).

Flags override the JSON config file; with neither, the defaults of
:class:`fisherlab.train.TrainConfig` apply (``mnist-ae`` on 1,000 MNIST digits, one epoch of SGD).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    FORMATTER,
    add_quiet_progress,
    check_device,
    check_out_folder,
    model_arg,
    model_description,
    progress_of,
)


def _steps_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--checkpoint-steps expects comma-separated integers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from ..train import OPTIMIZERS  # sgd, adam and every fisherlab.optim optimizer

    p = sub.add_parser(
        "train",
        help="train a model; write checkpoints, metrics CSV and loss plot",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=FORMATTER,
    )
    p.add_argument("config", nargs="?", type=Path, help="JSON config file (keys of TrainConfig); flags override it")
    p.add_argument("--out", "-o", type=Path, default=None, metavar="DIR",
                   help="output folder (default: named after the input: CONFIG.json → CONFIG/ beside it, else runs/MODEL/)")
    p.add_argument("--model", help="model name (fisherlab.models.available()), your own factory as module:factory, "
                   "module.Class or path/to/file.py:factory, or a JSON file with a model description (default: mnist-ae)")
    p.add_argument("--width", type=float, metavar="W", help="hidden-width multiplier of a built-in model (e.g. 0.1 for CPU-sized runs)")
    p.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="further model option, e.g. activation=sigmoid, input_dim=10 (repeatable; JSON values)")
    p.add_argument("--data", help="data set name, or your own: module:function, path/to/file.py:function, file.npz, "
                   "file.pt (default: the model's)")
    p.add_argument("--n", type=int, metavar="N", help="number of data examples to train on (default 1000)")
    p.add_argument("--n-data", dest="n", type=int, help=argparse.SUPPRESS)  # the capture's old spelling
    p.add_argument("--all-data", action="store_true", help="use the whole data set (n = None)")
    p.add_argument("--data-seed", type=int, metavar="S", help="seed of the data subset (default 0)")
    p.add_argument("--loss", choices=["bce_logits", "cross_entropy", "mse"], help="default: the model's")
    p.add_argument("--batch-size", "-B", "-b", type=int, metavar="B", help="examples per step (default 100)")
    p.add_argument("--epochs", type=int, metavar="E", help="passes over the data (default 1)")
    p.add_argument("--steps", type=int, metavar="S", help="number of updates (overrides --epochs)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), metavar="NAME",
                   help=f"one of: {', '.join(OPTIMIZERS)} (default sgd)")
    p.add_argument("--damping", type=float, metavar="λ",
                   help="damping of F + λI for the curvature optimizers, in --damping-scale, resolved on every "
                   "batch (default 1e-3, as analyze and demo; = --optimizer-option damping=…; sgd and adam take none)")
    p.add_argument("--damping-scale", choices=["absolute", "max", "mean", "mean-loss"], default=None,
                   help="scale of --damping: absolute λ, or α·λ_max(F), α·mean eig(F), α in the output-averaged "
                   "loss's units (default max)")
    p.add_argument("--optimizer-option", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer option, e.g. damping=1e-3, nesterov=true (repeatable; JSON values)")
    p.add_argument("--lr", type=float, metavar="LR", help="learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, metavar="M", help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=float, metavar="WD", help="L2 weight decay (default 0)")
    p.add_argument("--seed", type=int, help="initialization and batch-order seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="checkpoint every K steps (step 0 included)")
    p.add_argument("--checkpoint-steps", type=_steps_list, metavar="S1,S2,…", help="explicit checkpoint steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png / loss.pdf")
    add_quiet_progress(p)
    p.set_defaults(func=main)


def config_from_args(args: argparse.Namespace):
    """The :class:`~fisherlab.train.TrainConfig` of a config file overridden by flags."""
    from ..models import describe
    from ..train import TrainConfig

    base = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    if args.model and args.model.endswith(".json"):
        base["model"] = model_description(args.model, args.width, dict(args.model_arg))
    elif args.model or args.width is not None or args.model_arg:
        model = base.get("model", TrainConfig().model)
        model = {"name": model} if isinstance(model, str) else dict(model)
        name = args.model or model["name"]
        derived = ("name", "input_shape", "n_outputs", "loss", "n_params")
        # options of the file's model are kept when the name is unchanged
        opts = {k: v for k, v in model.items() if k not in derived} if name == model["name"] else {}
        if args.width is not None:
            opts["width"] = args.width
        opts.update(dict(args.model_arg))
        base["model"] = describe(name, **opts)
    flags = {
        "data": args.data, "n": args.n, "data_seed": args.data_seed, "loss": args.loss,
        "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
        "optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "seed": args.seed, "checkpoint_every": args.checkpoint_every,
        "checkpoint_steps": args.checkpoint_steps, "device": args.device,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.optimizer_option:
        base["optimizer_options"] = {**base.get("optimizer_options", {}), **dict(args.optimizer_option)}
    base = _with_default_damping(base, args)
    if args.all_data:
        base["n"] = None
    if args.no_plot:
        base["plot"] = False
    base["progress"] = progress_of(args)
    return TrainConfig.from_dict(base)


DEFAULT_DAMPING = {"value": 1e-3, "scale": "max"}
"""The curvature optimizers' damping when neither the flags nor the config give one: 1e-3·λ_max(F)
of each batch, the default of ``analyze`` and ``demo`` too."""


def _with_default_damping(base: dict, args: argparse.Namespace) -> dict:
    """``optimizer_options.damping`` from ``--damping``/``--damping-scale``, else the config's, else
    :data:`DEFAULT_DAMPING` for a curvature optimizer (first-order optimizers get none)."""
    from ..optim import OPTIMIZERS

    opts = dict(base.get("optimizer_options", {}))
    if args.damping is not None or args.damping_scale is not None:
        value = args.damping if args.damping is not None else DEFAULT_DAMPING["value"]
        scale = args.damping_scale or DEFAULT_DAMPING["scale"]
        opts["damping"] = value if scale == "absolute" else {"value": value, "scale": scale}
    elif "damping" not in opts and base.get("optimizer") in OPTIMIZERS:
        opts["damping"] = dict(DEFAULT_DAMPING)
    if opts:
        base = {**base, "optimizer_options": opts}
    return base


def default_out(args: argparse.Namespace, model: str) -> Path:
    """``--out`` when not given: ``CONFIG.json`` → ``CONFIG/`` beside it, else ``runs/<model>/``
    (an import path's ``:``, ``/`` and ``.py`` made file-name safe)."""
    if args.config is not None:
        return Path(args.config).with_suffix("")
    base = model.replace(".py:", ":").replace(":", "-")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(base).name.removesuffix(".py"))
    return Path("runs") / (safe.strip("-.") or "model")


def main(args: argparse.Namespace) -> int:
    from ..train import train

    check_device(args.device)
    cfg = config_from_args(args)
    if args.out is None:
        model = cfg.model if isinstance(cfg.model, str) else cfg.model["name"]
        args.out = default_out(args, model)
    check_out_folder(args.out)
    result = train(cfg, args.out)
    d = result.description
    print(
        f"trained {d['name']} ({'width ' + format(d['width'], 'g') + ', ' if 'width' in d else ''}"
        f"{'?' if d['n_params'] is None else format(d['n_params'], ',')} parameters) on {result.config.data} "
        f"for {result.steps} steps on {result.device} in {result.wall_time:.1f} s: "
        f"loss {result.losses[0] if result.metrics else float('nan'):.4g} -> {result.final_loss:.4g}"
    )
    print(f"wrote {len(result.checkpoints)} checkpoint(s), metrics.csv, run.json to {args.out}")
    return 0
