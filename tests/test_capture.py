"""Independent checks of :func:`fisherlab.capture` against dense float64 twins (``torch.func``).

Cases come from ``tests/cases.py`` through the fixtures of ``conftest.py``; no test loops over
cases. References are in torch order and mapped to fisherlab order with the layout converters.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fisherlab
from fisherlab.capturing.record import Storage
from fisherlab.errors import NonFiniteError, UnsupportedLayerError
from fisherlab.kernels import kfac_factors_from
from fisherlab.testing import (
    dense_fisher,
    dense_fisher_from_capture,
    mean_loss_gradient,
    per_example_loss_gradients,
)

from cases import D_Y, EXTRA_MODELS, MODELS, ModelCase, build_model, make_batch, make_capture

# ---- named tolerances -------------------------------------------------------------------------
EXACT_RTOL = 1e-10
"""float64 identities (capture vs autograd): only rounding differs, observed ≈ 1e-16."""
STORAGE_RTOL = 1e-12
"""dense vs factored storage: the same numbers, possibly summed in another order."""
FLOAT32_RTOL = 1e-4
"""a float32 capture vs the float64 capture of the same problem (tiny nets, ≈ 1e-7 observed)."""
MC_SEEDS = 16
"""independent captures per sample size for the Monte-Carlo rate check."""
MC_K = 4
"""the small sample size; the large one is 16·MC_K, so the RMS error should drop by √16 = 4."""
MC_RATE_BAND = (3.0, 5.3)
"""accepted drop of the RMS relative error from K to 16K over MC_SEEDS seeds (theory: 4; a wrong
1/K scaling or a biased estimate gives < 1.5; observed 3.4–4.8 over all cases)."""
MC_MEAN_CAPTURES = 192
"""independent mc captures averaged in the expectation check, each with MC_MEAN_K samples."""
MC_MEAN_K = 4
MC_MEAN_SIGMAS = 3.0
"""‖mean − exact‖_F must lie within this many standard errors (norm-level, E‖·‖² = Σ var / M)."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def to_fisherlab_matrix(cap: fisherlab.Capture, M: torch.Tensor) -> torch.Tensor:
    """A torch-order ``[P, P]`` matrix in fisherlab order ``[p, p]`` (rows and columns)."""
    return cap.from_torch_order(cap.from_torch_order(M).T).T


