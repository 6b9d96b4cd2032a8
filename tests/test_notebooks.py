"""The notebooks in notebooks/ run top to bottom (they assert their own results) in a fresh kernel
of this interpreter, display every figure they draw (the inline backend, as in Jupyter), and are
stored without outputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "fisherlab-test-python"
FIGURE_CALL = re.compile(r"\bplots\.plot_\w+\(")  # one figure per call
TIMEOUT_S = 120  # per cell; each notebook runs in well under a minute on 2 cores


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec that launches *this* Python (the venv's), found first through JUPYTER_PATH:
    a fresh CI machine may have no 'python3' kernelspec, or one pointing at another interpreter."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fisherlab tests", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's default, the inline backend, as in Jupyter
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small matrices; threads only contend on 2 shared cores
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return KERNEL


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_fim_structure.ipynb", "02_two_level_errors.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=TIMEOUT_S, resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell, when an assertion fails
    drawn = shown = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        drawn += len(FIGURE_CALL.findall(cell.source))
        shown += sum("image/png" in out.get("data", {}) for out in cell.outputs)
    # each plots.plot_* call draws one figure, and a fresh kernel must display every one of them
    # (not only the first: plots.style() must not undo the inline backend's interactive switch)
    assert drawn > 0 and shown == drawn, f"{path.name}: {shown} image/png outputs for {drawn} figures drawn"
