"""KFOC's top Kronecker pair at ResNet-18 scale (issue 14): the solver before and after, per layer.

Loads a ResNet-18 capture (``scale_bench.py --pipeline --phases capture``; made here at
``/tmp/kfoc/run32.h5`` when missing) with ``fisherlab.store.load(path, "b0")`` and
``Jacobian.coerce`` (float64), then per layer:

* **after** — ``kronecker_svd(lj, 1)`` (``"auto"``: the ``"factors"`` path on Linear layers, dense
  or the r = 1 Lanczos from the KFAC start, stopped at ``LANCZOS_TOL``, with the cheaper product
  form and the reduced bases) and the top pair's eigendecomposition (``top_pair_eigh``): seconds,
  products by R or Rᵀ;
* **before** — the solver as it was (``solver="arpack", product="per-example", start="ones",
  tol=0``, full ``eigh`` of both factors). Its products are counted by running that ARPACK from
  ones with the fast products (the same iteration up to round-off; its result is the accuracy
  reference: ``rel`` = ‖A⊗G − A'⊗G'‖_F/‖A'⊗G'‖_F from the factors' Gram identities). Its seconds are
  ``count × one per-example product`` (timed on enough examples for ~2e11 flops and scaled by N —
  the cost is linear in the examples; the old code's ``[c, N, d_in', d_in']`` temporaries, 5.4 GB at
  layer4 B = 32 and 21 GB at B = 128, are not reproduced: the chunked product of the same flops is
  timed) ``+ forming M`` ``+ eigh`` of the two factors (timed once per dimension). ``--exact-old S``
  runs the old path for real on layers whose estimate is under S seconds, to check the estimate.

Then ``KFOC.from_capture(jac, λ)`` in total (after; a fresh Jacobian, so nothing cached).

    python analysis/bench/kfoc_bench.py                         # B = 32 (/tmp/kfoc/run32.h5)
    python analysis/bench/kfoc_bench.py --file /tmp/sb/run128.h5  # B = 128 (read only)
    python analysis/bench/kfoc_bench.py --layers layer4.1.conv2 --exact-old 120

Measured (2026-12-01, 2 shared cores, torch.set_num_threads(2), float64, mc K = 1, λ = 1e-3; the
machine was shared with two other jobs, load average 3–7 throughout, so every time is ~2–3× idle;
"old" is a real run of the old path where marked ``run`` by the script (layer1/layer2 and the
shortcuts at B = 32, ``--exact-old 30``), else the estimate described above — for layer2.1.conv1
35.8 s against 32.8–33.7 s run on the two layers of the same shape):

B = 32 (``/tmp/kfoc/run32.h5``, load 3.1–4.6), per layer: new = kronecker_svd + top_pair_eigh s
(products) vs old s (products)::

    conv1 0.06 (15) vs 0.1 (43)        layer1.* 1.2–1.8 (13–15) vs 4.9–5.7 (43)
    layer2.0.conv1 3.5 (15) vs 10.4    layer2.*.conv2, 2.1.conv1 11–13 (13) vs 33–36 (43)
    layer3.0.conv1 6.5 (13) vs 44      layer3.*.conv2, 3.1.conv1 14–24 (11–13) vs 158–250 (43)
    layer4.0.conv1 1.9 (11) vs 488     layer4.*.conv2, 4.1.conv1 6.7–10 (11–13) vs 1282–1855 (43)
    shortcuts 0.2–0.5 (11–13) vs 0.7–26; linear ("factors") 0.08 both
    sum over layers 134 s vs ~6150 s; KFOC.from_capture total (after) 145.5 s (load 4.4).

B = 128 (``/tmp/sb/run128.h5``, load 4.2–6.9): layer1.* 6.7–9.7 s (13–15) vs 18–33 (43);
layer2.0.conv1 15 s (13) vs 28; layer2.*.conv2, 2.1.conv1 45–56 s (11–13) vs 128–210;
layer3.0.conv1 28 s vs 255; layer3.*.conv2, 3.1.conv1 26–60 s (11) vs 764–928; layer4.0.conv1
29 s (11; not reduced: B·T = 2048 of 2304) vs 2317; layer4.*.conv2, 4.1.conv1 47–63 s (11–13;
reduced, of which the lifted eigh 21–30 s) vs 6674–7888; shortcuts 1.1–1.9 s; sum over layers
562 s vs ~27 500 s (7.6 h). KFOC.from_capture total (after): 382 s at load 3–6.

At lower load (23:34–23:44 UTC): KFOC.from_capture total 53.1 s at B = 32 (load 0.4–1.3) and
174.9 s at B = 128 (load 1.3–1.8). ``--new-only`` at B = 128 (load 1.6 rising to 3.9, sum 297 s):
layer1.* 2.1–2.5 s, layer2.0.conv1 4.9, layer2.*.conv2/2.1.conv1 13–20, layer3.0.conv1 12.6,
layer3.*.conv2/3.1.conv1 38–40 (of which eigh 5.2–5.5), layer4.0.conv1 14.7, layer4.*.conv2/4.1.conv1
29–31 (of which the lifted eigh 13.4–13.6), shortcuts 0.25–1.1, conv1 0.08, linear 0.08.

Products: the KFAC start and LANCZOS_TOL = 1e-10 take 11–15 products on every layer (ARPACK from ones
at tol = 0: 43 on every layer: its first 20-vector Lanczos cycle alone is 41). Start and stop,
measured at B = 32 on conv1, layer1.0.conv1, the three shortcuts, layer4.0.conv1, layer4.1.conv2
(products, and the error of the pair against the tol = 0 run): KFAC start 11–15 (1e-13 – 6e-11),
ones 11–15 (3e-13 – 9e-11) — the start saves 0–2 products, the gain is stopping the Lanczos when
converged; tol = 0 13–17 from KFAC, 13–19 from ones; tol = 1e-6 7–11 (3e-9 – 9e-7). Accuracy against that ARPACK (``rel``): 8e-14 – 1e-10 at B = 32
(21 layers), 8e-14 – 6e-12 on the 8 layers referenced at B = 128. Where the time goes now: the
dense-stored layer1/layer2 convs (per-example products, 2·N·d_out·d_in'·(d_in'+d_out) flops each,
at the GEMM rate) and layer3 (factored, dominated by the ``B·T·d_in'²`` GEMM); the reduced layer4
layers spend half their time in the complete QR of the lifted eigendecomposition.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

import fisherlab
from fisherlab.jacobian import Jacobian
from fisherlab.operators import KFOC, kronecker_svd
from fisherlab.operators.kfoc import _rearranged_maps, product_flops, product_form, top_pair_eigh

OLD = dict(solver="arpack", product="per-example", start="ones", tol=0.0, reduce="never")
"""The solver before issue 14 (scipy svds at tol = 0 from ones on the per-example products)."""
SUB_FLOPS = 2e11
"""One timed per-example product uses enough examples for about this many flops."""


def _load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _pair_rel(A, G, A0, G0) -> float:
    """‖A⊗G − A0⊗G0‖_F / ‖A0⊗G0‖_F without forming either: the difference is
    ``dA⊗G0 + A0⊗dG + dA⊗dG`` (dA = A − A0, dG = G − G0), whose norm² is Σ_ij ⟨P_i, P_j⟩⟨Q_i, Q_j⟩
    over its three terms (no cancellation between O(1) numbers)."""
    dA, dG = A - A0, G - G0
    P, Q = [dA, A0, dA], [G0, dG, dG]
    d2 = sum((P[i] * P[j]).sum() * (Q[i] * Q[j]).sum() for i in range(3) for j in range(3))
    return float(d2.clamp_min(0).sqrt() / (A0.norm() * G0.norm()))


_EIGH_S: dict[int, float] = {}


def _eigh_seconds(M: torch.Tensor) -> float:
    d = M.shape[0]
    if d not in _EIGH_S:
        t = time.perf_counter()
        torch.linalg.eigh((M + M.T) / 2)
        _EIGH_S[d] = time.perf_counter() - t
    return _EIGH_S[d]


def _old_product_seconds(lj) -> tuple[float, float]:
    """(seconds of one per-example product at N examples, seconds forming M), timed on a subset."""
    d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
    per_ex = 2 * lj.K * d_out * d_in * (d_in + d_out)
    b = max(1, min(lj.B, int(SUB_FLOPS // per_ex)))
    sub = type(lj)(lj.spec, b, lj.K, lj.a[:b] if lj.factored else None, lj.g[:b] if lj.factored else None,
                   None if lj.factored else lj.dense[: b * lj.K])
    t = time.perf_counter()
    R, RT = _rearranged_maps(sub, "per-example")
    t_form = time.perf_counter() - t
    X = torch.ones(1, d_out, d_out, dtype=torch.float64)
    Y = torch.ones(1, d_in, d_in, dtype=torch.float64)
    t = time.perf_counter()
    R(X)
    RT(Y)
    t_prod = (time.perf_counter() - t) / 2
    return t_prod * lj.B / b, t_form * lj.B / b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="/tmp/kfoc/run32.h5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-3, help="λ for KFOC.from_capture (absolute)")
    ap.add_argument("--layers", default=None, help="comma-separated layer names (default: all)")
    ap.add_argument("--exact-old", type=float, default=0.0, help="run the old path for real where its estimate is under this many seconds")
    ap.add_argument("--no-total", action="store_true", help="skip the KFOC.from_capture total")
    ap.add_argument("--reference", default="all",
                    help="layers (comma-separated names, or 'all') whose old ARPACK is run for its product count and as the "
                         "accuracy reference; the others take --old-products")
    ap.add_argument("--new-only", action="store_true", help="time the new solver only (no reference, no old estimate)")
    ap.add_argument("--old-products", type=int, default=43, help="the old ARPACK's products where not run (43 on every layer at B = 32)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not os.path.exists(args.file):
        os.makedirs(os.path.dirname(args.file) or ".", exist_ok=True)
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "scale_bench.py"), "--pipeline", "--batch", "32",
                        "--threads", str(args.threads), "--phases", "capture", "--file", args.file], check=True)
    cap = fisherlab.store.load(args.file, "b0")
    jac = Jacobian.coerce(cap)
    names = set(args.layers.split(",")) if args.layers else None
    print(f"{args.file}: B = {jac.B}, K = {jac.K}, {len(jac.layers)} layers; threads {args.threads}; {_load()}")
    hdr = f"{'layer':20s} {'T':>4s} {'d_in':>5s} {'d_out':>5s} {'solver/form':24s} {'new s':>7s} {'eigh s':>7s} {'prod':>5s} {'old s':>8s} {'prod':>5s} {'rel':>8s}"
    print(hdr)
    tot_new = tot_old = 0.0
    for lj in jac.layers:
        s = lj.spec
        if names is not None and s.name not in names:
            continue
        t = time.perf_counter()
        ks = kronecker_svd(lj, 1)
        t_new = time.perf_counter() - t
        t = time.perf_counter()
        top_pair_eigh(lj, ks)
        t_eigh = time.perf_counter() - t
        if args.new_only:
            n_old, rel, t_old, note = 0, float("nan"), float("nan"), "-"
        elif ks.solver in ("lanczos", "arpack"):
            if args.reference == "all" or s.name in args.reference.split(","):
                ref = kronecker_svd(lj, 1, "arpack", start="ones", tol=0.0, reduce="never")  # old iteration, fast products
                n_old, rel = ref.products, _pair_rel(ks.A[0], ks.G[0], ref.A[0], ref.G[0])
            else:
                n_old, rel = args.old_products, float("nan")
            t_prod, t_form = _old_product_seconds(lj)
            A1, G1 = ks.A[0], ks.G[0]
            t_old = n_old * t_prod + (t_form if lj.factored else 0.0) + _eigh_seconds(A1) + _eigh_seconds(G1)
            note = "est"
            if args.exact_old and t_old < args.exact_old:
                t = time.perf_counter()
                ko = kronecker_svd(lj, 1, **OLD)
                top_pair_eigh(lj, ko)
                t_old, note = time.perf_counter() - t, "run"
                n_old = ko.products
        else:  # factors / dense: unchanged by issue 14
            n_old, rel, t_old, note = 0, 0.0, t_new + t_eigh, "same"
        tot_new += t_new + t_eigh
        tot_old += t_old
        form = ks.solver + ("/" + ks.product if ks.product else "")
        print(f"{s.name:20s} {lj.T:4d} {s.d_in_bar:5d} {s.d_out:5d} {form:24s} {t_new:7.2f} {t_eigh:7.2f} {ks.products:5d} "
              f"{t_old:8.1f} {n_old:5d} {rel:8.1e} {note}", flush=True)
    print(f"{'sum over layers':20s} new {tot_new:.1f} s (kronecker_svd + top_pair_eigh), old {tot_old:.1f} s; {_load()}")
    if not args.no_total:
        jac2 = Jacobian.coerce(fisherlab.store.load(args.file, "b0"))
        t = time.perf_counter()
        KFOC.from_capture(jac2, args.damping)
        print(f"KFOC.from_capture total (after): {time.perf_counter() - t:.1f} s; {_load()}")


if __name__ == "__main__":
    main()
