"""``fisherlab capture``: per-example Jacobians of one batch at several training checkpoints → HDF5.

The same batch (recorded by its indices in the data set) is captured at every checkpoint and
appended to one run file, one atomic checkpoint at a time (:func:`fisherlab.save`). Rerunning
the same command resumes: checkpoints already complete in ``--out`` are skipped.

Checkpoint names are the file stems (``ckpt/step_001000.pt`` → ``step_001000``); the training
step is the sidecar's ``step`` (``step_001000.json``, written by ``fisherlab train``), else the
stem's trailing integer (``None`` without one). Without ``--model`` the model description is
taken from the sidecar (or the training run's ``run.json``), and without ``--data`` the data set
name and task too. State dicts are loaded with
``torch.load(path, weights_only=True, map_location="cpu")``: nothing is unpickled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .._validate import positive_int
from ..capturing import FisherMode, Loss
from ..errors import ConfigError, MissingFileError
from ..runs import checkpoint_name, describe_run, load_state_dict, run_data
from ..workflows.checkpoints import batch_indices, capture_checkpoints
from ._common import (
    FORMATTER,
    add_quiet_progress,
    check_device,
    check_out_file,
    model_arg,
    model_description,
    progress_of,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TASK_OF_LOSS = {"cross_entropy": "classification"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture",
        help="capture per-example Jacobians of one batch at training checkpoints into an HDF5 file",
        description="Capture per-example layer Jacobians of the same batch at each state_dict checkpoint "
        "and append them to one HDF5 run file (resumable: complete checkpoints are skipped).",
        formatter_class=FORMATTER,
    )
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="a model name (fisherlab.models.available(), e.g. mnist-ae), your own factory as "
                   "module:factory, module.Class or path/to/file.py:factory, or a JSON file with a model description "
                   "(default: the checkpoints' sidecar JSON written by fisherlab train)")
    p.add_argument("--width", type=float, default=None, metavar="W",
                   help="hidden-width multiplier of a built-in model (default: the sidecar's or --model's, else 1)")
    p.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="model option (JSON value), e.g. n_classes=100 (repeatable)")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="state_dict files (torch.save(model.state_dict(), ...)), captured in this order")
    p.add_argument("--data", default=None, metavar="DATA",
                   help="data set name, or your own: module:function (returning (inputs, targets) or a Dataset), "
                   "path/to/file.py:function, file.npz or file.pt with arrays x, y (default: the training run's, else the model's)")
    p.add_argument("--task", default=None, help="data task (default: classification for cross_entropy, else the set's default)")
    p.add_argument("--n", dest="n_data", type=int, default=None, metavar="N",
                   help="number of data examples to load (the batch is drawn from them; default: all)")
    p.add_argument("--n-data", dest="n_data", type=int, default=None, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--data-seed", type=int, default=0, metavar="S", help="seed of the data set (subset/generator)")
    p.add_argument("--batch-size", "-B", type=int, required=True, metavar="B", help="examples per batch")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-seed", type=int, default=0, metavar="S", help="seed of the random batch")
    batch.add_argument("--indices", type=int, nargs="+", metavar="I", help="explicit example indices (B of them)")
    p.add_argument("--loss", choices=[x.value for x in Loss], default=None, help="default: the model's loss")
    p.add_argument("--fisher", choices=[m.value for m in FisherMode], default="mc", help="Fisher mode")
    p.add_argument("--n-samples", "-K", type=int, default=1, metavar="K", help="Monte-Carlo samples per example (mc)")
    p.add_argument("--batches", type=int, default=1, metavar="N",
                   help="independent batches of --batch-size each, for intervals over batches")
    p.add_argument("--draws", type=int, default=1, metavar="D",
                   help="independent Monte-Carlo draws per batch (mc only), for intervals over draws")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (the same at every checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="capture checkpoints that are complete in --out again and replace them (default: skip them: resume)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory budget of each capture, e.g. 8GiB: a capture estimated to need more is refused in one line "
                   "before it allocates (default: the memory available on --device)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="stored dtype")
    p.add_argument("--storage", choices=["auto", "factored", "dense"], default="auto", help="per-layer storage")
    p.add_argument("--batchnorm", choices=["outside", "fisher"], default="outside",
                   help="BatchNorm's affine parameters: outside the Fisher (listed), or in it as dense "
                   "per-example-gradient layers (eval mode: running statistics)")
    p.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none",
                   help="HDF5 filter (none is fastest; lzf/gzip are several times slower to write)")
    p.add_argument("--out", "-o", default=None, metavar="FILE",
                   help="the run's HDF5 file, appended to (default: capture.h5 in the training run's folder, "
                   "i.e. next to checkpoints/, else next to the first checkpoint)")
    add_quiet_progress(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------


def default_out(checkpoints: list[Path]) -> Path:
    """``RUN/capture.h5`` for checkpoints in ``RUN/checkpoints/``, else ``capture.h5`` beside the first."""
    parent = checkpoints[0].resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "capture.h5"


def run(args: argparse.Namespace) -> int:
    from .. import datasets, models

    ckpts = [Path(c) for c in args.checkpoints]
    for c in ckpts:  # fail before any work
        if not c.is_file():
            raise MissingFileError(f"checkpoint {c}: no such file")
    check_device(args.device)
    out = check_out_file(Path(args.out) if args.out is not None else default_out(ckpts))
    memory = None
    if args.memory is not None:
        from ..planning import parse_bytes

        memory = parse_bytes(args.memory)
    opts = dict(args.model_arg)
    if args.model is not None:
        desc = model_description(args.model, args.width, opts)
    else:
        desc = describe_run(ckpts, width=args.width)
        if opts:
            desc = models.describe(desc["name"], **{**{k: v for k, v in desc.items() if k != "name"}, **opts})
    loss = args.loss or models.default_loss(desc)
    if loss is None:
        raise ConfigError(f"model '{desc['name']}' does not say its loss; pass --loss")
    side_data = run_data(ckpts)
    data_name = args.data or side_data.get("name") or models.default_data(desc)
    if data_name is None:
        raise ConfigError(f"model '{desc['name']}' has no embedded default data set; pass --data")
    task = args.task or _TASK_OF_LOSS.get(loss) or (side_data.get("task") if not args.data else None)
    data = datasets.load(data_name, n=args.n_data, seed=args.data_seed, **({"task": task} if task else {}))
    positive_int(args.batches, "--batches")
    idx = batch_indices(len(data), args.batch_size * args.batches, args.indices, args.batch_seed)
    x, y = data.batch(idx)

    dtype = _DTYPES[args.dtype]
    compression = None if args.compression == "none" else args.compression
    meta = {"data": data.describe(), "batch_seed": None if args.indices is not None else args.batch_seed}
    written = capture_checkpoints(
        desc, ckpts, x, y, out, loss=loss, fisher=args.fisher, n_samples=args.n_samples, seed=args.seed,
        indices=idx, device=args.device, dtype=dtype, storage=args.storage, compression=compression,
        meta=meta, batches=args.batches, draws=args.draws, overwrite=args.overwrite, progress=progress_of(args),
        batchnorm=args.batchnorm, memory=memory,
    )
    print(f"fisherlab capture: {out}: {len(written)} checkpoint(s) written, {len(ckpts) - len(written)} already complete")
    return 0


__all__ = ["register", "run", "model_description", "default_out", "checkpoint_name", "load_state_dict", "batch_indices"]