def capture(model, x, y, loss, fisher, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", torch.float64)
    return fisherlab.capture(model, x, y, loss=loss, fisher=fisher, **kw)


@pytest.fixture(params=list(EXTRA_MODELS.values()), ids=list(EXTRA_MODELS))
def extra_case(request):
    return request.param


# ---- per-example gradients and Fishers vs torch.func -------------------------------------------


def _check_empirical_rows(case: ModelCase, loss: str) -> None:
    cap, model, x, y = make_capture(case, loss, "empirical")
    ref = cap.from_torch_order(per_example_loss_gradients(model, x, y, loss).T).T  # [B, p]
    J = cap.per_example_gradients()
    assert J.shape == (cap.B, cap.p) and J.dtype == torch.float64
    assert rel_err(J, ref) <= EXACT_RTOL
    for i, lc in enumerate(cap.layers):  # per layer too, whatever the storage
        s = lc.spec
        assert rel_err(cap.per_example_gradients(s.name), ref[:, s.offset : s.stop]) <= EXACT_RTOL
        assert torch.equal(cap.per_example_gradients(i), cap.per_example_gradients(s.name))


def test_empirical_rows_are_torch_func_per_example_gradients(model_case, loss):
    """Linear/Conv2d, with/without bias, stride 2, padding (cases.MODELS), all losses."""
    _check_empirical_rows(model_case, loss)


def test_empirical_rows_dilation_rectangular_kernels_and_positions(extra_case, loss):
    """Dilation, rectangular kernel/stride/padding, and a Linear layer seen at T = 3 positions."""
    _check_empirical_rows(extra_case, loss)


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_fisher_equals_dense_reference(model_case, loss, mode):
    """exact: JᵀJ/B = (1/B) Σ J_fᵀ Λ J_f (autograd Jacobians and loss Hessians);
    empirical: (1/B) Σ ∇ℓ_b ∇ℓ_bᵀ."""
    cap, model, x, y = make_capture(model_case, loss, mode)
    ref = to_fisherlab_matrix(cap, dense_fisher(model, x, y, loss, mode))
    assert rel_err(dense_fisher_from_capture(cap), ref) <= EXACT_RTOL


def test_exact_mode_on_extra_layer_configurations(extra_case, loss):
    cap, model, x, y = make_capture(extra_case, loss, "exact")
    ref = to_fisherlab_matrix(cap, dense_fisher(model, x, y, loss, "exact"))
    assert rel_err(dense_fisher_from_capture(cap), ref) <= EXACT_RTOL


def test_capture_shapes_and_bookkeeping(tiny_capture, mode):
    cap, model, x, y = tiny_capture
    B = x.shape[0]
    K = {"mc": 2, "exact": D_Y, "empirical": 1}[mode]  # make_capture uses n_samples = 2
    assert (cap.B, cap.K, cap.N, cap.fisher) == (B, K, B * K, fisherlab.FisherMode(mode))
    assert cap.grad.shape == (cap.p,) and cap.per_example_gradients().shape == (cap.N, cap.p)
    for lc in cap.layers:
        s = lc.spec
        if lc.storage is Storage.FACTORED:
            assert lc.a.shape == (B, lc.positions, s.d_in_bar)
            assert lc.g.shape == (B, K, lc.positions, s.d_out)
            if s.bias:  # the bias column of ā is 1
                assert torch.all(lc.a[..., -1] == 1)
        else:
            assert lc.dense.shape == (cap.N, s.numel)
    if mode == "mc":
        assert cap.sampled is not None and cap.sampled.shape[:2] == (K, B) and cap.seed is not None
    else:
        assert cap.sampled is None and cap.seed is None
    assert cap.loss_value == pytest.approx(
        float(fisherlab.capturing.losses.per_example_loss(cap.loss, model(x).detach().reshape(B, -1), y).mean()), rel=1e-12
    )


# ---- Monte-Carlo Fisher ------------------------------------------------------------------------


def _mc_fisher(model, x, y, loss, K: int, seed: int) -> torch.Tensor:
    cap = capture(model, x, y, loss, "mc", n_samples=K, generator=torch.Generator().manual_seed(seed))
    return dense_fisher_from_capture(cap)


def test_mc_error_drops_at_the_monte_carlo_rate(model_case, loss):
    """E‖F_K − F‖² ∝ 1/K: the RMS relative error over fixed seeds drops ≈ 4× from K to 16K."""
    model = build_model(model_case)
    x, y = make_batch(model_case, loss)
    cap = capture(model, x, y, loss, "exact")
    F = dense_fisher_from_capture(cap)
    errs = {
        K: torch.tensor([rel_err(_mc_fisher(model, x, y, loss, K, 1000 * K + s), F) for s in range(MC_SEEDS)])
        for K in (MC_K, 16 * MC_K)
    }
    rms = {K: float(e.pow(2).mean().sqrt()) for K, e in errs.items()}
    drop = rms[MC_K] / rms[16 * MC_K]
    lo, hi = MC_RATE_BAND
    assert lo <= drop <= hi, f"RMS error {rms}: drop {drop:.2f} not in {MC_RATE_BAND}"


def test_mc_fisher_is_unbiased(model_case, loss):
    """The average of M independent mc Fishers approaches the exact one within a few
    standard errors (and the standard error is small enough for this to mean something)."""
    model = build_model(model_case)
    x, y = make_batch(model_case, loss)
    F = dense_fisher_from_capture(capture(model, x, y, loss, "exact"))
    Fs = torch.stack([_mc_fisher(model, x, y, loss, MC_MEAN_K, s) for s in range(MC_MEAN_CAPTURES)])
    se = float(Fs.var(dim=0).sum().div(MC_MEAN_CAPTURES).sqrt())
    err = float((Fs.mean(0) - F).norm())
    assert se <= 0.1 * float(F.norm()), "too few captures for a meaningful expectation check"
    assert err <= MC_MEAN_SIGMAS * se, f"‖mean − exact‖ = {err:.3g} > {MC_MEAN_SIGMAS}·{se:.3g}"


# ---- ∇h ------------------------------------------------------------------------------------------


def test_grad_is_the_mean_loss_gradient(tiny_capture):
    cap, model, x, y = tiny_capture
    ref = cap.from_torch_order(mean_loss_gradient(model, x, y, cap.loss))
    assert rel_err(cap.grad, ref) <= EXACT_RTOL
    # round trip through the torch order
    assert torch.equal(cap.from_torch_order(cap.to_torch_order(cap.grad)), cap.grad)


def test_grad_equals_mean_of_empirical_rows(model_case, loss):
    """∇h = (1/B) Σ_b ∇ℓ_b: the stored gradient and the empirical Jacobian agree."""
    cap, *_ = make_capture(model_case, loss, "empirical")
    torch.testing.assert_close(cap.per_example_gradients().mean(0), cap.grad, rtol=EXACT_RTOL, atol=0)


# ---- storage ---------------------------------------------------------------------------------------


def test_dense_and_factored_storage_agree(tiny_capture, model_case, loss, mode):
    cap, *_ = tiny_capture
    dense, *_ = make_capture(model_case, loss, mode, storage="dense")
    fact, *_ = make_capture(model_case, loss, mode, storage="factored")
    assert all(lc.storage is Storage.DENSE for lc in dense.layers)
    assert all(lc.storage is Storage.FACTORED for lc in fact.layers)
    J = fact.per_example_gradients()
    assert rel_err(dense.per_example_gradients(), J) <= STORAGE_RTOL
    assert rel_err(cap.per_example_gradients(), J) <= STORAGE_RTOL  # "auto"
    # a dense Conv2d layer's ∇h block is a weight backward, not āᵀg: equal up to the summation order
    assert rel_err(dense.grad, fact.grad) <= STORAGE_RTOL
    for d, f in zip(dense.layers, fact.layers):  # the KFAC factors a dense layer keeps (2.25)–(2.27)
        A, G = kfac_factors_from(f.a, f.g)
        assert rel_err(d.A, A) <= STORAGE_RTOL and rel_err(d.G, G) <= STORAGE_RTOL


def test_storage_override_per_layer():
    case = MODELS["cnn"]
    first, last = "0", "4"
    cap, *_ = make_capture(case, "mse", "exact", storage={first: "factored", last: "dense"})
    assert cap.layer(first).storage is Storage.FACTORED  # "auto" would pick dense here
    assert cap.layer(last).storage is Storage.DENSE
    assert cap.layer("2").storage is Storage.FACTORED  # not named: "auto"
    ref, *_ = make_capture(case, "mse", "exact", storage="factored")
    assert rel_err(cap.per_example_gradients(), ref.per_example_gradients()) <= STORAGE_RTOL


def test_auto_picks_dense_for_a_conv_with_many_positions():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    cap = capture(model, x, torch.tensor([0, 2]), "cross_entropy", "exact")
    assert cap.layer("0").positions == 196
    assert cap.layer("0").storage is Storage.DENSE  # 3·10·4 numbers per example vs 196·(10 + 3·4)
    assert cap.layer("3").storage is Storage.FACTORED  # a Linear layer: factors are smaller


# ---- bad input: one clear line ---------------------------------------------------------------------


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _NanToNum(nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x)


def _mlp3() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def _nan_inputs():
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    return x


BAD = {
    # id: (model builder, inputs, targets, keyword arguments, error, message pattern)
    # in-place activations are handled, not refused: tests/test_user_model.py::test_inplace_*
    "layer-used-twice": (_Twice, None, None, {}, ValueError, r"layer 'lin' is called more than once"),
    "ce-float-targets": (_mlp3, None, torch.rand(4, 3), {}, ValueError, r"cross_entropy targets must be class indices"),
    "ce-class-out-of-range": (_mlp3, None, torch.tensor([0, 1, 2, 3]), {}, ValueError, r"must lie in \[0, 3\)"),
    "mse-target-shape": (_mlp3, None, torch.rand(4, 2), {"loss": "mse"}, ValueError, r"mse targets must have the output shape \(4, 3\)"),
    "batch-mismatch": (_mlp3, None, torch.tensor([0, 1, 2]), {}, ValueError, r"B=4 examples but targets have shape \(3,\)"),
    "unknown-loss": (_mlp3, None, None, {"loss": "hinge"}, ValueError, r"unknown loss 'hinge'"),
    "unknown-fisher": (_mlp3, None, None, {"fisher": "gauss"}, ValueError, r"unknown fisher mode 'gauss'"),
    "n-samples-zero": (_mlp3, None, None, {"n_samples": 0}, ValueError, r"n_samples must be a positive integer, got 0"),
    "n-samples-negative": (_mlp3, None, None, {"n_samples": -2}, ValueError, r"n_samples must be a positive integer"),
    "n-samples-float": (_mlp3, None, None, {"n_samples": 2.5}, ValueError, r"n_samples must be a positive integer"),
    "nan-inputs": (_mlp3, _nan_inputs(), None, {}, NonFiniteError, r"non-finite.*in the network outputs"),
    "nan-hidden-layer-input": (
        lambda: nn.Sequential(nn.Linear(3, 4), _NanToNum(), nn.Linear(4, 3)),
        _nan_inputs(), None, {}, NonFiniteError, r"non-finite.*inputs ā of layer '0'",
    ),
    "bad-dtype": (_mlp3, None, None, {"dtype": torch.float16}, ValueError, r"dtype must be torch.float32 or torch.float64"),
    "groups-conv": (
        lambda: nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten()),
        torch.randn(4, 2, 1, 1), None, {"loss": "mse"}, UnsupportedLayerError, r"layer '0': Conv2d with groups=2",
    ),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=list(BAD))
