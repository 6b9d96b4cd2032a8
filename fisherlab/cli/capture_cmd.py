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
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .. import store
from ..capturing import FisherMode, Loss, capture
from ..errors import StoreError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TASK_OF_LOSS = {"cross_entropy": "classification"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture",
        help="capture per-example Jacobians of one batch at training checkpoints into an HDF5 file",
        description="Capture per-example layer Jacobians of the same batch at each state_dict checkpoint "
        "and append them to one HDF5 run file (resumable: complete checkpoints are skipped).",
    )
    p.add_argument("--model", default=None, metavar="DESC",
                   help="a model name (see fisherlab.models, e.g. mnist-ae) or a JSON file with a model description "
                   "(default: the checkpoints' sidecar JSON written by fisherlab train)")
    p.add_argument("--width", type=float, default=None, help="hidden-width multiplier for a model given by name")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="state_dict files (torch.save(model.state_dict(), ...)), captured in this order")
    p.add_argument("--data", default=None, metavar="NAME", help="data set name (default: the model's default data)")
    p.add_argument("--task", default=None, help="data task (default: classification for cross_entropy, else the set's default)")
    p.add_argument("--n-data", type=int, default=None, metavar="N", help="examples to load from the data set (default: all)")
    p.add_argument("--data-seed", type=int, default=0, metavar="S", help="seed of the data set (subset/generator)")
    p.add_argument("--batch-size", "-B", type=int, required=True, metavar="B")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-seed", type=int, default=0, metavar="S", help="seed of the random batch (default 0)")
    batch.add_argument("--indices", type=int, nargs="+", metavar="I", help="explicit example indices (B of them)")
    p.add_argument("--loss", choices=[x.value for x in Loss], default=None, help="default: the model's loss")
    p.add_argument("--fisher", choices=[m.value for m in FisherMode], default="mc")
    p.add_argument("--n-samples", "-K", type=int, default=1, metavar="K", help="Monte-Carlo samples per example (mc)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (the same at every checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    p.add_argument("--storage", choices=["auto", "factored", "dense"], default="auto")
    p.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none",
                   help="HDF5 filter (default none: fastest; lzf/gzip are several times slower to write)")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="the run's HDF5 file (appended to)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------


def model_description(spec: str, width: float | None) -> dict:
    """``--model``: a JSON file holding a description, or a model name (+ ``--width``)."""
    from .. import models

    path = Path(spec)
    if path.suffix != ".json" and not path.is_file():
        return models.describe(spec, **({} if width is None else {"width": width}))
    if not path.is_file():
        raise ValueError(f"--model {spec}: no such file")
    try:
        desc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--model {spec}: not valid JSON ({err})") from None
    if not isinstance(desc, dict) or "name" not in desc:
        raise ValueError(f"--model {spec}: a model description is a JSON object with a 'name'")
    if width is not None:
        desc = {**desc, "width": width}
    return models.describe(desc["name"], **{k: v for k, v in desc.items() if k != "name"})


def checkpoint_name(path: Path) -> tuple[str, int | None]:
    """``step-1000.pt`` → (``"step-1000"``, 1000); no trailing integer → step ``None``."""
    name = path.name
    for suffix in (".pt", ".pth", ".ckpt", ".bin"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = re.search(r"(\d+)$", name)
    return name, (int(m.group(1)) if m else None)


def sidecar(path: Path) -> dict:
    """The JSON written next to a ``fisherlab train`` checkpoint (``<stem>.json``, else ``../run.json``); ``{}``."""
    for side in (path.with_suffix(".json"), path.parent.parent / "run.json"):
        if side.is_file():
            try:
                obj = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"checkpoint {path}: unreadable sidecar {side} ({err})") from None
            if isinstance(obj, dict):
                return obj
    return {}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict, never unpickling (``weights_only=True``); ``{"state_dict": …}``/``{"model": …}`` unwrapped."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        obj: Any = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path}: cannot load a state_dict with weights_only=True ({msg})") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path}: not a state_dict (a dict of tensors)")
    return obj


