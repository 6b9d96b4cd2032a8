"""``tiny-gpt`` and its ``tiny-text`` data set (issue 11 item 7): Linear layers applied over the
sequence axis, per-position cross-entropy, expand vs reduce on a real model.

* the data set: windows of character tokens and their next tokens, seeded subsets, the vocabulary;
* the model: its description (``"dataset"``, input shape, T·V outputs, loss), the token/position
  embeddings and the LayerNorms outside the Fisher and listed;
* per-position cross-entropy: the loss is the sum over positions, S Sᵀ its Hessian (torch.func),
  mc draws per position from softmax(z_t); an exact capture of a small sequence model is the dense
  Fisher ``(1/B) Σ_b J_bᵀ Λ_b J_b`` by torch.func;
* the capture of tiny-gpt equals torch.func per-example gradients (empirical and mc);
* KFAC (expand) and KFAC-reduce differ on it, and agree when T = 1;
* ``compare`` with the default methods runs on it.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlab
from fisherlab import datasets, methods, models
from fisherlab.capturing import losses as L
from fisherlab.operators import KFAC, KFACReduce
from fisherlab.testing import dense_fisher, dense_fisher_from_capture, loss_hessians, per_example_loss_gradients

EXACT_RTOL = 1e-11
"""float64 capture vs torch.func on ≤ 60k parameters: ~1e-15 measured; margin 1e4."""
DRAW_ATOL = 0.03
"""Frequencies of 4,000 seeded draws vs softmax probabilities: σ ≤ 0.008, about 4σ."""
REDUCE_MIN_DIFF = 0.05
"""expand vs reduce on tiny-gpt (T = 32): the products differ by ~0.3–1 relative; far above round-off."""

B = 8
WIDTH = 0.5  # d = 24: every capture and compare here takes well under a second


def _quiet_build(desc: dict, seed: int = 0) -> nn.Module:
    return models.build(desc, seed=seed)


def _capture(model, x, y, fisher, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fisherlab: these modules have parameters but are not part of the Fisher")
        return fisherlab.capture(model, x, y, loss="cross_entropy", fisher=fisher, device="cpu", **kw)


@pytest.fixture(scope="module")
def gpt():
    desc = models.describe("tiny-gpt", width=WIDTH)
    data = datasets.load(desc["dataset"], n=64, seed=0)
    x, y = data.batch(range(B))
    return desc, _quiet_build(desc), x, y


# ---- the data set ------------------------------------------------------------------------------


def test_tiny_text_windows_and_next_tokens():
    full = datasets.load("tiny-text")
    vocab = datasets.vocabulary("tiny-text")
    text = datasets.TINY_TEXT_FILE.read_text(encoding="utf-8")
    T = datasets.TINY_TEXT_CONTEXT
    assert full.task == "next-token" and len(full) == len(text) - T
    assert vocab == "".join(sorted(set(text))) and full.info["vocab_size"] == len(vocab) and 64 <= len(vocab) <= 100
    x, y = full.batch([0, 5, len(full) - 1])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, T)
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert decode(x[1]) == text[5 : 5 + T] and decode(y[1]) == text[6 : 6 + T]
    assert decode(y[2])[-1] == text[-1]
    sub = datasets.load("tiny-text", n=50, seed=3)
    xs, ys = sub.batch(range(50))
    assert xs.shape == (50, T) and torch.equal(ys[:, :-1], xs[:, 1:])  # next-token targets
    assert all(decode(r) in text for r in xs[:5])
    assert torch.equal(datasets.load("tiny-text", n=50, seed=3).x, xs) and not torch.equal(datasets.load("tiny-text", n=50, seed=4).x, xs)
    with pytest.raises(fisherlab.errors.ConfigError, match="has no vocabulary"):
        datasets.vocabulary("mnist")


# ---- the model ---------------------------------------------------------------------------------


def test_description_names_its_data_set_and_outputs(gpt):
    desc, model, x, y = gpt
    V = len(datasets.vocabulary(desc["dataset"]))
    assert desc["dataset"] == "tiny-text" == models.default_data(desc) and desc["vocab_size"] == V
    assert desc["loss"] == "cross_entropy" and desc["input_shape"] == [32] and desc["n_outputs"] == 32 * V
    assert model(x).shape == (B, 32, V)
    assert desc["n_params"] == sum(p.numel() for p in model.parameters())


def test_embeddings_and_layernorms_are_outside_the_fisher_and_listed(gpt):
    desc, model, x, y = gpt
    with pytest.warns(UserWarning, match=r"not part of the Fisher: tok \(Embedding\), pos \(Embedding\)"):
        cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="empirical", device="cpu")
    assert set(cap.layout.excluded) == {
        "tok (Embedding)", "pos (Embedding)", "ln_f (LayerNorm)",
        *(f"blocks.{i}.{n} (LayerNorm)" for i in range(2) for n in ("ln1", "ln2")),
    }
    per_block = ["attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2"]
    assert cap.layout.names == [f"blocks.{i}.{n}" for i in range(2) for n in per_block] + ["head"]
    outside = sum(p.numel() for n, p in model.named_parameters() if "ln" in n or n.startswith(("tok", "pos")))
    assert cap.p + outside == desc["n_params"]
    assert all(lc.positions == 32 for lc in cap.layers)  # every Linear sees the 32 positions


# ---- per-position cross-entropy ----------------------------------------------------------------


def test_per_position_cross_entropy_sums_positions_and_its_hessian_factor():
    g = torch.Generator().manual_seed(0)
    Bz, T, V = 3, 4, 5
    z = torch.randn(Bz, T * V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (Bz, T), generator=g)
    L.check_targets("cross_entropy", z, y)
    assert L.target_positions("cross_entropy", y) == T and L.target_positions("cross_entropy", y[:, 0]) == 1
    ref = F.cross_entropy(z.reshape(-1, V), y.reshape(-1), reduction="none").reshape(Bz, T).sum(1)
    assert torch.allclose(L.per_example_loss("cross_entropy", z, y), ref, rtol=1e-14)
    grad = torch.func.vmap(torch.func.grad(lambda zb, yb: L.per_example_loss("cross_entropy", zb[None], yb[None]).sum()))(z, y)
    assert torch.allclose(L.output_gradient("cross_entropy", z, y), grad, rtol=1e-13, atol=1e-15)
    S = L.hessian_sqrt("cross_entropy", z, positions=T)
    H = torch.func.vmap(torch.func.hessian(lambda zb, yb: L.per_example_loss("cross_entropy", zb[None], yb[None]).sum()))(z, y)
    assert torch.allclose(S @ S.mT, H, rtol=1e-12, atol=1e-15)
    ys = L.sample_targets("cross_entropy", z, 4000, torch.Generator().manual_seed(1), positions=T)
    assert ys.shape == (4000, Bz, T)
    freq = F.one_hot(ys, V).double().mean(0)  # [B, T, V]
    assert float((freq - torch.softmax(z.reshape(Bz, T, V), -1)).abs().max()) <= DRAW_ATOL
    with pytest.raises(ValueError, match=r"cross_entropy targets must be class indices of shape \[3\] or \[3, T\]"):
        L.check_targets("cross_entropy", z, torch.zeros(Bz, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        L.check_targets("cross_entropy", z, torch.full((Bz, T), 5))


class _Seq(nn.Module):
    """Embedding → Linear over positions → tanh → Linear head: a sequence model small enough for
    the exact mode (K = T·V)."""

    def __init__(self, V: int = 5, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = nn.Linear(d, 6)
        self.head = nn.Linear(6, V)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_capture_of_a_sequence_model_is_the_dense_fisher(fisher):
    torch.manual_seed(0)
    model = _Seq().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, 5, (4, 3), generator=g)
    cap = _capture(model, x, y, fisher, dtype=torch.float64)
    assert cap.K == (15 if fisher == "exact" else 1)
    ref = dense_fisher(copy.deepcopy(model), x, y, "cross_entropy", fisher)  # torch order, all parameters
    keep = cap.from_torch_order(torch.eye(ref.shape[0], dtype=torch.float64)).T  # [P_torch, p] selector
    Fd = keep.T @ ref @ keep
    assert float((dense_fisher_from_capture(cap) - Fd).norm()) <= EXACT_RTOL * float(Fd.norm())
    assert loss_hessians(model, x, y, "cross_entropy").shape == (4, 15, 15)


# ---- the capture of tiny-gpt vs torch.func -----------------------------------------------------


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_capture_equals_torch_func_per_example_gradients(gpt, fisher):
    desc, model, x, y = gpt
    model = copy.deepcopy(model).double()
    K = 2 if fisher == "mc" else 1
    cap = _capture(model, x, y, fisher, dtype=torch.float64, n_samples=K, generator=torch.Generator().manual_seed(7))
    if fisher == "mc":
        assert cap.sampled.shape == (K, B, 32)
        rows = torch.stack([per_example_loss_gradients(copy.deepcopy(model), x, cap.sampled[k], "cross_entropy") for k in range(K)], 1)
        rows = rows.reshape(B * K, -1) / math.sqrt(K)
    else:
        rows = per_example_loss_gradients(copy.deepcopy(model), x, y, "cross_entropy")
    ref = cap.from_torch_order(rows.T).T  # [N, p]
    got = cap.per_example_gradients()
    assert float((got - ref).norm()) <= EXACT_RTOL * float(ref.norm())
    grad = cap.from_torch_order(per_example_loss_gradients(copy.deepcopy(model), x, y, "cross_entropy").mean(0))
    assert float((cap.grad.double() - grad).norm()) <= EXACT_RTOL * float(grad.norm())


# ---- expand vs reduce --------------------------------------------------------------------------


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["pi", "tikhonov"])
def test_kfac_expand_and_reduce_differ_on_positions_and_agree_when_one(gpt, mode):
    desc, model, x, y = gpt
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cap = _capture(model, x, y, "mc", storage="factored", generator=torch.Generator().manual_seed(0))
    w = v[: cap.p]
    lam = 1e-3
    expand, reduce = KFAC.from_capture(cap, lam, mode), KFACReduce.from_capture(cap, lam, mode)
    assert _rel(reduce @ w, expand @ w) >= REDUCE_MIN_DIFF
    assert _rel(reduce.solve(w), expand.solve(w)) >= REDUCE_MIN_DIFF
    one = _capture(model, x[:, :1], y[:, :1], "mc", storage="factored", generator=torch.Generator().manual_seed(0))  # T = 1
    assert all(lc.positions == 1 for lc in one.layers)
    e1, r1 = KFAC.from_capture(one, lam, mode), KFACReduce.from_capture(one, lam, mode)
    assert _rel(r1 @ w, e1 @ w) <= 1e-12 and _rel(r1.solve(w), e1.solve(w)) <= 1e-12


# ---- compare -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:compare. worse than the zero step")
def test_compare_with_the_default_methods_runs(gpt):
    desc, model, x, y = gpt
    cap = _capture(model, x, y, "mc", generator=torch.Generator().manual_seed(0))
    table = fisherlab.compare(cap, fisherlab.Damping(1e-3, "max"))
    keys = methods.default_keys()
    assert [r["method"] for r in table.rows] == keys
    finite = [k for k in keys if k != "tko-kronecker"]  # (3.18) needs Linear layers with one position
    assert all(math.isfinite(table.row(k)["energy_error"]) for k in finite)
    assert "one position" in table.row("tko-kronecker")["note"]
    assert table.row("block-diagonal")["energy_error"] < table.row("kfac")["energy_error"]
