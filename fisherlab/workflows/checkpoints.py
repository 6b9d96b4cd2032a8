"""Captures from training checkpoints: ``state_dict`` files → one HDF5 run file.

The same batch is captured at every checkpoint and appended, one atomic checkpoint at a time
(:func:`fisherlab.save`); checkpoints already complete in the file are skipped, so rerunning
resumes a killed capture.

One batch is one sample: with ``batches=n`` (``fisherlab capture --batches n``) the inputs hold
n disjoint batches of equal size, and with ``draws=d`` (``mc`` only) each batch is captured with
d independent Monte-Carlo draws. Each (batch, draw) is stored as its own checkpoint,
``<name>.b<i>d<j>``, whose metadata ``sample = {"of": <name>, "batch": i, "draw": j, ...}``
groups it with its siblings; :func:`fisherlab.metrics.compare_file` reports every column of a
checkpoint as a mean with a 95 % interval over its samples. State dicts are loaded with
``torch.load(path, weights_only=True, map_location="cpu")`` (:mod:`fisherlab.runs`): nothing is
unpickled.

Used by ``fisherlab capture`` and ``fisherlab demo``.
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .. import models
from .._validate import positive_int
from ..capturing import capture
from ..errors import ConfigError, FisherlabError, MissingFileError, StoreError
from ..io.progress import tqdm
from ..runs import checkpoint_name, load_into, sidecar_step
from ..store import list_checkpoints, save

__all__ = ["capture_checkpoints", "batch_indices", "sample_name", "describe_module", "batches_of", "CURRENT"]

CURRENT = "current"
"""The checkpoint name of an ``nn.Module`` captured as it is (``checkpoints=None``)."""


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) or inspect.isfunction(obj) else type(obj)
    return f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', type(cls).__name__)}"


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_module(model: nn.Module, options: dict | None = None) -> tuple[dict, bool]:
    """How a capture file records an ``nn.Module`` instance: ``(description, rebuildable)``.

    The description names the instance's class by import path (``"factory": {"module", "attr"}``)
    with its keyword arguments as JSON: ``options`` when given, else the constructor's defaults.
    It is *rebuildable* when that class is importable and, built on the meta device with those
    arguments, has the instance's parameter and buffer shapes (checked; nothing is allocated).
    Otherwise the description records the class path with ``"rebuildable": false``: the file
    cannot rebuild the model (its Jacobians are complete all the same). Never a pickle.
    """
    opts = dict(options or {})
    bad = [k for k, v in opts.items() if not models._jsonable(v)]
    if bad:
        raise ConfigError(f"model_options: {bad[0]!r} is not JSON-able; only JSON values describe a model")
    source = models._importable(type(model))
    if source is not None:
        try:
            d = models.describe(f"{source['module']}:{source['attr']}", **opts)
            with torch.device("meta"):
                twin = models._make(d)
            if _shapes(twin) == _shapes(model):
                return d, True
        except Exception:  # not importable, or not buildable from these arguments
            pass
    d = {"name": _class_path(model), **opts, "rebuildable": False,
         "n_params": sum(p.numel() for p in model.parameters())}
    return d, False


def _description_of(model: Any, options: dict | None) -> tuple[dict, nn.Module | None]:
    """``(description, instance)`` of a description / name / import path, a factory, or an
    ``nn.Module`` instance (``instance`` is ``None`` unless one was given or had to be built)."""
    if isinstance(model, nn.Module):
        d, ok = describe_module(model, options)
        if not ok:
            warnings.warn(
                f"capture_checkpoints: the file records the model's class {d['name']} but cannot rebuild it "
                "from that (constructor arguments unknown, or the class is not importable; pass model_options={...})",
                UserWarning, stacklevel=3,
            )
        return d, model
    if isinstance(model, dict):
        if options:
            model = {**model, **options}
        return models._normalise(model), None
    if isinstance(model, str):
        return models.describe(model, **(options or {})), None
    if callable(model):  # a factory: a function or an nn.Module class
        source = models._importable(model)
        if source is None:
            built = model(**(options or {}))
            if not isinstance(built, nn.Module):
                raise ConfigError(f"model factory {_class_path(model)} returned a {type(built).__name__}, not an nn.Module")
            return _description_of(built, options)
        return models.describe(f"{source['module']}:{source['attr']}", **(options or {})), None
    raise ConfigError(f"model must be an nn.Module, a factory, a name or a description, got {type(model).__name__}")


def batches_of(loader: Iterable, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` batches ``(x, y)`` of a ``DataLoader`` (any iterable of pairs), stacked
    along the example axis: ``[n·B, ...]`` inputs and targets. The n batches must have one size
    B (``drop_last=True`` drops a short last one).

    Raises:
        ConfigError: fewer than ``n`` batches, unequal sizes, or items that are not (x, y) tensors.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for item in loader:
        if len(xs) == n:
            break
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ConfigError(f"data loader: batch {len(xs)} is a {type(item).__name__}, not (inputs, targets)")
        x, y = item[0], item[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ConfigError(f"data loader: batch {len(xs)} holds {type(x).__name__}/{type(y).__name__}, not tensors")
        if xs and x.shape[0] != xs[0].shape[0]:
            raise ConfigError(
                f"data loader: batch {len(xs)} has {x.shape[0]} examples, batch 0 has {xs[0].shape[0]} "
                "(the captured batches have one size; use drop_last=True)"
            )
        xs.append(x)
        ys.append(y)
    if len(xs) < n:
        raise ConfigError(f"data loader: {len(xs)} batch(es), {n} needed (batches={n})")
    return torch.cat(xs), torch.cat(ys)


def _check_fit(model: nn.Module, description: dict, x: Tensor) -> None:
    """One example through the model before any capture: data that do not fit it (a shape
    mismatch) give one line naming both shapes, not a traceback from inside the forward."""
    name = description.get("name", type(model).__name__)
    want = description.get("input_shape")
    if want:
        numel = 1
        for s in want:
            numel *= int(s)
        if x[0].numel() != numel:
            raise ConfigError(
                f"the data's examples have shape {list(x.shape[1:])}, model '{name}' takes {list(want)}: "
                "the data do not fit the model"
            )
    ref = next(model.parameters(), None)
    try:
        with torch.no_grad():
            model(x[:1].to(device=ref.device if ref is not None else None,
                           dtype=ref.dtype if ref is not None and x.is_floating_point() else None))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the data (examples of shape {list(x.shape[1:])}) do not fit model '{name}': {msg}") from None


def sample_name(checkpoint: str, batch: int, draw: int, batches: int, draws: int) -> str:
    """The stored name of one sample of ``checkpoint`` (the name itself for a single sample)."""
    return checkpoint if batches == draws == 1 else f"{checkpoint}.b{batch}d{draw}"


def batch_indices(n: int, B: int, indices: Sequence[int] | None, seed: int) -> list[int]:
    """The batch: ``indices`` as given (checked), or B distinct indices of ``range(n)`` drawn with ``seed``.

    Raises:
        ConfigError: ``B < 1``, ``len(indices) != B``, an index out of range, or ``B > n``.
    """
    positive_int(B, "--batch-size")
    if indices is not None:
        if len(indices) != B:
            raise ConfigError(f"--indices gives {len(indices)} indices but --batch-size is {B}")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ConfigError(f"--indices {bad[0]} is out of range for a data set of {n} examples")
        return list(indices)
    if B > n:
        raise ConfigError(f"--batch-size {B} exceeds the data set's {n} examples")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:B].tolist()


def capture_checkpoints(
    description: dict | str | nn.Module | Callable[..., nn.Module] | None = None,
    checkpoints: Sequence[str | Path] | None = None,
    inputs: Tensor | Iterable | None = None,
    targets: Tensor | None = None,
    out: str | Path | None = None,
    *,
    model: dict | str | nn.Module | Callable[..., nn.Module] | None = None,
    model_options: dict | None = None,
    loss: str | None = None,
    fisher: str = "mc",
    n_samples: int = 1,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    steps: Sequence[int | None] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    storage: str = "auto",
    compression: str | None = None,
    meta: dict | None = None,
    batches: int = 1,
    draws: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    batchnorm: str = "outside",
    memory: int | str | None = None,
) -> list[str]:
    """Capture ``(inputs, targets)`` at each checkpoint of ``description``'s model into ``out``.

    Args:
        description: the model (also as ``model=``): a description
            (:func:`fisherlab.models.describe`), a name (built-in, registered with
            :func:`fisherlab.models.register`, or an import path ``"mymodels:factory"``), a
            factory (a function or ``nn.Module`` class; its keyword arguments ``model_options``),
            or an ``nn.Module`` instance. The file records how to rebuild it: an import path and
            JSON keyword arguments, never a pickle. For an instance: its class's import path with
            ``model_options`` (else the constructor's defaults) when that builds the instance's
            shapes, else the class path marked ``"rebuildable": false`` (and a warning says so).
        checkpoints: ``state_dict`` files, loaded into the model; the checkpoint names are their
            stems, which must differ. ``None`` with an instance: the instance as it is, one
            checkpoint named ``"current"``.
        inputs, targets: the batch (the same at every checkpoint) as tensors; or ``inputs`` a
            ``DataLoader`` (any iterable of ``(x, y)``) and ``targets`` ``None``: its first
            ``batches`` batches are the captured batches (:func:`batches_of`).
        model_options: keyword arguments of a factory or an instance's class (JSON values).
        out: the HDF5 run file, appended to; complete checkpoints are skipped (resume).
        loss, fisher, n_samples: as in :func:`fisherlab.capture`; ``seed`` seeds the MC draws
            identically at every checkpoint.
        indices: the batch's indices in its data set (recorded; a file captured on another
            batch is refused).
        steps: training steps of the checkpoints (default: the sidecar's, else the stem's
            trailing integer).
        device, dtype, storage, compression: capture and store options.
        meta: metadata stored with every checkpoint.
        batches: independent batches in ``inputs`` (split evenly, in order; ``indices`` likewise).
        draws: Monte-Carlo draws per batch (``fisher="mc"`` only; draw j uses seed ``seed + j``).
        overwrite: capture checkpoints that are complete in ``out`` again and replace them
            (default: skip them, which resumes a stopped run).
        progress: show a progress bar.
        batchnorm: ``"outside"`` or ``"fisher"`` (BatchNorm's γ, β join the Fisher), as in
            :func:`fisherlab.capture`. The checkpoints are captured in eval mode (BatchNorm with
            its running statistics: a per-example Fisher).
        memory: the bytes (or ``"8GiB"``) each capture may allocate; a capture estimated to need
            more is refused before it allocates (:func:`fisherlab.capture`'s ``memory``).

    Returns:
        The names of the checkpoints written now.

    Raises:
        MissingFileError: a checkpoint file does not exist (before any work).
        ConfigError: two checkpoints with the same name, a checkpoint that does not load or fit.
        StoreError: ``out`` holds checkpoints captured on another batch.
    """
    if (description is None) == (model is None):
        raise ConfigError("capture_checkpoints: give the model once (description or model=)")
    if out is None:
        raise ConfigError("capture_checkpoints: out (the HDF5 run file) is required")
    if loss is None:
        raise ConfigError("capture_checkpoints: loss is required ('cross_entropy', 'mse' or 'bce_logits')")
    description, instance = _description_of(model if model is not None else description, model_options)
    if memory is not None:
        from ..planning import parse_bytes

        memory = parse_bytes(memory)
    positive_int(batches, "batches")
    if inputs is not None and not isinstance(inputs, Tensor):
        if targets is not None:
            raise ConfigError("capture_checkpoints: with a data loader as inputs, targets must be None")
        inputs, targets = batches_of(inputs, batches)
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ConfigError("capture_checkpoints: inputs and targets must be tensors (or inputs a DataLoader)")
    if checkpoints is None:
        if instance is None:
            raise ConfigError("capture_checkpoints: checkpoints (state_dict files) are required unless the model is an nn.Module")
        ckpts: list[Path | None] = [None]
    else:
        ckpts = [Path(c) for c in checkpoints]
        if not ckpts:
            raise ConfigError("capture_checkpoints: no checkpoints given")
    for c in ckpts:  # fail before any work
        if c is not None and not c.is_file():
            raise MissingFileError(f"checkpoint {c}: no such file")
    names: list[tuple[str, int | None]] = []
    for i, c in enumerate(ckpts):
        name = CURRENT if c is None else checkpoint_name(c)[0]
        names.append((name, steps[i] if steps is not None else (None if c is None else sidecar_step(c))))
    dup = {n for n, _ in names if [m for m, _ in names].count(n) > 1}
    if dup:
        raise ConfigError(f"checkpoints: several files give the checkpoint name {sorted(dup)[0]!r} (names are file stems)")
    idx = None if indices is None else [int(i) for i in indices]
    positive_int(draws, "draws")
    if draws > 1 and fisher != "mc":
        raise ConfigError(f"draws = {draws}: only the mc Fisher draws samples (fisher = '{fisher}' is deterministic)")
    if inputs.shape[0] % batches:
        raise ConfigError(f"{inputs.shape[0]} examples do not split into {batches} batches of equal size")
    size = inputs.shape[0] // batches
    samples = [  # (stored name, checkpoint, batch, draw)
        (sample_name(n, b, d, batches, draws), n, b, d) for n, _ in names for b in range(batches) for d in range(draws)
    ]

    def rows(b: int) -> slice:
        return slice(b * size, (b + 1) * size)

    out = Path(out)
    done: set[str] = set()
    expected = {s: None if idx is None else idx[rows(b)] for s, _, b, _ in samples}
    allowed = {tuple(v) for v in expected.values() if v is not None}  # a run file holds one set of batches
    if out.exists():
        for info in list_checkpoints(out):
            if info.complete:
                done.add(info.name)
                want = expected.get(info.name)
                other = info.batch_indices is not None and (
                    info.batch_indices != want if want is not None else bool(allowed) and tuple(info.batch_indices) not in allowed
                )
                if other:
                    raise StoreError(
                        f"{out}: checkpoint '{info.name}' was captured on another batch; use the same "
                        "data and batch or another output file"
                    )
    if overwrite:
        done = set()
    for s, *_ in samples:
        if s in done:
            print(f"fisherlab capture: '{s}' is complete in {out}, skipped", file=sys.stderr)
    by_name = {n: (c, st) for c, (n, st) in zip(ckpts, names)}
    todo = [x for x in samples if x[0] not in done]

    def load(path: Path | None) -> nn.Module:
        if path is None:
            return instance
        net = copy.deepcopy(instance) if instance is not None else models.build(description)
        return load_into(net, path, description)

    modes = None if instance is None else [m.training for m in instance.modules()]
    written = []
    bar = tqdm(total=len(todo), desc="capture", unit="sample", disable=not progress or not todo, file=sys.stderr)
    net, loaded, checked = None, None, False
    try:
        for stored, name, b, d in todo:
            path, step = by_name[name]
            bar.set_postfix_str(stored)
            if loaded != name:
                net, loaded = load(path), name
                net.eval()  # a checkpoint's Fisher: running statistics (capture's docstring)
            if not checked:
                _check_fit(net, description, inputs)
                checked = True
            sample = {"of": name, "batch": b, "draw": d, "batches": batches, "draws": draws}
            try:
                cap = capture(
                    net, inputs[rows(b)], targets[rows(b)], loss=loss, fisher=fisher, n_samples=n_samples,
                    generator=torch.Generator().manual_seed(seed + d), device=device, dtype=dtype,
                    storage=storage, model_description=description, batchnorm=batchnorm, memory=memory,
                    meta={**(meta or {}), **({"checkpoint_file": str(path)} if path is not None else {}),
                          **({"sample": sample} if len(samples) > len(names) else {})},
                )
            except FisherlabError:
                raise
            except ValueError as err:  # capture's own checks of the data against the model and loss
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ConfigError(f"checkpoint '{name}': {msg}") from None
            save(cap, out, checkpoint=stored, step=step, compression=compression, batch_indices=expected[stored],
                 overwrite=overwrite)
            written.append(stored)
            del cap
            bar.update(1)
    finally:
        bar.close()
        if modes is not None:  # the caller's module keeps its own train/eval flags
            for m, t in zip(instance.modules(), modes):
                m.training = t
    return written
