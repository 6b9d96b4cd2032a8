"""Imports point one way, down the data flow; no cycles; h5py only in the store.

Every module under ``fisherlab/`` is parsed with :mod:`ast` (nothing is imported) and each of its
imports — module level, in functions, under ``TYPE_CHECKING`` — is mapped to the fisherlab
module it names. Each module sits on a *floor* of the data flow (capture → store → Jacobian →
operators → metrics/spectra → plots/reports, with the applications on top); a module may import
from its own floor or a lower one, never a higher one, and the import graph has no cycle.

Violations that exist today in modules being reworked by other parts of the redesign are listed
in :data:`KNOWN_EXCEPTIONS`; the list only shrinks (an entry that no longer occurs is reported as a
warning: delete it).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fisherlab"

# The floors, lowest first: a module may import from its floor and the floors below it.
# A module's floor is that of its longest dotted prefix named here ("operators" covers
# fisherlab.operators and fisherlab.operators.kfac).
FLOORS: list[tuple[str, ...]] = [
    # 0: no fisherlab knowledge. io (tables, number formatting) imports nothing of fisherlab, so
    #    that metrics, structure and spectra can write their tables with it. distributed runs the
    #    pure tasks that higher modules define (fisherlab.metrics, the drivers) on Dask workers.
    ("_version", "_system", "errors", "_validate", "layout", "io", "intervals", "distributed"),
    # 1: pure factor maths and the capture; testing: the dense references built from the formulas
    ("kernels", "record", "capturing", "capture", "testing"),
    ("store",),
    # the setup cache beside a capture file (Grams, eigendecompositions; its own sidecar HDF5 files)
    ("cache",),
    ("jacobian", "damping"),
    ("linalg",),
    ("operators",),
    ("methods", "planning"),
    ("anatomy",),
    ("metrics", "structure", "spectra"),
    ("plots",),
    ("models", "datasets", "optim", "train", "runs"),
    # the applications; fisherlab.analysis is the drivers' first public name (a re-export)
    ("workflows", "experiments", "reproduce", "analysis", "demo"),
    ("cli",),
]

STORE = ("store", "cache")
"""The modules that may import h5py (``fisherlab.store`` and, once a package, its submodules; the
setup cache, which writes its own sidecar files and never the capture file)."""

# Violations owned by parts of the redesign still in progress (operators/, metrics, optim,
# spectra, plots, reproduce, store). Format: "upward: importer -> imported",
# "cycle: a <-> b [<-> c]" (the members of one cycle, sorted), "h5py: module".
# Delete an entry once it is fixed; never add one for a module outside those files.
KNOWN_EXCEPTIONS: set[str] = set()

OTHERS = ("operators", "metrics", "optim", "spectra", "plots", "reproduce", "store")
"""The modules whose violations may be listed in :data:`KNOWN_EXCEPTIONS` (see above)."""


# ---- parsing ---------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _known(name: str) -> str | None:
    """The fisherlab module ``name`` refers to: itself, else its longest known prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(name: str) -> list[tuple[str, int, str]]:
    """``(imported module, line, kind)`` of every import in module ``name``; kind is
    ``"fisherlab"`` or the top-level name of a third-party module."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: list[tuple[str, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                out.append((target, node.lineno, "fisherlab") if target else (alias.name, node.lineno, alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _known(base) is None:
                out.append((base, node.lineno, base.split(".")[0]))
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in MODULES else _known(base), node.lineno, "fisherlab"))
    return out


def _floor_of(name: str) -> int | None:
    rel = name.removeprefix("fisherlab").removeprefix(".")
    best, floor = -1, None
    for i, names in enumerate(FLOORS):
        for prefix in names:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    return floor


GRAPH: dict[str, set[str]] = {
    m: {t for t, _, kind in _imports(m) if kind == "fisherlab" and t != m} for m in MODULES
}


def _floor(name: str) -> int:
    """A module's floor; the package face (``fisherlab/__init__.py``) sits on the floor of the
    highest module it re-exports."""
    if name == "fisherlab":
        return max((_floor(t) for t in GRAPH[name]), default=0)
    floor = _floor_of(name)
    assert floor is not None, f"{name}: on no floor; add it to FLOORS in tests/test_imports.py"
    return floor


# ---- the rules ---------------------------------------------------------------------------------


def _upward() -> set[str]:
    bad = set()
    for m, targets in GRAPH.items():
        if m == "fisherlab":  # the package face only re-exports
            continue
        for t in targets:
            if _floor(t) > _floor(m):
                bad.add(f"upward: {m} -> {t}")
    return bad


def _cycles() -> set[str]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[str] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add("cycle: " + " <-> ".join(sorted(comp)))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def _h5py() -> set[str]:
    return {
        f"h5py: {m}"
        for m in MODULES
        for _, _, kind in _imports(m)
        if kind == "h5py" and not any(_floor_of(m) is not None and (m == f"fisherlab.{s}" or m.startswith(f"fisherlab.{s}.")) for s in STORE)
    }


def _violations() -> set[str]:
    return _upward() | _cycles() | _h5py()


# ---- tests -----------------------------------------------------------------------------------


def test_every_module_is_on_a_floor():
    assert [m for m in MODULES if m != "fisherlab" and _floor_of(m) is None] == []


@pytest.mark.parametrize("rule", [_upward, _cycles, _h5py], ids=["no-upward-imports", "no-cycles", "h5py-only-in-store"])
def test_imports_point_down_the_data_flow(rule):
    new = sorted(rule() - KNOWN_EXCEPTIONS)
    assert new == [], "\n".join(new)


def test_known_exceptions_belong_to_modules_still_being_reworked():
    def owner_ok(entry: str) -> bool:
        mods = entry.split(": ", 1)[1].replace("<->", " ").replace("->", " ").split()
        return any(m.removeprefix("fisherlab.").split(".")[0] in OTHERS for m in mods)

    assert [e for e in KNOWN_EXCEPTIONS if not owner_ok(e)] == []
    stale = sorted(KNOWN_EXCEPTIONS - _violations())
    if stale:
        warnings.warn("fixed, delete from KNOWN_EXCEPTIONS: " + "; ".join(stale), stacklevel=1)


def test_package_inits_only_re_export():
    """``__init__.py`` files hold imports, ``__all__`` and constants — no functions or classes."""
    bad = [
        f"{m}: {type(node).__name__} {node.name}"
        for m in MODULES
        if _is_package(m)
        for node in ast.parse(MODULES[m].read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    assert bad == []


def test_the_checker_sees_relative_in_function_and_package_imports():
    """The parser maps the kinds of import the package uses (a self-test of this file)."""
    demo = dict((t, k) for t, _, k in _imports("fisherlab.workflows.demo"))
    assert demo.get("fisherlab.workflows.analysis") == "fisherlab"  # from .analysis import …
    assert demo.get("fisherlab.models") == "fisherlab"  # from .. import models
    assert demo.get("fisherlab._version") == "fisherlab"  # from .._version import __version__
    cli = {t for t, _, k in _imports("fisherlab.cli.demo_cmd") if k == "fisherlab"}
    assert "fisherlab.workflows.demo" in cli  # imported inside a function
    assert _floor("fisherlab.capturing.run") < _floor("fisherlab.store") < _floor("fisherlab.jacobian")
    assert _floor("fisherlab.operators.kfac") < _floor("fisherlab.metrics") < _floor("fisherlab.cli.main")
