"""What every subcommand shares: the help formatter, ``--quiet``/``--progress``, ``--model``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError, MissingFileError

__all__ = ["FORMATTER", "add_quiet_progress", "progress_of", "model_arg", "model_description"]


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
