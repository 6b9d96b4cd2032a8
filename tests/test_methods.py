"""The method registry: every registered method is tested by being registered.

Protocol tests parametrized from :data:`fisherlab.methods.METHODS` × the tiny Linear and Conv2d
cases: the operator builds from the capture alone, ``@``/``solve``/``to_dense``/``to_scipy`` agree,
it appears in ``compare`` with its family's gap rule, in the optimizers and in the plots. Plus the
dense reference of ``diagonal``, the method added through the registry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fisherlab
from fisherlab import methods, optim, plots
from fisherlab.errors import FisherlabError
from fisherlab.methods import METHODS, Family

from oprefs import DAMPING, cached_capture, dense_fbullet

PROTO_RTOL = 1e-10
"""Direct float64 algebra, condition numbers ≲ 1e3 at λ = 0.1: ~1e-13, margin 1e3."""

CASES = ["mlp", "cnn"]


OPERATOR_KEYS = [k for k, m in METHODS.items() if m.builder is not None]


def _build(key: str, case_id: str, mode: str = "mc"):
    cap = cached_capture(case_id, "cross_entropy", mode)
    try:
        return cap, methods.build(key, cap, DAMPING)
    except FisherlabError as err:
        if case_id == "cnn" and key == "tko-kronecker":
            assert "defined for Linear layers" in str(err)
            pytest.skip("the Kronecker F_coarse (3.18) is defined for Linear layers only")
        if key == "kfac-reduce" and "stored dense" in str(err):
            pytest.skip("KFAC-reduce needs factored storage (the tiny CNN's conv layers are stored dense)")
        raise


def close(x, y, rtol=PROTO_RTOL):
    return float((x - y).norm()) <= rtol * max(float(y.norm()), 1e-300)


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("key", OPERATOR_KEYS)
def test_protocol(key, case_id):
    cap, op = _build(key, case_id)
    p = cap.p
    assert op.shape == (p, p)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(p, 3, dtype=torch.float64, generator=g)
    D = op.to_dense()
    assert close(op @ v, D @ v)
    assert close(op @ v[:, 0], D @ v[:, 0])
    assert close(op.solve(op @ v), v)
    assert close(op.inverse().to_dense() @ D, torch.eye(p, dtype=torch.float64))
    L = op.to_scipy()
    assert np.allclose(L.matvec(v[:, 0].numpy()), (D @ v[:, 0]).numpy(), rtol=PROTO_RTOL, atol=0)
    assert np.allclose(L.rmatvec(v[:, 0].numpy()), (D.T @ v[:, 0]).numpy(), rtol=PROTO_RTOL, atol=0)
    if op.symmetric:
        assert close(D, D.T)


@pytest.mark.parametrize("key", list(METHODS))
def test_record_is_complete(key):
    m = METHODS[key]
    assert m.key == key and isinstance(m.family, Family) and m.legend and m.legend == m.legend.upper()
    assert methods.legend(key) == m.legend and methods.colour(key) == m.colour and methods.marker(key) == m.marker
    assert plots.legend_for(key) == m.legend and plots.color_for(key) == m.colour
    if m.optimizer:
        assert m.optimizer in optim.OPTIMIZERS and methods.method_of_optimizer(m.optimizer) == key


def test_legends_and_colours_are_unique():
    legends = [m.legend for m in METHODS.values()]
    colours = [m.colour for m in METHODS.values()]
    assert len(set(legends)) == len(legends) and len(set(colours)) == len(colours)


@pytest.mark.parametrize("case_id", CASES)
def test_every_default_method_appears_in_compare_with_its_family(case_id):
    cap = cached_capture(case_id, "cross_entropy", "mc")
    table = fisherlab.compare(cap, DAMPING)
    assert [r["method"] for r in table.rows] == methods.default_keys()
    for r in table.rows:
        fam = METHODS[r["method"]].family
        assert r["family"] == fam.value
        if fam is Family.MULTIPLICATIVE:
            assert r["gap"] <= 0.0 and r["reduction_ratio"] <= 1.0  # exact: ratio = 1 + gap/𝔈_KFAC
        if r["method"] == "kfac":
            assert r["gap"] == 0.0 and r["reduction_ratio"] == 1.0


def test_unknown_method_and_option_are_one_line():
    cap = cached_capture("mlp", "cross_entropy", "mc")
    with pytest.raises(ValueError, match=r"unknown method 'kfca' \(choose from zero, exact, block-diagonal"):
        methods.build("kfca", cap, DAMPING)
    with pytest.raises(ValueError, match="method 'kfac' has no option m"):
        methods.build("kfac", cap, DAMPING, m=3)
    with pytest.raises(ValueError, match="unknown method"):
        fisherlab.compare(cap, DAMPING, ["kfac", "nope"])


def test_families_partition_the_registry():
    fams = [methods.keys(f) for f in Family]
    assert sorted(sum(fams, [])) == sorted(METHODS)
    assert methods.keys([Family.MULTIPLICATIVE, Family.ADDITIVE]) == [k for k in METHODS if METHODS[k].family.coarse]


# ---- diagonal: the method added through the registry ------------------------------------------


@pytest.mark.parametrize("storage", ["factored", "dense"])
@pytest.mark.parametrize("mode", ["mc", "exact"])
@pytest.mark.parametrize("case_id", ["mlp", "mlp-nobias", "cnn", "cnn-nobias"])
def test_diagonal_is_the_diagonal_of_the_dense_fisher(case_id, mode, storage):
    cap = cached_capture(case_id, "cross_entropy", mode, storage=storage)
    op = methods.build("diagonal", cap, DAMPING)
    ref = torch.diagonal(dense_fbullet(cap, DAMPING))
    assert close(op.diagonal(), ref)
    assert close(op.to_dense(), torch.diag(ref))


def test_coarse_correction_over_the_diagonal():
    """A two-level correction over any one-level base: the multiplicative gap stays ≤ 0 and a full
    coarse space still gives ζ."""
    cap = cached_capture("cnn", "cross_entropy", "mc")
    table = fisherlab.compare(cap, DAMPING, ["diagonal", "residuals"], options={"residuals": {"base": "diagonal"}})
    diag, two = table.row("diagonal"), table.row("residuals")
    assert two["energy_error"] <= diag["energy_error"] * (1 + PROTO_RTOL)


def test_diagonal_optimizer_takes_one_step():
    from cases import MODELS, build_model, make_batch

    model = build_model(MODELS["mlp"])
    x, y = make_batch(MODELS["mlp"], "cross_entropy", B=4)
    opt = optim.make_optimizer("diagonal", model, lr=0.1, damping=DAMPING, loss="cross_entropy", fisher="mc")
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    opt.step(inputs=x, targets=y)
    assert not torch.equal(before, torch.nn.utils.parameters_to_vector(model.parameters()))
    assert opt.history[-1]["method"] == "diagonal"


COARSE_KEYS = [k for k, m in METHODS.items() if m.family.coarse] + ["ekfac+residuals", "foof+tko"]


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("key", COARSE_KEYS)
def test_coarse_increment_is_the_solve_from_the_shared_context(key, case_id):
    """Every coarse correction built from one :class:`Pieces` shares one context per base (ζ_base
    and r computed once), and its ``increment()`` — what compare uses — is ``solve(∇h)``."""
    cap = cached_capture(case_id, "cross_entropy", "mc")
    pieces = methods.Pieces.of(cap, DAMPING)
    try:
        op = methods.build(key, pieces)
        again = methods.build(key, pieces)
    except FisherlabError as err:
        assert case_id == "cnn" and "defined for Linear layers" in str(err)
        pytest.skip("the Kronecker F_coarse (3.18) is defined for Linear layers only")
    assert op.context is again.context is pieces.coarse_context(op.base)
    w = cap.grad.to(torch.float64).reshape(-1, 1)
    assert close(op.increment(), op.solve(w))


def test_a_context_of_another_right_hand_side_is_refused():
    from fisherlab.operators import CoarseContext, TwoLevelKFAC

    cap = cached_capture("mlp", "cross_entropy", "mc")
    pieces = methods.Pieces.of(cap, DAMPING)
    kfac, exact = pieces.one_level("kfac"), pieces.fisher()
    other = CoarseContext(kfac, exact, 2 * pieces.rhs)
    with pytest.raises(ValueError, match="another right-hand side"):
        TwoLevelKFAC.from_capture(pieces.jac, DAMPING, "residuals", kfac=kfac, exact=exact, rhs=pieces.rhs, context=other)
    with pytest.raises(ValueError, match="another one-level operator"):
        TwoLevelKFAC.from_capture(pieces.jac, DAMPING, "residuals", kfac=methods.build("kfac", pieces.jac, DAMPING),
                                  exact=exact, rhs=pieces.rhs, context=pieces.coarse_context(kfac))


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("key", [k for k, m in METHODS.items() if m.family.coarse])
def test_coarse_layer_products_equal_the_direct_products(key, case_id):
    """compare's anatomy of a correction adds c·Z_iβ_i to KFAC's U_iᵀ(ζ_KFAC − y)_i instead of a
    product with U: it equals U_iᵀ(x − y)_i computed directly."""
    cap = cached_capture(case_id, "cross_entropy", "mc")
    pieces = methods.Pieces.of(cap, DAMPING)
    try:
        op = methods.build(key, pieces)
    except FisherlabError:
        pytest.skip("the Kronecker F_coarse (3.18) is defined for Linear layers only")
    jac, w = pieces.jac, cap.grad.to(torch.float64).reshape(-1, 1)
    y = pieces.fisher().apply_inverse(w)  # ζ, as in compare
    split = jac.layout.split
    given = [lj.rmatmat(d) for lj, d in zip(jac.layers, split(op.context.zeta_kfac - y))]
    direct = [lj.rmatmat(d) for lj, d in zip(jac.layers, split(op.increment() - y))]
    for got, want in zip(op.layer_products(given), direct):
        assert float((got - want).norm()) <= PROTO_RTOL * max(float(torch.cat(direct).norm()), 1e-300)
