"""BatchNorm in the Fisher (issue 13 item 5): ``capture(..., batchnorm="fisher")``.

An affine BatchNorm1d/2d is a layer of kind ``batchnorm`` with ā = [1] and g = the per-example
gradient row w.r.t. ``[γ; β]``. Checked against float64 ``torch.func`` twins (eval mode: running
statistics), for an MLP with BatchNorm1d and a CNN with BatchNorm2d (followed by an in-place
ReLU), mse and cross_entropy, empirical, mc and exact; KFAC's BatchNorm block against the exact
block; the store; and the batch-statistics capture, which must state itself.
"""

from __future__ import annotations

import copy
import math
import warnings

import h5py
import pytest
import torch
from torch import nn

import fisherlab
from fisherlab import store
from fisherlab.errors import ConfigError
from fisherlab.layout import LayerKind, Layout
from fisherlab.operators import KFAC, ExactFisher
from fisherlab.testing import dense_fisher, dense_fisher_from_capture, dense_kfac_factors, per_example_loss_gradients

# ---- named tolerances -------------------------------------------------------------------------
EXACT_RTOL = 1e-10
"""float64 identities (capture vs autograd): only rounding differs, observed ≈ 1e-16."""
DAMPING = 0.1
"""λ of the operator checks (tiny nets: F matters, the references are well conditioned)."""
FLOAT32_RTOL = 1e-4
"""the training-gradient check of a float32 batch-statistics capture (float32 rounding)."""

D_Y = 3
B = 5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, D_Y))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
        nn.Conv2d(3, 2, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(8, D_Y),
    )


def _seq() -> nn.Module:
    """BatchNorm1d on ``[B, C, L]`` (positions summed into the row) before a Linear seen at L positions."""
    return nn.Sequential(nn.BatchNorm1d(2), Transpose(), nn.Linear(2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, D_Y))


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


MODELS = {"mlp-bn1d": (_mlp, (4,)), "cnn-bn2d": (_cnn, (2, 4, 4)), "seq-bn1d": (_seq, (2, 4))}


