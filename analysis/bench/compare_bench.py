"""The whole comparison table for one checkpoint of the mc-mode MNIST autoencoder.

``fisherlab.compare`` with every method (exact ζ by Woodbury, block-diagonal, KFAC with both
dampings, the block approximations of issue 11 — FOOF, EKFAC, KFAC-reduce, unit-wise, mini-block,
KFOC, KPSVD — the six coarse spaces, TKO exact and Kronecker, and ``ekfac+residuals`` as an example
of a composed key) on 784-1000-500-250-30-250-500-1000-784
(p ≈ 2.8 M), B = 256, ``bce_logits``, mc with K = 1, real MNIST digits, λ = 1e-3. Prints the
table, each method's time and the total, measured in one run.

Measured (2 shared cores, full width, B = 256, every method but ``exact``): total 80.7 s; build +
solve KFAC 3.68 s (it pays the factor eigendecompositions the others reuse), FOOF 0.61, EKFAC 0.90,
KFAC-reduce 0.57 (T = 1: KFAC's factors), mini-block(16) 1.89, KFOC 2.64, unit-wise 14.8 (Woodbury,
d_out Cholesky factors of B × B per layer), KPSVD(r = 2) 28.1 (CG), ekfac+residuals 1.45.

    python analysis/bench/compare_bench.py            # target: total < 30 s on 2 cores
    python analysis/bench/compare_bench.py --quick    # width 0.05, B = 32
"""

from __future__ import annotations

import argparse
import time

import torch

import fisherlab
from fisherlab import datasets, methods, models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=None, help="comma-separated keys (default: every base method but 'exact', plus ekfac+residuals)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.width = 32, 0.05
    if args.threads:
        torch.set_num_threads(args.threads)

    desc = models.describe("mnist-ae", width=args.width)
    model = models.build(desc, seed=0)
    data = datasets.load("mnist")
    x, y = data.batch(list(range(args.batch)))
    t0 = time.perf_counter()
    cap = fisherlab.capture(model, x, y, loss="bce_logits", fisher="mc", generator=torch.Generator().manual_seed(0), device="cpu")
    t_cap = time.perf_counter() - t0

    t0 = time.perf_counter()
    keys = args.methods.split(",") if args.methods else [
        k for k, m in methods.METHODS.items() if k != "exact"
    ] + ["ekfac+residuals"]
    table = fisherlab.compare(cap, args.damping, keys)
    total = time.perf_counter() - t0
    print(table)
    print("\nbuild + solve (s), next to KFAC's:")
    t_kfac = table.row("kfac")["seconds"]
    for r in table.rows:
        if r["seconds"] == r["seconds"]:
            print(f"  {r['method']:<18} {r['seconds']:8.3f}   ×{r['seconds'] / t_kfac:7.1f} KFAC")
    print(
        f"\ncapture {t_cap:.2f} s; compare: exact ζ {table.meta['exact_seconds']:.2f} s, "
        f"methods {sum(r['seconds'] for r in table.rows if r['seconds'] == r['seconds']):.2f} s, "
        f"total {total:.2f} s (target < 30 s); p = {cap.p:,}, B = {cap.B}, threads {torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
