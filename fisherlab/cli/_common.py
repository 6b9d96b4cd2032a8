"""What every subcommand shares: the help formatter, ``--quiet``/``--progress``, ``--model``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError, MissingFileError

__all__ = [
    "FORMATTER", "add_quiet_progress", "progress_of", "model_arg", "model_description",
    "check_device", "check_out_folder", "check_out_file",
]


class FORMATTER(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (``(default: …)``), except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default == [] or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help or ""
        if isinstance(action.default, (list, tuple)) and "%(default)" not in (action.help or ""):
            return f"{action.help or ''} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def add_quiet_progress(parser: argparse.ArgumentParser, *, tables: bool = False) -> None:
    """``--quiet/-q`` (no progress bar, no tables) and ``--progress/--no-progress`` (default:
    a bar only when stderr is a terminal, so that logs get no carriage returns)."""
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar" + (" and no tables" if tables else ""))
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="force the progress bar on or off (default: on when stderr is a terminal, unless --quiet)")


def progress_of(args: argparse.Namespace) -> bool:
    """The progress decision for ``args`` (see :func:`add_quiet_progress`)."""
    from ..io.progress import want_progress

    return want_progress(getattr(args, "progress", None), getattr(args, "quiet", False))


def model_arg(text: str) -> tuple[str, object]:
    """``key=value`` with ``value`` parsed as JSON when possible (``n_classes=100``, ``batchnorm=false``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def model_description(spec: str, width: float | None = None, options: dict | None = None) -> dict:
    """``--model``: a registered name, your own factory (``module:factory``, ``module.Class``,
    ``path/to/file.py:factory``), or a JSON file holding a description; ``--width`` and
    ``--model-arg`` options on top."""
    from .. import models

    opts = dict(options or {})
    if width is not None:
        opts["width"] = width
    path = Path(spec)
    if path.suffix != ".json":
        return models.describe(spec, **opts)
    if not path.is_file():
        raise MissingFileError(f"--model {spec}: no such file")
    try:
        desc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model {spec}: not valid JSON ({err})") from None
    if not isinstance(desc, dict) or "name" not in desc:
        raise ConfigError(f"--model {spec}: a model description is a JSON object with a 'name'")
    return models.describe(desc["name"], **{**{k: v for k, v in desc.items() if k != "name"}, **opts})


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``--device``: a torch device that exists here (one line otherwise, e.g. ``cuda`` on a
    machine without a GPU), checked before any work."""
    from .._validate import available_device

    return available_device(device, flag)


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be written into (a read-only file system, permissions), else ``None``."""
    import os

    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except (OSError, AttributeError):  # pragma: no cover
        pass
    return None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"


def check_out_folder(out: Path, flag: str = "--out") -> Path:
    """``--out`` naming a folder (made if missing): refused in one line when it is an existing
    file, lies under a file, or cannot be written (permissions, a read-only file system)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: an existing file, not a folder; name a folder (it is made if missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out}: {parent} is a file, not a folder")
    why = _unwritable(parent)
    if why:
        raise ConfigError(f"{flag} {out}: cannot write into {parent} ({why})")
    return out


def check_out_file(out: Path, flag: str = "--out") -> Path:
    """``--out`` naming a file: refused in one line when it is a folder or its folder is missing,
    a file, or cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: a folder; name the HDF5 file, e.g. {out / 'capture.h5'}")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {out}: {parent} is a file, not a folder")
    if not parent.exists():
        raise ConfigError(f"{flag} {out}: the folder {parent} does not exist")
    why = _unwritable(parent)
    if why == "permission denied" and out.exists() and os.access(out, os.W_OK):
        why = None  # an existing file we may append to
    if why:
        raise ConfigError(f"{flag} {out}: cannot write into {parent} ({why})")
    return out
