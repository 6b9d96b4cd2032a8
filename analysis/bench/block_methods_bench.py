"""The block approximations of issue 11 beside KFAC, and the whole ``compare``, in one run.

``fisherlab.compare`` with every registered method (``exact`` ζ by Woodbury is the reference, not a
row) and ``ekfac+residuals`` on the mc-mode MNIST autoencoder 784-1000-500-250-30-250-500-1000-784
(full width, p ≈ 2.8 M), B = 256, ``bce_logits``, K = 1, real MNIST digits, λ = 1e-3. Prints the
table, then each method's build + solve time (as ``compare`` measures it: pieces shared between
methods — KFAC's factor eigendecompositions, KFOC's top Kronecker pair reused by KPSVD — are paid
by the first method that needs them) next to KFAC's, and the total ``compare`` time, with the
threads and the machine's load average.

    python analysis/bench/block_methods_bench.py              # the benchmark (2 threads)
    python analysis/bench/block_methods_bench.py --quick      # width 0.05, B = 32 (a smoke run)
    python analysis/bench/block_methods_bench.py --methods kfac,unit-wise,kpsvd

Measured (2 shared cores, torch.set_num_threads(2), full width, B = 256, λ = 1e-3; 2026-12-01 under a
load average of 10–12 from other jobs, so every time is ~3–5× its idle value): build + solve (s)
beside KFAC's 11.17: foof 2.94, ekfac 3.00, kfac-reduce 2.62, diagonal 0.39, unit-wise 21.2 (1.9×
KFAC), mini-block 5.61, kfoc 8.89, kpsvd 21.2 (1.9×); compare total 186.7 s = 16.7× KFAC. Before
the issue-11 speed-ups (the previous session, idle machine): unit-wise 14.8 s = 4.0× KFAC's 3.68,
kpsvd 28.1 s = 7.6×, total 80.7 s = 21.9×. The target is a total ``compare`` < 60 s on an idle
2-core machine (16.3× KFAC's idle 3.68 s).

Measured idle (2026-12-01 21:26 UTC, load average 0.9–1.4, 2 threads): KFAC 2.48 s; foof 0.45,
ekfac 0.49, kfac-reduce 0.41, diagonal 0.07, unit-wise 3.27 (1.32× KFAC), mini-block 1.67, kfoc
1.87, kpsvd 4.48 (1.81×); the coarse corrections 0.6–2.6 s; **compare total 38.9 s** (target met).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import fisherlab
from fisherlab import datasets, methods, models

BLOCK_METHODS = ("foof", "ekfac", "kfac-reduce", "diagonal", "unit-wise", "mini-block", "kfoc", "kpsvd")
"""The one-level block approximations of issue 11 (and the diagonal), printed first."""


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "load average unknown"


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="width 0.05, B = 32")
    ap.add_argument("--methods", default=None, help="comma-separated keys (default: every method but 'exact', and ekfac+residuals)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.width = 32, 0.05
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, float]:
    load_before = _load()
    desc = models.describe("mnist-ae", width=args.width)
    model = models.build(desc, seed=0)
    x, y = datasets.load("mnist").batch(list(range(args.batch)))
    cap = fisherlab.capture(model, x, y, loss="bce_logits", fisher="mc", generator=torch.Generator().manual_seed(0), device="cpu")
    keys = args.methods.split(",") if args.methods else [k for k in methods.METHODS if k != "exact"] + ["ekfac+residuals"]
    if "kfac" not in keys:
        keys = ["kfac", *keys]
    t0 = time.perf_counter()
    table = fisherlab.compare(cap, args.damping, keys)
    total = time.perf_counter() - t0
    print(table)
    seconds = {r["method"]: float(r["seconds"]) for r in table.rows if r["seconds"] == r["seconds"]}
    t_kfac = seconds["kfac"]
    print(f"\nbuild + solve (s) beside KFAC's ({t_kfac:.3f} s), mnist-ae width {args.width:g}, B = {cap.B}, λ = {args.damping:g}:")
    order = [k for k in BLOCK_METHODS if k in seconds] + [k for k in seconds if k not in BLOCK_METHODS]
    print(f"  {'method':<18} {'seconds':>8} {'kfac':>8} {'× KFAC':>8}")
    for k in order:
        print(f"  {k:<18} {seconds[k]:8.3f} {t_kfac:8.3f} {seconds[k] / t_kfac:8.2f}")
    print(
        f"\ncompare total {total:.2f} s (exact ζ {table.meta['exact_seconds']:.2f} s, rows {sum(seconds.values()):.2f} s; "
        f"target < 60 s); p = {cap.p:,}, threads {torch.get_num_threads()}; {load_before} before, {_load()} after"
    )
    return {**seconds, "total": total}


if __name__ == "__main__":
    main()
