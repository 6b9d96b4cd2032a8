"""BatchNorm: the eval-mode (running statistics) Fisher against the batch-coupled one (issue 13 item 5).

For each model, train it briefly in train mode (Adam; BatchNorm updates its running statistics),
then on independent batches capture

* the **eval** forward (``capture``'s default: running statistics, true per-example rows), and
* the **training** forward (``batch_statistics=True``: the batch's statistics, coupled examples),

and report, for BatchNorm outside the Fisher (``batchnorm="outside"``, fisherlab's default) and in
it (``"fisher"``):

* ``fisher``: ‖F_eval − F_batch‖_F / ‖F_batch‖_F, whole and per layer (min–max over layers),
  computed from Grams (‖JᵀJ‖_F = ‖JJᵀ‖_F, ⟨J₁ᵀJ₁, J₂ᵀJ₂⟩ = ‖J₁J₂ᵀ‖²_F): no p × p matrix;
* ``grad``: ‖∇h_eval − ∇h_train‖ / ‖∇h_train‖ (∇h_train is autograd's training gradient);
* ``coupling``: how much example 0's batch-statistics row changes when the other B − 1 examples
  of its batch are replaced (0 for the eval-mode rows, by construction).

    python analysis/bench/batchnorm_bench.py [--steps 300] [--batches 4] [-B 64] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

import fisherlab
from fisherlab import datasets, models

TRAIN_POOL = 20_000
"""examples the training batches are drawn from (the measured batches are disjoint from them)."""

PROBLEMS = {  # name: (model description, data set, loss)
    "cuda-convnet": (dict(name="cuda-convnet"), "cifar-standin", "cross_entropy"),
    "deep-linear-64": (dict(name="deep-linear-64"), "fashion-mnist", "cross_entropy"),
}


def _rows(cap) -> list[torch.Tensor]:
    return [lc.jacobian().double() for lc in cap.layers]


def fisher_gap(J1: torch.Tensor, J2: torch.Tensor) -> float:
    """‖J₁ᵀJ₁ − J₂ᵀJ₂‖_F / ‖J₂ᵀJ₂‖_F by N × N Grams."""
    a = (J1 @ J1.T).square().sum()
    b = (J2 @ J2.T).square().sum()
    c = (J1 @ J2.T).square().sum()
    return float(((a + b - 2 * c).clamp_min(0) / b).sqrt())


def train(model, x, y, loss: str, steps: int, B: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (B,), generator=g)
        z = model(x[idx]).reshape(B, -1)
        h = torch.nn.functional.cross_entropy(z, y[idx]) if loss == "cross_entropy" else 0.5 * (z - y[idx]).square().sum(1).mean()
        opt.zero_grad()
        h.backward()
        opt.step()


def training_gradient(model, x, y, loss: str, layout) -> torch.Tensor:
    m = copy.deepcopy(model).train()
    z = m(x).reshape(x.shape[0], -1)
    h = torch.nn.functional.cross_entropy(z, y) if loss == "cross_entropy" else 0.5 * (z - y).square().sum(1).mean()
    grads = torch.autograd.grad(h, list(m.parameters()))
    return layout.from_torch_order(torch.cat([g.reshape(-1) for g in grads]).double())


def measure(name: str, steps: int, batches: int, B: int, fisher: str, seed: int = 0) -> list[dict]:
    desc, data_name, loss = PROBLEMS[name]
    model = models.build(models.describe(desc["name"]), seed=seed)
    n_train = min(steps * B, TRAIN_POOL)  # training batches are drawn from it with replacement
    data = datasets.load(data_name, n=n_train + (batches + 1) * B, seed=seed, task="classification")
    x_all, y_all = data.x.reshape(data.x.shape[0], *_input_shape(model, data.x)), data.y
    train(model, x_all[:n_train], y_all[:n_train], loss, steps, B, seed)
    out = []
    for k in range(batches):
        sl = slice(n_train + k * B, n_train + (k + 1) * B)
        x, y = x_all[sl], y_all[sl]
        for bn in ("outside", "fisher"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the statistics lines: we know
                kw = dict(loss=loss, fisher=fisher, device="cpu", dtype=torch.float64, batchnorm=bn,
                          generator=torch.Generator().manual_seed(k))
                ev = fisherlab.capture(model.double().eval(), x.double(), y, **kw)
                model.train()
                tr = fisherlab.capture(model, x.double(), y, batch_statistics=True, **kw)
                # the other B − 1 examples replaced: example 0's coupled row moves
                x2 = torch.cat([x[:1], x_all[sl.start - B + 1 : sl.start]]).double()
                tr2 = fisherlab.capture(model, x2, torch.cat([y[:1], y_all[sl.start - B + 1 : sl.start]]), batch_statistics=True, **kw)
            J_ev, J_tr = _rows(ev), _rows(tr)
            layer = [fisher_gap(a, b) for a, b in zip(J_ev, J_tr)]
            whole = fisher_gap(torch.cat(J_ev, 1), torch.cat(J_tr, 1))
            g_tr = training_gradient(model, x.double(), y, loss, ev.layout)
            K = ev.K
            r1, r2 = torch.cat(J_tr, 1)[:K], torch.cat(_rows(tr2), 1)[:K]
            out.append(dict(
                problem=name, batchnorm=bn, batch=k, p=ev.p, fisher_whole=whole, fisher_layer_min=min(layer),
                fisher_layer_max=max(layer), grad=float((ev.grad.double() - g_tr).norm() / g_tr.norm()),
                grad_batch_vs_train=float((tr.grad.double() - g_tr).norm() / g_tr.norm()),
                coupling=float((r1 - r2).norm() / r1.norm()),
            ))
        model.float()
    return out


def _input_shape(model, x: torch.Tensor) -> tuple[int, ...]:
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    if isinstance(first, torch.nn.Conv2d):
        c = first.in_channels
        side = int(round((x[0].numel() / c) ** 0.5))
        return (c, side, side)
    return (first.in_features,)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--steps", type=int, default=300, help="Adam steps in train mode before measuring")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("-B", type=int, default=64)
    ap.add_argument("--fisher", default="exact", choices=["exact", "mc", "empirical"])
    ap.add_argument("--quick", action="store_true", help="10 steps, 1 batch, B = 16")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.batches, a.B = 10, 1, 16
    torch.set_num_threads(1)
    rows = []
    for name in a.problems:
        rows += measure(name, a.steps, a.batches, a.B, a.fisher)
    keys = ["fisher_whole", "fisher_layer_min", "fisher_layer_max", "grad", "grad_batch_vs_train", "coupling"]
    print(f"steps={a.steps} B={a.B} batches={a.batches} fisher={a.fisher}")
    print(f"{'problem':<16}{'batchnorm':<10}{'p':>8}  " + "  ".join(f"{k:>19}" for k in keys))
    for name in a.problems:
        for bn in ("outside", "fisher"):
            rs = [r for r in rows if r["problem"] == name and r["batchnorm"] == bn]
            cells = "  ".join(f"{min(r[k] for r in rs):8.3f}–{max(r[k] for r in rs):<8.3f}"[:19].rjust(19) for k in keys)
            print(f"{name:<16}{bn:<10}{rs[0]['p']:>8}  {cells}")
    return rows


if __name__ == "__main__":
    main()
