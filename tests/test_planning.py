"""The memory planner (issue 14): refusals in one line naming the flag, before any work; results
under a budget that fits are the unbudgeted ones."""

from __future__ import annotations

import pytest
import torch

import fisherlab
from fisherlab.errors import FisherlabError
from fisherlab import planning
from fisherlab.errors import MemoryBudgetError
from fisherlab.jacobian import Jacobian
from fisherlab.linalg import slq_quadrature
from fisherlab.spectra import spectra

from cases import MODELS, make_capture

EQUAL = 1e-12
COLUMNS = ("energy_error", "relative_error", "gap", "euclidean_relative_error", "cosine")
METHODS = ["exact", "block-diagonal", "kfac", "nicolaides", "residuals", "zero"]


@pytest.fixture(scope="module")
def capture():
    return make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, n_samples=2)[0]


@pytest.mark.parametrize("text,want", [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("16GB", 16 * 10**9),
                                       (4096, 4096), ("1.5kib", 1536)])
def test_parse_bytes(text, want):
    assert planning.parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["8 parsecs", "", -1, 0, "nanGiB", True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(MemoryBudgetError):
        planning.parse_bytes(bad)


def test_impossible_budget_is_refused_in_one_line(capture, monkeypatch):
    calls = []
    monkeypatch.setattr(Jacobian, "gram_eigh", property(lambda self: calls.append(1)))  # nothing may be computed
    with pytest.raises(MemoryBudgetError) as err:
        fisherlab.compare(capture, 0.1, METHODS, memory=1000)
    msg = str(err.value)
    assert "\n" not in msg and "--memory" in msg and "memory=" in msg and "largest:" in msg
    assert not calls


def test_budget_that_fits_gives_the_same_table(capture):
    ref = fisherlab.compare(capture, 0.1, METHODS)
    got = fisherlab.compare(capture, 0.1, METHODS, memory="1GiB")
    scale = ref.meta["zeta_norm2"]
    for ra, rb in zip(ref.rows, got.rows):
        for col in COLUMNS:
            atol = EQUAL * (1.0 if col in ("relative_error", "cosine", "euclidean_relative_error") else scale)
            assert rb[col] == pytest.approx(ra[col], rel=EQUAL, abs=atol, nan_ok=True), (ra["method"], col)


def test_plan_counts_the_big_allocations(capture):
    jac = Jacobian.coerce(capture)
    plan = planning.plan_compare(jac, METHODS, memory="1GiB")
    names = " | ".join(s.name for s in plan.stages)
    assert "N × N Grams" in names and "KFAC factors" in names and "p-sized" in names
    N = jac.N
    gram = next(s for s in plan.stages if s.name.startswith("N × N"))
    assert gram.bytes == (len(jac.layers) + 3) * N * N * 8
    assert plan.fits and plan.peak >= plan.resident > 0
    assert "peak" in plan.table()


def test_spectra_refused_before_setup(capture):
    with pytest.raises(MemoryBudgetError, match="--memory"):
        spectra(capture, 0.1, operators=("fisher",), memory=2000)


def test_slq_sized_to_the_budget():
    p = 50
    A = torch.diag(torch.linspace(1, 2, p, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="running 10 steps"):
        rule = slq_quadrature(lambda V: A @ V, p, n_probes=2, n_steps=40, memory_bytes=10 * p * 8)
    assert rule.info["n_steps"] == 10
    with pytest.raises(FisherlabError, match="raise the memory budget"):
        slq_quadrature(lambda V: A @ V, p, n_probes=2, n_steps=40, memory_bytes=3 * p * 8)
