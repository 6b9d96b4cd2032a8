"""CSV, JSON and markdown tables, and the one number formatter.

Every table file fisherlab writes goes through here: :func:`write_csv` (rows of dicts or of
sequences, full float precision, written atomically), :func:`read_csv`, :func:`write_json`
(atomic, ``Path``/numpy/enum values converted), :func:`markdown_table` and :func:`text_table`
(the fixed-width tables of the terminal), and :func:`fmt`, which prints a number with a format
spec or ``"n/a"`` for a missing one (``None`` or NaN).

This module imports nothing of fisherlab: every floor of the package may use it.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["fmt", "write_csv", "read_csv", "write_json", "markdown_table", "text_table", "columns_of", "safe_text"]

NA = "n/a"
"""What :func:`fmt` prints for a missing number."""


def fmt(x: Any, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec``; ``"n/a"`` for ``None`` and NaN.

    Args:
        x: a number (or anything ``format`` takes); ``None`` and NaN print as ``"n/a"``.
        spec: a format spec (``".3g"``, ``"+.3e"``) or a ``str.format`` template (``"{:.4f}"``).

    >>> fmt(0.123456, ".3g"), fmt(None), fmt(float("nan"), "+.3e"), fmt(2.5, "{:.2f}")
    ('0.123', 'n/a', 'n/a', '2.50')
    """
    if x is None or (isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral) and math.isnan(x)):
        return NA
    return spec.format(x) if "{" in spec else format(x, spec)


def columns_of(rows: Iterable[Mapping]) -> list[str]:
    """The keys of ``rows`` in first-seen order (the union over all rows)."""
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""Text cells starting with these are formulas to a spreadsheet (CSV injection: a checkpoint named
``=HYPERLINK(...)``); :func:`write_csv` writes them with a leading apostrophe."""


def safe_text(s: str) -> str:
    """``s`` with control characters (terminal escapes, NUL, …) shown as ``\\xNN``: names that come
    from files or users are printed, never interpreted by the terminal."""
    return "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in str(s))


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):  # full precision; numpy float64 too (whose repr is "np.float64(…)")
        return repr(float(v))
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, str) and v.startswith(_FORMULA_START) and not _numeric(v):
        return "'" + v
    return v


def _numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _replace(tmp: Path, path: Path) -> Path:
    os.replace(tmp, path)
    return path


def write_csv(rows: Iterable[Mapping | Sequence], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as a CSV file with a header; returns the path.

    Args:
        rows: dicts (a missing key or ``None`` writes an empty cell; keys outside ``columns``
            are left out) or sequences (one cell per column, in order).
        path: the file; its folder is created; written to ``<path>.tmp`` and moved into place, so
            a reader never sees half a file.
        columns: the header (default: the dicts' keys in first-seen order; required for rows of
            sequences).

    Floats are written in full precision (``repr``); enums as their values.
    """
    rows = list(rows)
    path = Path(path)
    dict_rows = all(isinstance(r, Mapping) for r in rows)
    if columns is None:
        if not dict_rows:
            raise TypeError("write_csv: rows of sequences need columns=")
        columns = columns_of(rows)  # type: ignore[arg-type]
    cols = list(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            if isinstance(r, Mapping):
                w.writerow([_cell(r.get(c)) for c in cols])
            else:
                if len(r) != len(cols):
                    raise ValueError(f"write_csv {path}: a row has {len(r)} cells for {len(cols)} columns")
                w.writerow([_cell(v) for v in r])
    return _replace(tmp, path)


def _parse(s: str) -> Any:
    if s == "":
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(s, s)


def read_csv(path: str | os.PathLike, *, parse: bool = False) -> list[dict]:
    """The rows of a CSV file with a header, as dicts.

    Args:
        path: the file.
        parse: convert cells to ``int``/``float``/``bool`` where they parse, empty cells to
            ``None`` (default: every cell a string, as :class:`csv.DictReader` gives it).
    """
    with Path(path).open(newline="") as f:
        rows = [{k: _unguard(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if parse:
        rows = [{k: _parse(v) for k, v in r.items()} for r in rows]
    return rows


def _unguard(v: str) -> str:
    """Undo :func:`write_csv`'s apostrophe before a formula-like text cell."""
    return v[1:] if isinstance(v, str) and v.startswith("'") and v[1:2] in _FORMULA_START and v[1:2] else v


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, enum.Enum):
        return o.value
    if hasattr(o, "tolist"):  # numpy arrays and scalars, torch tensors
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path``, atomically; returns the path.

    Paths, enums and numpy/torch values are converted (``str``, ``.value``, ``.tolist()``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False) + "\n")
    return _replace(tmp, path)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> list[str]:
    """The lines of a markdown table.

    Args:
        header: the column titles.
        rows: the cells (anything ``str`` takes; format numbers first with :func:`fmt`).
        align: one letter per column, ``l``, ``r`` or ``c`` (default: the renderer's, ``---``).

    >>> markdown_table(["a", "b"], [[1, "x"]])
    ['| a | b |', '|---|---|', '| 1 | x |']
    """
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    if align is not None and len(align) != len(header):
        raise ValueError(f"markdown_table: align {align!r} has {len(align)} letters for {len(header)} columns")
    sep = [marks[a] for a in align] if align else ["---"] * len(header)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(sep) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if c is None else safe_text(c).replace("|", "\\|") for c in r) + " |")
    return lines


def text_table(rows: Sequence[Sequence[str]], *, right: Iterable[int] = (), indent: str = "  ") -> list[str]:
    """The lines of a fixed-width table: columns padded to their widest cell, two spaces apart.

    Args:
        rows: the cells, the first row being the header.
        right: indices of right-aligned columns (numbers).
        indent: put before every line.
    """
    if not rows:
        return []
    right = set(right)
    rows = [[safe_text(c) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append(indent + "  ".join(cells).rstrip())
    return out