def build(case: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode with non-trivial running statistics, γ and β; and a batch of inputs."""
    make, shape = MODELS[case]
    torch.manual_seed(seed)
    model = make().double()
    model.train()
    with torch.no_grad():
        model(3 * torch.randn(16, *shape, dtype=torch.float64) + 1)  # running statistics ≠ (0, 1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    model.eval()
    return model, torch.randn(B, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))


def targets(loss: str, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, D_Y, (B,), generator=g) if loss == "cross_entropy" else torch.randn(B, D_Y, dtype=torch.float64, generator=g)


def capture(model, x, y, loss, fisher, **kw):
    kw.setdefault("batchnorm", "fisher")
    return fisherlab.capture(model, x, y, loss=loss, fisher=fisher, device="cpu", dtype=torch.float64, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def in_fisherlab_order(cap, M: torch.Tensor) -> torch.Tensor:
    return cap.from_torch_order(cap.from_torch_order(M).T).T


def bn_layers(cap) -> list[int]:
    return [i for i, s in enumerate(cap.layout.layers) if s.kind is LayerKind.BATCHNORM]


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def case(request):
    return request.param


@pytest.fixture(params=["mse", "cross_entropy"])
def loss(request):
    return request.param


# ---- the layout ------------------------------------------------------------------------------


def test_batchnorm_layer_spec_and_parameter_order():
    model, _ = build("mlp-bn1d")
    lay = Layout.from_model(model, batchnorm="fisher")
    assert lay.names == ["0", "1", "3"] and lay.excluded == ()
    s = lay.layers[1]
    assert (s.kind, s.d_in, s.d_in_bar, s.d_out, s.numel, s.bias) == (LayerKind.BATCHNORM, 1, 1, 12, 12, False)
    assert lay.p == lay.torch_numel == sum(p.numel() for p in model.parameters())
    bn = model[1]
    theta = lay.parameters_vector(model)
    assert torch.equal(lay.block(theta, "1"), torch.cat([bn.weight, bn.bias]).detach())  # [γ; β]
    v = torch.randn(lay.p, dtype=torch.float64)
    assert torch.equal(lay.from_torch_order(lay.to_torch_order(v)), v)
    assert Layout.from_json(lay.to_json()) == lay
    with pytest.warns(UserWarning, match=r"not part of the Fisher: 1 \(BatchNorm1d\)"):
        assert Layout.from_model(model).names == ["0", "3"]  # the default: outside, as before


def test_unknown_batchnorm_choice_is_one_line():
    model, x = build("mlp-bn1d")
    with pytest.raises(ConfigError, match=r"batchnorm must be one of 'outside', 'fisher', got 'in'") as info:
        capture(model, x, targets("mse"), "mse", "empirical", batchnorm="in")
    assert "\n" not in str(info.value)


def test_non_affine_and_other_norms_stay_outside():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"not part of the Fisher: 3 \(LayerNorm\)"):
        lay = Layout.from_model(model, batchnorm="fisher")
    assert lay.names == ["0", "2", "4"]  # affine=False: no parameters at all


# ---- per-example rows and Fishers vs torch.func (eval mode) ---------------------------------


def test_empirical_rows_are_torch_func_per_example_gradients(case, loss):
    model, x = build(case)
    y = targets(loss)
    cap = capture(model, x, y, loss, "empirical")
    assert bn_layers(cap)
    ref = cap.from_torch_order(per_example_loss_gradients(copy.deepcopy(model), x, y, loss).T).T  # [B, p]
    assert cap.p == ref.shape[1]  # every parameter is in the Fisher
    assert rel_err(cap.per_example_gradients(), ref) <= EXACT_RTOL
    for i in bn_layers(cap):
        s = cap.layout.layers[i]
        assert rel_err(cap.per_example_gradients(i), ref[:, s.offset : s.stop]) <= EXACT_RTOL
    assert rel_err(cap.grad, ref.mean(0)) <= EXACT_RTOL  # ∇h


def test_mc_rows_are_per_example_gradients_of_the_drawn_targets(case, loss):
    model, x = build(case)
    K = 3
    cap = capture(model, x, targets(loss), loss, "mc", n_samples=K, generator=torch.Generator().manual_seed(5))
    rows = torch.stack([  # [B, K, P]: row (b, k) = ∂_θ L(ŷ_{b,k}, f(x_b)) / √K
        per_example_loss_gradients(copy.deepcopy(model), x, cap.sampled[k], loss) for k in range(K)
    ], dim=1) / math.sqrt(K)
    ref = cap.from_torch_order(rows.reshape(B * K, -1).T).T
    assert rel_err(cap.per_example_gradients(), ref) <= EXACT_RTOL


def test_dense_storage_of_a_batchnorm_layer_gives_the_same_rows():
    model, x = build("cnn-bn2d")
    y = targets("mse")
    fac = capture(model, x, y, "mse", "exact")
    den = capture(model, x, y, "mse", "exact", storage={"1": "dense"})
    assert den.layer("1").dense is not None and fac.layer("1").a is not None
    assert rel_err(den.per_example_gradients(), fac.per_example_gradients()) <= EXACT_RTOL


def test_exact_fisher_operator_equals_dense_reference_with_batchnorm(case, loss):
    """The whole ExactFisher (F + λI, its solve) against (1/B) Σ J_fᵀΛJ_f + λI by torch.func."""
    model, x = build(case)
    y = targets(loss)
    cap = capture(model, x, y, loss, "exact")
    F = in_fisherlab_order(cap, dense_fisher(copy.deepcopy(model), x, y, loss, "exact"))
    assert rel_err(dense_fisher_from_capture(cap), F) <= EXACT_RTOL
    Fb = F + DAMPING * torch.eye(cap.p, dtype=torch.float64)
    op = ExactFisher(cap, DAMPING)
    assert rel_err(op.to_dense(), Fb) <= EXACT_RTOL
    assert rel_err(op.solve(cap.grad), torch.linalg.solve(Fb, cap.grad)) <= EXACT_RTOL


def test_kfac_batchnorm_block_is_the_exact_block(case):
    model, x = build(case)
    cap = capture(model, x, targets("cross_entropy"), "cross_entropy", "exact", storage="factored")
    F = dense_fisher_from_capture(cap)
    factors = dense_kfac_factors(cap)
    tik = KFAC.from_capture(cap, DAMPING, "tikhonov")
    pi_op = KFAC.from_capture(cap, DAMPING, "pi")
    for i in bn_layers(cap):
        s = cap.layout.layers[i]
        block = F[s.offset : s.stop, s.offset : s.stop]
        A, G = factors[i]
        assert torch.equal(A, torch.ones(1, 1, dtype=torch.float64))  # ā = [1]
        assert rel_err(torch.kron(A, G), block) <= EXACT_RTOL  # A ⊗ G = the exact block
        damped = block + DAMPING * torch.eye(s.numel, dtype=torch.float64)
        assert rel_err(tik.blocks[i].to_dense(), damped) <= EXACT_RTOL
        # π-damping (2.30) with A = 1: (1 + π√λ)F_ii + (√λ/π + λ)I, π² = 1/(tr F_ii / 2C)
        pi, sq = math.sqrt(s.numel / float(torch.trace(block))), math.sqrt(DAMPING)
        expect = (1 + pi * sq) * block + (sq / pi + DAMPING) * torch.eye(s.numel, dtype=torch.float64)
        assert rel_err(pi_op.blocks[i].to_dense(), expect) <= EXACT_RTOL


# ---- the store ---------------------------------------------------------------------------------


def test_store_round_trip_and_layer_table(tmp_path):
    model, x = build("cnn-bn2d")
    cap = capture(model, x, targets("mse"), "mse", "mc", n_samples=2, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "bn.h5"
    fisherlab.save(cap, path, checkpoint="c0", step=0)
    back = fisherlab.load(path, "c0")
    assert back.layout == cap.layout
    assert all(a.equals(b) for a, b in zip(back.layers, cap.layers)) and torch.equal(back.grad, cap.grad)
    info = store.list_checkpoints(path)[0]
    assert [li.kind for li in info.layers] == ["conv2d", "batchnorm", "conv2d", "linear"]
    assert fisherlab.load(path, "c0", layers=["1"]).layout.names == ["1"]


def test_v1_file_with_batchnorm_layers_reads_and_stays_v1(tmp_path, monkeypatch):
    model, x = build("mlp-bn1d")
    y = targets("cross_entropy")
    path = tmp_path / "old.h5"
    monkeypatch.setattr(store, "SCHEMA_VERSION", 1)
    fisherlab.save(capture(model, x, y, "cross_entropy", "empirical"), path, checkpoint="a", step=0)
    monkeypatch.undo()
    second = capture(model, 2 * x, y, "cross_entropy", "empirical")
    fisherlab.save(second, path, checkpoint="b", step=1)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["schema_version"]) == 1
    assert fisherlab.load(path, "b").layer("1").equals(second.layer("1"))


# ---- train- vs eval-mode statistics --------------------------------------------------------------


def test_batch_statistics_capture_states_itself_and_is_the_training_forward(tmp_path):
    model, x = build("cnn-bn2d")
    y = targets("cross_entropy")
    model.train()
    model[3].eval()  # (a Conv: no effect, but its flag must come back)
    before = [m.training for m in model.modules()]
    stats = copy.deepcopy(model[1].state_dict())
    with pytest.warns(UserWarning, match=r"capture with batch statistics \(BatchNorm '1'\): the examples are coupled"):
        cap = capture(model, x, y, "cross_entropy", "empirical", batch_statistics=True)
    assert cap.meta["batch_statistics"] is True
    assert [m.training for m in model.modules()] == before
    after = model[1].state_dict()  # running averages not updated by the capture
    assert all(torch.equal(after[k], stats[k]) for k in stats)
    # ∇h is the training gradient (train-mode forward, mean loss), BatchNorm parameters included
    train = copy.deepcopy(model)
    z = train(x).reshape(B, -1)
    torch.nn.functional.cross_entropy(z, y).backward()
    ref = cap.from_torch_order(torch.cat([p.grad.reshape(-1) for p in train.parameters()]))
    assert rel_err(cap.grad, ref) <= EXACT_RTOL
    # ... and the eval-mode capture's ∇h is not (the two statistics differ)
    model.eval()
    assert rel_err(capture(model, x, y, "cross_entropy", "empirical").grad, ref) > 0.01
    # the file records it
    fisherlab.save(cap, tmp_path / "bs.h5", checkpoint="c", step=0)
    assert fisherlab.load(tmp_path / "bs.h5", "c").meta["batch_statistics"] is True


def test_batch_statistics_rows_sum_to_the_batch_gradient_in_float32():
    """Rows under batch statistics are backpropagated vectors: their mean is still ∇h."""
    model, x = build("mlp-bn1d")
    model.train()
    y = targets("mse")
    with pytest.warns(UserWarning, match="capture with batch statistics"):
        cap = fisherlab.capture(model, x.float(), y.float(), loss="mse", fisher="empirical", device="cpu",
                                dtype=torch.float32, batch_statistics=True, batchnorm="fisher")
    assert rel_err(cap.per_example_gradients().double().mean(0), cap.grad.double()) <= FLOAT32_RTOL


def test_train_mode_model_captured_in_eval_mode_is_told():
    model, x = build("mlp-bn1d")
    model.train()
    with pytest.warns(UserWarning, match=r"BatchNorm '1' in train mode captured in eval mode with the running statistics"):
        cap = capture(model, x, targets("mse"), "mse", "empirical")
    assert "batch_statistics" not in cap.meta
    model.eval()
    with pytest.warns(UserWarning, match="no BatchNorm is in train mode"):
        capture(model, x, targets("mse"), "mse", "empirical", batch_statistics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eval-mode capture of an eval-mode model says nothing
        capture(model, x, targets("mse"), "mse", "empirical")


def test_capture_checkpoints_and_cli_take_batchnorm(tmp_path):
    from fisherlab.cli import main

    model, x = build("mlp-bn1d")
    y = targets("cross_entropy")
    ckpt = tmp_path / "step_1.pt"
    torch.save(model.float().state_dict(), ckpt)
    # the workflow: a user model by file path
    src = tmp_path / "bnmodels.py"
    src.write_text(
        "from torch import nn\n"
        "def factory():\n"
        "    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))\n"
    )
    from fisherlab.workflows.checkpoints import capture_checkpoints

    out = tmp_path / "run.h5"
    capture_checkpoints(f"{src}:factory", [ckpt], x.float(), y, out, loss="cross_entropy", fisher="empirical",
                        device="cpu", batchnorm="fisher", progress=False)
    cap = fisherlab.load(out, "step_1")
    assert cap.layout.names == ["0", "1", "3"] and cap.layout.layers[1].kind is LayerKind.BATCHNORM
    assert "batch_statistics" not in cap.meta
    npz = tmp_path / "data.npz"
    import numpy as np

    np.savez(npz, x=x.float().numpy(), y=y.numpy())
    out2 = tmp_path / "cli.h5"
    rc = main(["capture", "--model", f"{src}:factory", "--checkpoints", str(ckpt), "--data", str(npz), "-B", str(B),
               "--loss", "cross_entropy", "--fisher", "empirical", "--device", "cpu", "--batchnorm", "fisher",
               "--out", str(out2), "--quiet"])
    assert rc == 0
    assert [s.kind.value for s in fisherlab.load(out2, "step_1").layout.layers] == ["linear", "batchnorm", "linear"]
