"""A training run's folder: its checkpoints, their JSON sidecars, and loading them back.

:func:`fisherlab.train.train` writes, into a run folder::

    run.json                      model description, run config, data summary, checkpoint list
    checkpoints/step_000100.pt    model.state_dict() after 100 updates
    checkpoints/step_000100.json  its sidecar: step, epoch, loss, file, model description, config, data

This module is the one place that knows those names: :func:`checkpoint_path` and
:func:`save_state_dict` / :func:`write_sidecar` (the writer's side), :func:`checkpoint_name`,
:func:`sidecar`, :func:`load_state_dict`, :func:`load_checkpoint` and :func:`describe_run`
(the reader's side: ``fisherlab capture`` and :func:`fisherlab.workflows.capture_checkpoints`).
State dicts are loaded with ``torch.load(path, weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import models
from .errors import ConfigError, MissingFileError
from .io.tables import write_json

__all__ = [
    "RUN_JSON",
    "CHECKPOINT_DIR",
    "checkpoint_path",
    "save_state_dict",
    "write_sidecar",
    "checkpoint_name",
    "sidecar",
    "load_state_dict",
    "load_checkpoint",
    "describe_run",
]

RUN_JSON = "run.json"
"""The run's summary, in the run folder."""

CHECKPOINT_DIR = "checkpoints"
"""The folder of the ``.pt`` checkpoints and their sidecars, in the run folder."""

_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


# ---- writing ---------------------------------------------------------------------------------


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/step_000100.pt`` for step 100."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:06d}.pt"


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """``model.state_dict()`` (on the CPU) to ``path``, atomically (``<path>.tmp`` then a move)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path


def write_sidecar(checkpoint: str | os.PathLike, info: dict) -> Path:
    """The sidecar ``<stem>.json`` of a checkpoint file (atomically)."""
    return write_json(info, Path(checkpoint).with_suffix(".json"))


# ---- reading ---------------------------------------------------------------------------------


def checkpoint_name(path: str | os.PathLike) -> tuple[str, int | None]:
    """``step-1000.pt`` → (``"step-1000"``, 1000); no trailing integer → step ``None``."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = re.search(r"(\d+)$", name)
    return name, (int(m.group(1)) if m else None)


def sidecar(path: str | os.PathLike) -> dict:
    """The JSON written next to a ``fisherlab train`` checkpoint (``<stem>.json``, else the run's
    ``../run.json``); ``{}`` when there is none.

    Raises:
        ConfigError: a sidecar that is not valid JSON.
    """
    path = Path(path)
    for side in (path.with_suffix(".json"), path.parent.parent / RUN_JSON):
        if side.is_file():
            try:
                obj = json.loads(side.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"checkpoint {path}: unreadable sidecar {side} ({err})") from None
            if isinstance(obj, dict):
                return obj
    return {}


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict, never unpickling (``weights_only=True``); ``{"state_dict": …}``/``{"model": …}`` unwrapped.

    Raises:
        MissingFileError: no such file.
        ConfigError: not loadable with ``weights_only=True``, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path}: no such file")
    try:
        obj: Any = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"checkpoint {path}: cannot load a state_dict with weights_only=True ({msg})") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"checkpoint {path}: not a state_dict (a dict of tensors)")
    return obj


def load_into(model: nn.Module, path: str | os.PathLike, description: dict | None = None) -> nn.Module:
    """Load the state_dict of ``path`` into ``model`` (strictly); returns the model.

    Raises:
        ConfigError: the state_dict does not fit the model (naming ``description``'s model).
    """
    sd = load_state_dict(path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        name = (description or {}).get("name", type(model).__name__)
        raise ConfigError(f"checkpoint {path}: does not fit model '{name}' ({str(err).splitlines()[0]})") from None
    return model


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint written by :func:`fisherlab.train.train` and load its weights.

    Args:
        path: a ``step_XXXXXX.pt`` file; its sidecar ``step_XXXXXX.json`` (or the run's
            ``run.json`` one folder up) gives the model description.
        map_location: where to load the tensors.

    Returns:
        ``(model in eval mode, sidecar dict)`` (from ``run.json``: ``{"model": …}`` only).

    Raises:
        MissingFileError: no checkpoint file, or no sidecar with a model description.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"checkpoint not found: {p}")
    side = p.with_suffix(".json")
    info = sidecar(p)
    if not isinstance(info.get("model"), dict):
        raise MissingFileError(f"checkpoint {p}: no sidecar {side.name} or {RUN_JSON} with the model description")
    if not side.is_file():
        info = {"model": info["model"]}
    model = models.build(info["model"])
    model.load_state_dict(torch.load(p, map_location=map_location, weights_only=True))
    model.eval()
    return model, info


def describe_run(checkpoints: Sequence[str | os.PathLike], *, width: float | None = None) -> dict:
    """The model description that ``fisherlab train`` recorded in the checkpoints' sidecars.

    Args:
        checkpoints: checkpoint files, each with a sidecar (or a run's ``run.json``).
        width: replaces the description's width multiplier.

    Raises:
        ConfigError: a checkpoint without a model description in its sidecar, or sidecars that
            describe different models.
    """
    found = [s["model"] for s in map(sidecar, checkpoints) if isinstance(s.get("model"), dict)]
    if not found or len(found) != len(checkpoints):
        raise ConfigError("--model is required: the checkpoints have no sidecar JSON with a model description")
    if any(f != found[0] for f in found[1:]):
        raise ConfigError("the checkpoints' sidecars describe different models; pass --model or capture them separately")
    opts = {k: v for k, v in found[0].items() if k != "name"}
    if width is not None:
        opts["width"] = width
    return models.describe(found[0]["name"], **opts)


def run_data(checkpoints: Sequence[str | os.PathLike]) -> dict:
    """The data summary (``name``, ``task``, …) in the first checkpoint's sidecar; ``{}`` without one."""
    data = sidecar(checkpoints[0]).get("data") if checkpoints else None
    return data if isinstance(data, dict) else {}


def sidecar_step(path: str | os.PathLike) -> int | None:
    """The training step of a checkpoint: its sidecar's ``step`` (when the sidecar names this
    file), else the file stem's trailing integer, else ``None``."""
    side = sidecar(path)
    if isinstance(side.get("step"), int) and side.get("file") == Path(path).name:
        return side["step"]
    return checkpoint_name(path)[1]


__all__ += ["load_into", "sidecar_step", "run_data"]
