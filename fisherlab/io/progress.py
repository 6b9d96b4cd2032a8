"""Progress bars: notebook widgets where they can render, plain text elsewhere.

``tqdm.auto`` picks the widget bar inside a Jupyter kernel and, when ``ipywidgets`` is not
installed, warns "IProgress not found" and falls back to text. :func:`tqdm` avoids the warning:
it uses ``tqdm.auto`` only when ``ipywidgets`` is importable, else plain ``tqdm``.
:func:`want_progress` is the command line's rule: a bar only on a terminal (no ``\\r`` written
into a log file) unless asked for explicitly.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from typing import Any

__all__ = ["tqdm", "want_progress"]


@lru_cache(maxsize=1)
def _tqdm_class() -> type:
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm as cls
    else:
        from tqdm.std import tqdm as cls
    return cls


def tqdm(*args: Any, **kwargs: Any):
    """A tqdm bar (``tqdm.auto`` when ``ipywidgets`` is importable, else ``tqdm.std``)."""
    return _tqdm_class()(*args, **kwargs)


def want_progress(asked: bool | None, quiet: bool = False, stream: Any = None) -> bool:
    """Whether a command-line run shows a bar: ``asked`` when given (``--progress`` /
    ``--no-progress``), else not ``quiet`` and ``stream`` (stderr) is a terminal."""
    if asked is not None:
        return bool(asked)
    if quiet:
        return False
    s = sys.stderr if stream is None else stream
    return bool(getattr(s, "isatty", lambda: False)())