def test_bad_input_gives_one_clear_line(bad):
    build, x, y, kw, err, match = bad
    torch.manual_seed(0)
    model = build().train()
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(4, 3) if x is None else x
    kw = {"loss": "cross_entropy", "fisher": "mc", **kw}
    if y is None:
        y = torch.randint(0, 3, (4,)) if kw["loss"] == "cross_entropy" else torch.rand(4, 2)
    with pytest.raises(err, match=match) as info:
        fisherlab.capture(model, x, y, device="cpu", **kw)
    assert "\n" not in str(info.value)
    # the model is restored even when the capture fails half-way (hooks removed, train mode)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_unsupported_module_is_listed_and_the_rest_captured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model.train()
    model(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"not part of the Fisher: 1 \(BatchNorm1d\)"):
        cap = capture(model, x, y, "bce_logits", "empirical")
    assert cap.layout.names == ["0", "3"] and cap.layout.excluded == ("1 (BatchNorm1d)",)
    ref = cap.from_torch_order(per_example_loss_gradients(copy.deepcopy(model), x, y, "bce_logits").T).T
    assert rel_err(cap.per_example_gradients(), ref) <= EXACT_RTOL  # BatchNorm in eval mode


# ---- the model is left as it was; seeds; dtypes; devices -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["same-dtype", "copied"])
def test_model_is_left_as_it_was(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    model.train()
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # BatchNorm is listed
        cap = capture(model, x, y, "cross_entropy", "mc", n_samples=3, dtype=dtype)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    after = model.state_dict()  # parameters and BatchNorm running statistics untouched
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert cap.dtype == dtype
    # the capture ran in eval mode: Dropout off, so it is deterministic given the seed
    again = capture(model, x, y, "cross_entropy", "mc", n_samples=3, dtype=dtype, generator=torch.Generator().manual_seed(cap.seed))
    assert cap.equals(again)


def test_eval_mode_model_stays_in_eval_mode():
    model = build_model(MODELS["mlp"]).eval()
    x, y = make_batch(MODELS["mlp"], "mse")
    capture(model, x, y, "mse", "exact")
    assert not model.training


def test_seed_is_recorded_and_reproducible(model_case, loss):
    model = build_model(model_case)
    x, y = make_batch(model_case, loss)
    a = capture(model, x, y, loss, "mc", n_samples=3, generator=torch.Generator().manual_seed(1234))
    b = capture(model, x, y, loss, "mc", n_samples=3, generator=torch.Generator().manual_seed(1234))
    assert a.seed == b.seed == 1234 and a.equals(b)
    c = capture(model, x, y, loss, "mc", n_samples=3, generator=torch.Generator().manual_seed(1235))
    assert not torch.equal(a.per_example_gradients(), c.per_example_gradients())
    # no generator: a seed is drawn, recorded, and reproduces the capture
    d = capture(model, x, y, loss, "mc", n_samples=3)
    assert isinstance(d.seed, int)
    assert d.equals(capture(model, x, y, loss, "mc", n_samples=3, generator=torch.Generator().manual_seed(d.seed)))


def test_float32_by_default_and_float64_on_request(model_case):
    model = build_model(model_case)  # float64 parameters
    x, y = make_batch(model_case, "cross_entropy")
    c32 = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="exact", device="cpu")
    c64 = capture(model, x, y, "cross_entropy", "exact", dtype=torch.float64)
    assert c32.dtype == torch.float32 and c64.dtype == torch.float64
    assert all(t.dtype == torch.float32 for lc in c32.layers for t in (lc.a, lc.g, lc.dense) if t is not None)
    assert c32.per_example_gradients().dtype == torch.float32
    assert rel_err(c32.per_example_gradients().double(), c64.per_example_gradients()) <= FLOAT32_RTOL
    assert rel_err(c32.grad.double(), c64.grad) <= FLOAT32_RTOL
    # a float32 model captured in float64: computed in float64 on a copy
    m32 = copy.deepcopy(model).float()
    c = fisherlab.capture(m32, x.float(), y, loss="cross_entropy", fisher="exact", device="cpu", dtype=torch.float64)
    assert c.dtype == torch.float64 and next(m32.parameters()).dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_cpu_device(device):
    cap, *_ = make_capture(MODELS["cnn"], "mse", "empirical")
    model = build_model(MODELS["cnn"])
    x, y = make_batch(MODELS["cnn"], "mse")
    other = fisherlab.capture(
        model, x, y, loss="mse", fisher="empirical", device=device, dtype=torch.float64,
    )
    assert other.grad.device.type == "cpu" and torch.equal(other.grad, cap.grad)


def test_default_device_is_cpu_without_cuda():
    from fisherlab.capturing import default_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device().type == expected


def test_auto_storage_keeps_single_position_layers_factored():
    """A Linear layer with d_out = 1 has dense rows smaller than its factors, yet stays factored."""
    from fisherlab.capturing.record import Storage, choose_storage

    assert choose_storage(B=8, K=1, T=1, d_in_bar=6, d_out=1, storage="auto") is Storage.FACTORED
    assert choose_storage(B=8, K=1, T=196, d_in_bar=26, d_out=8, storage="auto") is Storage.DENSE
    assert choose_storage(B=8, K=1, T=1, d_in_bar=6, d_out=1, storage="dense") is Storage.DENSE
