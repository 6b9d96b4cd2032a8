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

import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from ..io.progress import tqdm

from .. import models
from .._validate import positive_int
from ..capturing import capture
from ..errors import ConfigError, MissingFileError, StoreError
from ..runs import checkpoint_name, load_into, sidecar_step
from ..store import list_checkpoints, save

__all__ = ["capture_checkpoints", "batch_indices", "sample_name"]


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
    description: dict | str,
    checkpoints: Sequence[str | Path],
    inputs: Tensor,
    targets: Tensor,
    out: str | Path,
    *,
    loss: str,
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
) -> list[str]:
    """Capture ``(inputs, targets)`` at each checkpoint of ``description``'s model into ``out``.

    Args:
        description: a model description (:func:`fisherlab.models.describe`), also of your own
            model (``models.describe("mymodels:factory", ...)``, or a name registered with
            :func:`fisherlab.models.register`), or a bare name / import path; it is recorded in
            the file, so the file says how to rebuild the model.
        checkpoints: ``state_dict`` files; the checkpoint names are their stems, which must differ.
        inputs, targets: the batch (the same at every checkpoint).
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

    Returns:
        The names of the checkpoints written now.

    Raises:
        MissingFileError: a checkpoint file does not exist (before any work).
        ConfigError: two checkpoints with the same name, a checkpoint that does not load or fit.
        StoreError: ``out`` holds checkpoints captured on another batch.
    """
    if not isinstance(description, dict):
        description = models.describe(description)
    ckpts = [Path(c) for c in checkpoints]
    for c in ckpts:  # fail before any work
        if not c.is_file():
            raise MissingFileError(f"checkpoint {c}: no such file")
    names: list[tuple[str, int | None]] = []
    for i, c in enumerate(ckpts):
        name = checkpoint_name(c)[0]
        names.append((name, steps[i] if steps is not None else sidecar_step(c)))
    dup = {n for n, _ in names if [m for m, _ in names].count(n) > 1}
    if dup:
        raise ConfigError(f"checkpoints: several files give the checkpoint name {sorted(dup)[0]!r} (names are file stems)")
    idx = None if indices is None else [int(i) for i in indices]
    positive_int(batches, "batches")
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

    written = []
    bar = tqdm(total=len(todo), desc="capture", unit="sample", disable=not progress or not todo, file=sys.stderr)
    model, loaded = None, None
    for stored, name, b, d in todo:
        path, step = by_name[name]
        bar.set_postfix_str(stored)
        if loaded != name:
            model, loaded = load_into(models.build(description), path, description), name
            model.eval()  # a checkpoint's Fisher: running statistics (capture's docstring)
        sample = {"of": name, "batch": b, "draw": d, "batches": batches, "draws": draws}
        cap = capture(
            model, inputs[rows(b)], targets[rows(b)], loss=loss, fisher=fisher, n_samples=n_samples,
            generator=torch.Generator().manual_seed(seed + d), device=device, dtype=dtype,
            storage=storage, model_description=description, batchnorm=batchnorm,
            meta={**(meta or {}), "checkpoint_file": str(path), **({"sample": sample} if len(samples) > len(names) else {})},
        )
        save(cap, out, checkpoint=stored, step=step, compression=compression, batch_indices=expected[stored],
             overwrite=overwrite)
        written.append(stored)
        del cap
        bar.update(1)
    bar.close()
    return written
