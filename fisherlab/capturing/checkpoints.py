"""Captures from training checkpoints: ``state_dict`` files → one HDF5 run file.

The same batch is captured at every checkpoint and appended, one atomic checkpoint at a time
(:func:`fisherlab.save`); checkpoints already complete in the file are skipped, so rerunning
resumes a killed capture. State dicts are loaded with
``torch.load(path, weights_only=True, map_location="cpu")``: nothing is unpickled.

Used by ``fisherlab capture`` and ``fisherlab demo``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import StoreError
from .run import capture

__all__ = ["capture_checkpoints", "checkpoint_name", "sidecar", "load_state_dict", "batch_indices"]


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
    """
    from .. import models
    from ..store import list_checkpoints, save

    ckpts = [Path(c) for c in checkpoints]
    for c in ckpts:  # fail before any work
        if not c.is_file():
            raise ValueError(f"checkpoint {c}: no such file")
    names: list[tuple[str, int | None]] = []
    for i, c in enumerate(ckpts):
        name, step = checkpoint_name(c)
        side = sidecar(c)
        if isinstance(side.get("step"), int) and side.get("file") == c.name:
            step = side["step"]
        if steps is not None:
            step = steps[i]
        names.append((name, step))
    dup = {n for n, _ in names if [m for m, _ in names].count(n) > 1}
    if dup:
        raise ValueError(f"checkpoints: several files give the checkpoint name {sorted(dup)[0]!r} (names are file stems)")
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

    from tqdm.auto import tqdm

    written = []
    bar = tqdm(todo, desc="capture", unit="ckpt", disable=not progress or not todo, file=sys.stderr)
    for path, name, step in bar:
        bar.set_postfix_str(name)
        model = models.build(description)
        sd = load_state_dict(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"checkpoint {path}: does not fit model '{description['name']}' ({str(err).splitlines()[0]})"
            ) from None
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
