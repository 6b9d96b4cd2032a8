"""The ``fisherlab`` command line: one module per subcommand, each with ``register(subparsers)``.

Errors that fisherlab raises on purpose (:class:`fisherlab.errors.FisherlabError`: bad
arguments, missing files, unusable captures) print as one line, ``fisherlab: error: …``, exit
status 2, no traceback; argparse's own usage errors exit 2 too. So do the machine's limits
(:func:`environment_error`): out of memory (naming ``--memory``, a smaller batch,
``--storage factored``) and file-system errors (disk full, read-only, permissions, a file where
a folder is needed). Any other exception is a bug and shows its traceback. ``--traceback`` shows
it for all of these as well.

The subcommands import the library inside their handlers, so that building the parser stays
cheap; the import-order test (tests/test_imports.py) checks those imports like any other.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
from typing import Sequence

from .._version import __version__
from ..errors import FisherlabError

__all__ = ["COMMANDS", "build_parser", "main", "environment_error"]

# subcommand modules, in the order `fisherlab --help` lists them
COMMANDS = [
    "capture_cmd",
    "inspect_cmd",
    "analyze_cmd",
    "demo_cmd",
    "train_cmd",
]


def _command(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisherlab", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Capture per-example Jacobians to HDF5 and compare curvature approximations offline.",
    )
    parser.add_argument("--version", action="version", version=f"fisherlab {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="show the traceback of every error (by default fisherlab's own errors print one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        _command(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fisherlab ARGV``; returns the exit status (0; 2 for an error; 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    lead = [a for a in argv[:1] if a == "--traceback"]  # `fisherlab --traceback analyze FILE …`
    rest = argv[len(lead):]
    for name in COMMANDS:
        rewrite = getattr(_command(name), "rewrite_argv", None)
        if rewrite is not None:
            rest = rewrite(rest)
    args = parser.parse_args(lead + rest)
    try:
        return int(args.func(args) or 0)
    except FisherlabError as err:
        if args.traceback:
            raise
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"fisherlab: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fisherlab inspect f.h5 | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fisherlab: interrupted", file=sys.stderr)
        return 130
    except BaseException as err:  # the machine's limits: memory, the file system
        line = environment_error(err, getattr(args, "command", None))
        if line is None or args.traceback:
            raise
        print(f"fisherlab: error: {line}", file=sys.stderr)
        return 2


# what to change when a command runs out of memory
_MEMORY_HINTS = {
    "capture": "pass --memory (the capture is then planned and refused before it allocates), a smaller "
               "--batch-size, or --storage factored",
    "analyze": "pass --memory (the analysis is then planned first), fewer --methods or --checkpoints",
    "train": "use a smaller --batch-size or --width",
}
_OS_ERRORS = {  # errno → what the user is told; anything else is a bug and keeps its traceback
    errno.ENOSPC: "no space left on device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder",
    errno.EEXIST: "exists already",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EIO: "input/output error of the device",
}


def environment_error(err: BaseException, command: str | None = None) -> str | None:
    """The one line for an error of the machine rather than of fisherlab: out of memory
    (``MemoryError``, torch's out-of-memory errors) or a file-system error (disk full, read-only,
    permissions, a file where a folder is needed); ``None`` for anything else (a bug)."""
    hint = _MEMORY_HINTS.get(command or "", "pass --memory, or use a smaller batch or --storage factored")
    torch = sys.modules.get("torch")
    oom_types: tuple[type, ...] = (MemoryError,)
    if torch is not None:
        oom_types += tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                       getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if isinstance(t, type))
    text = str(err)
    if isinstance(err, oom_types) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    ):
        m = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
        size = ""
        if m:
            size = f" (an allocation of {int(m.group(1)) / 2**30:.3g} GiB)" if m.group(1).isdigit() else f" (an allocation of {m.group(1)})"
        return f"out of memory{size}: {hint}"
    if isinstance(err, OSError) and err.errno in _OS_ERRORS:
        where = err.filename if err.filename is not None else ""
        return f"{where}: {_OS_ERRORS[err.errno]}" if where else _OS_ERRORS[err.errno]
    return None
