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


def test_the_budget_bounds_the_dense_rows_held(tmp_path, monkeypatch):
    """Under ``memory=``, every driver — compare_file (serial), a damping sweep's step — holds dense
    rows only within ROWS_MEMORY_SHARE of what the plan leaves (budget − peak), not of the memory
    the system has free (the B = 512 ResNet-18 held 8.6 GB of rows under --memory 16GiB)."""
    import fisherlab.jacobian as jacobian_mod
    from fisherlab.metrics import compare_file
    from fisherlab.workflows.analysis import sweep_task

    path = tmp_path / "run.h5"
    fisherlab.save(make_capture(MODELS["cnn"], "cross_entropy", "mc", B=3, n_samples=2)[0], path, checkpoint="c0", step=0)
    monkeypatch.setattr(jacobian_mod, "ROWS_MIN_POSITIONS", 0)  # every factored layer is a candidate
    fj = planning.jacobian_from_file(path, "c0", memory=2**40, stream=False)
    try:
        budget = fj.plan.peak  # the in-memory plan fits exactly (the float32 copy is its largest transient)
        free = budget - planning.plan_compare(fj.jac, memory=budget).peak
        rows = [lj.rows_bytes for lj in fj.jac.layers if isinstance(lj, jacobian_mod.FactoredLayerJacobian)]
        assert rows and free > 0
        monkeypatch.setattr(jacobian_mod, "ROWS_MEMORY_SHARE", 0.5 * min(rows) / free)  # no layer fits the share
        ref = sweep_task(fj.jac, fisherlab.Damping(0.1), METHODS, fj.grad)
        got = sweep_task(fj.jac, fisherlab.Damping(0.1), METHODS, fj.grad, memory=budget)
    finally:
        fj.close()
    assert ref.meta["dense_rows"] and got.meta["dense_rows"] == []
    kw = dict(progress=False, cache=False, stream=False)
    assert compare_file(path, 0.1, METHODS, **kw).meta["checkpoints"][0]["dense_rows"]
    assert compare_file(path, 0.1, METHODS, memory=budget, **kw).meta["checkpoints"][0]["dense_rows"] == []


def test_spectra_plans_the_rotated_jacobian_of_the_preconditioned_operator(capture):
    """The preconditioned operator holds U rotated into KFAC's eigenbasis, a second Jacobian: the
    plan counts it (at least the bytes of the tensors rotated_jacobian makes), only when asked for."""
    from fisherlab.operators import KFAC
    from fisherlab.operators.derived import rotated_jacobian

    jac = Jacobian.coerce(capture)
    with_pre, _ = planning.plan_spectra(jac, memory="1GiB", n_steps=8)
    without, _ = planning.plan_spectra(jac, memory="1GiB", n_steps=8, operators=("fisher", "kfac"))
    stage = next(s for s in with_pre.stages if "rotated" in s.name)
    assert stage.resident and with_pre.peak - without.peak == stage.bytes
    rot = rotated_jacobian(jac, KFAC.from_capture(jac, 0.1))
    held = sum(t.numel() * t.element_size() for lj in rot.layers for t in vars(lj).values() if isinstance(t, torch.Tensor))
    assert 0 < held <= stage.bytes
