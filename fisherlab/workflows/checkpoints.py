"""Captures from training checkpoints: ``state_dict`` files → one HDF5 run file.

The same batch is captured at every checkpoint and appended, one atomic checkpoint at a time
(:func:`fisherlab.save`); checkpoints already complete in the file are skipped, so rerunning
resumes a killed capture. State dicts are loaded with
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
from tqdm.auto import tqdm

from .. import models
from .._validate import positive_int
from ..capturing import capture
from ..errors import ConfigError, MissingFileError, StoreError
from ..runs import checkpoint_name, load_into, sidecar_step
from ..store import list_checkpoints, save

__all__ = ["capture_checkpoints", "batch_indices"]


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
    description: dict,
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
    progress: bool = True,
) -> list[str]:
    """Capture ``(inputs, targets)`` at each checkpoint of ``description``'s model into ``out``.

    Args:
        description: a model description (:func:`fisherlab.models.describe`).
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
        progress: show a progress bar.

    Returns:
        The names of the checkpoints written now.

    Raises:
        MissingFileError: a checkpoint file does not exist (before any work).
        ConfigError: two checkpoints with the same name, a checkpoint that does not load or fit.
        StoreError: ``out`` holds checkpoints captured on another batch.
    """
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

    out = Path(out)
    done: set[str] = set()
    if out.exists():
        for info in list_checkpoints(out):
            if info.complete:
                done.add(info.name)
                if idx is not None and info.batch_indices is not None and info.batch_indices != idx:
                    raise StoreError(
                        f"{out}: checkpoint '{info.name}' was captured on another batch; use the same "
                        "data and batch or another output file"
                    )
    todo = [(c, n, s) for c, (n, s) in zip(ckpts, names) if n not in done]
    for n, _ in names:
        if n in done:
            print(f"fisherlab capture: '{n}' is complete in {out}, skipped", file=sys.stderr)

    written = []
    bar = tqdm(todo, desc="capture", unit="ckpt", disable=not progress or not todo, file=sys.stderr)
    for path, name, step in bar:
        bar.set_postfix_str(name)
        model = load_into(models.build(description), path, description)
        cap = capture(
            model, inputs, targets, loss=loss, fisher=fisher, n_samples=n_samples,
            generator=torch.Generator().manual_seed(seed), device=device, dtype=dtype,
            storage=storage, model_description=description,
            meta={**(meta or {}), "checkpoint_file": str(path)},
        )
        save(cap, out, checkpoint=name, step=step, compression=compression, batch_indices=idx)
        written.append(name)
        del cap, model
    bar.close()
    return written
