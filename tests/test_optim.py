"""Optimizers (fisherlab.optim): one step is −lr·ζ_method from the operators on a capture of the
same batch with the same seed; weight decay, running factors, the inverse-update period and
momentum enter as documented; every optimizer lowers the loss of a tiny regression; the gap
(4.6) recorded during training is ≤ 0 for the multiplicative two-level methods; BatchNorm
parameters get SGD steps; bad settings fail with one-line errors. Float64 throughout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fisherlab
from fisherlab.capturing.losses import per_example_loss
from fisherlab.errors import DampingError
from fisherlab.jacobian import Jacobian
from fisherlab.metrics import build_method
from fisherlab.operators import KFAC, ExactFisher, TwoLevelKFAC
from fisherlab.optim import (
    LEGENDS,
    OPTIMIZERS,
    KFACOptimizer,
    NaturalGradient,
    TKOOptimizer,
    TwoLevelKFACOptimizer,
    make_optimizer,
)

from cases import MODELS, build_model, make_batch



STEP_RTOL = 1e-10
"""Same float64 operations on the same capture, in a different order: ~1e-14; margin 1e4."""
GAP_ATOL = 1e-12
"""The gap (4.6) is −(R_0r)ᵀF_coarse⁻¹(R_0r) ≤ 0; round-off on these tiny problems is ≲ 1e-15."""

LR = 0.2
DAMPING = 0.3
SEED = 7
LOSS = "cross_entropy"
MODE = "mc"
K = 2

# optimizer name -> the registered method of its operator (from the registry: a new method with an
# optimizer name is tested here by being registered)
METHOD_OF = {"two-level-kfac": "nicolaides", **fisherlab.methods.optimizer_names()}
TWO_LEVEL = [n for n in OPTIMIZERS if n.startswith("kfac-2l-")]
STEP_CASES = [(o, c) for o in METHOD_OF for c in ("mlp", "cnn") if not (o == "tko-kronecker" and c == "cnn")]


def theta(model: nn.Module) -> torch.Tensor:
    return fisherlab.Layout.from_model(model, warn=False).parameters_vector(model)


def reference_zeta(model: nn.Module, x, y, method: str, *, generator: torch.Generator, wd: float = 0.0, loss: str = LOSS,
                   kfac_factors=None, batch_statistics: bool = False):
    """ζ = op⁻¹(∇h + wdθ) built directly from the operators on a capture of (x, y)."""
    cap = fisherlab.capture(model, x, y, loss=loss, fisher=MODE, n_samples=K, generator=generator, device="cpu",
                            dtype=torch.float64, storage=fisherlab.methods.get(method).storage,
                            batch_statistics=batch_statistics)
    jac = Jacobian.from_capture(cap)
    rhs = cap.grad + wd * theta(model)
    exact = ExactFisher(jac, DAMPING)
    kfac = None if kfac_factors is None else KFAC(jac, DAMPING, "pi", factors=kfac_factors)
    op = build_method(method, jac, DAMPING, rhs=rhs, exact=exact, kfac=kfac)
    return op.solve(rhs), cap


def assert_step(before: torch.Tensor, after: torch.Tensor, expected_increment: torch.Tensor) -> None:
    err = float((after - before - expected_increment).norm())
    assert err <= STEP_RTOL * float(expected_increment.norm()), err


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clone_gen(g: torch.Generator) -> torch.Generator:
    c = torch.Generator()
    c.set_state(g.get_state())
    return c


# ---- one step = −lr ζ_method ----------------------------------------------------------------


@pytest.mark.parametrize("name,case_id", STEP_CASES, ids=[f"{o}-{c}" for o, c in STEP_CASES])
def test_one_step_equals_operator_increment(name, case_id):
    case = MODELS[case_id]
    model = build_model(case)
    ref = copy.deepcopy(model)
    x, y = make_batch(case, LOSS, B=4)
    opt = make_optimizer(name, model, lr=LR, damping=DAMPING, loss=LOSS, fisher=MODE, n_samples=K, seed=SEED)
    before = theta(model)
    out = opt.step(inputs=x, targets=y)
    zeta, cap = reference_zeta(ref, x, y, METHOD_OF[name], generator=gen())
    assert_step(before, theta(model), -LR * zeta)
    assert out == pytest.approx(cap.loss_value, rel=1e-12)
    assert opt.history[-1]["step"] == 1 and opt.history[-1]["loss"] == pytest.approx(cap.loss_value, rel=1e-12)


def test_set_batch_is_consumed_by_the_next_step():
    case = MODELS["mlp"]
    model, ref = build_model(case), build_model(case)
    x, y = make_batch(case, LOSS, B=4)
    opt = KFACOptimizer(model, lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED)
    opt.set_batch(x, y)
    before = theta(model)
    opt.step()
    zeta, _ = reference_zeta(ref, x, y, "kfac", generator=gen())
    assert_step(before, theta(model), -LR * zeta)
    with pytest.raises(ValueError, match="needs the batch"):
        opt.step()


def test_weight_decay_is_added_before_preconditioning():
    case = MODELS["mlp"]
    model = build_model(case)
    ref = copy.deepcopy(model)
    x, y = make_batch(case, LOSS, B=4)
    wd = 0.05
    opt = TwoLevelKFACOptimizer(model, coarse="residuals", lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED, weight_decay=wd)
    before = theta(model)
    opt.step(inputs=x, targets=y)
    zeta, _ = reference_zeta(ref, x, y, "residuals", generator=gen(), wd=wd)
    assert_step(before, theta(model), -LR * zeta)


# ---- running factors, inverse-update period, momentum ---------------------------------------


def two_batches(case):
    return make_batch(case, LOSS, B=4, seed=11), make_batch(case, LOSS, B=4, seed=12)


def test_running_average_of_factors():
    case = MODELS["cnn"]
    model = build_model(case)
    (x1, y1), (x2, y2) = two_batches(case)
    rho = 0.8
    opt = KFACOptimizer(model, lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED, factor_decay=rho)
    g1 = clone_gen(opt.generator)
    ref1 = copy.deepcopy(model)
    opt.step(inputs=x1, targets=y1)
    _, cap1 = reference_zeta(ref1, x1, y1, "kfac", generator=g1)
    F1 = [lj.kfac_factors for lj in Jacobian.from_capture(cap1).layers]
    for (A, G), (A1, G1) in zip(opt.factors, F1):
        assert torch.allclose(A, A1, rtol=1e-12, atol=0) and torch.allclose(G, G1, rtol=1e-12, atol=0)

    g2 = clone_gen(opt.generator)
    ref2 = copy.deepcopy(model)
    before = theta(model)
    opt.step(inputs=x2, targets=y2)
    cap2 = fisherlab.capture(ref2, x2, y2, loss=LOSS, fisher=MODE, n_samples=K, generator=g2, device="cpu", dtype=torch.float64)
    jac2 = Jacobian.from_capture(cap2)
    F2 = [lj.kfac_factors for lj in jac2.layers]
    avg = [(rho * A1 + (1 - rho) * A2, rho * G1 + (1 - rho) * G2) for (A1, G1), (A2, G2) in zip(F1, F2)]
    for (A, G), (Ae, Ge) in zip(opt.factors, avg):
        assert torch.allclose(A, Ae, rtol=1e-12, atol=1e-15) and torch.allclose(G, Ge, rtol=1e-12, atol=1e-15)
    zeta = KFAC(jac2, DAMPING, "pi", factors=avg).solve(cap2.grad)
    assert_step(before, theta(model), -LR * zeta)


@pytest.mark.parametrize("name", ["kfac", "kfac-2l-nicolaides"])
def test_inverse_update_period_reuses_the_previous_kfac(name):
    """T_inv = 2: step 2 preconditions with step 1's KFAC operator; the coarse correction is
    rebuilt from batch 2; step 3 rebuilds KFAC from batch 3."""
    case = MODELS["mlp"]
    model = build_model(case)
    batches = [make_batch(case, LOSS, B=4, seed=s) for s in (11, 12, 13)]
    opt = make_optimizer(name, model, lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED, inverse_update_period=2, record_gap=True)
    factors_of_step = []
    for step, (x, y) in enumerate(batches, start=1):
        g = clone_gen(opt.generator)
        ref = copy.deepcopy(model)
        before = theta(model)
        opt.step(inputs=x, targets=y)
        cap = fisherlab.capture(ref, x, y, loss=LOSS, fisher=MODE, n_samples=K, generator=g, device="cpu", dtype=torch.float64)
        jac = Jacobian.from_capture(cap)
        factors_of_step.append([lj.kfac_factors for lj in jac.layers])
        used = factors_of_step[0] if step == 2 else factors_of_step[-1]
        kfac = KFAC(jac, DAMPING, "pi", factors=used)
        op = kfac if name == "kfac" else TwoLevelKFAC(jac, DAMPING, "nicolaides", kfac=kfac, exact=ExactFisher(jac, DAMPING), rhs=cap.grad)
        assert_step(before, theta(model), -LR * op.solve(cap.grad))
        assert opt.history[-1]["gap"] <= GAP_ATOL


def test_momentum_heavy_ball_on_zeta():
    case = MODELS["mlp"]
    model = build_model(case)
    (x1, y1), (x2, y2) = two_batches(case)
    mu = 0.5
    opt = KFACOptimizer(model, lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED, momentum=mu)
    zetas = []
    for x, y in ((x1, y1), (x2, y2)):
        g, ref, before = clone_gen(opt.generator), copy.deepcopy(model), theta(model)
        opt.step(inputs=x, targets=y)
        zetas.append(reference_zeta(ref, x, y, "kfac", generator=g)[0])
    assert_step(before, theta(model), -LR * (mu * zetas[0] + zetas[1]))


# ---- training ---------------------------------------------------------------------------------


def regression_problem():
    """A tiny MLP regression: 64 examples of a random teacher, 4 mini-batches of 16."""
    g = gen(3)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    Y = torch.tanh(X @ W) + 0.05 * torch.randn(64, 4, generator=g, dtype=torch.float64)
    return X, Y


def full_loss(model, X, Y) -> float:
    with torch.no_grad():
        return float(per_example_loss("mse", model(X), Y).mean())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_lowers_the_loss(name):
    X, Y = regression_problem()
    model = build_model(MODELS["mlp"], seed=1)
    h0 = full_loss(model, X, Y)
    opt = make_optimizer(name, model, lr=1.0, damping=0.3, loss="mse", n_samples=1, seed=SEED, weight_decay=1e-3)
    for step in range(20):
        i = (step % 4) * 16
        opt.step(inputs=X[i : i + 16], targets=Y[i : i + 16])
    h = full_loss(model, X, Y)
    assert h < 0.7 * h0, (h0, h)  # all reach 0.23–0.59 of h0 with these settings
    assert len(opt.history) == 20 and all(r["seconds"] > 0 for r in opt.history)


@pytest.mark.parametrize("name", TWO_LEVEL)
def test_history_gap_nonpositive_and_ratio_in_unit_interval(name):
    X, Y = regression_problem()
    model = build_model(MODELS["mlp"], seed=1)
    opt = make_optimizer(name, model, lr=0.5, damping=0.5, loss="mse", seed=SEED, record_gap=True, record_ratio=True)
    for step in range(4):
        i = (step % 4) * 16
        opt.step(inputs=X[i : i + 16], targets=Y[i : i + 16])
    for r in opt.history:
        assert set(r) >= {"step", "loss", "gap", "ratio", "seconds"}
        assert r["gap"] <= GAP_ATOL
        assert -1e-12 <= r["ratio"] <= 1 + 1e-10
        assert r["coarse_dim"] >= 1


def test_history_of_tko_and_kfac_and_ngd():
    X, Y = regression_problem()
    kw = dict(lr=0.5, damping=0.5, loss="mse", seed=SEED, record_gap=True, record_ratio=True)
    for name, check in [
        ("tko", lambda r: r["gap"] is not None and r["ratio"] >= 0),
        ("kfac", lambda r: r["gap"] == 0.0 and r["ratio"] == 1.0),
        ("ngd", lambda r: r["gap"] is None and r["ratio"] == 0.0),
        ("ngd-block", lambda r: r["gap"] is None and r["ratio"] >= 0),
    ]:
        opt = make_optimizer(name, build_model(MODELS["mlp"], seed=1), **kw)
        opt.step(inputs=X[:16], targets=Y[:16])
        assert check(opt.history[0]), (name, opt.history[0])
    opt = make_optimizer("kfac", build_model(MODELS["mlp"], seed=1), lr=0.5, damping=0.5, loss="mse", seed=SEED)
    opt.step(inputs=X[:16], targets=Y[:16])
    assert opt.history[0]["gap"] is None and opt.history[0]["ratio"] is None


# ---- BatchNorm ----------------------------------------------------------------------------------


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4)).double()
    with torch.no_grad():  # non-trivial affine parameters
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
    return m


def test_batchnorm_parameters_get_sgd_steps():
    with pytest.warns(UserWarning, match="not part of the Fisher"):
        model = bn_model()
        opt = KFACOptimizer(model, lr=LR, damping=DAMPING, loss="mse", n_samples=K, seed=SEED, weight_decay=0.01)
    x = torch.randn(8, 5, generator=gen(1), dtype=torch.float64)
    y = torch.randn(8, 4, generator=gen(2), dtype=torch.float64)
    ref = copy.deepcopy(model)
    bn0 = [p.detach().clone() for p in model[1].parameters()]
    before = theta(model)
    opt.step(inputs=x, targets=y)

    # BatchNorm: SGD on the train-mode gradient of the mean loss, with the weight decay
    train = copy.deepcopy(ref)
    h = per_example_loss("mse", train(x), y).mean()
    grads = torch.autograd.grad(h, list(train.parameters()))
    gw, gb = grads[2], grads[3]
    assert torch.allclose(model[1].weight, bn0[0] - LR * (gw + 0.01 * bn0[0]), rtol=1e-12, atol=1e-14)
    assert torch.allclose(model[1].bias, bn0[1] - LR * (gb + 0.01 * bn0[1]), rtol=1e-12, atol=1e-14)
    # running statistics updated once, as by the training forward
    assert torch.allclose(model[1].running_mean, train[1].running_mean) and int(model[1].num_batches_tracked) == 1

    # Fisher layers: the capture normalises with the batch statistics, so its ∇h is the training gradient
    hidden = copy.deepcopy(ref)
    hidden[1].running_mean = None
    hidden[1].running_var = None
    with pytest.warns(UserWarning):
        zeta, cap = reference_zeta(hidden, x, y, "kfac", generator=gen(), wd=0.01, loss="mse", batch_statistics=True)
    layout = fisherlab.Layout.from_model(ref, warn=False)
    g_train = layout.from_torch_order(torch.cat([g.reshape(-1) for g in grads]))
    assert torch.allclose(cap.grad, g_train, rtol=1e-10, atol=1e-14)
    assert_step(before, theta(model), -LR * zeta)


# ---- errors, registry, state --------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_damping_one_line_error(damping):
    with pytest.raises(DampingError) as err:
        KFACOptimizer(build_model(MODELS["mlp"]), lr=LR, damping=damping, loss=LOSS)
    assert "damping" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=0), "lr"),
        (dict(lr=-1), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1e-3), "weight_decay"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(inverse_update_period=0), "inverse_update_period"),
        (dict(damping_mode="heuristic"), "damping_mode"),
        (dict(fisher="true"), "fisher mode"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(n_samples=0), "n_samples"),
    ],
)
def test_bad_options_one_line_error(kw, match):
    args = dict(lr=LR, damping=DAMPING, loss=LOSS)
    args.update(kw)
    with pytest.raises(ValueError, match=match) as err:
        KFACOptimizer(build_model(MODELS["mlp"]), **args)
    assert "\n" not in str(err.value)


def test_bad_names_and_missing_options():
    model = build_model(MODELS["mlp"])
    with pytest.raises(ValueError, match="unknown coarse space"):
        TwoLevelKFACOptimizer(model, coarse="multigrid", lr=LR, damping=DAMPING, loss=LOSS)
    with pytest.raises(ValueError, match="coarse_operator"):
        TKOOptimizer(model, coarse_operator="dense", lr=LR, damping=DAMPING, loss=LOSS)
    with pytest.raises(ValueError, match="unknown fisherlab optimizer"):
        make_optimizer("shampoo", model, lr=LR, damping=DAMPING, loss=LOSS)
    with pytest.raises(ValueError, match="needs the option"):
        make_optimizer("kfac", model, lr=LR, loss=LOSS)
    with pytest.raises(ValueError, match="does not take the option"):
        make_optimizer("ngd", model, lr=LR, damping=DAMPING, loss=LOSS, factor_decay=0.9)
    with pytest.raises(TypeError, match="takes the model"):
        NaturalGradient(model.parameters(), lr=LR, damping=DAMPING, loss=LOSS)
    opt = make_optimizer("kfac", model, lr=LR, damping=DAMPING, loss=LOSS)
    with pytest.raises(ValueError, match="needs the batch"):
        opt.step()
    opt.param_groups[0]["damping"] = 0.0  # e.g. a bad schedule
    x, y = make_batch(MODELS["mlp"], LOSS)
    with pytest.raises(DampingError):
        opt.step(inputs=x, targets=y)


def test_registry_names_and_classes():
    model = build_model(MODELS["mlp"])
    kw = dict(lr=LR, damping=DAMPING, loss=LOSS)
    assert set(LEGENDS) == set(OPTIMIZERS)
    assert isinstance(make_optimizer("kfac-tikhonov", model, **kw), KFACOptimizer)
    assert make_optimizer("kfac-tikhonov", model, **kw).damping_mode == "tikhonov"
    assert make_optimizer("kfac-2l-taylor", model, q=3, **kw).q == 3
    assert make_optimizer("two-level-kfac", model, coarse="spectral", **kw).coarse == "spectral"
    assert make_optimizer("tko-kronecker", model, **kw).coarse_operator == "kronecker"
    assert make_optimizer("ngd-block", model, **kw).block_diagonal
    assert all(isinstance(make_optimizer(n, model, **kw), torch.optim.Optimizer) for n in OPTIMIZERS)


def test_training_registry_has_fisherlab_optimizers():
    from fisherlab.train import OPTIMIZERS as TRAIN_OPTIMIZERS
    from fisherlab.train import TrainConfig

    cfg = TrainConfig(model={"name": "deep-linear-64", "input_dim": 10}, data="random-vectors", optimizer="kfac-2l-taylor")
    assert cfg.resolved().optimizer == "kfac-2l-taylor"  # registered (eagerly or on first use)
    assert {"sgd", "adam"} | set(OPTIMIZERS) <= set(TRAIN_OPTIMIZERS)


def test_train_loop_steps_a_two_level_optimizer_with_batchnorm():
    """fisherlab.train hands the batch over (set_batch), steps with its closure and writes the gap
    (4.6) of every step into the metrics (the paper's Fig. 5) — on a BatchNorm deep linear net."""
    from fisherlab.train import TrainConfig, train

    cfg = TrainConfig(
        model={"name": "deep-linear-64", "input_dim": 10}, data="random-vectors", n=64, batch_size=32, steps=6,
        optimizer="kfac-2l-nicolaides", lr=0.1, optimizer_options={"damping": 0.1, "record_gap": True},
        progress=False, plot=False, device="cpu",
    )
    with pytest.warns(UserWarning, match="not part of the Fisher"):
        result = train(cfg)
    rows = result.metrics
    assert len(rows) == 6 and all(r["gap"] <= 1e-10 and r["coarse_dim"] == 64 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    with pytest.raises(ValueError, match="optimizer_options.damping"):
        train(TrainConfig(**{**cfg.to_dict(), "optimizer": "kfac", "optimizer_options": {}}))


def test_state_dict_round_trip_resumes_identically():
    case = MODELS["mlp"]
    (x1, y1), (x2, y2) = two_batches(case)
    kw = dict(lr=LR, damping=DAMPING, loss=LOSS, n_samples=K, seed=SEED, factor_decay=0.9, momentum=0.3)
    model = build_model(case)
    opt = KFACOptimizer(model, **kw)
    opt.step(inputs=x1, targets=y1)
    model2 = copy.deepcopy(model)
    opt2 = KFACOptimizer(model2, **{**kw, "seed": 999})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through torch.save / torch.load
    opt.step(inputs=x2, targets=y2)
    opt2.step(inputs=x2, targets=y2)
    assert torch.allclose(theta(model), theta(model2), rtol=1e-12, atol=0)
    assert opt2.steps == 2


def test_a_scaled_damping_resolves_on_every_batch():
    """Damping(α, "max"): each step uses α·λ_max(F) of its own batch (recorded in the history)."""
    case = MODELS["mlp"]
    model = build_model(case)
    x, y = make_batch(case, LOSS, B=4)
    opt = make_optimizer("kfac", model, lr=LR, damping=fisherlab.Damping(1e-2, "max"), loss=LOSS, fisher="empirical")
    ref = copy.deepcopy(model)
    opt.step(inputs=x, targets=y)
    cap = fisherlab.capture(ref, x, y, loss=LOSS, fisher="empirical", device="cpu", dtype=torch.float64)
    lam = fisherlab.Damping(1e-2, "max").resolve(cap)
    assert opt.history[-1]["damping"] == pytest.approx(lam, rel=1e-10)
    zeta = fisherlab.KFAC(cap, lam).solve(cap.grad)
    after = theta(model)
    assert_step(theta(ref), after, -LR * zeta)