def batch_indices(n: int, B: int, indices: list[int] | None, seed: int) -> list[int]:
    """The batch: ``indices`` as given (checked), or B distinct indices drawn with ``seed``."""
    if B < 1:
        raise ValueError(f"--batch-size must be >= 1, got {B}")
    if indices is not None:
        if len(indices) != B:
            raise ValueError(f"--indices gives {len(indices)} indices but --batch-size is {B}")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"--indices {bad[0]} is out of range for a data set of {n} examples")
        return list(indices)
    if B > n:
        raise ValueError(f"--batch-size {B} exceeds the data set's {n} examples")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:B].tolist()


def run(args: argparse.Namespace) -> int:
    from .. import datasets, models
    from ..store import save

    ckpts = [Path(c) for c in args.checkpoints]
    for c in ckpts:  # fail before any work
        if not c.is_file():
            raise ValueError(f"checkpoint {c}: no such file")
    sides = [sidecar(c) for c in ckpts]
    if args.model is not None:
        desc = model_description(args.model, args.width)
    else:
        found = [s["model"] for s in sides if isinstance(s.get("model"), dict)]
        if len(found) != len(ckpts):
            raise ValueError("--model is required: the checkpoints have no sidecar JSON with a model description")
        desc = models.describe(found[0]["name"], **{k: v for k, v in found[0].items() if k != "name"})
        if any(f != found[0] for f in found[1:]):
            raise ValueError("the checkpoints' sidecars describe different models; pass --model or capture them separately")
        if args.width is not None:
            desc = models.describe(desc["name"], **{**{k: v for k, v in desc.items() if k != "name"}, "width": args.width})
    loss = args.loss or models.default_loss(desc)
    side_data = sides[0].get("data") if isinstance(sides[0].get("data"), dict) else {}
    data_name = args.data or side_data.get("name") or models.default_data(desc)
    if data_name is None:
        raise ValueError(f"model '{desc['name']}' has no embedded default data set; pass --data")
    task = args.task or _TASK_OF_LOSS.get(loss) or (side_data.get("task") if not args.data else None)
    data = datasets.load(data_name, n=args.n_data, seed=args.data_seed, **({"task": task} if task else {}))
    idx = batch_indices(len(data), args.batch_size, args.indices, args.batch_seed)
    x, y = data.batch(idx)

    names = []
    for c, side in zip(ckpts, sides):
        name, step = checkpoint_name(c)
        if isinstance(side.get("step"), int) and side.get("file") == c.name:
            step = side["step"]
        names.append((name, step))
    dup = {n for n, _ in names if [m for m, _ in names].count(n) > 1}
    if dup:
        raise ValueError(f"--checkpoints: several files give the checkpoint name {sorted(dup)[0]!r} (names are file stems)")

    out = Path(args.out)
    done: set[str] = set()
    if out.exists():
        for info in store.list_checkpoints(out):
            if info.complete:
                done.add(info.name)
                if info.batch_indices is not None and info.batch_indices != idx:
                    raise StoreError(
                        f"{out}: checkpoint '{info.name}' was captured on another batch; use the same "
                        "--data/--batch-size/--batch-seed/--indices or another --out"
                    )

    dtype = _DTYPES[args.dtype]
    compression = None if args.compression == "none" else args.compression
    meta_common = {
        "data": data.describe(),
        "batch_seed": None if args.indices is not None else args.batch_seed,
    }
    todo = [(c, n, s) for c, (n, s) in zip(ckpts, names) if n not in done]
    for c, (n, _) in zip(ckpts, names):
        if n in done:
            print(f"fisherlab capture: '{n}' is complete in {out}, skipped", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(todo, desc="capture", unit="ckpt", disable=args.quiet or not todo, file=sys.stderr)
    for path, name, step in bar:
        bar.set_postfix_str(name)
        model = models.build(desc)
        sd = load_state_dict(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {path}: does not fit model '{desc['name']}' ({str(err).splitlines()[0]})") from None
        cap = capture(
            model, x, y, loss=loss, fisher=args.fisher, n_samples=args.n_samples,
            generator=torch.Generator().manual_seed(args.seed), device=args.device, dtype=dtype,
            storage=args.storage, model_description=desc,
            meta={**meta_common, "checkpoint_file": str(path)},
        )
        save(cap, out, checkpoint=name, step=step, compression=compression, batch_indices=idx)
        del cap, model
    bar.close()
    print(f"fisherlab capture: {out}: {len(todo)} checkpoint(s) written, {len(done)} already complete")
    return 0


__all__ = ["register", "run", "model_description", "checkpoint_name", "load_state_dict", "batch_indices"]
