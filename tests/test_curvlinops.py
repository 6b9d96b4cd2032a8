"""Cross-library: fisherlab's KFAC (expand), KFAC-reduce, FOOF and EKFAC against curvlinops
(``curvlinops-for-pytorch``, a test-only dependency installed with ``--no-deps``: see the Makefile)
on the same batch, after converting curvlinops' ``parameters_to_vector`` order to fisherlab's
(:attr:`fisherlab.layout.Layout.torch_index`). curvlinops has no KFOC/KPSVD, unit-wise or
mini-block; those are checked against their dense definitions in tests/test_block_methods.py.

Both libraries: the type-2 (exact) Fisher of the mean cross-entropy, [weight | bias] treated
jointly (``separate_weight_and_bias=False``), undamped (fisherlab's operator minus λI; the damping
conventions differ). Measured agreement: ≤ 7e-15 relative in the Frobenius norm.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherlab import methods

from cases import MODELS, make_capture

curvlinops = pytest.importorskip("curvlinops")

LAM = 0.1
RTOL = 1e-12
"""Same float64 sums in another order: ~1e-15 measured, margin 1e3."""


def _setup(case_id):
    cap, model, x, y = make_capture(MODELS[case_id], "cross_entropy", "exact", B=3, storage="factored")
    return cap, model, x, y, list(model.parameters())


def _dense_in_fisherlab_order(op, cap, params):
    P = sum(p.numel() for p in params)
    D = op @ torch.eye(P, dtype=torch.float64)
    idx = cap.layout.torch_index
    return D[idx][:, idx]


def _curvlinops(kind, model, params, x, y):
    kw = dict(separate_weight_and_bias=False, check_deterministic=False, progressbar=False)
    loss = nn.CrossEntropyLoss()
    if kind == "ekfac":
        return curvlinops.EKFACLinearOperator(model, loss, params, [(x, y)], fisher_type="type-2", **kw)
    fisher, approx = {"kfac": ("type-2", "expand"), "kfac-reduce": ("type-2", "reduce"), "foof": ("forward-only", "expand")}[kind]
    return curvlinops.KFACLinearOperator(model, loss, params, [(x, y)], fisher_type=fisher, kfac_approx=approx, **kw)


def _positions_scale(cap, kind):
    """FOOF only: fisherlab's input factor for a layer with T positions is the sum over positions
    (2.27, KFAC's split, where G carries the 1/T); curvlinops' forward-only A is the mean. The
    p_i × p_i block of fisherlab's FOOF is T times curvlinops' on such layers."""
    if kind != "foof":
        return torch.ones(cap.p, dtype=torch.float64)
    return torch.cat([torch.full((lc.spec.numel,), float(lc.positions), dtype=torch.float64) for lc in cap.layers])


@pytest.mark.parametrize("kind", ["kfac", "kfac-reduce", "foof", "ekfac"])
@pytest.mark.parametrize("case_id", ["mlp", "cnn"])
def test_agrees_with_curvlinops(case_id, kind):
    cap, model, x, y, params = _setup(case_id)
    key = "kfac-tikhonov" if kind == "kfac" else kind
    opts = {"damping_mode": "tikhonov"} if kind in ("kfac-reduce", "foof") else {}
    ours = methods.build(key, cap, LAM, **opts).to_dense() - LAM * torch.eye(cap.p, dtype=torch.float64)
    s = _positions_scale(cap, kind).sqrt()
    theirs = _dense_in_fisherlab_order(_curvlinops(kind, model, params, x, y), cap, params) * s[:, None] * s[None, :]
    assert float((ours - theirs).norm()) <= RTOL * float(theirs.norm())


def test_reduce_differs_from_expand_on_conv_in_both_libraries():
    cap, model, x, y, params = _setup("cnn")
    e = _dense_in_fisherlab_order(_curvlinops("kfac", model, params, x, y), cap, params)
    r = _dense_in_fisherlab_order(_curvlinops("kfac-reduce", model, params, x, y), cap, params)
    assert float((e - r).norm()) > 1e-3 * float(e.norm())
