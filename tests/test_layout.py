import pytest
import torch
from torch import nn

from fisherlab.layout import Layout, unvec, vec
from fisherlab.errors import UnsupportedLayerError

from cases import build_model


def test_vec_stacks_columns_and_kronecker_identity():
    torch.manual_seed(0)
    G, X, A = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    M = torch.arange(6.0).reshape(2, 3)
    assert vec(M).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert torch.equal(unvec(vec(M), 2, 3), M)
    # (A ⊗ G) vec(X) = vec(G X Aᵀ)
    torch.testing.assert_close(torch.kron(A, G) @ vec(X), vec(G @ X @ A.T), rtol=1e-13, atol=0)
    # vec(g āᵀ) = ā ⊗ g
    g, a = torch.randn(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(vec(torch.outer(g, a)), torch.kron(a, g), rtol=1e-14, atol=0)


def test_converters_are_inverse_permutations(model_case):
    model = build_model(model_case)
    lay = Layout.from_model(model)
    theta_t = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert lay.torch_numel == theta_t.numel() == lay.p
    idx = lay.torch_index
    assert torch.equal(idx.sort().values, torch.arange(lay.p))  # a permutation
    v = torch.randn(lay.p, 2, dtype=torch.float64)
    assert torch.equal(lay.from_torch_order(lay.to_torch_order(v)), v)
    assert torch.equal(lay.to_torch_order(lay.from_torch_order(theta_t)), theta_t)


def test_fisherlab_order_is_column_stacked_weight_then_bias(model_case):
    model = build_model(model_case)
    lay = Layout.from_model(model)
    theta = lay.parameters_vector(model)
    named = dict(model.named_modules())
    for spec, block in zip(lay.layers, lay.split(theta)):
        m = named[spec.name]
        M = lay.layer_matrix(m.weight.detach(), None if m.bias is None else m.bias.detach())
        assert M.shape == (spec.d_out, spec.d_in_bar)
        assert torch.equal(block, vec(M))


def test_unsupported_modules_are_listed_and_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"not part of the Fisher: 1 \(BatchNorm1d\)"):
        lay = Layout.from_model(model)
    assert lay.names == ["0", "2"]
    assert lay.torch_numel == sum(p.numel() for p in model.parameters())
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    back = lay.to_torch_order(lay.from_torch_order(w))
    bn = slice(16, 24)  # BatchNorm weight and bias in torch order
    assert torch.all(back[bn] == 0) and torch.equal(back[:16], w[:16]) and torch.equal(back[24:], w[24:])


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(2, 2, 2, padding="same"), "asymmetrically"),
    ],
)
def test_refused_configurations_say_what_and_where(module, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        Layout.from_model(nn.Sequential(module))


def test_model_without_supported_layers():
    with pytest.raises(UnsupportedLayerError, match="no supported layer"):
        Layout.from_model(nn.Sequential(nn.BatchNorm1d(3)), warn=False)


def test_json_round_trip(model_case):
    lay = Layout.from_model(build_model(model_case))
    assert Layout.from_json(lay.to_json()) == lay
